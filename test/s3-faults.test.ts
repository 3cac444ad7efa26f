// The S3 transport when the network or the store fails it: a fault proxy
// between the SDK and the store (Ceph RGW) cuts GET answers and part uploads
// part way, and refuses conditional creates as stores without them do.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { ListMultipartUploadsCommand } from '@aws-sdk/client-s3'
import { createS3Upload, headObject, openS3Read, putIfAbsent, putObjectBytes, s3Client } from '../lib/s3/index.js'
import { collectBytes, needsS3, s3Store } from './helpers/s3.js'
import { s3FaultProxy } from './helpers/s3-fault-proxy.js'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { GetObjectCommand } from '@aws-sdk/client-s3'
import { Rng, makeDisk } from './helpers/random.js'
import { exits, sha256, tempDir, vma } from './helpers/run.js'

const MiB = 1024 * 1024
// Before the first client: the SDK's Node-22 notice is no test's concern.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

t.test('the transport through a faulty connection', needsS3, async t => {
  const store = await s3Store(t)
  Object.assign(process.env, store.env)
  const proxy = await s3FaultProxy(t, store.endpoint)
  const client = s3Client({ endpoint: proxy.endpoint })
  t.teardown(() => client.destroy())
  const bucket = await store.bucket()
  const data = randomBytes(13 * MiB + 777)

  await t.test('an upload whose parts are cut part way sends them again and completes identical', async t => {
    proxy.rules.dropPart = { afterBytes: 2 * MiB, times: 2 }
    const warnings: Array<Record<string, unknown>> = []
    const log = { info: () => {}, warn: (fields: Record<string, unknown>) => { warnings.push(fields) } }
    const upload = createS3Upload(client, bucket, 'retried.bin', { partSize: 5 * MiB, log })
    await pipeline(Readable.from([data]), upload)
    t.equal(proxy.counts.droppedParts, 2, 'two parts were cut')
    t.ok(upload.stats.retries >= 2, `retries counted (${upload.stats.retries})`)
    t.ok(warnings.length >= 2, 'and logged')
    proxy.rules.dropPart = undefined
    t.equal(sha256(await collectBytes(openS3Read(store.client, bucket, 'retried.bin'))), sha256(data), 'the object is identical')
  })

  await t.test('a read cut part way resumes from the byte reached, identical', async t => {
    proxy.rules.dropGet = { afterBytes: 3 * MiB + 5, times: 3 }
    const stream = openS3Read(client, bucket, 'retried.bin')
    t.equal(sha256(await collectBytes(stream)), sha256(data), 'identical')
    t.equal(proxy.counts.droppedGets, 3, 'three answers were cut')
    t.equal(stream.stats.resumes, 3, 'and resumed')
  })

  await t.test('a read cut more often than its attempts fails with E_S3_NETWORK', async t => {
    proxy.rules.dropGet = { afterBytes: 0, times: 10 }
    await t.rejects(collectBytes(openS3Read(client, bucket, 'retried.bin', { attempts: 3 })), { code: 'E_S3_NETWORK' })
    proxy.rules.dropGet = undefined
  })

  await t.test('an upload whose part is cut more often than its attempts is aborted, nothing visible', async t => {
    proxy.rules.dropPart = { afterBytes: MiB, times: 100 }
    const upload = createS3Upload(client, bucket, 'failed.bin', { partSize: 5 * MiB, partAttempts: 2 })
    await t.rejects(pipeline(Readable.from([data]), upload), { code: 'E_S3_NETWORK' })
    proxy.rules.dropPart = undefined
    await t.rejects(headObject(store.client, bucket, 'failed.bin'), { code: 'E_S3_NOT_FOUND' })
    const open = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket }))
    t.equal(open.Uploads?.length ?? 0, 0, 'no upload left open')
  })

  await t.test('what each checksum kind sends with every part and PUT', async t => {
    for (const checksum of ['crc32', 'md5', 'none'] as const) {
      proxy.seen.length = 0
      const key = `sum-${checksum}.bin`
      await pipeline(Readable.from([data]), createS3Upload(client, bucket, key, { checksum, partSize: 5 * MiB }))
      await pipeline(Readable.from([Buffer.from('small')]), createS3Upload(client, bucket, `${key}.small`, { checksum }))
      const bodies = proxy.seen.filter(r => r.method === 'PUT' && r.url.includes(key))
      t.equal(bodies.length, 4, `${checksum}: three parts and one PUT`)
      for (const r of bodies) {
        t.equal(r.headers['x-amz-checksum-crc32'] !== undefined, checksum === 'crc32', `${checksum}: CRC32 header on ${r.url}`)
        t.equal(r.headers['content-md5'] !== undefined, checksum === 'md5', `${checksum}: Content-MD5 header on ${r.url}`)
      }
      t.equal(sha256(await collectBytes(openS3Read(client, bucket, key))), sha256(data), `${checksum}: identical`)
    }
  })

  await t.test('a store that refuses conditional creates: E_S3_UNSUPPORTED', async t => {
    proxy.rules.refuseConditionalCreate = true
    await t.rejects(putIfAbsent(client, bucket, 'lock', 'me'), { code: 'E_S3_UNSUPPORTED' })
    t.equal(proxy.counts.refusedCreates, 1)
    await putObjectBytes(client, bucket, 'plain', 'a plain PUT still goes through')
    proxy.rules.refuseConditionalCreate = false
    t.equal(await putIfAbsent(client, bucket, 'lock', 'me'), true)
  })
})

t.test('vma create and extract through a faulty connection', needsS3, async t => {
  const store = await s3Store(t)
  Object.assign(process.env, store.env)
  const proxy = await s3FaultProxy(t, store.endpoint)
  const bucket = await store.bucket()
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, makeDisk(new Rng(5), 20 * MiB))
  const args = ['--uuid', '5d1e4f7a-0000-4000-8000-000000000015', '--ctime', '1700000000', '-d', `drive-scsi0=${disk}`]
  const url = `s3://${bucket}/dump/vzdump-qemu-100-2024_01_31-02_00_01.vma`
  const env = { VMAPIPE_S3_ENDPOINT: proxy.endpoint }

  // Cut early: the first two parts to arrive may include the archive's last, small one.
  proxy.rules.dropPart = { afterBytes: 64 * 1024, times: 2 }
  const created = await vma(['create', url, ...args], { env })
  exits(t, created, 0, 'create completes though two parts were cut')
  t.equal(proxy.counts.droppedParts, 2)
  t.match(created.stderr, /"msg":"S3 request sent again by the SDK"|"msg":"S3 request failed; sending it again"/, 'the retries are logged')
  exits(t, await vma(['create', join(dir, 'local.vma'), ...args]), 0)
  const got = await store.client.send(new GetObjectCommand({ Bucket: bucket, Key: 'dump/vzdump-qemu-100-2024_01_31-02_00_01.vma' }))
  t.equal(sha256(Buffer.from(await got.Body?.transformToByteArray() ?? [])), sha256(join(dir, 'local.vma')), 'the object is the local archive, byte for byte')

  proxy.rules.dropGet = { afterBytes: 5 * MiB, times: 2 }
  const restored = await vma(['extract', url, '-'], { env })
  exits(t, restored, 0, 'the restore completes though its GET was cut twice')
  t.equal(proxy.counts.droppedGets, 2)
  t.equal(sha256(restored.stdout), sha256(disk), 'identical')
  t.match(restored.stderr, /"msg":"S3 read dropped; resuming from the byte reached"/, 'the resumes are logged')
  t.match(restored.stderr, /"resumes":2,.*"msg":"downloaded"/)
})
