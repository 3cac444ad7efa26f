/**
 * Compressing as `vma create --compress` does, in bounded memory: input lent
 * from a few slabs (as the disk reader's records are) in pieces smaller than
 * a slab (as the archive writer pushes them), the compressor, and a file
 * writer that gives each chunk back once written, with the 1 MiB buffer of
 * fs.WriteStream (io/output.ts). Nothing waits in front of the encoder, so
 * the reader's slabs come back in time and it never reads into buffers of
 * its own; the encoder yields once per slab of output, in small slabs, so
 * the output held at once is about what the writer buffers. Before, input
 * waited in two 1 MiB stages and output burst into three: vma create
 * --compress lzo of 1 GiB held 11 MiB of slabs, now 7.
 */
import t from 'tap'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createCompressor } from '../lib/io/compression.js'
import { SLAB_SIZE, giveBack, inSlab, lend, slabSource, takeSlab } from '../lib/io/slabs.js'
import { exits, q, sh, tempDir } from './helpers/run.js'
import { KINDS, sha256 } from './helpers/compression.js'
import { Rng } from './helpers/random.js'

const SIZE = 24 << 20
/** The pieces the archive writer pushes: runs of clusters, cut at extents' ends. */
const PIECE = 256 << 10
/** Slabs the input may have out at once: the one being compressed, the one being read, one waiting. */
const INPUT_SLABS = 3
/** Slab memory the output may take: the writer's buffer, a write in flight, the slab being filled. */
const OUTPUT_SLAB_BYTES = 3 << 20

/** `data` read into slabs from a source of INPUT_SLABS, a slab at a time, pushed on in loans of PIECE; counts reads that found no free slab. */
function lentInput (data: Buffer): { stream: Readable, dry: () => number } {
  const source = slabSource(INPUT_SLABS)
  let dry = 0
  let at = 0
  const stream = new Readable({
    highWaterMark: SLAB_SIZE,
    read () {
      if (at >= data.length) { this.push(null); return }
      const slab = source()
      if (slab === undefined) dry++
      const into = slab ?? Buffer.allocUnsafe(SLAB_SIZE)
      const n = data.copy(into, 0, at, at + SLAB_SIZE)
      at += n
      // As the disk reader hands on records: each piece a loan, the slab's own loan given back once they are lent.
      for (let p = 0; p < n; p += PIECE) this.push(lend(into.subarray(p, Math.min(n, p + PIECE))))
      if (slab !== undefined) giveBack(slab)
    },
  })
  return { stream, dry: () => dry }
}

t.test('compressing a disk: input slabs come back in time, output held stays near the file writer buffer, the programs decompress it', async t => {
  const dir = tempDir(t)
  const data = new Rng(14).fill(Buffer.alloc(SIZE))
  // Free slabs left by other kinds would let the input take more than INPUT_SLABS: taken out of the way.
  const parked: Buffer[] = []
  for (let s = takeSlab(true); s !== undefined; s = takeSlab(true)) parked.push(s)
  for (const { kind, ext, unpack } of KINDS) {
    const file = join(dir, `out${ext}`)
    const handle = await open(file, 'w')
    const input = lentInput(data)
    const slabs = new Map<ArrayBufferLike, number>()
    let outside = 0
    const writer = new Writable({
      highWaterMark: 1 << 20,
      writev (chunks, callback) {
        const buffers = chunks.map(c => c.chunk as Buffer)
        for (const b of buffers) {
          if (inSlab(b)) slabs.set(b.buffer, b.buffer.byteLength)
          else outside++
        }
        handle.writev(buffers).then(() => { for (const b of buffers) giveBack(b); callback() }, callback)
      },
    })
    await pipeline(input.stream, createCompressor(kind as 'zstd' | 'lzo' | 'gzip', kind === 'gzip' ? 1 : undefined), writer)
    await handle.close()
    t.equal(input.dry(), 0, `${kind}: the input never waited for a slab`)
    t.equal(outside, 0, `${kind}: every output chunk in a slab`)
    const bytes = [...slabs.values()].reduce((a, b) => a + b, 0)
    t.ok(bytes <= OUTPUT_SLAB_BYTES, `${kind}: ${slabs.size} slabs, ${bytes >> 10} KiB, carried the output`)
    const r = await sh(`${unpack} ${q(file)} | sha256sum`)
    exits(t, r, 0, `${kind}: ${unpack} decompresses it`)
    t.equal(r.stdout.toString().split(' ')[0], sha256(data), `${kind}: the input back`)
  }
  for (const s of parked) giveBack(s)
})
