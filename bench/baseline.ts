/**
 * BENCH_BASELINE=DIR npm run bench -- baseline: this checkout against another
 * one (an older commit, built, in DIR) on the main jobs, in interleaved pairs
 * in the same run, wall and CPU time, so that a change's cost or gain is
 * measured beside what it changed and not against a figure from another day.
 */
import { readFileSync, rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, MB, q, timed, vma as ours } from './lib.js'

const PAIRS = 5

interface Usage { wall: number, cpu: number }

/** Runs `script` under /usr/bin/time: wall and CPU (user + system) seconds of the whole pipeline's children. */
async function usage (script: string, dir: string): Promise<Usage> {
  const out = join(dir, 'time.txt')
  await timed(`/usr/bin/time -f '%e %U %S' -o ${q(out)} bash -c ${q(`set -o pipefail; ${script}`)}`)
  const [wall, user, system] = readFileSync(out, 'utf8').trim().split('\n').pop()?.split(' ').map(Number) ?? []
  return { wall, cpu: user + system }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const spread = (xs: number[]): string => `${median(xs).toFixed(2)} (${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)})`

export async function benchBaseline (dir: string, gib: number): Promise<void> {
  const base = process.env.BENCH_BASELINE
  if (base === undefined) {
    process.stdout.write('\nbaseline: skipped (BENCH_BASELINE names a built checkout to compare with)\n')
    return
  }
  const theirs = `${q(process.execPath)} ${q(join(base, 'dist/bin/vma.js'))}`
  const archive = join(dir, 'a.vma')
  const disk = join(dir, 'disk.raw')
  process.stderr.write(`generating a ${gib} GiB archive and disk\n`)
  await writeBenchArchive(archive, gib * GIB, 'forward')
  await writeBenchDisk(disk, gib * GIB)
  const out = join(dir, 'out')
  const bytes = statSync(archive).size
  const jobs: Array<[string, (vma: string) => string]> = [
    ['verify', vma => `${vma} verify -q ${q(archive)}`],
    ['extract to a directory', vma => `${vma} extract -q ${q(archive)} ${q(out)}`],
    ['extract - > /dev/null', vma => `${vma} extract -q ${q(archive)} - > /dev/null`],
    ['extract --format qcow2', vma => `${vma} extract -q --format qcow2 ${q(archive)} ${q(out)}`],
    ['create from raw > /dev/null', vma => `${vma} create -q - -d drive-scsi0=${q(disk)} > /dev/null`],
  ]
  await timed(`cat ${q(archive)} ${q(disk)} > /dev/null`)
  process.stdout.write(`\nthis checkout against ${base}, ${PAIRS} interleaved pairs, median (min-max)\n\n`)
  process.stdout.write('| job | wall s, this | wall s, baseline | CPU s, this | CPU s, baseline | wall ratio | CPU ratio | MB/s, this |\n')
  process.stdout.write('| --- | --- | --- | --- | --- | --- | --- | --- |\n')
  for (const [job, script] of jobs) {
    const runs: Record<'this' | 'base', Usage[]> = { this: [], base: [] }
    for (let i = 0; i < PAIRS; i++) {
      // Alternate which goes first, so that neither always meets the warmer cache.
      for (const who of i % 2 === 0 ? ['this', 'base'] as const : ['base', 'this'] as const) {
        runs[who].push(await usage(script(who === 'this' ? ours : theirs), dir))
        rmSync(out, { recursive: true, force: true })
      }
    }
    const ratio = (k: keyof Usage): number[] => runs.this.map((r, i) => r[k] / runs.base[i][k])
    process.stdout.write(`| ${job} | ${spread(runs.this.map(r => r.wall))} | ${spread(runs.base.map(r => r.wall))} | ` +
      `${spread(runs.this.map(r => r.cpu))} | ${spread(runs.base.map(r => r.cpu))} | ${spread(ratio('wall'))} | ${spread(ratio('cpu'))} | ` +
      `${(bytes / MB / median(runs.this.map(r => r.wall))).toFixed(0)} |\n`)
  }
}
