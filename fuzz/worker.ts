/**
 * The fuzz loop of one parser, in a child process of its own (main.ts starts
 * it with a heap limit and watches its memory and time from outside). Case
 * i is made from its own seed, so a restart goes on at i + 1. A case that
 * crashes or hangs in here is saved and the worker exits so that a fresh one
 * takes over: whatever the case left behind (timers, sockets) goes with it.
 */
import { createHash } from 'node:crypto'
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { availableParallelism, loadavg } from 'node:os'
import { join } from 'node:path'
import { VmapipeError } from '../lib/index.js'
import { Rng, caseSeed } from './rng.js'
import { loadSeeds } from './seeds.js'
import { TARGETS, type CaseContext, type Verdict } from './targets.js'
import { type Seed, mutate } from './mutate.js'

export type CaseClass = 'accepted' | 'error' | 'crash' | 'hang' | 'memory' | 'mismatch' | 'diverge'
export const FAILURES: readonly CaseClass[] = ['crash', 'hang', 'memory', 'mismatch']

export interface WorkerJob {
  parser: string
  seed: number
  /** First case index. */
  start: number
  /** Milliseconds to fuzz, counted from when the worker is ready (starting one is slow on a busy machine). */
  budget: number
  /** Stop before this case index. */
  end: number
  caseTimeout: number
  /** RSS bound in MiB (main.ts watches it too, for loops that never yield). */
  memory: number
  crossCheck: number
  seedDir: string
  workDir: string
  outDir: string
  /** Replay this input instead of fuzzing (with the seed named in its record, for NBD's segment boundaries). */
  replay?: { input: string, seedName?: string }
}

export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'start', index: number, seedName: string, steps: string[] }
  | { type: 'done', index: number, class: CaseClass, checked: boolean, detail?: string }
  /** The worker saved the case and will exit: start a new one after `index`. */
  | { type: 'restart', index: number }

/** What a saved case's .json holds beside its .bin. */
export interface CaseRecord {
  parser: string
  class: CaseClass
  seed: number
  index: number
  seedName: string
  steps: string[]
  detail: string
}

/** Cases kept per failure signature: the rest only count. */
const SAMPLES_PER_SIGNATURE = 3

/**
 * What makes two failures the same: the class, the message without its
 * numbers, and the first frame of the stack (numbers vary, places do not).
 */
export function signature (cls: CaseClass, detail: string): string {
  const lines = detail.split('\n')
  const frame = lines.find(l => l.trim().startsWith('at ')) ?? ''
  return `${cls}: ${lines[0].replace(/\d+/g, 'N').slice(0, 200)}${frame === '' ? '' : ` | ${frame.trim().replace(/:\d+:\d+\)?$/, '')}`}`
}

/** Saves a failing case as NAME.bin (the input) and NAME.json (what and why), unless its signature has samples enough. */
export function saveCase (outDir: string, rec: CaseRecord, input: Buffer): string | undefined {
  mkdirSync(outDir, { recursive: true })
  const sig = createHash('sha1').update(signature(rec.class, rec.detail)).digest('hex').slice(0, 8)
  const prefix = `${rec.parser}-${rec.class}-${sig}-`
  if (readdirSync(outDir).filter(f => f.startsWith(prefix) && f.endsWith('.bin')).length >= SAMPLES_PER_SIGNATURE) return undefined
  const base = join(outDir, `${prefix}s${rec.seed}-${rec.index}`)
  writeFileSync(`${base}.bin`, input)
  writeFileSync(`${base}.json`, JSON.stringify({ ...rec, signature: signature(rec.class, rec.detail) }, null, 2) + '\n')
  return `${base}.bin`
}

/** A thrown error as a class: a VmapipeError is the clean way to say no, anything else is a crash. */
function classify (err: unknown): { class: CaseClass, detail: string } {
  if (err instanceof VmapipeError) return { class: 'error', detail: `${err.code}: ${err.message}` }
  const e = err as Error
  return { class: 'crash', detail: e?.stack ?? String(err) }
}

/** How much slower than an idle machine this one runs now: load average per core, at least 1. */
export function loadFactor (): number {
  return Math.max(1, loadavg()[0] / availableParallelism())
}

const send = (m: WorkerMessage): void => { process.send?.(m) }

/** Divergent cases saved per worker. */
const MAX_DIVERGE_SAMPLES = 5
let diverged = 0
let current: { index: number, seedName: string, steps: string[], input: Buffer } | undefined
let job: WorkerJob

/** Saves the case under way with `cls` and leaves (a new worker goes on). */
function giveUp (cls: CaseClass, detail: string): never {
  if (current === undefined) console.error(`outside any case: ${cls}: ${detail}`)
  if (current !== undefined) {
    const { index, seedName, steps, input } = current
    saveCase(job.outDir, { parser: job.parser, class: cls, seed: job.seed, index, seedName, steps, detail }, input)
    send({ type: 'done', index: current.index, class: cls, checked: false, detail })
    send({ type: 'restart', index: current.index })
  }
  process.exit(current === undefined ? 1 : 0)
}

async function runCase (bytes: Buffer, ctx: CaseContext): Promise<{ class: CaseClass, detail?: string, checked: boolean }> {
  const target = TARGETS[job.parser]
  let timer: NodeJS.Timeout | undefined
  const started = Date.now()
  const timeout = new Promise<'hang'>(resolve => {
    // On a machine busier than its cores, a case gets its share of a core: its time bound grows by as much.
    const check = (): void => {
      const left = job.caseTimeout * loadFactor() - (Date.now() - started)
      if (left <= 0) resolve('hang')
      else timer = setTimeout(check, left)
    }
    timer = setTimeout(check, job.caseTimeout)
  })
  const work = target.run(bytes, ctx).then(
    (v: Verdict) => ({ class: v.class as CaseClass, detail: 'detail' in v ? v.detail : undefined, checked: 'checked' in v && v.checked === true }),
    (err: unknown) => ({ ...classify(err), checked: false })
  )
  const r = await Promise.race([work, timeout])
  clearTimeout(timer)
  if (r === 'hang') {
    // A case that allocated for so long that its time ran out is a memory case.
    const rss = process.memoryUsage.rss() / 2 ** 20
    if (rss > job.memory) giveUp('memory', `worker RSS ${Math.round(rss)} MiB, over ${job.memory} MiB`)
    giveUp('hang', `no verdict within ${Date.now() - started} ms`)
  }
  return r
}

async function main (j: WorkerJob): Promise<void> {
  job = j
  process.on('uncaughtException', err => giveUp('crash', `uncaught exception: ${err.stack ?? String(err)}`))
  process.on('unhandledRejection', err => giveUp('crash', `unhandled rejection: ${(err as Error)?.stack ?? String(err)}`))
  setInterval(() => {
    const rss = process.memoryUsage.rss() / 2 ** 20
    if (current !== undefined && rss > j.memory) giveUp('memory', `worker RSS ${Math.round(rss)} MiB, over ${j.memory} MiB`)
  }, 20).unref()
  const target = TARGETS[j.parser]
  if (target === undefined) throw new Error(`unknown parser ${j.parser}`)
  const seeds = loadSeeds(j.seedDir, j.parser)
  mkdirSync(j.workDir, { recursive: true })
  await target.init?.(j.workDir, j.seedDir)
  const path = join(j.workDir, 'case.bin')
  send({ type: 'ready' })
  const until = Date.now() + j.budget
  for (let index = j.start; j.replay !== undefined ? index === j.start : Date.now() < until && index < j.end; index++) {
    const rng = new Rng(caseSeed(j.seed, j.parser, index))
    let seed: Seed
    let m: { bytes: Buffer, steps: string[] }
    if (j.replay !== undefined) {
      seed = seeds.find(s => s.name === j.replay?.seedName) ?? seeds[0]
      m = { bytes: readFileSync(j.replay.input), steps: ['replay'] }
    } else {
      seed = rng.pick(seeds)
      m = target.mutate?.(rng, seed, seeds) ?? mutate(rng, seed, seeds)
    }
    writeFileSync(path, m.bytes)
    current = { index, seedName: seed.name, steps: m.steps, input: m.bytes }
    send({ type: 'start', index, seedName: seed.name, steps: m.steps })
    const r = await runCase(m.bytes, { path, dir: j.workDir, rng, crossCheck: j.crossCheck, caseTimeout: j.caseTimeout, seed, index })
    // Divergences are kept as samples only: they are not failures.
    const keep = FAILURES.includes(r.class) || (r.class === 'diverge' && diverged++ < MAX_DIVERGE_SAMPLES)
    if (keep && j.replay === undefined) {
      saveCase(j.outDir, { parser: j.parser, class: r.class, seed: j.seed, index, seedName: seed.name, steps: m.steps, detail: r.detail ?? '' }, m.bytes)
    }
    send({ type: 'done', index, class: r.class, checked: r.checked, ...(r.detail !== undefined ? { detail: r.detail } : {}) })
    current = undefined
  }
  process.exit(0)
}

process.once('message', (m: WorkerJob) => { void main(m) })
