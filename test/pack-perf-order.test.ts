/**
 * Disks packed one after another (the default) are read one after another:
 * a disk is not read at all before the one ahead of it has ended, so that
 * only one fills its read-ahead and stream buffers at a time. Interleaved,
 * they are read together. Either way the archive holds every disk intact.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { RandomAccessDisk } from '../lib/contracts.js'
import { diskRecords } from '../lib/io/disk-records.js'
import { openOutput } from '../lib/io/output.js'
import { packArchive } from '../lib/jobs/pack.js'
import type { DiskSource } from '../lib/jobs/sources.js'
import { RawImage } from '../lib/raw/index.js'
import { cmp, exits, tempDir, vma } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'

/** Reads of the disks in the order they were asked for, as [disk index, offset]. */
type ReadLog = Array<[number, number]>

async function loggedSource (path: string, name: string, index: number, log: ReadLog): Promise<DiskSource> {
  const image = await RawImage.open(path)
  const disk: RandomAccessDisk = {
    size: image.size,
    map: async (offset, length) => await image.map(offset, length),
    read: async (buf, offset) => { log.push([index, offset]); await image.read(buf, offset) },
    close: async () => await image.close(),
  }
  return {
    name, path, format: 'raw', size: disk.size,
    records: async (device, progress) => diskRecords(disk, device, progress !== undefined ? { progress } : {}),
    close: () => { disk.close().catch(() => {}) },
  }
}

for (const interleave of [false, true]) {
  t.test(interleave ? 'interleaved disks are read together' : 'disks one after another are read one after another', async t => {
    const dir = tempDir(t)
    const paths = [0, 1, 2].map(i => {
      const path = join(dir, `disk${i}.raw`)
      // 6 MiB each: several read batches, so that reading ahead would show.
      writeFileSync(path, makeDisk(new Rng(70 + i), 6 << 20))
      return path
    })
    const log: ReadLog = []
    const sources = await Promise.all(paths.map(async (p, i) => await loggedSource(p, `drive-scsi${i}`, i, log)))
    const archive = join(dir, 'a.vma')
    const output = await openOutput(archive)
    await packArchive(sources, output, { interleave })
    await output.commit()
    const order = log.map(([disk]) => disk)
    const switches = order.filter((d, i) => i > 0 && d !== order[i - 1]).length
    if (interleave) t.ok(switches > 2, `reads go back and forth between the disks (${switches} switches)`)
    else t.same(order, [...order].sort((a, b) => a - b), 'every read of a disk comes before the first read of the next')
    t.same([...new Set(order)].sort(), [0, 1, 2], 'every disk was read')
    const out = join(dir, 'out')
    exits(t, await vma(['extract', archive, out]), 0, 'vma extract')
    paths.forEach((p, i) => t.ok(cmp(join(out, `disk-drive-scsi${i}.raw`), p), `disk ${i} intact`))
  })
}
