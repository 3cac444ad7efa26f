/**
 * lzop read in the main thread straight into slabs: what `lzop` writes, and
 * containers of our own with blocks larger than a slab (up to lzop's 64 MiB),
 * stored and compressed, extract to the same bytes as the plain archive, from
 * a file and through a pipe, in chunks of any size; damaged, cut and hostile
 * streams are E_COMPRESSED_DATA naming the compressed byte, never a crash or hang.
 */
import t, { type Test } from 'tap'
import { readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { cmp, exits, q, sh, sha256, tempDir, vma, vmaCmd } from './helpers/run.js'
import { type Fixture, multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { Rng } from './helpers/random.js'
import { lastLog } from './helpers/compression.js'
import { createDecompressor } from '../lib/io/compression.js'
import { LZOP_END, adler32, lzo1xBound, lzo1xCompress, lzopHeader } from '../lib/io/lzo.js'

const MiB = 1 << 20

/** Extracts `archive` (a path, or `-` with it piped in) into `out`; every file there must equal the plain archive's extract in `plain`. */
async function sameExtract (t: Test, archive: string, plain: string, out: string, how: 'file' | 'stdin'): Promise<void> {
  const cmd = how === 'file' ? `${vmaCmd} extract ${q(archive)} ${q(out)}` : `cat ${q(archive)} | ${vmaCmd} extract - ${q(out)}`
  exits(t, await sh(cmd), 0, `extract from ${how}`)
  const names = readdirSync(plain).sort()
  t.same(readdirSync(out).sort(), names, `from ${how}: the same files`)
  for (const name of names) t.ok(cmp(join(out, name), join(plain, name)), `from ${how}: ${name} byte-identical`)
}

/** An lzop block of `data`: LZO1X-compressed, or stored as it is (as lzop does where LZO1X would not shrink it). */
function lzopBlockOf (data: Buffer, stored: boolean): Buffer {
  const packed = Buffer.from(lzo1xCompress(data, new Uint8Array(lzo1xBound(data.length)), new Int32Array(1 << 14)))
  if (!stored && packed.length >= data.length) throw new Error(`a block of ${data.length} bytes does not shrink`)
  const body = stored ? data : packed
  const head = Buffer.alloc(12)
  head.writeUInt32BE(data.length, 0)
  head.writeUInt32BE(body.length, 4)
  head.writeUInt32BE(adler32(data), 8)
  return Buffer.concat([head, body])
}

/** An lzop stream of `data` cut into blocks of the sizes given (the last one taking the rest), and where each block starts in it. */
function lzopOf (data: Buffer, blocks: Array<{ size: number, stored: boolean }>): { bytes: Buffer, starts: number[] } {
  const parts = [lzopHeader(0)]
  const starts: number[] = []
  let offset = parts[0].length
  let at = 0
  for (const [i, { size, stored }] of blocks.entries()) {
    const piece = data.subarray(at, i === blocks.length - 1 ? data.length : at + size)
    at += piece.length
    const block = lzopBlockOf(piece, stored)
    starts.push(offset)
    offset += block.length
    parts.push(block)
  }
  parts.push(LZOP_END)
  return { bytes: Buffer.concat(parts), starts }
}

/**
 * The fixture's devices made compressible (runs of 16 bytes, every 16th byte
 * still random) where they hold data, zero where they were zero, so LZO1X
 * shrinks blocks of any size.
 */
function compressibleFixture (dir: string, seed: number): Fixture {
  const spec = multiDeviceSpec(seed)
  for (const { data } of spec.devices) {
    for (let i = 0; i < data.length; i++) if (data[i] !== 0 && i % 16 !== 0) data[i] = 1 + ((i >> 4) % 250)
  }
  return writeFixture(dir, spec)
}

/** Runs `data` through createDecompressor() in pieces of the sizes `size()` picks. */
async function decodeInPieces (data: Buffer, size: () => number): Promise<Buffer> {
  const pieces: Buffer[] = []
  for (let at = 0; at < data.length;) {
    const n = Math.min(size(), data.length - at)
    pieces.push(data.subarray(at, at + n))
    at += n
  }
  const out: Buffer[] = []
  await pipeline(Readable.from(pieces), createDecompressor(), new Writable({ write (chunk: Buffer, _enc, cb) { out.push(Buffer.from(chunk)); cb() } }))
  return Buffer.concat(out)
}

t.test('what lzop writes extracts byte-identical to the plain archive, from a file and from a pipe', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(41))
  const plain = join(dir, 'plain')
  exits(t, await vma(['extract', fx.archive, plain]), 0, 'the plain archive extracts')
  for (const level of ['', '-9']) {
    const archive = join(dir, `a${level}.vma.lzo`)
    exits(t, await sh(`lzop ${level} -c ${q(fx.archive)} > ${q(archive)}`), 0, `lzop ${level} compresses`)
    for (const how of ['file', 'stdin'] as const) await sameExtract(t, archive, plain, join(dir, `out${level}-${how}`), how)
    const one = join(dir, `scsi0${level}.raw`)
    exits(t, await sh(`${vmaCmd} extract ${q(archive)} -d drive-scsi0 > ${q(one)}`), 0, `lzop ${level}: one disk to stdout`)
    t.equal(sha256(one), sha256(fx.sources.get('drive-scsi0') as string), `lzop ${level}: the disk on stdout is the source's bytes`)
    exits(t, await vma(['verify', archive]), 0, `lzop ${level}: verify passes`)
  }
})

t.test('blocks larger than a slab, stored and compressed, and small ones: the same bytes from a file, a pipe and pieces of any size', async t => {
  const dir = tempDir(t)
  const fx = compressibleFixture(dir, 42)
  const archiveBytes = readFileSync(fx.archive)
  const plain = join(dir, 'plain')
  exits(t, await vma(['extract', fx.archive, plain]), 0, 'the plain archive extracts')
  // 1.25 MiB compressed, 1 MiB + 1 stored, small odd ones, the rest (some 1.5 MiB) compressed.
  const { bytes } = lzopOf(archiveBytes, [
    { size: 1.25 * MiB, stored: false }, { size: MiB + 1, stored: true }, { size: 1000, stored: false }, { size: 7, stored: true },
    { size: 0, stored: false },
  ])
  const archive = join(dir, 'big-blocks.vma.lzo')
  writeFileSync(archive, bytes)
  for (const how of ['file', 'stdin'] as const) await sameExtract(t, archive, plain, join(dir, `out-${how}`), how)
  exits(t, await vma(['verify', archive]), 0, 'verify passes')
  // Pieces from 1 byte to over a block: units cut anywhere, carried across chunks.
  const rng = new Rng(43)
  for (const [what, size] of [['1 to 300 bytes', () => 1 + rng.int(300)], ['up to 4 MiB', () => 1 + rng.int(4 * MiB)]] as const) {
    t.ok((await decodeInPieces(bytes, size)).equals(archiveBytes), `in pieces of ${what}: the archive's bytes`)
  }
})

t.test('damaged, cut and hostile lzop streams are E_COMPRESSED_DATA at the compressed byte, never a crash or hang', async t => {
  const dir = tempDir(t)
  const fx = compressibleFixture(dir, 44)
  const { bytes, starts } = lzopOf(readFileSync(fx.archive), [{ size: 1.5 * MiB, stored: false }, { size: MiB + 5, stored: true }, { size: 0, stored: false }])
  const big = starts[0]
  const stored = starts[1]
  t.ok(stored - big > 12 + 5000, 'the compressed block is over 5000 bytes, for the cuts and damage inside it')
  /** Each command exits 1 with E_COMPRESSED_DATA, naming compressed byte `at` (or one in [at, to]); no file is left under a final name. */
  const expectBad = async (what: string, damaged: Buffer, at: number, to = at): Promise<void> => {
    const archive = join(dir, 'bad.vma.lzo')
    writeFileSync(archive, damaged)
    const target = join(dir, 'never')
    // A file is read in chunks of 1 MiB, a pipe in 64 KiB: units are cut at other places.
    for (const [how, cmd] of [['verify', `${vmaCmd} verify ${q(archive)}`], ['extract from a pipe', `cat ${q(archive)} | ${vmaCmd} extract - ${q(target)}`]]) {
      const r = await sh(cmd)
      exits(t, r, 1, `${what}: ${how} exits 1`)
      const log = lastLog(r.stderr)
      t.equal(log.code, 'E_COMPRESSED_DATA', `${what}: ${how} says E_COMPRESSED_DATA`)
      const byte = Number(/compressed byte (\d+)/.exec(String(log.msg))?.[1])
      t.ok(byte >= at && byte <= to, `${what}: ${how} names compressed byte ${byte}, in [${at}, ${to}]`)
      t.same(readdirSync(dir).filter(n => n === 'never'), [], `${what}: ${how} leaves no target`)
    }
  }
  const copy = (): Buffer => Buffer.from(bytes)
  const flip = (at: number): Buffer => { const b = copy(); b[at] ^= 0xff; return b }
  await expectBad('cut inside the header', bytes.subarray(0, 20), 20)
  await expectBad('cut inside a compressed block larger than a slab', bytes.subarray(0, big + 5000), big + 5000)
  await expectBad('cut inside a stored block larger than a slab', bytes.subarray(0, stored + MiB), stored + MiB)
  await expectBad('cut before the end marker', bytes.subarray(0, bytes.length - 4), bytes.length - 4)
  await expectBad("a compressed block's checksum", flip(big + 8), big + 12)
  await expectBad("a stored block's checksum", flip(stored + 11), stored + 12)
  // LZO1X's own bounds or the checksum catch it, within the block's data.
  await expectBad("a compressed block's data", flip(big + 12 + 5000), big + 12, stored - 1)
  const claim = (at: number, n: number): Buffer => { const b = copy(); b.writeUInt32BE(n, at); return b }
  await expectBad('a block claiming more than 64 MiB', claim(stored, (64 * MiB) + 1), stored)
  await expectBad('a block claiming 4 GiB', claim(big, 0xffffffff), big)
  await expectBad('compressed bytes claimed beyond the block', claim(stored + 4, MiB + 6), stored + 4)
  await expectBad('bytes after the end', Buffer.concat([bytes, Buffer.from('more')]), bytes.length)
})
