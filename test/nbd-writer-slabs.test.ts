/**
 * NbdDiskWriter and slab loans: records lent from slabs (as the archive
 * reader lends them) are given back once their WRITE is answered, so a
 * restore reuses a few slabs instead of making a MiB of garbage per MiB sent,
 * and never before: a slab refilled while its bytes were still going out
 * would put the wrong data in the export, which qemu-img compare catches.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir } from './helpers/run.js'
import { startQemuNbd } from './helpers/nbd.js'
import { NbdDiskWriter } from '../lib/nbd/writer.js'
import { SLAB_SIZE, giveBack, lend, takeSlab } from '../lib/io/slabs.js'
import { CLUSTER_SIZE } from '../lib/record.js'

const SIZE = 48 * SLAB_SIZE
const PER_SLAB = SLAB_SIZE / CLUSTER_SIZE

/** Cluster `c`'s bytes: its number in every 4-byte word, except block 3 left out (a hole) in odd clusters. */
function fill (buf: Buffer, c: number): number {
  const mask = c % 2 === 1 ? 0xfff7 : 0xffff
  const length = (c % 2 === 1 ? 15 : 16) * 4096
  for (let at = 0; at < length; at += 4) buf.writeUInt32LE(c, at)
  return mask
}

t.test('a restore from lent records reuses its slabs and writes the right bytes', async t => {
  const dir = tempDir(t)
  const target = join(dir, 'target.qcow2')
  exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(SIZE)]), 0, 'qemu-img create')
  const socket = join(dir, 'target.sock')
  const peer = await startQemuNbd(t, { socket }, ['-f', 'qcow2', target])
  const writer = await NbdDiskWriter.open(`nbd+unix:///?socket=${socket}`, { id: 1, name: 'drive-scsi0', size: SIZE })

  const expected = Buffer.alloc(SIZE)
  const slabs = new Set<ArrayBufferLike>()
  for (let c = 0; c < SIZE / CLUSTER_SIZE; c += PER_SLAB) {
    const slab = takeSlab() as Buffer
    slabs.add(slab.buffer)
    for (let i = 0; i < PER_SLAB; i++) {
      const piece = slab.subarray(i * CLUSTER_SIZE, (i + 1) * CLUSTER_SIZE)
      const mask = fill(piece, c + i)
      const data = lend(piece.subarray(0, (mask === 0xffff ? 16 : 15) * 4096))
      const at = (c + i) * CLUSTER_SIZE
      if (mask === 0xffff) data.copy(expected, at)
      else { data.copy(expected, at, 0, 3 * 4096); data.copy(expected, at + 4 * 4096, 3 * 4096) }
      await writer.write({ kind: 'cluster', device: 1, cluster: c + i, mask, data })
    }
    giveBack(slab)
  }
  await writer.finish()
  await peer.stop()

  // The client keeps 16 requests of up to 1 MiB in flight; without give-backs every slab would be new (48).
  t.ok(slabs.size <= 24, `${slabs.size} slabs for ${SIZE / SLAB_SIZE} MiB`)
  const raw = join(dir, 'expected.raw')
  writeFileSync(raw, expected)
  exits(t, await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', target, raw]), 0, 'qemu-img compare')
})
