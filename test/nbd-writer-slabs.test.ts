/**
 * NbdDiskWriter and slab loans: records lent from slabs (as the archive
 * reader lends them) are given back once their WRITE is answered, so a
 * restore reuses a few slabs instead of making a MiB of garbage per MiB sent,
 * and never before: a slab refilled while its bytes were still going out
 * would put the wrong data in the export, which qemu-img compare catches.
 * The WRITE payload in flight is bounded, not only the requests: whole
 * clusters merge into 1 MiB WRITEs, and with 16 of them in flight a restore
 * held 17 slabs (and the archive's input, out of slabs, read into fresh
 * buffers: peak RSS 95-117 MiB); with at most 2 MiB in flight it holds 3.
 */
import t, { type Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir } from './helpers/run.js'
import { startQemuNbd } from './helpers/nbd.js'
import { NbdDiskWriter } from '../lib/nbd/writer.js'
import { SLAB_SIZE, giveBack, lend, takeSlab } from '../lib/io/slabs.js'
import { BLOCK_SIZE, CLUSTER_SIZE } from '../lib/record.js'

const PER_SLAB = SLAB_SIZE / CLUSTER_SIZE

/**
 * Restores `size` bytes of records lent from slabs into qemu-nbd serving a new
 * `format` image; `fill` writes cluster `c`'s stored blocks at the start of its
 * piece and returns its mask. The slabs used, the image, and a raw file of
 * the bytes it must hold.
 */
async function restoreFromSlabs (t: Test, format: 'raw' | 'qcow2', size: number, fill: (piece: Buffer, c: number) => number):
Promise<{ slabs: number, target: string, expected: string }> {
  const dir = tempDir(t)
  const target = join(dir, `target.${format}`)
  exits(t, await run('qemu-img', ['create', '-q', '-f', format, target, String(size)]), 0, 'qemu-img create')
  const socket = join(dir, 'target.sock')
  const peer = await startQemuNbd(t, { socket }, ['-f', format, target])
  const writer = await NbdDiskWriter.open(`nbd+unix:///?socket=${socket}`, { id: 1, name: 'drive-scsi0', size })

  const expected = Buffer.alloc(size)
  const slabs = new Set<ArrayBufferLike>()
  for (let c = 0; c < size / CLUSTER_SIZE; c += PER_SLAB) {
    const slab = takeSlab() as Buffer
    slabs.add(slab.buffer)
    for (let i = 0; i < PER_SLAB; i++) {
      const piece = slab.subarray(i * CLUSTER_SIZE, (i + 1) * CLUSTER_SIZE)
      const mask = fill(piece, c + i)
      let stored = 0
      for (let b = 0; b < 16; b++) {
        if ((mask & (1 << b)) !== 0) piece.copy(expected, (c + i) * CLUSTER_SIZE + b * BLOCK_SIZE, stored * BLOCK_SIZE, ++stored * BLOCK_SIZE)
      }
      await writer.write({ kind: 'cluster', device: 1, cluster: c + i, mask, data: lend(piece.subarray(0, stored * BLOCK_SIZE)) })
    }
    giveBack(slab)
  }
  await writer.finish()
  await peer.stop()
  const raw = join(dir, 'expected.raw')
  writeFileSync(raw, expected)
  return { slabs: slabs.size, target, expected: raw }
}

t.test('a restore from lent records reuses its slabs and writes the right bytes', async t => {
  const size = 48 * SLAB_SIZE
  // Cluster c: its number in every 4-byte word, block 3 left out (a hole) in odd clusters.
  const { slabs, target, expected } = await restoreFromSlabs(t, 'qcow2', size, (piece, c) => {
    for (let at = 0; at < (c % 2 === 1 ? 15 : 16) * BLOCK_SIZE; at += 4) piece.writeUInt32LE(c, at)
    return c % 2 === 1 ? 0xfff7 : 0xffff
  })
  // Without give-backs every slab would be new (48).
  t.ok(slabs <= 24, `${slabs} slabs for ${size / SLAB_SIZE} MiB`)
  exits(t, await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', target, expected]), 0, 'qemu-img compare')
})

t.test('a restore of whole data clusters holds a few slabs, however many WRITEs the export takes at once', async t => {
  const size = 64 * SLAB_SIZE
  const { slabs, target, expected } = await restoreFromSlabs(t, 'raw', size, (piece, c) => {
    for (let at = 0; at < CLUSTER_SIZE; at += 4) piece.writeUInt32LE(c + 1, at)
    return 0xffff
  })
  t.ok(slabs <= 6, `${slabs} slabs for ${size / SLAB_SIZE} MiB (at most 6)`)
  exits(t, await run('cmp', [target, expected]), 0, 'the export holds the records\' bytes')
})
