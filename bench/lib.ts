/** Timing whole commands and printing tables, for the benchmarks. */
import { spawn } from 'node:child_process'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
export const q = (s: string): string => `'${s.replace(/'/g, "'\\''")}'`
export const vma = `${q(process.execPath)} ${q(join(root, 'dist/bin/vma.js'))}`
export const packVma = `${q(process.execPath)} ${q(join(root, 'dist/bin/pack-vma.js'))}`
export const GIB = 2 ** 30
export const MB = 1e6

export interface Timed { seconds: number, stderr: string }

export async function timed (script: string): Promise<Timed> {
  const started = process.hrtime.bigint()
  const child = spawn('bash', ['-c', `set -o pipefail; ${script}`], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  if (code !== 0) throw new Error(`${script} failed (${code}): ${stderr}`)
  return { seconds: Number(process.hrtime.bigint() - started) / 1e9, stderr }
}

/** The best of `n` runs (of a script, or of a job that times itself), to keep a busy moment of the machine out of the figure. */
export async function best (n: number, script: string | (() => Promise<Timed>), after?: () => void): Promise<Timed> {
  let top: Timed | undefined
  for (let i = 0; i < n; i++) {
    const t = typeof script === 'string' ? await timed(script) : await script()
    after?.()
    if (top === undefined || t.seconds < top.seconds) top = t
  }
  return top as Timed
}

/** The JSON log lines of a run (vma logs one per job), by command. */
export function logs (stderr: string): Array<Record<string, number | string>> {
  return stderr.trim().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Record<string, number | string>)
}

export function peakMiB (t: Timed, cmd?: string): string {
  const line = logs(t.stderr).filter(l => cmd === undefined || l.cmd === cmd).pop()
  return line === undefined ? '?' : (Number(line.maxRssKiB) / 1024).toFixed(0)
}

/** Rows of (job, seconds, MB/s, ratio against a peer in the same run). */
export class Table {
  private readonly rows: string[][] = []
  constructor (private readonly unit: string) {}

  add (job: string, t: Timed, bytes: number, peer?: Timed, peerName?: string): void {
    this.rows.push([job, t.seconds.toFixed(2), (bytes / MB / t.seconds).toFixed(0), peer ? `${(peer.seconds / t.seconds).toFixed(2)}x ${peerName}` : ''])
  }

  print (title: string): void {
    const table = [['job', 'seconds', `MB/s of ${this.unit}`, 'speed vs peer (peer time / ours)'], ...this.rows]
    const widths = table[0].map((_, i) => Math.max(...table.map(r => r[i].length)))
    process.stdout.write(`\n${title}\n\n`)
    for (const [i, r] of table.entries()) {
      process.stdout.write(`| ${r.map((c, j) => c.padEnd(widths[j])).join(' | ')} |\n`)
      if (i === 0) process.stdout.write(`| ${widths.map(w => '-'.repeat(w)).join(' | ')} |\n`)
    }
  }
}
