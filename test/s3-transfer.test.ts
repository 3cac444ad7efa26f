// The S3 transport against a real store (Ceph RGW on loopback): uploads
// (one PUT, multipart with each checksum kind), streamed and resumed reads,
// small objects, conditional creates, and stale uploads aborted.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { ListMultipartUploadsCommand, CreateMultipartUploadCommand, PutObjectCommand } from '@aws-sdk/client-s3'
import {
  abortStaleUploads, createS3Upload, openS3Ranged, deleteObject, getObjectBytes, headObject, listObjects, openS3Read, parseS3Url, putIfAbsent,
  putObjectBytes, s3Client,
} from '../lib/s3/index.js'
import { VmapipeError } from '../lib/errors.js'
import { collectBytes, needsS3, s3Session } from './helpers/s3.js'
import { sha256 } from './helpers/run.js'

const MiB = 1024 * 1024
// Before the first client: the SDK's Node-22 notice is no test's concern.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

/** `data` in pieces of odd sizes, as a stream gives them. */
function pieces (data: Buffer, size = 100_003): Readable {
  return Readable.from((function * () { for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size) })(), { objectMode: false })
}

t.test('s3:// URLs', async t => {
  t.same(parseS3Url('s3://bucket/a/b.vma.zst'), { bucket: 'bucket', key: 'a/b.vma.zst' })
  t.same(parseS3Url('s3://bucket'), { bucket: 'bucket', key: '' })
  t.same(parseS3Url('s3://bucket/dump/'), { bucket: 'bucket', key: 'dump/' })
  for (const bad of ['s3://', 's3:///key', 's3://a/key', 'http://bucket/key', 's3://bu*cket/k']) {
    t.throws(() => parseS3Url(bad), { code: 'E_S3_URL' }, bad)
  }
})

t.test('uploads and reads through the store', needsS3, async t => {
  const { store, client, bucket } = await s3Session(t)

  await t.test('a stream smaller than a part is one PUT', async t => {
    const data = randomBytes(300_000)
    const upload = createS3Upload(client, bucket, 'small.bin')
    await pipeline(pieces(data), upload)
    t.same(upload.stats, { bytes: data.length, parts: 1, retries: 0 })
    t.equal(sha256(await collectBytes(openS3Read(client, bucket, 'small.bin'))), sha256(data), 'read back identical')
    const head = await headObject(client, bucket, 'small.bin')
    t.equal(head.size, data.length)
  })

  await t.test('by position: ranged reads through a bounded cache', async t => {
    const data = randomBytes(9 * MiB + 100)
    await pipeline(pieces(data), createS3Upload(client, bucket, 'ranged.bin'))
    const lines: Record<string, string[]> = { debug: [], info: [], warn: [] }
    const note = (level: string) => (_: unknown, message: string): void => { lines[level].push(message) }
    const reader = await openS3Ranged(client, bucket, 'ranged.bin', { cacheBytes: 2 * MiB, log: { debug: note('debug'), info: note('info'), warn: note('warn') } })
    t.equal(reader.size, data.length)
    // Far apart, as an index reads extent headers: one 64 KiB block each, nothing ahead.
    for (let at = 100; at < data.length; at += 3 * MiB) {
      const buf = Buffer.alloc(512)
      t.equal(await reader.read(buf, at), 512)
      t.ok(buf.equals(data.subarray(at, at + 512)), `512 bytes at ${at}`)
    }
    t.same(reader.stats, { gets: 3, bytes: 3 * 64 * 1024, hits: 0 }, 'a block per header')
    // In order, across block bounds: fetched ahead, in few GETs.
    const whole = Buffer.alloc(data.length)
    for (let at = 0; at < data.length; at += 100_000) {
      const n = await reader.read(whole.subarray(at, Math.min(data.length, at + 100_000)), at)
      t.equal(n, Math.min(100_000, data.length - at))
    }
    t.ok(whole.equals(data), 'read in order: identical')
    t.ok(reader.stats.gets < 20, `${reader.stats.gets} GETs for ${data.length} bytes`)
    t.ok(reader.stats.hits > 50, 'most reads from the cache')
    t.same(lines.info, [], 'no info line per GET')
    t.ok(lines.debug.includes('downloaded'), 'each GET logged at debug')
    const tail = Buffer.alloc(1000)
    t.equal(await reader.read(tail, data.length - 10), 10, 'short at the end')
    t.equal(await reader.read(tail, data.length + 10), 0, 'nothing past it')
    for (let i = 0; i < 30; i++) {
      const at = Math.floor(Math.random() * (data.length - 300_000))
      const buf = Buffer.alloc(1 + Math.floor(Math.random() * 300_000))
      await reader.read(buf, at)
      if (!buf.equals(data.subarray(at, at + buf.length))) t.fail(`random read at ${at}`)
    }
    await reader.close()
  })

  await t.test('an empty stream is an empty object', async t => {
    await pipeline(Readable.from([]), createS3Upload(client, bucket, 'empty'))
    t.equal((await collectBytes(openS3Read(client, bucket, 'empty'))).length, 0)
  })

  for (const checksum of ['crc32', 'md5', 'none'] as const) {
    await t.test(`multipart with ${checksum}: growing parts, identical bytes`, async t => {
      const data = randomBytes(23 * MiB + 12345)
      const key = `multi-${checksum}.bin`
      const upload = createS3Upload(client, bucket, key, { checksum, partSize: 5 * MiB, partsPerStep: 2, maxInFlight: 2 })
      await pipeline(pieces(data), upload)
      // 5 + 5 + 10 + 3.01 MiB
      t.same(upload.stats, { bytes: data.length, parts: 4, retries: 0 })
      t.equal(sha256(await collectBytes(openS3Read(client, bucket, key))), sha256(data), 'read back identical')
      t.equal(sha256(await collectBytes(openS3Read(client, bucket, key, { start: 7 * MiB, end: 17 * MiB }))), sha256(data.subarray(7 * MiB, 17 * MiB)), 'a range')
    })
  }

  await t.test('an upload destroyed part way leaves nothing under the key, and no open upload', async t => {
    const upload = createS3Upload(client, bucket, 'broken.bin', { partSize: 5 * MiB })
    upload.on('error', () => {})
    upload.write(randomBytes(12 * MiB))
    await new Promise(resolve => setTimeout(resolve, 500))
    upload.destroy(new Error('the source failed'))
    await new Promise(resolve => upload.once('close', resolve))
    await t.rejects(headObject(client, bucket, 'broken.bin'), { code: 'E_S3_NOT_FOUND' })
    const open = await client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: 'broken' }))
    t.equal(open.Uploads?.length ?? 0, 0, 'the multipart upload was aborted')
  })

  await t.test('an aborted signal stops the upload with E_INTERRUPTED', async t => {
    const controller = new AbortController()
    const upload = createS3Upload(client, bucket, 'stopped.bin', { partSize: 5 * MiB, signal: controller.signal })
    // A stream without an end: only the abort stops it, once two parts are on their way.
    const block = randomBytes(MiB)
    const endless = Readable.from((function * () { for (;;) yield block })(), { objectMode: false })
    const done = pipeline(endless, upload)
    while (upload.stats.parts < 2) await new Promise(resolve => setTimeout(resolve, 10))
    controller.abort()
    await t.rejects(done, { code: 'E_INTERRUPTED' })
    await t.rejects(headObject(client, bucket, 'stopped.bin'), { code: 'E_S3_NOT_FOUND' })
  })

  await t.test('small objects, listings, conditional creates', async t => {
    await putObjectBytes(client, bucket, 'dir/a.notes', 'hello')
    await putObjectBytes(client, bucket, 'dir/b.log', Buffer.from('log'))
    t.equal((await getObjectBytes(client, bucket, 'dir/a.notes', 100)).toString(), 'hello')
    await t.rejects(getObjectBytes(client, bucket, 'dir/a.notes', 3), { code: 'E_LIMIT' })
    const listed: string[] = []
    for await (const o of listObjects(client, bucket, 'dir/')) {
      listed.push(o.key)
      t.ok(o.lastModified instanceof Date && o.size > 0 && o.etag !== '')
    }
    t.same(listed, ['dir/a.notes', 'dir/b.log'])
    t.equal(await putIfAbsent(client, bucket, 'dir/lock', 'me'), true, 'created')
    t.equal(await putIfAbsent(client, bucket, 'dir/lock', 'other'), false, 'taken')
    t.equal((await getObjectBytes(client, bucket, 'dir/lock', 10)).toString(), 'me')
    await deleteObject(client, bucket, 'dir/lock')
    await deleteObject(client, bucket, 'dir/lock')
    t.equal(await putIfAbsent(client, bucket, 'dir/lock', 'again'), true, 'free again')
  })

  await t.test('a read pinned to an ETag fails on a changed object', async t => {
    await putObjectBytes(client, bucket, 'changing', 'one')
    const { etag } = await headObject(client, bucket, 'changing')
    await putObjectBytes(client, bucket, 'changing', 'two')
    await t.rejects(collectBytes(openS3Read(client, bucket, 'changing', { etag })), { code: 'E_S3_PRECONDITION' })
  })

  await t.test('stale uploads are aborted by age and prefix', async t => {
    const older = await client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: 'jobs/old.vma' }))
    await client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: 'other/old.vma' }))
    t.ok(older.UploadId)
    t.equal(await abortStaleUploads(client, bucket, 'jobs/', new Date(Date.now() - 3600_000)), 0, 'none older than an hour')
    t.equal(await abortStaleUploads(client, bucket, 'jobs/'), 1)
    t.equal(await abortStaleUploads(client, bucket, 'jobs/'), 0, 'none left')
    t.equal(await abortStaleUploads(client, bucket, ''), 1, 'the other prefix')
  })

  await t.test('errors by code', async t => {
    await t.rejects(headObject(client, bucket, 'nothing-here'), { code: 'E_S3_NOT_FOUND' })
    await t.rejects(collectBytes(openS3Read(client, bucket, 'nothing-here')), { code: 'E_S3_NOT_FOUND' })
    await t.rejects(collectBytes(openS3Read(client, 'no-such-bucket-vmapipe', 'k')), { code: 'E_S3_NOT_FOUND' })
    await t.rejects(pipeline(Readable.from([Buffer.from('x')]), createS3Upload(client, 'no-such-bucket-vmapipe', 'k')), { code: 'E_S3_NOT_FOUND' })
    // The SDK reads the credentials from the environment on the first request, and keeps them.
    const saved = process.env.AWS_SECRET_ACCESS_KEY
    process.env.AWS_SECRET_ACCESS_KEY = 'wrong'
    const denied = s3Client({ endpoint: store.endpoint })
    t.teardown(() => denied.destroy())
    const err = await headObject(denied, bucket, 'small.bin').catch((e: unknown) => e)
    process.env.AWS_SECRET_ACCESS_KEY = saved
    t.match(err, { code: 'E_S3_ACCESS' })
    t.equal((err as VmapipeError).fault, 'system')
    const nowhere = s3Client({ endpoint: 'http://127.0.0.1:1', maxAttempts: 1 })
    t.teardown(() => nowhere.destroy())
    await t.rejects(headObject(nowhere, bucket, 'k'), { code: 'E_S3_NETWORK' })
    await client.send(new PutObjectCommand({ Bucket: bucket, Key: 'k', Body: 'v' }))
  })
})
