/**
 * Compressing in this thread straight into slabs (lib/io/compression.ts):
 * zstd, lzop and gzip fed writes of awkward sizes (lzop blocks cut by every
 * write's end, writes smaller than a block, larger than a slab) put out only
 * slab loans, a few slabs carry everything when the consumer gives them
 * back, none is reused while a loan is out, and the real programs decompress
 * the result to the input (the lzop header holds the time: two runs may differ).
 */
import t, { type Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Duplex } from 'node:stream'
import { createCompressor } from '../lib/io/compression.js'
import { giveBack, inSlab } from '../lib/io/slabs.js'
import { exits, q, sh, tempDir } from './helpers/run.js'
import { KINDS, compressible, sha256 } from './helpers/compression.js'
import { Rng } from './helpers/random.js'

/** 24 MiB: random bytes (stored lzop blocks, zstd's raw blocks) then bytes zstd and gzip shrink 2:1, with zero runs. */
function input (): Buffer {
  return Buffer.concat([new Rng(7).fill(Buffer.alloc(8 << 20)), compressible(16, 8)])
}

/** Write sizes, in turn: around an lzop block (256 KiB), tiny, and over a slab (1 MiB). */
const SIZES = [(256 << 10) - 1, 1, 4095, (256 << 10) + 1, (1 << 20) + 7, 100_000]

/** Feeds `data` to `c` in writes of SIZES; calls `take` with each output chunk, in order. */
async function compress (c: Duplex, data: Buffer, take: (chunk: Buffer) => void): Promise<void> {
  const ended = new Promise<void>((resolve, reject) => { c.on('end', resolve); c.on('error', reject) })
  c.on('data', take)
  for (let at = 0, i = 0; at < data.length; i++) {
    const piece = data.subarray(at, at + SIZES[i % SIZES.length])
    at += piece.length
    if (!c.write(piece)) await new Promise(resolve => c.once('drain', resolve))
  }
  c.end()
  await ended
}

for (const { kind, ext, unpack } of KINDS) {
  t.test(`${kind}: slab loans out, a few slabs carry it all, none reused while lent; ${unpack} gives the input back`, async t => {
    const dir = tempDir(t)
    const data = input()
    const want = sha256(data)

    // A consumer that gives each chunk back at once: the same few slabs go round.
    const given: Buffer[] = []
    const buffers = new Set<ArrayBufferLike>()
    let outside = 0
    await compress(createCompressor(kind as 'zstd' | 'lzo' | 'gzip'), data, chunk => {
      if (!inSlab(chunk)) outside++
      buffers.add(chunk.buffer)
      given.push(Buffer.from(chunk))
      giveBack(chunk)
    })
    t.equal(outside, 0, 'every output chunk is a slab loan')
    t.ok(buffers.size <= 8, `given back at once: ${buffers.size} slabs carried ${given.length} chunks`)
    await unpacks(t, join(dir, `given${ext}`), given, want, `${unpack}, given back at once`)

    // A consumer that keeps every chunk and gives none back: nothing it holds is overwritten.
    const kept: Buffer[] = []
    await compress(createCompressor(kind as 'zstd' | 'lzo' | 'gzip'), data, chunk => { kept.push(chunk) })
    await unpacks(t, join(dir, `kept${ext}`), kept, want, `${unpack}, every chunk kept`)
  })

  /** The program decompresses `chunks`, written to `file`, to bytes with the sha256 `want`. */
  async function unpacks (t: Test, file: string, chunks: Buffer[], want: string, what: string): Promise<void> {
    writeFileSync(file, Buffer.concat(chunks))
    const r = await sh(`${unpack} ${q(file)} | sha256sum`)
    exits(t, r, 0, `${what}: decompresses`)
    t.equal(r.stdout.toString().split(' ')[0], want, `${what}: the input back`)
  }
}
