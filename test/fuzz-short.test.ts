/**
 * The fuzzer's short run, part of npm test: the first cases of seed 1 for
 * each parser; any crash, hang, memory or qemu-img mismatch fails the
 * parser's test, naming the failures (their cases are kept in the output
 * directory for `npm run fuzz -- --replay FILE`). First the harness itself:
 * a target that fails on purpose in every way must be classified so.
 */
import t from 'tap'
import { mkdirSync, readdirSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { PVE_VMA, VMA, run, tempDir } from './helpers/run.js'

const FUZZ = join(dirname(VMA), '../fuzz/main.js')
/** Kept after the run (fuzz-out/ is ignored by git), so that a failure can be replayed; the seeds are made once. */
const OUT = join(dirname(VMA), '../../fuzz-out/npm-test')

interface Counts {
  parser: string
  cases: number
  classes: Record<string, number>
  checked: number
  findings: Record<string, { count: number, first: string }>
}

const FAILURES = ['crash', 'hang', 'memory', 'mismatch']
const PARSERS = ['vma', 'qcow2-image', 'qcow2-stream', 'parallels-image', 'parallels-stream', 'descriptor', 'nbd-client', 'nbd-server']
/**
 * Cases per parser (the same cases on any machine, however busy): with the
 * seeds made first, the whole file stays under a minute of CPU. The duration
 * is only a bound.
 */
const CASES = 150

async function fuzz (out: string, args: string[]): Promise<{ code: number | null, results: Counts[], stdout: string, stderr: string }> {
  const env = PVE_VMA === undefined ? {} : { PVE_VMA }
  const r = await run(process.execPath, [FUZZ, '--out', out, '--json', ...args], { env })
  const stdout = r.stdout.toString()
  const json = stdout.trim().split('\n').pop() ?? ''
  const results = json.startsWith('{') ? (JSON.parse(json) as { results: Counts[] }).results : []
  return { code: r.code, results, stdout, stderr: r.stderr }
}

t.test('the harness tells each class apart', async t => {
  const out = tempDir(t, 'vmapipe-fuzz-self-')
  const r = await fuzz(out, ['--parser', 'selftest', '--cases', '7', '--duration', '120', '--case-timeout', '1000'])
  const c = r.results[0]
  t.ok(c !== undefined, 'a summary', { stdout: r.stdout, stderr: r.stderr })
  for (const cls of ['accepted', 'error', 'crash', 'hang', 'memory']) t.ok(c?.classes[cls] > 0, `${cls} seen`, { classes: c?.classes })
  const sigs = Object.keys(c?.findings ?? {})
  t.ok(sigs.some(s => s.startsWith('crash: TypeError: a bug')), 'a thrown TypeError is a crash, with its stack', { sigs })
  t.ok(sigs.some(s => s.startsWith('crash: the worker died')), 'a worker that dies is a crash', { sigs })
  t.ok(sigs.some(s => /^hang: .*never yields/.test(s)), 'a loop that never yields is a hang', { sigs })
  t.ok(sigs.some(s => /^hang: no verdict within N ms$/.test(s)), 'a promise that never settles is a hang', { sigs })
  t.equal(r.code, 1, 'exits 1 on failures')
  const saved = readdirSync(out).filter(f => f.endsWith('.bin'))
  t.equal(saved.length, 5, 'each failing case is saved', { saved })
  const crash = saved.find(f => f.includes('-crash-'))
  if (crash === undefined) return
  const replay = await run(process.execPath, [FUZZ, '--out', out, '--replay', join(out, crash)])
  t.equal(replay.code, 1, 'a saved crash replays as a failure')
  t.match(replay.stdout.toString(), /^selftest: crash/, 'and says so')
})

t.test(`each parser, ${CASES} cases of seed 1`, async t => {
  const out = OUT
  mkdirSync(out, { recursive: true })
  for (const f of readdirSync(out)) if (f !== 'seeds') rmSync(join(out, f), { recursive: true, force: true })
  const r = await fuzz(out, ['--cases', String(CASES), '--duration', '60', '--seed', '1'])
  t.equal(r.results.length, PARSERS.length, 'every parser ran', { stdout: r.stdout, stderr: r.stderr })
  for (const parser of PARSERS) {
    const c = r.results.find(x => x.parser === parser)
    t.test(parser, async t => {
      t.ok(c !== undefined && c.cases >= 10, 'ran cases', { cases: c?.cases })
      // A fuzzer whose cases all fail at the first check fuzzes nothing behind it.
      t.ok((c?.classes.accepted ?? 0) > 0, 'some cases are accepted', { classes: c?.classes })
      t.ok((c?.classes.error ?? 0) > 0, 'some cases are refused with a typed error', { classes: c?.classes })
      for (const cls of FAILURES) {
        const found = Object.entries(c?.findings ?? {}).filter(([sig]) => sig.startsWith(`${cls}:`))
        t.equal(c?.classes[cls] ?? 0, 0, `no ${cls}`, { findings: found.map(([sig, f]) => `${f.count} x ${sig}\n${f.first}`), out })
      }
    })
  }
})
