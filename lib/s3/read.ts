/**
 * Reading an object as a stream: one GET, and after a dropped connection a
 * ranged GET from the byte reached, pinned to the first answer's ETag
 * (If-Match) so that an object replaced meanwhile is an error, not a splice
 * of two objects.
 */
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { GetObjectCommand, type S3Client } from '@aws-sdk/client-s3'
import { VmapipeError } from '../errors.js'
import { type Collector, v8Collector } from '../util/collector.js'
import { backoff, isNetworkError, s3Error } from './fail.js'
import { type S3Log, rate } from './log.js'
import { formatS3Url } from './url.js'

export interface S3ReadOptions {
  /** First byte (default 0). */
  start?: number
  /** The byte after the last one (default the object's end). */
  end?: number
  /** Read only this version of the object (its ETag, as headObject gives it); default the first answer's. */
  etag?: string
  /** Attempts in a row, without a byte between them, before the read fails (default 6). */
  attempts?: number
  signal?: AbortSignal
  log?: S3Log
}

/** Counts of a read, as it goes. */
export interface S3ReadStats {
  bytes: number
  /** GETs made again after a dropped connection. */
  resumes: number
}

export interface S3ReadStream extends Readable {
  readonly stats: S3ReadStats
}

const MiB = 1024 * 1024
/**
 * Bytes read between two collections of the young generation: every 2 MiB rather than 4 took 4-6 MiB off the peak of
 * verify and serve of s3:// (256 MiB archive, same CPU); every 1 MiB added 13 to a .vma.zst's (reads held by the
 * decompressor across two collections are promoted, and old-generation garbage waits for a full collection).
 */
const COLLECT_EVERY = 2 * MiB
let sinceCollected = 0
let collect: Collector | undefined

/**
 * Counts `n` bytes read from a socket, and collects the young generation every COLLECT_EVERY of them. Node reads
 * each socket read into a new buffer, which V8 frees only at a scavenge, and it scavenges for such memory only once
 * 32 MiB of it (twice its default semi-space) have piled up: an S3 download held 41-54 MiB of dead reads.
 */
function countRead (n: number): void {
  sinceCollected += n
  if (sinceCollected < COLLECT_EVERY) return
  sinceCollected = 0
  collect ??= v8Collector()
  collect({ type: 'minor' })
}

/** The bytes of `key` from `start` to `end` as a Readable (E_S3_NOT_FOUND, E_S3_PRECONDITION if it changes while read). */
export function openS3Read (client: S3Client, bucket: string, key: string, options: S3ReadOptions = {}): S3ReadStream {
  const where = formatS3Url({ bucket, key })
  const stats: S3ReadStats = { bytes: 0, resumes: 0 }
  const controller = new AbortController()
  const stop = (): void => controller.abort()
  options.signal?.addEventListener('abort', stop, { once: true })
  const attempts = Math.max(1, options.attempts ?? 6)
  const start = options.start ?? 0
  let body: Readable | undefined

  async function * chunks (): AsyncGenerator<Buffer> {
    let offset = start
    let end = options.end
    let etag = options.etag
    let failures = 0
    const started = Date.now()
    while (end === undefined || offset < end) {
      const reached = offset
      try {
        const ranged = offset > 0 || end !== undefined
        const res = await client.send(new GetObjectCommand({
          Bucket: bucket,
          Key: key,
          Range: ranged ? `bytes=${offset}-${end === undefined ? '' : end - 1}` : undefined,
          IfMatch: etag,
        }), { abortSignal: controller.signal })
        etag ??= res.ETag
        end ??= offset + (res.ContentLength ?? 0)
        body = res.Body as Readable
        for await (const chunk of body) {
          offset += (chunk as Buffer).length
          stats.bytes += (chunk as Buffer).length
          countRead((chunk as Buffer).length)
          yield chunk as Buffer
        }
        body = undefined
        if (offset < end) throw new VmapipeError('E_S3_NETWORK', `${where}: the answer ended at byte ${offset} of ${end}`)
      } catch (err) {
        body?.destroy()
        body = undefined
        if (options.signal?.aborted === true || controller.signal.aborted) throw new VmapipeError('E_INTERRUPTED', `${where}: read stopped`, { cause: err })
        const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode
        if (status === 412) throw new VmapipeError('E_S3_PRECONDITION', `${where}: the object changed while it was read (at byte ${offset})`, { cause: err })
        failures = offset > reached ? 1 : failures + 1
        if (failures >= attempts || !isNetworkError(err)) throw s3Error(err, `${where} (at byte ${offset})`)
        stats.resumes++
        options.log?.warn({ url: where, offset, attempt: failures, error: (err as Error).message }, 'S3 read dropped; resuming from the byte reached')
        await sleep(backoff(failures), undefined, { signal: controller.signal }).catch(() => undefined)
      }
    }
    const ms = Date.now() - started
    options.log?.info({ url: where, bytes: stats.bytes, resumes: stats.resumes, seconds: ms / 1000, rate: rate(stats.bytes, ms) }, 'downloaded')
  }

  const stream = Readable.from(chunks(), { objectMode: false }) as Readable & { stats: S3ReadStats }
  stream.stats = stats
  stream.once('close', () => {
    options.signal?.removeEventListener('abort', stop)
    controller.abort()
    body?.destroy()
  })
  return stream
}
