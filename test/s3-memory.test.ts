// An upload's memory against a real store (Ceph RGW on loopback): part buffers filled again once their part is up,
// and chunks lent from slabs given back once copied, so neither is garbage waiting for a collection (issue 14).
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createS3Upload, openS3Read, s3Client } from '../lib/s3/index.js'
import { SLAB_SIZE, takeSlab } from '../lib/io/slabs.js'
import { collectBytes, needsS3, s3Store } from './helpers/s3.js'
import { sha256 } from './helpers/run.js'

const MiB = 1024 * 1024
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

t.test('upload memory', needsS3, async t => {
  const store = await s3Store(t)
  Object.assign(process.env, store.env)
  const client = s3Client()
  t.teardown(() => client.destroy())
  const bucket = await store.bucket()

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
})
