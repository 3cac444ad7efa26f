/**
 * npm run fuzz: a mutation fuzzer for each parser of the library (see
 * README, Development). Each parser runs in a child process (worker.ts)
 * with a heap limit; this process watches every case from outside: a case
 * over its time bound is a hang, a worker over the memory bound is killed
 * (memory), a worker that dies is a crash; then a new worker goes on with
 * the next case. Failing cases are saved with their class and stack, to be
 * run again with --replay FILE.
 */
import { type ChildProcess, fork } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { makeSeeds } from './seeds.js'
import { PARSERS, TARGETS } from './targets.js'
import { type CaseClass, type CaseRecord, type WorkerJob, type WorkerMessage, FAILURES, loadFactor, saveCase, signature } from './worker.js'

const WORKER = join(dirname(fileURLToPath(import.meta.url)), 'worker.js')
const CLASSES: readonly CaseClass[] = ['accepted', 'error', 'crash', 'hang', 'memory', 'mismatch', 'diverge']
/** Time a worker gets beyond the case bound before it is killed from outside (its own timer failed to fire). */
const GRACE_MS = 1500

const HELP = `Usage: npm run fuzz -- [--parser NAME[,NAME...]] [--duration SECONDS] [--cases N] [--seed N]
                        [--case-timeout MS] [--memory MB] [--cross-check FRACTION]
                        [--out DIR] [--jobs N] [--json]
       npm run fuzz -- --replay FILE.bin

Parsers: ${PARSERS.join(', ')} (default all).
--duration      seconds per parser (default 60)
--cases         at most this many cases per parser: cases 0 to N-1 of the seed, the same
                set on any machine however fast
--seed          the run's seed (default 1): the same seed makes the same cases
--case-timeout  a case without a verdict after this many ms is a hang (default 2000)
--memory        a worker above this RSS in MiB is killed, the case is "memory" (default 256)
--cross-check   share of accepted qcow2 and Parallels images read again by
                qemu-img convert -O raw and compared (default 0.2)
--out           where failing cases (and the seeds) go (default fuzz-out)
--jobs          parsers fuzzed at once (default 1)
--json          end with the counts as one JSON line
--replay FILE   run one saved case again (its .json beside it names the parser)
Exit status: 0 no failure, 1 a crash, hang, memory or mismatch case, 2 usage.`

export interface ParserCounts {
  parser: string
  cases: number
  seconds: number
  classes: Record<CaseClass, number>
  /** Accepted images compared with qemu-img. */
  checked: number
  restarts: number
  peakRssMiB: number
  /** Failing and divergent cases by signature: how many, and the first one's detail. */
  findings: Record<string, { count: number, first: string }>
}

interface Options {
  seed: number
  caseTimeout: number
  memory: number
  crossCheck: number
  out: string
  seedDir: string
  /** Cases per parser at most. */
  cases: number
}

function vmRssKiB (pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m === null ? 0 : Number(m[1])
  } catch {
    return 0
  }
}

/** CPU time (user and system) a process has used, in ms. */
function cpuMs (pid: number): number {
  try {
    // Fields 14 and 15 of /proc/PID/stat, after the command name in parentheses; in clock ticks of 10 ms.
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 10
  } catch {
    return 0
  }
}

function startWorker (o: Options, job: WorkerJob): { child: ChildProcess, stderr: () => string } {
  const child = fork(WORKER, [], {
    execArgv: [`--max-old-space-size=${o.memory}`],
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    env: { ...process.env, NODE_OPTIONS: '' },
  })
  let stderr = ''
  child.stderr?.on('data', (b: Buffer) => { stderr = (stderr + b.toString()).slice(-8192) })
  child.send(job)
  return { child, stderr: () => stderr }
}

/**
 * Runs one worker until it ends; returns the next case index (undefined when
 * its time is up) and how long it fuzzed (from ready to exit).
 */
async function runWorker (
  o: Options, counts: ParserCounts, job: WorkerJob, onCase?: (m: WorkerMessage) => void
): Promise<{ next: number | undefined, spent: number }> {
  const { child, stderr } = startWorker(o, job)
  let ready: number | undefined
  let inFlight: { index: number, started: number, cpu: number, seedName: string, steps: string[] } | undefined
  let restartAfter: number | undefined
  let killed: { cls: CaseClass, detail: string } | undefined
  child.on('message', (m: WorkerMessage) => {
    onCase?.(m)
    if (m.type === 'ready') ready = Date.now()
    else if (m.type === 'start') inFlight = { index: m.index, started: Date.now(), cpu: cpuMs(child.pid ?? 0), seedName: m.seedName, steps: m.steps }
    else if (m.type === 'done') {
      count(counts, m.class, m.detail)
      if (m.checked) counts.checked++
      inFlight = undefined
    } else restartAfter = m.index
  })
  const watch = setInterval(() => {
    if (killed !== undefined || child.pid === undefined) return
    const rss = vmRssKiB(child.pid) / 1024
    counts.peakRssMiB = Math.max(counts.peakRssMiB, Math.round(rss))
    if (inFlight !== undefined && rss > o.memory) killed = { cls: 'memory', detail: `worker RSS ${Math.round(rss)} MiB, over ${o.memory} MiB` }
    else if (inFlight !== undefined) {
      // A loop that never yields burns CPU: its CPU time says so whatever the load; the wall clock, scaled by the load, is the backstop.
      const cpu = cpuMs(child.pid) - inFlight.cpu
      const wall = Date.now() - inFlight.started
      if (cpu > job.caseTimeout + GRACE_MS || wall > (job.caseTimeout + GRACE_MS) * loadFactor() * 2) {
        killed = { cls: 'hang', detail: `no verdict after ${cpu} ms of CPU, ${wall} ms (the worker's own timer did not fire: a loop that never yields)` }
      }
    }
    if (killed !== undefined) child.kill('SIGKILL')
  }, 50)
  const exit = await new Promise<{ code: number | null, signal: NodeJS.Signals | null }>(resolve => {
    child.on('exit', (code, signal) => resolve({ code, signal }))
  })
  clearInterval(watch)
  const spent = ready === undefined ? 0 : Date.now() - ready
  if (restartAfter !== undefined) { counts.restarts++; return { next: restartAfter + 1, spent } }
  if (inFlight === undefined) {
    if (exit.code !== 0) throw new Error(`the ${job.parser} worker failed outside any case (${exit.code ?? exit.signal}): ${stderr()}`)
    // A worker leaves on its own only when its time is up or its cases are done: the parser is finished. (Its time,
    // measured from here, looks shorter than its own clock by the ready message's way here; going on by that much
    // again and again started a worker, with its seeds to load, every second or two until chance ended it.)
    return { next: undefined, spent }
  }
  // The worker died or was killed in the middle of a case: that case is the culprit.
  const death = killed ?? (/heap out of memory|Allocation failed|ENOMEM/.test(stderr())
    ? { cls: 'memory' as const, detail: `the worker ran out of memory: ${stderr().slice(-2000)}` }
    : { cls: 'crash' as const, detail: `the worker died (${exit.code ?? exit.signal}): ${stderr().slice(-2000)}` })
  count(counts, death.cls, death.detail)
  counts.restarts++
  const input = join(job.workDir, 'case.bin')
  if (job.replay === undefined && existsSync(input)) {
    const { index, seedName, steps } = inFlight
    saveCase(o.out, { parser: job.parser, class: death.cls, seed: job.seed, index, seedName, steps, detail: death.detail }, readFileSync(input))
  }
  onCase?.({ type: 'done', index: inFlight.index, class: death.cls, checked: false, detail: death.detail })
  return { next: inFlight.index + 1, spent }
}

function count (counts: ParserCounts, cls: CaseClass, detail?: string): void {
  counts.cases++
  counts.classes[cls]++
  if (!FAILURES.includes(cls) && cls !== 'diverge') return
  const sig = signature(cls, detail ?? '')
  const f = counts.findings[sig] ??= { count: 0, first: (detail ?? '').split('\n').slice(0, 4).join('\n') }
  f.count++
}

function emptyCounts (parser: string): ParserCounts {
  const classes = Object.fromEntries(CLASSES.map(c => [c, 0])) as Record<CaseClass, number>
  return { parser, cases: 0, seconds: 0, classes, checked: 0, restarts: 0, peakRssMiB: 0, findings: {} }
}

function jobOf (o: Options, parser: string, workDir: string): Omit<WorkerJob, 'start' | 'budget' | 'end'> {
  return { parser, seed: o.seed, caseTimeout: o.caseTimeout, memory: o.memory, crossCheck: o.crossCheck, seedDir: o.seedDir, workDir, outDir: o.out }
}

async function fuzzParser (o: Options, parser: string, seconds: number): Promise<ParserCounts> {
  const counts = emptyCounts(parser)
  let budget = seconds * 1000
  let next: number | undefined = 0
  while (next !== undefined && next < o.cases && budget > 0) {
    const workDir = mkdtempSync(join(tmpdir(), 'vmapipe-fuzz-'))
    try {
      const r = await runWorker(o, counts, { ...jobOf(o, parser, workDir), start: next, budget, end: o.cases })
      next = r.next
      budget -= r.spent
      counts.seconds += r.spent / 1000
    } finally {
      rmSync(workDir, { recursive: true, force: true })
    }
  }
  return counts
}

async function replay (o: Options, file: string, parserOption?: string): Promise<number> {
  const recordPath = file.replace(/\.bin$/, '') + '.json'
  const rec = existsSync(recordPath) ? JSON.parse(readFileSync(recordPath, 'utf8')) as CaseRecord : undefined
  const parser = parserOption ?? rec?.parser
  if (parser === undefined || TARGETS[parser] === undefined) throw new Error(`name the parser with --parser (no ${recordPath} says which)`)
  const counts = emptyCounts(parser)
  const workDir = mkdtempSync(join(tmpdir(), 'vmapipe-fuzz-'))
  let verdict: { class: CaseClass, detail?: string } | undefined
  try {
    await runWorker(o, counts, {
      ...jobOf(o, parser, workDir), start: rec?.index ?? 0, budget: 0, end: Number.MAX_SAFE_INTEGER, crossCheck: 1,
      replay: { input: resolve(file), ...(rec?.seedName !== undefined ? { seedName: rec.seedName } : {}) },
    }, m => { if (m.type === 'done') verdict = m })
  } finally {
    rmSync(workDir, { recursive: true, force: true })
  }
  console.log(`${parser}: ${verdict?.class ?? 'no verdict'}${verdict?.detail !== undefined ? `\n${verdict.detail}` : ''}`)
  return verdict !== undefined && FAILURES.includes(verdict.class) ? 1 : 0
}

function table (all: ParserCounts[]): string {
  const head = ['parser', 'cases', 'cases/s', ...CLASSES, 'checked', 'restarts', 'peakRSS']
  const rows = all.map(c => [
    c.parser, c.cases, (c.cases / Math.max(c.seconds, 0.001)).toFixed(0), ...CLASSES.map(k => c.classes[k]), c.checked, c.restarts, `${c.peakRssMiB}M`,
  ].map(String))
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map(r => r[i].length)))
  return [head, ...rows].map(r => r.map((v, i) => i === 0 ? v.padEnd(widths[i]) : v.padStart(widths[i])).join('  ')).join('\n')
}

async function main (): Promise<number> {
  const { values } = parseArgs({
    options: {
      parser: { type: 'string' },
      duration: { type: 'string', default: '60' },
      cases: { type: 'string' },
      seed: { type: 'string', default: '1' },
      'case-timeout': { type: 'string', default: '2000' },
      memory: { type: 'string', default: '256' },
      'cross-check': { type: 'string', default: '0.2' },
      out: { type: 'string', default: 'fuzz-out' },
      jobs: { type: 'string', default: '1' },
      json: { type: 'boolean', default: false },
      replay: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  if (values.help) { console.log(HELP); return 0 }
  const num = (name: string, text: string, min: number): number => {
    const n = Number(text)
    if (!Number.isFinite(n) || n < min) throw new UsageError(`--${name} ${text}: a number of at least ${min}`)
    return n
  }
  const parsers = values.parser?.split(',') ?? PARSERS
  for (const p of parsers) if (TARGETS[p] === undefined) throw new UsageError(`unknown parser ${p} (known: ${PARSERS.join(', ')})`)
  const out = resolve(values.out)
  const o: Options = {
    seed: num('seed', values.seed, 0),
    caseTimeout: num('case-timeout', values['case-timeout'], 10),
    memory: num('memory', values.memory, 64),
    crossCheck: num('cross-check', values['cross-check'], 0),
    out,
    seedDir: await makeSeeds(join(out, 'seeds')),
    cases: values.cases === undefined ? Number.MAX_SAFE_INTEGER : Math.floor(num('cases', values.cases, 1)),
  }
  if (values.replay !== undefined) return await replay(o, values.replay, values.parser)
  const duration = num('duration', values.duration, 0.1)
  const jobs = Math.floor(num('jobs', values.jobs, 1))
  const results: ParserCounts[] = []
  const queue = [...parsers]
  await Promise.all(Array.from({ length: Math.min(jobs, queue.length) }, async () => {
    for (let p = queue.shift(); p !== undefined; p = queue.shift()) {
      const c = await fuzzParser(o, p, duration)
      results.push(c)
      if (!values.json) console.error(`${p}: ${c.cases} cases, ${CLASSES.filter(k => c.classes[k] > 0).map(k => `${k} ${c.classes[k]}`).join(', ')}`)
    }
  }))
  results.sort((a, b) => parsers.indexOf(a.parser) - parsers.indexOf(b.parser))
  console.log(table(results))
  for (const c of results) {
    for (const [sig, f] of Object.entries(c.findings).sort((a, b) => b[1].count - a[1].count)) console.log(`${c.parser}: ${f.count} x ${sig}`)
  }
  const failed = results.some(c => FAILURES.some(k => c.classes[k] > 0))
  if (failed) console.log(`failing cases are in ${out} (npm run fuzz -- --replay FILE.bin)`)
  if (values.json) console.log(JSON.stringify({ seed: o.seed, duration, results }))
  return failed ? 1 : 0
}

class UsageError extends Error {}

main().then(code => { process.exitCode = code }, (err: Error) => {
  console.error(err instanceof UsageError ? `fuzz: ${err.message}\n\n${HELP}` : err.stack)
  process.exitCode = err instanceof UsageError ? 2 : 1
})
