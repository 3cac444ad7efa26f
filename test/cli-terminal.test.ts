/**
 * Issue 11, the CLI at a terminal and in cron: errors a person can read, -q
 * that never hides an error, Ctrl-C and SIGTERM, no binary on a terminal.
 * Terminal behaviour runs under a pseudo-terminal from script(1).
 */
import t, { type Test } from 'tap'
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, have, q, run, sh, tempDir, vma, vmaCmd, PACK_VMA, VMA } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture, writeJob } from './helpers/fixtures.js'
import { buildArchive } from './helpers/vma-builder.js'

const packCmd = `${q(process.execPath)} ${q(PACK_VMA)}`

/**
 * Runs a shell command line with stdin, stdout and stderr on a
 * pseudo-terminal; returns what the terminal showed, as lines, progress bar
 * frames left out.
 */
async function onTerminal (command: string): Promise<{ code: number | null, lines: string[] }> {
  const r = await sh(`script -qfec ${q(command)} /dev/null`)
  const lines = r.stdout.toString().split(/\r?\n|\r\x1b\[K/).map(l => l.replace(/\r/g, '')).filter(l => l !== '' && !/ ETA /.test(l))
  return { code: r.code, lines }
}

t.test('errors a person can read: one plain line and a hint on a terminal, JSON lines otherwise', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(111))
  const damaged = join(dir, 'damaged.vma')
  const bytes = readFileSync(fx.archive)
  bytes[40] ^= 0xff // inside the header, under its MD5
  writeFileSync(damaged, bytes)

  const tty = await onTerminal(`${vmaCmd} extract ${q(damaged)} ${q(join(dir, 'out'))}`)
  t.equal(tty.code, 1, 'exit 1: the archive is invalid')
  t.match(tty.lines[0], /^vma: header checksum mismatch: .* \(E_VMA_HEADER_MD5, byte \d+\)$/, 'what, code and byte on one line')
  t.match(tty.lines[1], /^vma: hint: .*vma verify/, 'then the hint')
  t.equal(tty.lines.length, 2, 'nothing else', { lines: tty.lines })
  t.notOk(existsSync(join(dir, 'out')), 'no target left')

  const missing = await onTerminal(`${vmaCmd} list ${q(join(dir, 'nope.vma'))}`)
  t.equal(missing.code, 3, 'exit 3: cannot open')
  t.match(missing.lines.join('\n'), /^vma: cannot open .*nope\.vma.* \(E_IO\)$/m)
  t.notMatch(missing.lines.join('\n'), /"level"/, 'no JSON on a terminal')

  const json = await onTerminal(`${vmaCmd} extract --log-format json ${q(damaged)} ${q(join(dir, 'out'))}`)
  t.equal(json.code, 1)
  const line = JSON.parse(json.lines[0]) as { code: string, offset: number, hint: string }
  t.equal(line.code, 'E_VMA_HEADER_MD5', '--log-format json on a terminal: JSON lines')
  t.type(line.offset, 'number')

  const piped = await vma(['extract', damaged, join(dir, 'out')])
  exits(t, piped, 1)
  t.equal((JSON.parse(piped.stderr.trim().split('\n')[0]) as { code: string }).code, 'E_VMA_HEADER_MD5', 'stderr not a terminal: JSON lines, as before')

  const text = await vma(['extract', '--log-format', 'text', damaged, join(dir, 'out')])
  exits(t, text, 1)
  t.match(text.stderr, /^vma: header checksum mismatch: .* \(E_VMA_HEADER_MD5, byte \d+\)\n/, '--log-format text in a pipe')

  const badFormat = await vma(['list', '--log-format', 'xml', fx.archive])
  exits(t, badFormat, 2, 'an unknown log format is a usage error')
  t.match(badFormat.stderr, /--log-format xml/)
})

t.test('a successful run on a terminal ends with a human summary, not JSON', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(112))
  const out = join(dir, 'out')
  const r = await onTerminal(`${vmaCmd} extract ${q(fx.archive)} ${q(out)}`)
  t.equal(r.code, 0)
  t.match(r.lines.at(-1), /^vma: .*test\.vma extracted into .*out: qemu-server\.conf, .*disk-drive-scsi0\.raw.* in \d+\.\d s$/)
  t.notOk(r.lines.some(l => l.startsWith('{')), 'no JSON line', { lines: r.lines })
  t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), fx.sources.get('drive-scsi0') as string), 'and the disk is right')
  const quiet = await onTerminal(`${vmaCmd} verify -q ${q(fx.archive)} > /dev/null`)
  t.equal(quiet.code, 0)
  t.same(quiet.lines, [], '-q: no summary, no bar')
})

t.test('vma backup on a terminal: plain lines and a summary; the log file keeps JSON', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, Buffer.alloc(1 << 20, 9))
  mkdirSync(join(dir, 'dump'))
  const logFile = join(dir, 'job.log')
  const job = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk }], target: join(dir, 'dump'), compression: 'none', log: { file: logFile, stderr: true } })
  const r = await onTerminal(`${vmaCmd} backup ${q(job)}`)
  t.equal(r.code, 0)
  t.match(r.lines.at(-1), /^vma: .*vzdump-qemu-100-[\d_-]+\.vma written, [\d.]+ [KM]iB from 1\.00 MiB of disk in \d+\.\d s$/)
  t.notOk(r.lines.some(l => l.includes('{"level"')), 'no JSON on the terminal', { lines: r.lines })
  const logged = readFileSync(logFile, 'utf8').trim().split('\n').map(l => JSON.parse(l) as { msg: string, result?: string })
  t.equal(logged.at(-1)?.msg, 'backup job done', 'the file ends with the JSON summary')
  t.equal(logged.at(-1)?.result, 'ok')
  const archive = readdirSync(join(dir, 'dump')).find(n => n.endsWith('.vma')) as string
  const back = await vma(['extract', join(dir, 'dump', archive), '-'])
  t.ok(back.stdout.equals(readFileSync(disk)), 'and the archive holds the disk')
})

t.test('-q never hides an error: vma backup -q with a job that logs to a file', async t => {
  const dir = tempDir(t)
  // As examples/backup-job.json: logs go to a file, not to stderr.
  const job = writeJob(dir, {
    vmid: 100,
    disks: [{ name: 'drive-scsi0', path: join(dir, 'no-such-disk.raw') }],
    target: join(dir, 'dump'),
    log: { file: join(dir, 'log', 'job.log'), stderr: false, level: 'info' },
  })
  mkdirSync(join(dir, 'dump'))
  const r = await vma(['backup', '-q', job])
  exits(t, r, 3)
  t.equal(failure(r).code, 'E_IO')
  t.match(failure(r).msg, /no-such-disk\.raw/, 'the error names the missing disk')
  t.match(r.stderr, /"result":"failed"/)
  t.match(readFileSync(join(dir, 'log', 'job.log'), 'utf8'), /no-such-disk\.raw/, 'and the log file has it too')
  const ok = await vma(['list', '-q', writeFixture(dir, multiDeviceSpec(113)).archive])
  exits(t, ok, 0)
  t.equal(ok.stderr, '', '-q on success: nothing on stderr')
})

/** The command a cron line or a systemd ExecStart= runs, as arguments after `vma`. */
function exampleArgs (file: string, pattern: RegExp): string[] {
  const text = readFileSync(new URL(`../../examples/${file}`, import.meta.url), 'utf8')
  const m = pattern.exec(text)
  if (m === null) throw new Error(`${file}: no vma command line`)
  return m[1].trim().split(/\s+/)
}

t.test('the cron and systemd examples make a failed job visible', async t => {
  const dir = tempDir(t)
  const job = writeJob(dir, {
    vmid: 100,
    disks: [{ name: 'drive-scsi0', path: join(dir, 'gone.raw') }],
    target: join(dir, 'dump'),
    log: { file: join(dir, 'job.log'), stderr: false },
  })
  mkdirSync(join(dir, 'dump'))
  const examples = [['vmapipe-backup.cron', /^[^#\n]*\broot\s+vma\s+(.*)$/m], ['vmapipe-backup@.service', /^ExecStart=\S*\/vma\s+(.*)$/m]] as const
  for (const [file, pattern] of examples) {
    const args = exampleArgs(file, pattern)
    t.match(args.at(-1), /^\/etc\/vmapipe\/.*\.json$/, `${file}: the job file comes last`)
    const r = await vma([...args.slice(0, -1), job])
    exits(t, r, 3, `${file}: exit 3`)
    t.match(r.stderr, /gone\.raw/, `${file}: the error reaches stderr (cron mails it, the journal keeps it)`)
  }
  t.match(readFileSync(new URL('../../examples/vmapipe-backup.cron', import.meta.url), 'utf8'), /^MAILTO=/m, 'cron mails the output somewhere')
})

/** Starts `vma extract - OUT` in its own process group, fed half of `input`, and waits until files appear. */
async function halfExtract (t: Test, input: Buffer, out: string): Promise<{ child: ChildProcess, result: Promise<{ code: number | null, stderr: string }> }> {
  const child = spawn(process.execPath, [VMA, 'extract', '-', out], { stdio: ['pipe', 'pipe', 'pipe'], detached: true, env: { ...process.env, NODE_OPTIONS: '' } })
  if (child.stdin === null || child.stderr === null) throw new Error('no pipes')
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  child.stdin.on('error', () => {})
  const result = new Promise<{ code: number | null, stderr: string }>(resolve => child.on('close', code => resolve({ code, stderr })))
  child.stdin.write(input.subarray(0, input.length >> 1))
  for (let i = 0; i < 100 && !(existsSync(out) && readdirSync(out).length > 0); i++) await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(existsSync(out), 'extraction had started')
  return { child, result }
}

t.test('Ctrl-C: SIGINT to the process group exits 130 with "interrupted", also on a compressed archive', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(114))
  const inputs: Array<[string, Buffer]> = [['plain', readFileSync(fx.archive)]]
  if (have('zstd')) inputs.push(['zstd', spawnSync('zstd', ['-q', '-c', fx.archive], { maxBuffer: 1 << 26 }).stdout])
  for (const [kind, input] of inputs) {
    const out = join(dir, `out-${kind}`)
    const { child, result } = await halfExtract(t, input, out)
    process.kill(-(child.pid as number), 'SIGINT') // as a terminal's ^C: every process of the group
    const r = await result
    t.equal(r.code, 130, `${kind}: exit 130`, { stderr: r.stderr })
    t.equal(failure(r).code, 'E_INTERRUPTED', `${kind}: E_INTERRUPTED`)
    t.notMatch(r.stderr, /E_COMPRESSED_DATA|"level":50,[^\n]*"code":"E_(?!INTERRUPTED)/, `${kind}: the signal is the reason given, not a torn stream`)
    t.notOk(existsSync(out), `${kind}: the target directory is gone`)
  }
})

t.test('Ctrl-C stops a command that has nothing to clean up at once: exit 130', async t => {
  // vma list waiting for an archive that does not come: nothing written, nothing to wait for.
  const child = spawn(process.execPath, [VMA, 'list', '--log-level', 'debug', '-'], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  const closed = new Promise<number | null>(resolve => child.on('close', resolve))
  // The debug line 'starting' comes once the signal handlers are in place.
  await new Promise<void>(resolve => child.stderr.on('data', (b: Buffer) => { stderr += b.toString(); if (stderr.includes('starting')) resolve() }))
  child.kill('SIGINT')
  t.equal(await closed, 130, 'exit 130 while stdin is still open', { stderr })
  t.match(failure({ stderr }), { code: 'E_INTERRUPTED', signal: 'SIGINT' })
  child.stdin.end()
})

t.test('SIGTERM exits 143 and cleans up', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(115))
  const out = join(dir, 'out')
  const { child, result } = await halfExtract(t, buildArchive(fx.spec), out)
  child.kill('SIGTERM')
  const r = await result
  t.equal(r.code, 143, 'exit 143', { stderr: r.stderr })
  t.match(failure(r), { code: 'E_INTERRUPTED', signal: 'SIGTERM' })
  t.notOk(existsSync(out), 'the target directory is gone')
})

t.test('no binary on a terminal: refused with a hint, exit 2; a file or a pipe works', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(116))
  const disk = fx.sources.get('drive-efidisk0') as string
  for (const [what, command, remedy] of [
    ['vma extract ARCHIVE', `${vmaCmd} extract ${q(fx.archive)} -d efidisk0`, /TARGETDIR/],
    ['vma extract ARCHIVE -', `${vmaCmd} extract ${q(fx.archive)} - -d efidisk0`, /> disk\.raw/],
    ['pack-vma', `${packCmd} ${q(disk)}`, /-o FILE/],
    ['vma create -', `${vmaCmd} create - -d drive-scsi0=${q(disk)}`, /OUT file/],
  ] as const) {
    const r = await onTerminal(command)
    t.equal(r.code, 2, `${what}: exit 2`, { lines: r.lines })
    t.match(r.lines[0], /not written to a terminal/, `${what}: says why`)
    t.match(r.lines[0], remedy, `${what}: says what to do instead`)
    t.ok(r.lines.every(l => l.length < 300 && /^(vma|pack-vma): /.test(l)), `${what}: only messages, no binary`, { lines: r.lines })
  }
  const file = join(dir, 'efi.raw')
  const redirected = await onTerminal(`${vmaCmd} extract -q ${q(fx.archive)} -d efidisk0 > ${q(file)}`)
  t.equal(redirected.code, 0, '> file works')
  t.ok(cmp(file, disk), 'and writes the disk')
  const piped = await onTerminal(`${vmaCmd} extract -q ${q(fx.archive)} - -d efidisk0 | cat > ${q(file + '.2')}`)
  t.equal(piped.code, 0, 'a pipe works')
  t.ok(cmp(file + '.2', disk))
  const packed = join(dir, 'packed.vma')
  const pack = await onTerminal(`${packCmd} -q ${q(disk)} > ${q(packed)} && ${vmaCmd} extract -q ${q(packed)} - > ${q(file + '.3')}`)
  t.equal(pack.code, 0, 'pack-vma > file works')
  t.ok(cmp(file + '.3', disk), 'and the archive holds the disk')
  const created = await run('sh', ['-c', `${vmaCmd} create - -d drive-scsi0=${q(disk)} | ${vmaCmd} extract - - > ${q(file + '.4')}`])
  exits(t, created, 0, 'vma create - into a pipe')
  t.ok(cmp(file + '.4', disk))
})
