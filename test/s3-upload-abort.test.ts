// An upload destroyed in the moment the store has made the multipart upload but its answer is not yet read (Ctrl-C
// then left the upload open: the answer was dropped with the other requests, and with it the id to abort).
import t from 'tap'
import { ListMultipartUploadsCommand } from '@aws-sdk/client-s3'
import { createS3Upload, headObject } from '../lib/s3/index.js'
import { needsS3, s3Session } from './helpers/s3.js'

const MiB = 1024 * 1024
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

t.test('destroyed while the upload is being started: the upload is aborted all the same', needsS3, async t => {
  const { store, client, bucket } = await s3Session(t)
  const upload = createS3Upload(client, bucket, 'started.bin', { partSize: 5 * MiB })
  let made = false
  // The store answers CreateMultipartUpload, and the upload is destroyed before that answer is in: a request given the
  // upload's abort signal loses it, as it would to a Ctrl-C in that moment.
  type Handle = (request: { query?: Record<string, unknown> }, options?: { abortSignal?: AbortSignal }) => Promise<unknown>
  const handler = client.config.requestHandler as unknown as { handle: Handle }
  const handle = handler.handle.bind(handler)
  handler.handle = async (request, options) => {
    const answer = await handle(request, { ...options, abortSignal: undefined })
    if (request.query?.uploads === undefined) return answer
    made = true
    upload.destroy()
    if (options?.abortSignal?.aborted === true) throw Object.assign(new Error('Request aborted'), { name: 'AbortError' })
    return answer
  }
  const closed = new Promise(resolve => upload.once('close', resolve))
  upload.on('error', () => {})
  upload.write(Buffer.alloc(6 * MiB, 1))
  await closed
  t.ok(made, 'the store made the upload before the destroy')
  const open = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: 'started.bin' }))
  t.equal(open.Uploads?.length ?? 0, 0, 'no upload left open')
  await t.rejects(headObject(client, bucket, 'started.bin'), { code: 'E_S3_NOT_FOUND' })
})
