/**
 * Archives in object stores: where a path is taken, an `s3://BUCKET/KEY` is
 * too. An archive is read by one streamed GET (resumed after a dropped
 * connection) or by ranged GETs where random access is wanted (an
 * uncompressed archive's index), and written by a multipart upload that
 * appears under its key only when complete. The AWS SDK is loaded only here,
 * and only for such a URL.
 */
import { VmapipeError } from '../errors.js'
import { type Input, openInput } from '../io/input.js'
import type { Output } from '../io/output.js'
import type { PositionalReader } from '../io/pread.js'
import { isS3Url, parseS3Url, type S3Location } from '../s3/url.js'
import type { S3Log } from '../s3/log.js'
import type { S3Options } from '../s3/client.js'

/** How archives in a store are reached: the client's options, the transport's log (pino fits), a signal that stops transfers. */
export interface S3Access {
  s3?: S3Options
  log?: S3Log
  signal?: AbortSignal
}

/** An archive being written: a file (`Output`) or an upload (no descriptor; commit and abort as for a file). */
export type ArchiveOutput = Omit<Output, 'fd' | 'partial'> & { fd?: number, partial?: string }

/** The object an `s3://` URL names; E_S3_URL where it names a bucket or a prefix. */
function objectOf (url: string): S3Location {
  const location = parseS3Url(url)
  if (location.key === '' || location.key.endsWith('/')) throw new VmapipeError('E_S3_URL', `${url} names a prefix, not an object`)
  return location
}

/** An archive to read front to back: a path, `-` (stdin) or an `s3://` URL (with its size). */
export async function openArchiveInput (path: string, access: S3Access = {}): Promise<Input> {
  if (!isS3Url(path)) return openInput(path)
  const { bucket, key } = objectOf(path)
  const s3 = await import('../s3/index.js')
  const client = s3.s3Client(access.s3)
  try {
    const head = await s3.headObject(client, bucket, key, access.signal)
    const stream = s3.openS3Read(client, bucket, key, { etag: head.etag, signal: access.signal, log: access.log })
    stream.once('close', () => client.destroy())
    return { stream, name: path, size: head.size }
  } catch (err) {
    client.destroy()
    throw err
  }
}

/** An object read by position (ranged GETs through a bounded cache), closed with its client. */
export async function openS3Reader (url: string, access: S3Access = {}): Promise<PositionalReader> {
  const { bucket, key } = objectOf(url)
  const s3 = await import('../s3/index.js')
  const client = s3.s3Client(access.s3)
  try {
    const reader = await s3.openS3Ranged(client, bucket, key, { log: access.log })
    return { ...reader, close: async () => { await reader.close(); client.destroy() } }
  } catch (err) {
    client.destroy()
    throw err
  }
}

/**
 * Where an archive is written: a file under a temporary name until commit
 * (openOutput), or an upload that becomes the object when its stream
 * finishes. Without `force` an object already under the key is
 * E_TARGET_EXISTS (checked when opened: S3 has no create-if-absent for a
 * multipart upload on most stores).
 */
export async function openArchiveOutput (path: string, options: S3Access & { force?: boolean } = {}): Promise<ArchiveOutput> {
  if (!isS3Url(path)) {
    // Loaded here: reading an archive (vma list) needs none of it.
    const { openOutput } = await import('../io/output.js')
    return await openOutput(path, { force: options.force === true })
  }
  const { bucket, key } = objectOf(path)
  const s3 = await import('../s3/index.js')
  const client = s3.s3Client(options.s3)
  try {
    if (options.force !== true) {
      const exists = await s3.headObject(client, bucket, key, options.signal).then(() => true, (err: VmapipeError) => {
        if (err.code === 'E_S3_NOT_FOUND') return false
        throw err
      })
      if (exists) throw new VmapipeError('E_TARGET_EXISTS', `${path} exists`, { option: 'force' })
    }
  } catch (err) {
    client.destroy()
    throw err
  }
  const upload = s3.createS3Upload(client, bucket, key, { signal: options.signal, log: options.log })
  const closed = new Promise<void>(resolve => upload.once('close', () => { client.destroy(); resolve() }))
  return {
    stream: upload,
    name: path,
    removedStale: [],
    commit: async () => {
      if (!upload.writableFinished) throw new VmapipeError('E_IO', `${path}: committed before the upload finished`)
    },
    abort: async () => {
      if (!upload.writableFinished) upload.destroy()
      await closed
    },
  }
}
