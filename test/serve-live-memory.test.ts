/**
 * Live restore's memory: the pass gives each record's data back to its slab
 * (io/slabs.ts) once it is in the cache file, so a few slabs go round instead
 * of every decoded MiB being garbage until a collection. The disk served
 * equals the original, and buffers alive during the pass stay far below what
 * garbage slabs reached (50 to 70 MiB).
 */
import t from 'tap'
import { createWriteStream } from 'node:fs'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { once } from 'node:events'
import { benchFilesApart, cmp, q, sh } from './helpers/run.js'
import { openInput } from '../lib/io/input.js'
import { openLiveArchive } from '../lib/jobs/live.js'

const SIZE = 256 * 1048576
const MIB = 1048576

t.test('a zstd archive served while its pass runs: the bytes equal the disk, array buffers stay bounded', async t => {
  const { dir, archive, disk: original } = await benchFilesApart(t, SIZE)
  t.equal((await sh(`zstd -q -1 --rm ${q(archive)}`)).code, 0, 'compressed')

  t.comment(`before: ${(process.memoryUsage().arrayBuffers / MIB).toFixed(1)} MiB`)
  let peak = 0
  const sample = setInterval(() => { peak = Math.max(peak, process.memoryUsage().arrayBuffers) }, 5)
  const live = await openLiveArchive(openInput(`${archive}.zst`), { cacheDir: dir })
  const outcome = await live.outcome
  clearInterval(sample)
  t.ok(outcome.ok, 'the pass completes')
  t.ok(peak < 32 * MIB, `array buffers peaked at ${(peak / MIB).toFixed(1)} MiB (under 32)`)

  const served = join(dir, 'served.raw')
  const out = createWriteStream(served)
  const [disk] = live.disks
  const buf = Buffer.alloc(4 * MIB)
  for (let at = 0; at < disk.size; at += buf.length) {
    const piece = buf.subarray(0, Math.min(buf.length, disk.size - at))
    await disk.read(piece, at)
    if (!out.write(Buffer.from(piece))) await once(out, 'drain')
  }
  out.end()
  await once(out, 'finish')
  await live.close()
  t.ok(cmp(served, original), 'the served disk equals the original')
  const file = await open(served)
  t.equal((await file.stat()).size, SIZE, 'whole disk')
  await file.close()
})
