import t from 'tap'
import { spawn } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { exits, q, run, sh, tempDir, vma, vmaCmd, VMA } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { buildArchive } from './helpers/vma-builder.js'

t.test('help lists every command and the exit codes', async t => {
  const r = await vma(['--help'])
  exits(t, r, 0)
  for (const word of ['list', 'config', 'verify', 'extract', 'Exit codes', '130', '143']) t.match(r.stdout.toString(), word)
  const none = await vma([])
  exits(t, none, 2, 'no command is a usage error')
  for (const cmd of ['list', 'config', 'verify', 'extract']) {
    const h = await vma([cmd, '--help'])
    exits(t, h, 0)
    t.match(h.stdout.toString(), new RegExp(`Usage: vma ${cmd}`))
    t.match(h.stdout.toString(), /Example/)
  }
  t.match((await vma(['--version'])).stdout.toString(), /^vmapipe \d+\.\d+\.\d+\n$/)
})

t.test('usage errors exit 2 with a hint', async t => {
  for (const args of [['frobnicate'], ['list'], ['list', 'a', 'b'], ['extract', 'a', '--nope'], ['verify', '--log-level', 'loud', 'x']]) {
    const r = await vma(args)
    exits(t, r, 2, `vma ${args.join(' ')}`)
    t.notMatch(r.stderr, /at .*\.js:\d+/, 'no stack trace')
  }
})

t.test('a missing or unreadable input exits 3', async t => {
  const r = await vma(['list', '/nonexistent/x.vma'])
  exits(t, r, 3)
  t.equal(failure(r).code, 'E_IO')
  t.match(failure(r).msg, '/nonexistent/x.vma', 'naming the input')
  const d = await vma(['verify', '/'])
  exits(t, d, 3)
})

t.test('a progress bar appears on a terminal, not in a pipe', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(31))
  // script(1) gives the command a pseudo-terminal on stderr.
  const r = await sh(`script -qec ${q(`${vmaCmd} verify ${q(fx.archive)} -q; ${vmaCmd} extract ${q(fx.archive)} ${q(join(dir, 'o'))}`)} /dev/null`)
  exits(t, r, 0)
  t.match(r.stdout.toString(), /extract \[[#.]+\]\s+\d+% .* ETA /, 'bar with percentage and ETA')
  t.notMatch(r.stdout.toString(), /verify \[/, '-q hides the bar')
  const piped = await vma(['extract', fx.archive, join(dir, 'p')])
  t.notMatch(piped.stderr, /\[#/, 'no bar when stderr is not a terminal')
})

t.test('SIGTERM mid-extraction: exit 143, every file removed', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(32))
  const bytes = buildArchive(fx.spec)
  const out = join(dir, 'out')
  const child = spawn(process.execPath, [VMA, 'extract', '-', out], { stdio: ['pipe', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  child.stdin.on('error', () => {}) // the rest of the input meets a closed pipe
  // Half the archive, then wait until files exist before pulling the plug.
  child.stdin.write(bytes.subarray(0, bytes.length >> 1))
  for (let i = 0; i < 100 && !(existsSync(out) && readdirSync(out).length > 0); i++) await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(existsSync(out), 'extraction had started')
  child.kill('SIGTERM')
  const code = await new Promise(resolve => child.on('close', resolve))
  t.equal(code, 143, 'exit 143', { stderr })
  t.notOk(existsSync(out), 'the target directory it created is gone')
  t.equal(failure({ stderr }).code, 'E_INTERRUPTED')
})

t.test('extract to a broken pipe is an I/O failure, not a crash', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(33))
  const r = await run('bash', ['-c', `set -o pipefail; ${vmaCmd} extract ${q(fx.archive)} - -d scsi0 | head -c 1000 > /dev/null`])
  exits(t, r, 3, 'exit 3 (the output went away)')
  t.equal(failure(r).code, 'E_IO')
  t.notMatch(r.stderr, /Unhandled|TypeError|at .*\.js:\d+/, 'no crash')
})
