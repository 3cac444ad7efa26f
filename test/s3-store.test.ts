// The store the S3 tests use answers like S3 where vmapipe depends on it:
// a conditional create is refused with 412, and multipart uploads are listed
// until completed or aborted.
import t from 'tap'
import {
  AbortMultipartUploadCommand, CreateMultipartUploadCommand, GetObjectCommand, ListMultipartUploadsCommand, PutObjectCommand
} from '@aws-sdk/client-s3'
import { needsS3, s3Store } from './helpers/s3.js'

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

t.test('the loopback store keeps the S3 semantics vmapipe relies on', needsS3, async t => {
  const store = await s3Store(t)
  const Bucket = await store.bucket()
  await store.client.send(new PutObjectCommand({ Bucket, Key: 'lock', Body: 'first', IfNoneMatch: '*' }))
  const second = await store.client.send(new PutObjectCommand({ Bucket, Key: 'lock', Body: 'second', IfNoneMatch: '*' }))
    .then(() => 200, (error: { $metadata?: { httpStatusCode?: number } }) => error.$metadata?.httpStatusCode)
  t.equal(second, 412, 'a second conditional create is refused')
  const got = await store.client.send(new GetObjectCommand({ Bucket, Key: 'lock', Range: 'bytes=1-3' }))
  t.equal(await got.Body?.transformToString(), 'irs', 'ranged GET')
  const { UploadId } = await store.client.send(new CreateMultipartUploadCommand({ Bucket, Key: 'big' }))
  const listed = await store.client.send(new ListMultipartUploadsCommand({ Bucket }))
  t.same(listed.Uploads?.map(u => u.UploadId), [UploadId], 'an open upload is listed')
  await store.client.send(new AbortMultipartUploadCommand({ Bucket, Key: 'big', UploadId }))
  const after = await store.client.send(new ListMultipartUploadsCommand({ Bucket }))
  t.equal(after.Uploads?.length ?? 0, 0, 'an aborted upload is gone')
})
