/**
 * Writing an object as a stream: a multipart upload written by hand on the
 * SDK's commands (not lib-storage's Upload, whose part size is fixed: a
 * 5 TiB stream in 10,000 parts would need 525 MiB parts, times the queue,
 * in memory). Parts start at 6 MiB and double every 1,000 parts, so 10,000
 * parts hold 5.8 TiB (more than S3's largest object, 5 TiB) while an archive
 * of a few GiB never holds more than a few 6 MiB parts. The object appears under its key only with
 * CompleteMultipartUpload after the last byte; any failure, destroy() or
 * abort aborts the upload, so nothing half-written is ever visible.
 */
import { createHash } from 'node:crypto'
import { Writable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, PutObjectCommand,
  UploadPartCommand, type CompletedPart, type S3Client,
} from '@aws-sdk/client-s3'
import { VmapipeError } from '../errors.js'
import { giveBack } from '../io/slabs.js'
import { type S3Checksum, checksumOf } from './client.js'
import { backoff, isNetworkError, s3Error } from './fail.js'
import { type S3Log, rate } from './log.js'
import { formatS3Url } from './url.js'

const MiB = 1024 * 1024
/** S3's bounds: parts of at least 5 MiB (but the last), at most 5 GiB, at most 10,000 of them. */
const MIN_PART = 5 * MiB
const MAX_PART = 5 * 1024 * MiB
const MAX_PARTS = 10_000
/**
 * The first parts' size: memory is about (parts in flight + 1) × this. 8 MiB parts peaked 10 MiB higher than 5 MiB
 * ones at the same speed on loopback; 6 MiB keeps 10,000 parts above 5 TiB.
 */
const FIRST_PART = 6 * MiB

export interface S3UploadOptions {
  /** Default the client's (`s3Client`'s `checksum`, 'crc32'). */
  checksum?: S3Checksum
  /** Bytes of the first parts (default 6 MiB, at least 5 MiB). */
  partSize?: number
  /** Parts after which the part size doubles (default 1,000). */
  partsPerStep?: number
  /** Parts uploaded at once (default 4); memory is about (this + 1) × the part size. */
  maxInFlight?: number
  /** Attempts per part, each with the part's bytes again, when the connection fails (default 5). */
  partAttempts?: number
  contentType?: string
  /** Aborting it aborts the upload (E_INTERRUPTED). */
  signal?: AbortSignal
  log?: S3Log
}

export interface S3UploadStats {
  bytes: number
  parts: number
  /** Parts (or the whole object) sent again after a failed attempt. */
  retries: number
}

/** The Writable `createS3Upload` gives: `stats` as it goes; 'finish' once the object is under its key. */
export class S3Upload extends Writable {
  readonly stats: S3UploadStats = { bytes: 0, parts: 0, retries: 0 }
  private readonly where: string
  private readonly checksum: S3Checksum
  private readonly firstPart: number
  private readonly partsPerStep: number
  private readonly maxInFlight: number
  private readonly partAttempts: number
  /** Stops the requests in flight when the upload is given up. */
  private readonly requests = new AbortController()
  /** The part being filled: incoming bytes are copied straight in, so no chunk is held and no part is copied twice. */
  private current: Buffer | undefined
  private filled = 0
  /**
   * Part buffers whose upload succeeded, filled again: a fresh 8 MiB buffer per part is freed only when the GC runs, so
   * dead parts were held beside the live ones.
   */
  private readonly spare: Buffer[] = []
  private uploadId: Promise<string> | undefined
  private readonly inFlight = new Set<Promise<void>>()
  private readonly done: CompletedPart[] = []
  private failure: Error | undefined
  private completed = false
  private readonly started = Date.now()
  private readonly onAbort = (): void => { this.destroy(new VmapipeError('E_INTERRUPTED', `${this.where}: upload stopped`)) }

  constructor (
    private readonly client: S3Client, private readonly bucket: string, private readonly key: string,
    private readonly options: S3UploadOptions = {}
  ) {
    super({ highWaterMark: MiB })
    this.where = formatS3Url({ bucket, key })
    this.checksum = options.checksum ?? checksumOf(client)
    this.firstPart = Math.max(MIN_PART, options.partSize ?? FIRST_PART)
    this.partsPerStep = Math.max(1, options.partsPerStep ?? 1000)
    this.maxInFlight = Math.max(1, options.maxInFlight ?? 4)
    this.partAttempts = Math.max(1, options.partAttempts ?? 5)
    if (options.signal?.aborted === true) process.nextTick(this.onAbort)
    else options.signal?.addEventListener('abort', this.onAbort, { once: true })
  }

  /** The size of part `n` (from 1). */
  private partSize (n: number): number {
    return Math.min(MAX_PART, this.firstPart * 2 ** Math.floor((n - 1) / this.partsPerStep))
  }

  override _write (chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.stats.bytes += chunk.length
    // Copied into parts, a chunk lent from a slab (the VMA writer's) goes back to be filled again, not to the GC.
    this.fill(chunk).then(() => { giveBack(chunk); callback() }, callback)
  }

  override _final (callback: (error?: Error | null) => void): void {
    this.finish().then(() => callback(), callback)
  }

  override _destroy (error: Error | null, callback: (error?: Error | null) => void): void {
    this.options.signal?.removeEventListener('abort', this.onAbort)
    this.current = undefined
    this.spare.length = 0
    if (this.completed) { callback(error); return }
    this.failure ??= error ?? new VmapipeError('E_INTERRUPTED', `${this.where}: upload stopped`)
    this.requests.abort()
    this.abortUpload().then(() => callback(error), abortError => callback(error ?? abortError))
  }

  /** Copies `chunk` into parts, sending each one full; waits while maxInFlight parts are on their way (the stream's backpressure). */
  private async fill (chunk: Buffer): Promise<void> {
    for (let at = 0; at < chunk.length;) {
      this.current ??= this.partBuffer(this.partSize(this.stats.parts + 1))
      const n = chunk.copy(this.current, this.filled, at)
      at += n
      this.filled += n
      if (this.filled === this.current.length) await this.sendPart(this.take())
    }
  }

  /** A buffer for a part of `size` bytes: a spare one of that size, else a new one. */
  private partBuffer (size: number): Buffer {
    while (this.spare.length > 0) {
      const buf = this.spare.pop() as Buffer
      // Spares of the size before a doubling are dropped.
      if (buf.length === size) return buf
    }
    return Buffer.allocUnsafe(size)
  }

  /** `body` (a whole part buffer, once its upload has succeeded: no request reads it any more) to be filled again. */
  private recycle (body: Buffer): void {
    if (body.byteOffset === 0 && body.length === body.buffer.byteLength && this.spare.length < this.maxInFlight) this.spare.push(body)
  }

  /** The bytes of the part being filled, which is then empty. */
  private take (): Buffer {
    const body = (this.current ?? Buffer.alloc(0)).subarray(0, this.filled)
    this.current = undefined
    this.filled = 0
    return body
  }

  /** Throws the first failure of a part, if any. */
  private check (): void {
    if (this.failure !== undefined) throw this.failure
  }

  private async sendPart (body: Buffer): Promise<void> {
    this.check()
    const number = ++this.stats.parts
    if (number > MAX_PARTS) throw new VmapipeError('E_LIMIT', `${this.where}: more than ${MAX_PARTS} parts`)
    this.uploadId ??= this.createUpload()
    const uploadId = await this.uploadId
    // Destroyed while the upload was being started: no part after the abort has begun.
    this.check()
    const sent: Promise<void> = this.uploadPart(uploadId, number, body)
      .then(part => { this.done.push(part); this.recycle(body) }, (err: Error) => { this.failure ??= err })
      .finally(() => this.inFlight.delete(sent))
    this.inFlight.add(sent)
    while (this.inFlight.size >= this.maxInFlight) await Promise.race(this.inFlight)
    this.check()
  }

  /**
   * Not stopped with the other requests: a store may have made the upload before its answer is in, and only with its
   * id can abortUpload abort it (Ctrl-C in that moment left the upload open).
   */
  private async createUpload (): Promise<string> {
    const created = await this.client.send(new CreateMultipartUploadCommand({
      Bucket: this.bucket,
      Key: this.key,
      ContentType: this.options.contentType,
      ChecksumAlgorithm: this.checksum === 'crc32' ? 'CRC32' : undefined,
    })).catch(err => { throw s3Error(err, `starting the upload of ${this.where}`) })
    if (created.UploadId === undefined) throw new VmapipeError('E_S3_REQUEST', `${this.where}: the store gave no upload id`)
    this.options.log?.debug?.({ url: this.where, uploadId: created.UploadId }, 'multipart upload started')
    return created.UploadId
  }

  /** The checksum fields of a request carrying `body`. */
  private checksumFields (body: Buffer): { ChecksumAlgorithm?: 'CRC32', ContentMD5?: string } {
    if (this.checksum === 'crc32') return { ChecksumAlgorithm: 'CRC32' }
    if (this.checksum === 'md5') return { ContentMD5: createHash('md5').update(body).digest('base64') }
    return {}
  }

  /**
   * Runs `send` until it succeeds, again (with its buffer, which a stream could not give twice) after a connection
   * failure. The SDK makes its own attempts first; they count as retries too.
   */
  private async withRetries<T extends { $metadata: { attempts?: number } }> (what: string, send: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        const res = await send()
        this.countSdkRetries(what, res.$metadata.attempts)
        return res
      } catch (err) {
        this.countSdkRetries(what, (err as { $metadata?: { attempts?: number } }).$metadata?.attempts)
        if (this.requests.signal.aborted || attempt >= this.partAttempts || !isNetworkError(err)) throw s3Error(err, `${what} of ${this.where}`)
        this.stats.retries++
        this.options.log?.warn({ url: this.where, what, attempt, error: (err as Error).message }, 'S3 request failed; sending it again')
        await sleep(backoff(attempt), undefined, { signal: this.requests.signal }).catch(() => undefined)
      }
    }
  }

  private countSdkRetries (what: string, attempts: number | undefined): void {
    if (attempts === undefined || attempts <= 1) return
    this.stats.retries += attempts - 1
    this.options.log?.warn({ url: this.where, what, attempts }, 'S3 request sent again by the SDK')
  }

  private async uploadPart (uploadId: string, number: number, body: Buffer): Promise<CompletedPart> {
    const res = await this.withRetries(`part ${number}`, async () => await this.client.send(new UploadPartCommand({
      Bucket: this.bucket, Key: this.key, UploadId: uploadId, PartNumber: number, Body: body, ContentLength: body.length, ...this.checksumFields(body),
    }), { abortSignal: this.requests.signal }))
    this.options.log?.debug?.({ url: this.where, part: number, bytes: body.length }, 'part uploaded')
    return { PartNumber: number, ETag: res.ETag, ChecksumCRC32: res.ChecksumCRC32 }
  }

  private async finish (): Promise<void> {
    if (this.stats.parts === 0) {
      // The whole stream fits in one part: one PUT.
      const body = this.take()
      this.stats.parts = 1
      await this.withRetries('upload', async () => await this.client.send(new PutObjectCommand({
        Bucket: this.bucket, Key: this.key, Body: body, ContentLength: body.length, ContentType: this.options.contentType, ...this.checksumFields(body),
      }), { abortSignal: this.requests.signal }))
    } else {
      if (this.filled > 0) await this.sendPart(this.take())
      await Promise.all(this.inFlight)
      this.check()
      const uploadId = await (this.uploadId as Promise<string>)
      const parts = [...this.done].sort((a, b) => (a.PartNumber ?? 0) - (b.PartNumber ?? 0))
      await this.withRetries('completing the upload', async () => await this.client.send(new CompleteMultipartUploadCommand({
        Bucket: this.bucket, Key: this.key, UploadId: uploadId, MultipartUpload: { Parts: parts },
      }), { abortSignal: this.requests.signal }))
    }
    this.completed = true
    const ms = Date.now() - this.started
    this.options.log?.info({ url: this.where, ...this.stats, seconds: ms / 1000, rate: rate(this.stats.bytes, ms) }, 'uploaded')
  }

  /** Aborts the multipart upload once its parts in flight have settled (a part finishing after the abort could be kept). */
  private async abortUpload (): Promise<void> {
    if (this.uploadId === undefined) return
    const uploadId = await this.uploadId.catch(() => undefined)
    if (uploadId === undefined) return
    await Promise.all(this.inFlight)
    await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: this.key, UploadId: uploadId }))
      .catch(err => { if (s3Error(err, '').code !== 'E_S3_NOT_FOUND') throw s3Error(err, `aborting the upload of ${this.where}`) })
    this.options.log?.info({ url: this.where, uploadId, parts: this.stats.parts, bytes: this.stats.bytes }, 'upload aborted')
  }
}

/** A Writable whose bytes become the object `key` in `bucket`, only once all have been written ('finish'). */
export function createS3Upload (client: S3Client, bucket: string, key: string, options: S3UploadOptions = {}): S3Upload {
  return new S3Upload(client, bucket, key, options)
}
