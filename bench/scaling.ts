/**
 * Scaling: extract to a directory and to stdout, clusters in order and in
 * reverse, of archives from 256 MiB to 8 GiB of disk (BENCH_SCALING, a list of
 * GiB, e.g. "0.25,1"), one run each (BENCH_SCALING_RUNS for the median of
 * more): wall and CPU seconds, and per GiB, to see time grow linearly, and the
 * peak RSS, to see memory stay flat. Each size's archives are removed before
 * the next is made.
 */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive } from './archives.js'
import { GIB, MB, type Run, SCALING, type ScalingRow, measure, median, q, shell, vma } from './lib.js'

const SIZES = (process.env.BENCH_SCALING ?? '0.25,1,2,4,8').split(',').map(Number)
const RUNS = Math.max(1, Number(process.env.BENCH_SCALING_RUNS ?? 1) || 1)

export async function benchScaling (dir: string): Promise<void> {
  for (const gib of SIZES) {
    if (!(gib > 0)) throw new Error(`BENCH_SCALING: ${gib} is not a size in GiB`)
  }
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })
  for (const gib of SIZES) {
    // Whole clusters of 64 KiB, as run.ts makes BENCH_GIB.
    const size = Math.max(1, Math.round(gib * 16384)) * 65536
    for (const order of ['forward', 'reverse'] as const) {
      process.stderr.write(`generating a ${gib} GiB disk archive, clusters ${order}\n`)
      const archive = join(dir, `${order}.vma`)
      await writeBenchArchive(archive, size, order)
      const bytes = statSync(archive).size
      await shell(`cat ${q(archive)} > /dev/null`) // warm the page cache
      const jobs: Array<[string, string]> = [
        ['extract to a directory (synced)', `${vma} extract -q ${q(archive)} ${q(out)}`],
        ['extract - > /dev/null', `${vma} extract -q --tmpdir ${q(dir)} ${q(archive)} - > /dev/null`],
      ]
      for (const [job, script] of jobs) {
        const runs: Run[] = []
        for (let i = 0; i < RUNS; i++) {
          runs.push(await measure(script))
          clean()
        }
        const row: ScalingRow = {
          job, order, gib: size / GIB, archiveBytes: bytes,
          wall: median(runs.map(r => r.wall)), cpu: median(runs.map(r => r.cpu)), rssKiB: Math.max(...runs.map(r => r.rssKiB)),
        }
        SCALING.push(row)
        process.stderr.write(`${formatScalingRow(row)}\n`)
      }
      rmSync(archive)
    }
  }
  process.stdout.write(formatScaling(SCALING))
}

function formatScalingRow (r: ScalingRow): string {
  return `| ${[
    r.job, r.order === 'forward' ? 'in order' : 'reversed', r.gib.toFixed(2), (r.archiveBytes / MB).toFixed(0),
    r.wall.toFixed(2), r.cpu.toFixed(2), (r.wall / r.gib).toFixed(2), (r.cpu / r.gib).toFixed(2), (r.archiveBytes / MB / r.wall).toFixed(0),
    (r.rssKiB / 1024).toFixed(0),
  ].join(' | ')} |`
}

/** The scaling rows as a Markdown table (also how `run.js --print FILE` shows them). */
export function formatScaling (rows: ScalingRow[]): string {
  if (rows.length === 0) return ''
  const runs = RUNS === 1 ? 'one run each' : `median of ${RUNS} runs each`
  return `\nScaling: ${runs}\n\n` +
    '| job | clusters | disk GiB | archive MB | wall s | CPU s | wall s/GiB | CPU s/GiB | MB/s of archive | peak RSS MiB |\n' +
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n' +
    [...rows].sort((a, b) => a.job.localeCompare(b.job) || a.order.localeCompare(b.order) || a.gib - b.gib).map(formatScalingRow).join('\n') + '\n'
}
