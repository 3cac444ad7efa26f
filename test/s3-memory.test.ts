// Memory against a real store (Ceph RGW on loopback), issue 14: an upload's part buffers filled again once their part
// is up, and chunks lent from slabs given back once copied, so neither is garbage waiting for a collection; a download's
// dead socket reads collected as it goes; a ranged reader's blocks filled again once they leave its cache.
import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createS3Upload, openS3Ranged, openS3Read } from '../lib/s3/index.js'
import { SLAB_SIZE, takeSlab } from '../lib/io/slabs.js'
import { collectBytes, needsS3, s3Session } from './helpers/s3.js'
import { sha256 } from './helpers/run.js'
import { Rng } from './helpers/random.js'

const MiB = 1024 * 1024
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

t.test('upload memory', needsS3, async t => {
  const { client, bucket } = await s3Session(t)

  await t.test('part buffers are reused, not one per part', async t => {
    const data = randomBytes(8 * 5 * MiB + 12345)
    const sizes: number[] = []
    const allocUnsafe = Buffer.allocUnsafe
    Buffer.allocUnsafe = (size: number) => {
      if (size >= 5 * MiB) sizes.push(size)
      return allocUnsafe(size)
    }
    const upload = createS3Upload(client, bucket, 'parts.bin', { partSize: 5 * MiB, maxInFlight: 2 })
    try {
      await pipeline(Readable.from((function * () { for (let i = 0; i < data.length; i += 777_777) yield data.subarray(i, i + 777_777) })()), upload)
    } finally {
      Buffer.allocUnsafe = allocUnsafe
    }
    t.equal(upload.stats.parts, 9)
    // Two parts in flight and one being filled, against nine parts.
    t.ok(sizes.length <= 3, `${sizes.length} part buffers allocated`)
    // A buffer filled again while its part was still on its way would show here.
    t.equal(sha256(await collectBytes(openS3Read(client, bucket, 'parts.bin'))), sha256(data), 'read back identical')
  })

  await t.test('chunks lent from slabs go back once copied', async t => {
    const data = randomBytes(12 * MiB)
    const seen = new Set<ArrayBufferLike>()
    const chunks = (function * () {
      for (let at = 0; at < data.length; at += SLAB_SIZE) {
        const slab = takeSlab() as Buffer
        seen.add(slab.buffer)
        data.copy(slab, 0, at, at + SLAB_SIZE)
        yield slab
      }
    })()
    await pipeline(Readable.from(chunks, { objectMode: false }), createS3Upload(client, bucket, 'slabs.bin', { partSize: 5 * MiB }))
    // Without the loans back, each chunk is a new slab (12).
    t.ok(seen.size <= 4, `${seen.size} slabs for 12 chunks`)
    t.equal(sha256(await collectBytes(openS3Read(client, bucket, 'slabs.bin'))), sha256(data), 'read back identical')
  })

  await t.test('a download does not pile up its socket reads', async t => {
    const data = randomBytes(48 * MiB)
    await pipeline(Readable.from([data]), createS3Upload(client, bucket, 'download.bin'))
    const before = process.memoryUsage().arrayBuffers
    let most = 0
    let read = 0
    const hash = createHash('sha256')
    for await (const chunk of openS3Read(client, bucket, 'download.bin')) {
      hash.update(chunk as Buffer)
      read += (chunk as Buffer).length
      most = Math.max(most, process.memoryUsage().arrayBuffers - before)
    }
    t.equal(read, data.length)
    t.equal(hash.digest('hex'), sha256(data), 'identical bytes')
    // V8 scavenges for dead buffers only once 32 MiB of them pile up; the reads are collected every 4 MiB.
    t.ok(most < 16 * MiB, `${(most / MiB).toFixed(1)} MiB of buffers at most`)
  })

  await t.test('ranged reads fill blocks that left the cache again, and give the right bytes', async t => {
    const data = randomBytes(12 * MiB + 777)
    await pipeline(Readable.from([data]), createS3Upload(client, bucket, 'ranged.bin'))
    const blockSize = 64 * 1024
    // Bytes of buffers of a block or more allocated while reading.
    let allocated = 0
    const { allocUnsafe, allocUnsafeSlow } = Buffer
    Buffer.allocUnsafe = (size: number) => {
      if (size >= blockSize) allocated += size
      return allocUnsafe(size)
    }
    Buffer.allocUnsafeSlow = (size: number) => {
      if (size >= blockSize) allocated += size
      return allocUnsafeSlow(size)
    }
    try {
      const reader = await openS3Ranged(client, bucket, 'ranged.bin', { blockSize, cacheBytes: MiB, readAhead: 512 * 1024 })
      const rng = new Rng(14)
      // In order with four reads at once, then anywhere: each read's bytes checked against the object's.
      const check = async (position: number, length: number): Promise<boolean> => {
        const buf = Buffer.alloc(length)
        const n = await reader.read(buf, position)
        return n === Math.max(0, Math.min(length, data.length - position)) && buf.subarray(0, n).equals(data.subarray(position, position + n))
      }
      let bad = 0
      for (let at = 0; at < data.length; at += 4 * 100_000) {
        const got = await Promise.all([0, 1, 2, 3].map(async i => await check(at + i * 100_000, 100_000)))
        bad += got.filter(ok => !ok).length
      }
      for (let i = 0; i < 200; i++) {
        const got = await Promise.all([0, 1, 2].map(async () => await check(rng.int(data.length), 1 + rng.int(300_000))))
        bad += got.filter(ok => !ok).length
      }
      await reader.close()
      t.equal(bad, 0, 'every read gave the object\'s bytes')
      // The cache (16 blocks), the spares (8), and blocks dropped because a read or a GET held them as they left the
      // cache (many here, with reads as large as the cache): not one per block fetched.
      t.ok(allocated < reader.stats.bytes / 10, `${(allocated / MiB).toFixed(1)} MiB of buffers for ${(reader.stats.bytes / MiB).toFixed(1)} MiB fetched`)
    } finally {
      Object.assign(Buffer, { allocUnsafe, allocUnsafeSlow })
    }
  })
})
