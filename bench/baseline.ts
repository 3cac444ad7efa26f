/**
 * BENCH_BASELINE=DIR npm run bench -- baseline: this checkout against another
 * one (an older commit, built, in DIR) on the main jobs, in interleaved pairs
 * in the same run, wall and CPU time, so that a change's cost or gain is
 * measured beside what it changed and not against a figure from another day.
 */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, Table, binCommand, pair, q, shell, vma as ours } from './lib.js'

export async function benchBaseline (dir: string, gib: number): Promise<void> {
  const base = process.env.BENCH_BASELINE
  if (base === undefined) {
    process.stdout.write('\nbaseline: skipped (BENCH_BASELINE names a built checkout to compare with)\n')
    return
  }
  const theirs = binCommand(join(base, 'dist/bin/vma.js'))
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
  await shell(`cat ${q(archive)} ${q(disk)} > /dev/null`)
  const table = new Table('baseline', 'archive')
  for (const [job, script] of jobs) {
    table.add(job, bytes, await pair(script(ours), script(theirs), { after: () => rmSync(out, { recursive: true, force: true }) }), `baseline ${base}`)
  }
  table.print(`This checkout against ${base}: ${gib} GiB disk`)
}
