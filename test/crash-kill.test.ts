/**
 * kill -9 in the middle of `vma extract` and `vma create`: what the dead run
 * left is recognised by the next run (its owner, pid and start time, is in
 * the name) and removed, and a live run's files are never touched.
 */
import t, { type Test } from 'tap'
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { VMA, cmp, exits, run as runTool, tempDir, vma } from './helpers/run.js'
import { failure, logged } from './helpers/logged.js'
import { Rng, makeDisk } from './helpers/random.js'
import { createHash } from 'node:crypto'
import { hostname } from 'node:os'

const SIZE = 8 << 20

/** The real CLI with its stdin a pipe that the test feeds. */
function start (t: Test, args: string[]): { child: ChildProcess, done: Promise<{ code: number | null, stderr: string }>, stderr: () => string } {
  const child = spawn(process.execPath, [VMA, ...args], { stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  let stderr = ''
  child.stderr?.on('data', (b: Buffer) => { stderr += b.toString() })
  child.stdin?.on('error', () => {})
  const done = new Promise<{ code: number | null, stderr: string }>(resolve => child.on('close', code => { resolve({ code, stderr }) }))
  return { child, done, stderr: () => stderr }
}

async function until (t: Test, what: string, test: () => boolean): Promise<void> {
  for (let i = 0; i < 400 && !test(); i++) await new Promise(resolve => setTimeout(resolve, 25))
  t.ok(test(), what)
}

const entries = (dir: string, prefix: string): string[] => { try { return readdirSync(dir).filter(f => f.startsWith(prefix)) } catch { return [] } }
/** Bytes of the files under the staging directories in `dir`. */
const stagedBytes = (dir: string): number =>
  entries(dir, '.vmapipe-partial-').flatMap(s => readdirSync(join(dir, s)).map(f => statSync(join(dir, s, f)).size)).reduce((a, b) => a + b, 0)

/** Starts `vma extract - target ...` fed the first half of the archive, and waits until it has written some of the disk. */
async function extractCaughtWriting (t: Test, archive: Buffer, target: string, extra: string[] = []): Promise<ReturnType<typeof start>> {
  const run = start(t, ['extract', '-', target, ...extra])
  run.child.stdin?.write(archive.subarray(0, archive.length >> 1))
  await until(t, 'the run is caught writing its staging', () => entries(target, '.vmapipe-partial-').length === 1 && stagedBytes(target) > 0)
  return run
}

async function kill (run: ReturnType<typeof start>): Promise<void> {
  run.child.kill('SIGKILL')
  await run.done
}

t.test('SIGKILL during vma extract: the rerun clears the dead run\'s staging, with or without --force; a live run\'s staging is left alone', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, makeDisk(new Rng(801), SIZE))
  const archivePath = join(dir, 'a.vma')
  exits(t, await vma(['create', archivePath, '-d', `drive-scsi0=${disk}`]), 0)
  const archive = readFileSync(archivePath)

  await t.test('into a new directory: a plain rerun adopts it', async t => {
    const target = join(dir, 'new')
    await kill(await extractCaughtWriting(t, archive, target))
    t.equal(entries(target, '.vmapipe-partial-').length, 1, 'the killed run left its staging')
    const rerun = await vma(['extract', archivePath, target])
    exits(t, rerun, 0, 'the rerun completes')
    t.match(logged(rerun).find(l => l.level === 40)?.msg, /removed \.vmapipe-partial-\S+ from .*, left by an extract that is gone/, 'and says what it removed')
    t.ok(cmp(join(target, 'disk-drive-scsi0.raw'), disk), 'the disk is whole')
    t.same(readdirSync(target), ['disk-drive-scsi0.raw'], 'nothing stale remains')
  })

  await t.test('into an existing empty directory (--force): the rerun removes the staging and still needs --force', async t => {
    const target = join(dir, 'existing')
    mkdirSync(target)
    await kill(await extractCaughtWriting(t, archive, target, ['--force']))
    const plain = await vma(['extract', archivePath, target])
    exits(t, plain, 3)
    t.equal(failure(plain).code, 'E_TARGET_EXISTS')
    t.match(failure(plain).msg, /; removed \.vmapipe-partial-\S+, left by an extract that is gone/, 'the message says the staging was cleared')
    t.match(failure(plain).hint, /--force/, 'and the hint that --force is wanted')
    t.same(readdirSync(target), [], 'the stale staging is gone')
    exits(t, await vma(['extract', archivePath, target, '--force']), 0)
    t.ok(cmp(join(target, 'disk-drive-scsi0.raw'), disk))
  })

  await t.test('a live run\'s staging is never removed by another run', async t => {
    const target = join(dir, 'live')
    const live = await extractCaughtWriting(t, archive, target)
    const staging = entries(target, '.vmapipe-partial-')
    for (const args of [[], ['--force']]) {
      const other = await vma(['extract', archivePath, target, ...args])
      exits(t, other, 3, `a second run${args.join(' ')} is refused`)
      t.equal(failure(other).code, 'E_TARGET_EXISTS')
      t.match(failure(other).msg, new RegExp(`being extracted into by pid ${live.child.pid} right now`))
      t.same(entries(target, '.vmapipe-partial-'), staging, 'the live staging is still there')
    }
    live.child.stdin?.end(archive.subarray(archive.length >> 1))
    exits(t, { ...(await live.done), stdout: Buffer.alloc(0) }, 0, 'the live run completes')
    t.ok(cmp(join(target, 'disk-drive-scsi0.raw'), disk))
    t.same(readdirSync(target), ['disk-drive-scsi0.raw'])
  })

  await t.test('an image built aside for stdout (--format qcow2 from a pipe): the next such run clears the dead run\'s', async t => {
    const tmp = join(dir, 'tmp')
    mkdirSync(tmp)
    const run = start(t, ['extract', '-', '-', '--format', 'qcow2', '--tmpdir', tmp])
    run.child.stdin?.write(archive.subarray(0, archive.length >> 1))
    const built = (): number =>
      entries(tmp, 'vmapipe-image-').flatMap(d => readdirSync(join(tmp, d)).map(f => statSync(join(tmp, d, f)).size)).reduce((a, b) => a + b, 0)
    await until(t, 'the run is caught building its image', () => built() > 1 << 20)
    await kill(run)
    t.equal(entries(tmp, 'vmapipe-image-').length, 1, 'the killed run left its image')
    const rerun = await vma(['extract', '-', '-', '--format', 'qcow2', '--tmpdir', tmp], { stdin: { file: archivePath } })
    exits(t, rerun, 0)
    t.same(readdirSync(tmp), [], 'nothing stale remains')
    writeFileSync(join(dir, 'out.qcow2'), rerun.stdout)
    exits(t, await runTool('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', join(dir, 'out.qcow2'), disk]), 0, 'the image is the disk')
  })

  await t.test('a reused pid (same pid, another start time) is a dead owner; another host\'s or an unknown owner is not', async t => {
    // An owner is written PID-START-HOST, HOST the first 8 hex digits of the host name's SHA-256.
    const [pid, host] = [process.pid, createHash('sha256').update(hostname()).digest('hex').slice(0, 8)]
    const cases: Array<[string, string, number, RegExp?]> = [
      ['reused', `.vmapipe-partial-${pid}-1-${host}-nAbCdEf`, 0],
      ['another host', `.vmapipe-partial-${pid}-1-00000000-nAbCdEf`, 3, /the staging of an extract on another host/],
      ['an older version', '.vmapipe-partial-Xy12Zq', 3, /whose owner cannot be told .*force to remove it/],
    ]
    for (const [name, staging, code, mention] of cases) {
      const target = join(dir, `owner-${name.replace(/\W/g, '-')}`)
      mkdirSync(join(target, staging), { recursive: true })
      writeFileSync(join(target, staging, 'disk-drive-scsi0.raw'), 'x')
      const r = await vma(['extract', archivePath, target])
      exits(t, r, code, `${name}: exit ${code}`)
      if (mention !== undefined) {
        t.equal(failure(r).code, 'E_TARGET_EXISTS')
        t.match(failure(r).msg, mention)
        t.same(entries(target, '.vmapipe-partial-'), [staging], `${name}: left alone`)
      }
    }
    const older = join(dir, 'owner-an-older-version')
    exits(t, await vma(['extract', archivePath, older, '--force']), 0, '--force clears an unknown owner\'s staging')
    t.same(readdirSync(older), ['disk-drive-scsi0.raw'])
  })
})

t.test('SIGKILL during vma create: the next run removes the dead run\'s temporary file, never a live run\'s', async t => {
  const dir = tempDir(t)
  const data = makeDisk(new Rng(901), SIZE)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, data)
  const out = join(dir, 'out.vma')
  const partials = (): string[] => entries(dir, '.out.vma.partial-')
  const creating = (): ReturnType<typeof start> => {
    const run = start(t, ['create', out, '-d', `size=${SIZE}:drive-scsi0=-`])
    run.child.stdin?.write(data.subarray(0, SIZE >> 1))
    return run
  }
  const victim = creating()
  await until(t, 'the run is caught writing', () => partials().length === 1 && statSync(join(dir, partials()[0])).size > 1 << 20)
  await kill(victim)
  const [stale] = partials()
  t.ok(stale !== undefined && statSync(join(dir, stale)).size > 1 << 20, 'the killed run left a temporary file of some size')
  t.match(stale, new RegExp(`^\\.out\\.vma\\.partial-${victim.child.pid}-\\d+-[0-9a-f]{8}-[0-9a-f]{8}$`), 'its name says whose it is')

  const live = creating()
  await until(t, 'the next run is writing', () => partials().length === 1 && partials()[0] !== stale)
  await until(t, 'and says so', () => live.stderr().includes('\n'))
  t.match(live.stderr(), /removed \.out\.vma\.partial-\S+, left by a run that is gone/, 'it removed the dead run\'s file and said so')
  const [livePartial] = partials()
  const other = await vma(['create', out, '-d', `drive-scsi0=${disk}`])
  exits(t, other, 0, 'a run beside the live one completes')
  t.same(partials(), [livePartial], 'and leaves the live run\'s file alone')
  exits(t, await vma(['extract', out, join(dir, 'x')]), 0)
  t.ok(cmp(join(dir, 'x', 'disk-drive-scsi0.raw'), disk), 'the archive holds the disk')
  live.child.stdin?.end(data.subarray(SIZE >> 1))
  const ended = await live.done
  t.equal(ended.code, 3, 'the live run, given the rest, finds OUT taken meanwhile and does not replace it (no --force)')
  t.equal(failure(ended).code, 'E_TARGET_EXISTS')
  t.same(partials(), [], 'and removes its own temporary file')
  exits(t, await vma(['extract', out, join(dir, 'y')]), 0)
  t.ok(cmp(join(dir, 'y', 'disk-drive-scsi0.raw'), disk), 'OUT is still the other run\'s archive')
})
