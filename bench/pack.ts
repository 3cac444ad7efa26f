/** Packing: pack-vma against cat and zstd -T0 of the same disk; memory of a pack | extract pipe. */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchDisk } from './archives.js'
import { GIB, Table, best, peakMiB, q, timed, packVma, vma } from './lib.js'
import { packArchive } from '../lib/jobs/pack.js'
import { openDisk } from '../lib/jobs/sources.js'
import { openOutput } from '../lib/io/output.js'

export async function benchPack (dir: string, gib: number): Promise<void> {
  const table = new Table('disk')
  const disk = join(dir, 'disk.raw')
  process.stderr.write(`generating a ${gib} GiB raw disk\n`)
  await writeBenchDisk(disk, gib * GIB)
  const size = statSync(disk).size
  await timed(`cat ${q(disk)} > /dev/null`)
  const cat = await best(3, `cat ${q(disk)} > /dev/null`)
  const zstd = await best(3, `zstd -q -T0 -c ${q(disk)} > /dev/null`)
  table.add('cat disk > /dev/null', cat, size)
  table.add('zstd -T0 disk > /dev/null', zstd, size)
  table.add('pack-vma disk > /dev/null', await best(3, `${packVma} -q ${q(disk)} > /dev/null`), size, cat, 'cat')
  table.add('pack-vma disk --compress zstd > /dev/null', await best(3, `${packVma} -q ${q(disk)} --compress zstd > /dev/null`), size, zstd, 'zstd -T0')
  table.add('cat disk | pack-vma --size N > /dev/null', await best(3, `cat ${q(disk)} | ${packVma} -q --size ${size} > /dev/null`), size, cat, 'cat')

  // Two disks: one after another (what vma create does) against interleaved (--interleave).
  for (const interleave of [false, true]) {
    const archive = join(dir, 'two.vma')
    let bestSeconds = Infinity
    for (let i = 0; i < 3; i++) {
      const started = process.hrtime.bigint()
      const disks = [await openDisk({ name: 'drive-scsi0', path: disk }), await openDisk({ name: 'drive-scsi1', path: disk })]
      const output = await openOutput(archive, { force: true })
      await packArchive(disks, output, { interleave })
      await output.commit()
      bestSeconds = Math.min(bestSeconds, Number(process.hrtime.bigint() - started) / 1e9)
      rmSync(archive)
    }
    table.add(`two disks, ${interleave ? 'interleaved' : 'one after another'} (library, to a file)`, { seconds: bestSeconds, stderr: '' }, 2 * size)
  }
  rmSync(disk)

  process.stderr.write('generating a 4 GiB raw disk\n')
  const big = join(dir, 'big.raw')
  await writeBenchDisk(big, 4 * GIB, 3)
  const out = join(dir, 'out')
  const pipe = await timed(`cat ${q(big)} | ${packVma} --size ${4 * GIB} | ${vma} extract - ${q(out)}`)
  table.add('cat 4 GiB disk | pack-vma --size N | vma extract - out', pipe, 4 * GIB)
  rmSync(out, { recursive: true, force: true })
  rmSync(big)

  table.print(`Packing: ${gib} GiB disk`)
  process.stdout.write('\npeak RSS of cat 4 GiB | pack-vma | vma extract, MiB: ' +
    `pack-vma ${peakMiB(pipe, 'pack-vma')}, vma extract ${peakMiB(pipe, 'extract')}\n`)
}
