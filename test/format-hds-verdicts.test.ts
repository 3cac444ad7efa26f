/**
 * Issue 12, defect 13 for Parallels: a .hds read from a file and from a
 * stream gets the same verdict. Both want every cluster the BAT names whole
 * in the input, the last one included (QEMU 7.2 reads zeros past the end of
 * a cut-short image, even inside the disk, and qemu-img check finds nothing:
 * no opinion worth matching).
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { ParallelsImage } from '../lib/parallels/image.js'
import { streamParallels } from '../lib/parallels/stream.js'
import { diskRecords } from '../lib/io/disk-records.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { CLUSTER_SIZE, expandCluster } from '../lib/record.js'
import { verdict } from './helpers/read.js'
import { Rng } from './helpers/random.js'
import { exits, run, tempDir } from './helpers/run.js'

const SIZE = 1536 * 1024 // a disk of 1.5 clusters of 1 MiB: the last cluster is half past the disk

async function collect (records: Readable, size: number): Promise<Buffer> {
  const disk = Buffer.alloc(size)
  for await (const rec of records) {
    const r = rec as ClusterRecord
    expandCluster(r, size).copy(disk, r.cluster * CLUSTER_SIZE)
  }
  return disk
}

async function fromFile (path: string): Promise<Buffer> {
  const image = await ParallelsImage.open(path)
  try {
    return await collect(diskRecords(image, 1), image.size)
  } finally {
    await image.close()
  }
}

async function fromStream (bytes: Buffer): Promise<Buffer> {
  const streamed = await streamParallels(Readable.from([bytes.subarray(0, 70000), bytes.subarray(70000)]), 'stdin')
  if (streamed === undefined) throw new Error('clusters of 1 MiB stream')
  return await collect(await streamed.records(1), streamed.size)
}

t.test('.hds from a file and from a stream: the same verdict on the same bytes', async t => {
  const dir = tempDir(t)
  const raw = join(dir, 'disk.raw')
  const disk = new Rng(13).fill(Buffer.alloc(SIZE))
  writeFileSync(raw, disk)
  const hds = join(dir, 'disk.hds')
  exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'parallels', raw, hds]), 0)
  const whole = readFileSync(hds)
  const lastCluster = whole.length - (1 << 20)
  const cases: Array<[string, Buffer, 'reads' | 'E_PARALLELS_BAT']> = [
    ['whole', whole, 'reads'],
    ['trailing bytes after the last cluster', Buffer.concat([whole, Buffer.alloc(3 << 20, 0xee)]), 'reads'],
    ['cut at the disk\'s end: the last cluster is not whole', whole.subarray(0, lastCluster + SIZE - (1 << 20)), 'E_PARALLELS_BAT'],
    ['cut one byte short of the last cluster', whole.subarray(0, whole.length - 1), 'E_PARALLELS_BAT'],
    ['cut inside the disk', whole.subarray(0, lastCluster + 1000), 'E_PARALLELS_BAT'],
    ['cut before the last cluster', whole.subarray(0, lastCluster), 'E_PARALLELS_BAT'],
  ]
  for (const [name, bytes, expect] of cases) {
    const path = join(dir, 'case.hds')
    writeFileSync(path, bytes)
    const file = await verdict(async () => await fromFile(path))
    const stream = await verdict(async () => await fromStream(bytes))
    if (expect === 'reads') t.ok('bytes' in file && file.bytes.equals(disk), `${name}: the file reader reads the disk`)
    else t.same(file, { code: expect }, `${name}: the file reader refuses it`)
    t.same(stream, file, `${name}: the stream reader agrees`)
  }
})
