/**
 * Measuring for the benchmarks: every job runs against its peer in
 * interleaved pairs of the same run (`pair`), wall and CPU seconds and peak
 * RSS of the whole pipeline, printed as tables and kept for the JSON file.
 */
import { spawn } from 'node:child_process'
import { accessSync, constants, existsSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
export const q = (s: string): string => `'${s.replace(/'/g, "'\\''")}'`
/**
 * How a bin is run: the file itself, as a user's shell or npm's link runs it, so that its
 * shebang's node flags apply; by node where it is not executable (a checkout built before
 * the build made it so, as BENCH_BASELINE may be).
 */
export function binCommand (path: string): string {
  try {
    accessSync(path, constants.X_OK)
    return q(path)
  } catch {
    return `${q(process.execPath)} ${q(path)}`
  }
}
export const vma = binCommand(join(root, 'dist/bin/vma.js'))
export const packVma = binCommand(join(root, 'dist/bin/pack-vma.js'))
export const GIB = 2 ** 30
export const MB = 1e6
/** Proxmox's own vma: $PVE_VMA, else ../shared/tools/pve-vma beside the checkout; undefined where neither is. */
export const PVE_VMA = [process.env.PVE_VMA, join(root, '../shared/tools/pve-vma'), join(root, '../../shared/tools/pve-vma')]
  .find(p => p !== undefined && p !== '' && existsSync(p))
/** Pairs per job: at least 5 (BENCH_PAIRS for more). */
export const PAIRS = Math.max(5, Number(process.env.BENCH_PAIRS ?? 5) || 5)

/** One measured run: wall and CPU (user + system of every process and thread) seconds, the largest process's peak RSS. */
export interface Run { wall: number, cpu: number, rssKiB: number, stderr: string }
/** A side of a pair: a bash script (its whole pipeline measured), or a job that measures itself. */
export type Job = string | (() => Promise<Run>)

/** Runs a bash script (setup, not measured); its stderr. */
export async function shell (script: string): Promise<string> {
  const child = spawn('bash', ['-c', `set -o pipefail; ${script}`], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  if (code !== 0) throw new Error(`${script} failed (${code}): ${stderr}`)
  return stderr
}

/** CPU seconds a live process (a server the script talks to) has used so far, and its peak RSS. */
export function processUsage (pid: number): { cpu: number, rssKiB: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const hwm = /VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  // utime and stime, fields 14 and 15 of stat, in clock ticks (100 a second on Linux).
  return { cpu: (Number(fields[11]) + Number(fields[12])) / 100, rssKiB: Number(hwm?.[1] ?? 0) }
}

const timeFile = join(tmpdir(), `vmapipe-bench-time-${process.pid}.txt`)

/**
 * Runs `script` under /usr/bin/time: its wall seconds, CPU seconds of the whole pipeline,
 * the peak RSS of its largest process. `servers` are processes it talks to whose CPU counts too.
 */
export async function measure (script: string, servers: number[] = []): Promise<Run> {
  const before = servers.map(processUsage)
  const started = process.hrtime.bigint()
  const stderr = await shell(`/usr/bin/time -f '%e %U %S %M' -o ${q(timeFile)} bash -c ${q(`set -o pipefail; ${script}`)}`)
  const wall = Number(process.hrtime.bigint() - started) / 1e9
  const [, user, system, rssKiB] = readFileSync(timeFile, 'utf8').trim().split('\n').pop()?.split(' ').map(Number) ?? []
  rmSync(timeFile, { force: true })
  const after = servers.map(processUsage)
  return {
    wall,
    cpu: user + system + after.reduce((sum, a, i) => sum + a.cpu - before[i].cpu, 0),
    rssKiB: Math.max(rssKiB, ...after.map(a => a.rssKiB)),
    stderr,
  }
}

export interface PairOptions {
  /** Called after each run (e.g. to remove the output). */
  after?: () => void
  /** Servers each side's script talks to (their CPU is part of the job). */
  oursServers?: number[]
  peerServers?: number[]
  pairs?: number
}

export interface Pair { ours: Run[], peer: Run[] }

/** `pairs` runs of each job, alternating which goes first so neither always meets the warmer cache or the quieter moment. */
export async function pair (ours: Job, peer: Job, options: PairOptions = {}): Promise<Pair> {
  const result: Pair = { ours: [], peer: [] }
  const one = async (job: Job, servers?: number[]): Promise<Run> => typeof job === 'string' ? await measure(job, servers) : await job()
  for (let i = 0; i < (options.pairs ?? PAIRS); i++) {
    for (const side of i % 2 === 0 ? ['ours', 'peer'] as const : ['peer', 'ours'] as const) {
      result[side].push(await one(side === 'ours' ? ours : peer, side === 'ours' ? options.oursServers : options.peerServers))
      options.after?.()
    }
  }
  return result
}

/** The JSON log lines of a run (vma logs one per job), by command. */
export function logs (stderr: string): Array<Record<string, number | string>> {
  return stderr.trim().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Record<string, number | string>)
}

export const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]
const spread = (xs: number[]): string => xs.some(x => !Number.isFinite(x))
  ? '-'
  : `${median(xs).toFixed(2)} (${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)})`
const mib = (kib: number): string => Number.isFinite(kib) && kib > 0 ? (kib / 1024).toFixed(0) : '-'

export interface Row {
  job: string
  peer: string
  bytes: number
  pairs: number
  ours: { wall: number[], cpu: number[], rssKiB: number[] }
  theirs: { wall: number[], cpu: number[], rssKiB: number[] }
  /** ours / peer, per pair: below 1, vmapipe took less. */
  wallRatio: number[]
  cpuRatio: number[]
}

/** One size of the scaling suite: a single job, no peer. */
export interface ScalingRow {
  job: string
  order: 'forward' | 'reverse'
  gib: number
  archiveBytes: number
  wall: number
  cpu: number
  rssKiB: number
}

/** The scaling suite's rows, for the JSON file. */
export const SCALING: ScalingRow[] = []

/** Every suite's rows, for the JSON file. */
export const RESULTS: Array<{ suite: string, title: string, unit: string, rows: Row[] }> = []

/** A suite's table: one row per job and peer, from its pairs. */
export class Table {
  readonly rows: Row[] = []
  constructor (private readonly suite: string, private readonly unit: string) {}

  /** Adds the row of job `job` against `peerName`; `bytes` is what MB/s is of. */
  add (job: string, bytes: number, result: Pair, peerName: string): void {
    const side = (runs: Run[]): Row['ours'] => ({ wall: runs.map(r => r.wall), cpu: runs.map(r => r.cpu), rssKiB: runs.map(r => r.rssKiB) })
    const row: Row = {
      job,
      peer: peerName,
      bytes,
      pairs: result.ours.length,
      ours: side(result.ours),
      theirs: side(result.peer),
      wallRatio: result.ours.map((r, i) => r.wall / result.peer[i].wall),
      cpuRatio: result.ours.map((r, i) => r.cpu / result.peer[i].cpu),
    }
    this.rows.push(row)
  }

  print (title: string): void {
    RESULTS.push({ suite: this.suite, title, unit: this.unit, rows: this.rows })
    process.stdout.write(formatTable(title, this.unit, this.rows))
  }
}

/** A suite's rows as a Markdown table under its title (also how `run.js --print FILE` shows a saved run). */
export function formatTable (title: string, unit: string, rows: Row[]): string {
  const mbs = (bytes: number, walls: number[]): string => bytes > 0 ? (bytes / MB / median(walls)).toFixed(0) : '-'
  const table = [
    ['job', 'peer', 'wall ratio', 'CPU ratio', 'wall s, ours / peer', 'CPU s, ours / peer', unit === '' ? 'MB/s' : `MB/s of ${unit}, ours / peer`,
      'peak RSS MiB, ours / peer'],
    ...rows.map(r => [
      r.job, r.peer, spread(r.wallRatio), spread(r.cpuRatio),
      `${median(r.ours.wall).toFixed(2)} / ${median(r.theirs.wall).toFixed(2)}`,
      `${fixed(median(r.ours.cpu))} / ${fixed(median(r.theirs.cpu))}`,
      `${mbs(r.bytes, r.ours.wall)} / ${mbs(r.bytes, r.theirs.wall)}`,
      `${mib(Math.max(...r.ours.rssKiB))} / ${mib(Math.max(...r.theirs.rssKiB))}`,
    ].map(cell => cell.replace(/\|/g, '\\|'))),
  ]
  const widths = table[0].map((_, i) => Math.max(...table.map(r => r[i].length)))
  const pairs = Math.max(0, ...rows.map(r => r.pairs))
  let text = `\n${title}; ratios ours / peer (below 1: vmapipe took less), median (min-max) of ${pairs} interleaved pairs\n\n`
  for (const [i, r] of table.entries()) {
    text += `| ${r.map((c, j) => c.padEnd(widths[j])).join(' | ')} |\n`
    if (i === 0) text += `| ${widths.map(w => '-'.repeat(w)).join(' | ')} |\n`
  }
  return text
}

const fixed = (x: number): string => Number.isFinite(x) ? x.toFixed(2) : '-'
