/**
 * gzip decoded in this thread into slabs through node:zlib's handle
 * (lib/io/compression.ts): the bytes are gzip's, the output buffers go round,
 * a bomb behind a stalled reader holds a few MiB, damaged and cut-off input is
 * E_COMPRESSED_DATA, compressing uses the same slabs, and a Node without that
 * handle goes through node:zlib's stream.
 */
import t from 'tap'
import { readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire, syncBuiltinESMExports } from 'node:module'
import { join } from 'node:path'
import * as zlib from 'node:zlib'
import { createCompressor, createDecompressor, zlibHandle } from '../lib/io/compression.js'
import { giveBack, inSlab } from '../lib/io/slabs.js'
import { cmp, exits, q, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { compressible, decode, decodeGivingBack, lastLog, sha256 as sha } from './helpers/compression.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { Rng } from './helpers/random.js'
import { scatter } from './helpers/vma-builder.js'

/** 24 MiB, many slabs' worth of gzip output. */
const gzipInput = (): Buffer => compressible(24, 51)

t.test('this Node has the zlib handle that gzip is decoded through; anything else is not taken for one', async t => {
  const engine = zlib.createGunzip()
  t.ok(zlibHandle(engine), `Node ${process.version}: _handle.writeSync and _writeState are there (else gzip falls back to the stream)`)
  engine.close()
  t.equal(zlibHandle({}), undefined)
  t.equal(zlibHandle({ _handle: { writeSync: () => {}, onerror: () => {} }, _writeState: new Uint32Array(3) }), undefined)
})

t.test('slabs go round when loans come back, and are never reused while one is out', async t => {
  const data = gzipInput()
  const gz = zlib.gzipSync(data, { level: 1 })
  const want = sha(data)
  const once = await decodeGivingBack([gz])
  t.equal(once.sha, want, 'given back at once: the bytes are the original')
  t.ok(once.chunks > 24, `${once.chunks} chunks`)
  t.equal(once.outside, 0, 'every chunk lies in a slab')
  t.ok(once.buffers <= 8, `given back at once: ${once.buffers} buffers carried 24 MiB`)

  const kept: Buffer[] = []
  await decode([gz], chunk => { kept.push(chunk) })
  t.equal(sha(Buffer.concat(kept)), want, 'kept, none given back: every chunk still holds its bytes')

  // Compressing: the same slabs, and what comes out is gzip that zlib reads back.
  const packed: Buffer[] = []
  let outside = 0
  await decode([data], chunk => {
    if (!inSlab(chunk)) outside++
    packed.push(Buffer.from(chunk))
    giveBack(chunk)
  }, createCompressor('gzip', 1))
  t.equal(outside, 0, 'compressed: every chunk lies in a slab')
  t.equal(sha(zlib.gunzipSync(Buffer.concat(packed))), want, 'compressed: gunzip gives the original')
})

t.test('members one after another, split where a write ends, then zeros: all members, as gzip -d', async t => {
  const a = new Rng(52).fill(Buffer.alloc(3 << 20))
  const b = Buffer.alloc(2 << 20, 7)
  const out: Buffer[] = []
  await decode([zlib.gzipSync(a), zlib.gzipSync(b), Buffer.alloc(4096)], chunk => { out.push(Buffer.from(chunk)); giveBack(chunk) })
  t.ok(Buffer.concat(out).equals(Buffer.concat([a, b])), 'both members, trailing zeros ignored')
})

t.test('a gzip bomb behind a reader that does not read: a few MiB decoded, then all of it once read', async t => {
  // 256 MiB of zeros in about 256 KiB: old ZLIB_PIECE-sized writes to node:zlib each inflated to some 64 MiB.
  const size = 256 << 20
  const gz = await new Promise<Buffer>((resolve, reject) => {
    const parts: Buffer[] = []
    const z = zlib.createGzip({ level: 9 })
    z.on('data', (p: Buffer) => parts.push(p)).on('end', () => resolve(Buffer.concat(parts))).on('error', reject)
    const zeros = Buffer.alloc(1 << 20)
    for (let i = 0; i < size >> 20; i++) z.write(zeros)
    z.end()
  })
  t.ok(gz.length < 1 << 20, `${gz.length} compressed bytes`)
  const d = createDecompressor()
  const before = process.memoryUsage().arrayBuffers
  d.write(gz)
  d.end()
  // Time for the decoder to run as far as it will.
  for (let i = 0; i < 20; i++) await new Promise(resolve => setTimeout(resolve, 10))
  const grew = process.memoryUsage().arrayBuffers - before
  t.ok(d.readableLength <= 4 << 20, `stalled: ${d.readableLength} bytes wait to be read`)
  t.ok(grew < 32 << 20, `stalled: buffers grew by ${(grew / 1048576).toFixed(1)} MiB`)
  const zeros = Buffer.alloc(1 << 20)
  let total = 0
  let allZero = true
  const buffers = new Set<ArrayBufferLike>()
  await new Promise<void>((resolve, reject) => {
    d.on('data', (chunk: Buffer) => {
      total += chunk.length
      allZero &&= chunk.equals(zeros.subarray(0, chunk.length))
      buffers.add(chunk.buffer)
      giveBack(chunk)
    }).on('end', resolve).on('error', reject)
  })
  t.equal(total, size, 'read: all of it')
  t.ok(allZero, 'read: zeros')
  t.ok(buffers.size <= 8, `read: ${buffers.size} buffers carried 256 MiB`)
})

t.test('a .vma.gz extracts byte for byte as the plain archive; damaged or cut off: E_COMPRESSED_DATA, nothing left', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(53))
  const gz = join(dir, 'a.vma.gz')
  exits(t, await sh(`gzip -1 -c ${q(fx.archive)} > ${q(gz)}`), 0)
  exits(t, await vma(['extract', fx.archive, join(dir, 'plain')]), 0, 'plain archive extracts')
  exits(t, await vma(['extract', gz, join(dir, 'gz')]), 0, '.vma.gz extracts')
  const names = readdirSync(join(dir, 'plain')).sort()
  t.same(readdirSync(join(dir, 'gz')).sort(), names, 'the same files')
  for (const name of names) t.ok(cmp(join(dir, 'gz', name), join(dir, 'plain', name)), `${name}: the same bytes`)
  const piped = await sh(`cat ${q(gz)} | ${vmaCmd} verify -`)
  exits(t, piped, 0, 'verify from a pipe')

  const rng = new Rng(54)
  // 8 MiB of words from a small vocabulary: deflate blocks of matches and literals, whose damage inflate sees where it is.
  const words = Array.from({ length: 512 }, () => Buffer.from(Array.from({ length: 3 + rng.int(9) }, () => 97 + rng.int(26))))
  const disk = Buffer.alloc(8 << 20)
  for (let at = 0; at < disk.length;) at += words[rng.int(words.length)].copy(disk, at) + 1
  const devices = [{ id: 1, name: 'drive-scsi0', size: disk.length, data: disk }]
  const wordy = writeFixture(dir, { configs: [{ name: 'qemu-server.conf', data: Buffer.from('memory: 512\n') }], devices, extents: scatter(rng, devices) },
    'words.vma')
  const bytes = zlib.gzipSync(readFileSync(wordy.archive))
  // A wrong CRC: every byte comes out right, and the check at the end fails. A damaged first block: inflate fails at once.
  const badCrc = Buffer.from(bytes)
  badCrc[bytes.length - 8] ^= 1
  const badBlock = Buffer.from(bytes)
  badBlock[10] = 0xff
  const cases = [['wrong CRC', badCrc], ['damaged block', badBlock], ['cut off', bytes.subarray(0, bytes.length >> 1)]] as const
  for (const [what, data] of cases) {
    const bad = join(dir, `bad-${what}.vma.gz`)
    writeFileSync(bad, data)
    for (const [how, args] of [['verify', ['verify', bad]], ['extract', ['extract', bad, join(dir, 'out')]]] as const) {
      const r = await vma([...args])
      exits(t, r, 1, `${what}: ${how} exits 1`)
      t.equal(lastLog(r.stderr).code, 'E_COMPRESSED_DATA', `${what}: ${how}: E_COMPRESSED_DATA`)
    }
    t.notOk(readdirSync(dir).includes('out'), `${what}: extract left no target`)
  }
})

t.test('a Node without the zlib handle we drive: gzip goes through node:zlib\'s stream, the same bytes both ways', async t => {
  const data = gzipInput().subarray(0, 6 << 20)
  const gz = zlib.gzipSync(data)
  const cjs = createRequire(import.meta.url)('node:zlib') as typeof zlib
  // Read-only but configurable: redefined for this test, with the ESM bindings that compression.ts reads.
  for (const name of ['createGunzip', 'createGzip'] as const) {
    const original = Object.getOwnPropertyDescriptor(cjs, name) as PropertyDescriptor
    const replace = (value: unknown): void => {
      Object.defineProperty(cjs, name, { ...original, value })
      syncBuiltinESMExports()
    }
    replace((options?: zlib.ZlibOptions) => {
      const engine = (original.value as typeof zlib.createGzip)(options)
      Object.defineProperty((engine as unknown as { _handle: object })._handle, 'writeSync', { value: undefined })
      return engine
    })
    t.teardown(() => replace(original.value))
  }
  const out: Buffer[] = []
  let slabs = 0
  await decode([gz], chunk => { if (inSlab(chunk)) slabs++; out.push(chunk) })
  t.equal(slabs, 0, 'not decoded into slabs: the stream did it')
  t.equal(sha(Buffer.concat(out)), sha(data), 'the original bytes')
  const damaged = Buffer.from(gz)
  damaged[gz.length - 8] ^= 1
  const err = await decode([damaged], () => {}).then(() => undefined, (e: { code?: string }) => e)
  t.equal(err?.code, 'E_COMPRESSED_DATA', 'damaged: E_COMPRESSED_DATA from the stream too')
  const packed: Buffer[] = []
  slabs = 0
  await decode([data], chunk => { if (inSlab(chunk)) slabs++; packed.push(chunk) }, createCompressor('gzip'))
  t.equal(slabs, 0, 'compressed by the stream')
  t.equal(sha(zlib.gunzipSync(Buffer.concat(packed))), sha(data), 'compressed: gunzip gives the original')
})
