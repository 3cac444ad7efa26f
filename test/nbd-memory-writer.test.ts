/**
 * A restore into an NBD export bounds the WRITE payload in flight, not only
 * the requests: each byte sent holds its slab until the WRITE is answered.
 * Whole clusters of data merge into 1 MiB WRITEs; with 16 of them in flight
 * a restore made a slab per MiB up to 17 and more (and the archive's input
 * read into fresh buffers once it had none left: peak RSS 95-117 MiB). With
 * at most 2 MiB in flight the writer holds 3 slabs, plus the run it gathers
 * and the slab being filled. The export must still hold the right bytes.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir } from './helpers/run.js'
import { startQemuNbd } from './helpers/nbd.js'
import { NbdDiskWriter } from '../lib/nbd/writer.js'
import { SLAB_SIZE, giveBack, lend, takeSlab } from '../lib/io/slabs.js'
import { CLUSTER_SIZE } from '../lib/record.js'

const SIZE = 64 * SLAB_SIZE
const PER_SLAB = SLAB_SIZE / CLUSTER_SIZE

t.test('a restore of whole data clusters holds a few slabs, however many WRITEs the export takes at once', async t => {
  const dir = tempDir(t)
  const target = join(dir, 'target.raw')
  writeFileSync(target, '')
  exits(t, await run('truncate', ['-s', String(SIZE), target]), 0, 'truncate')
  const socket = join(dir, 'target.sock')
  const peer = await startQemuNbd(t, { socket }, ['-f', 'raw', target])
  const writer = await NbdDiskWriter.open(`nbd+unix:///?socket=${socket}`, { id: 1, name: 'drive-scsi0', size: SIZE })

  const expected = Buffer.alloc(SIZE)
  const slabs = new Set<ArrayBufferLike>()
  for (let c = 0; c < SIZE / CLUSTER_SIZE; c += PER_SLAB) {
    const slab = takeSlab() as Buffer
    slabs.add(slab.buffer)
    for (let i = 0; i < PER_SLAB; i++) {
      const piece = slab.subarray(i * CLUSTER_SIZE, (i + 1) * CLUSTER_SIZE)
      for (let at = 0; at < CLUSTER_SIZE; at += 4) piece.writeUInt32LE(c + i + 1, at)
      piece.copy(expected, (c + i) * CLUSTER_SIZE)
      await writer.write({ kind: 'cluster', device: 1, cluster: c + i, mask: 0xffff, data: lend(piece) })
    }
    giveBack(slab)
  }
  await writer.finish()
  await peer.stop()

  t.ok(slabs.size <= 6, `${slabs.size} slabs for ${SIZE / SLAB_SIZE} MiB (at most 6)`)
  const raw = join(dir, 'expected.raw')
  writeFileSync(raw, expected)
  exits(t, await run('cmp', [target, raw]), 0, 'the export holds the records\' bytes')
})
