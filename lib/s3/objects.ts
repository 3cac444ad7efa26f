/** Small objects and listings: what jobs keep beside archives (sidecars, locks), and the housekeeping of uploads. */
import {
  AbortMultipartUploadCommand, DeleteObjectCommand, GetObjectCommand, HeadObjectCommand, ListMultipartUploadsCommand,
  ListObjectsV2Command, PutObjectCommand, type S3Client,
} from '@aws-sdk/client-s3'
import type { Readable } from 'node:stream'
import { VmapipeError } from '../errors.js'
import { s3Error } from './fail.js'
import { formatS3Url } from './url.js'

export interface S3Object {
  key: string
  size: number
  lastModified: Date
  etag: string
}

const where = (bucket: string, key: string): string => formatS3Url({ bucket, key })

/** Every object under `prefix` (all pages, in key order). */
export async function * listObjects (client: S3Client, bucket: string, prefix: string): AsyncIterable<S3Object> {
  let token: string | undefined
  do {
    const page = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }))
      .catch(err => { throw s3Error(err, `listing ${where(bucket, prefix)}`) })
    for (const o of page.Contents ?? []) {
      if (o.Key === undefined) continue
      yield { key: o.Key, size: o.Size ?? 0, lastModified: o.LastModified ?? new Date(0), etag: o.ETag ?? '' }
    }
    token = page.IsTruncated === true ? page.NextContinuationToken : undefined
  } while (token !== undefined)
}

/** An object's size, ETag and date; E_S3_NOT_FOUND where there is none. */
export async function headObject (client: S3Client, bucket: string, key: string, signal?: AbortSignal): Promise<S3Object> {
  const head = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }), { abortSignal: signal })
    .catch(err => { throw s3Error(err, where(bucket, key)) })
  return { key, size: head.ContentLength ?? 0, lastModified: head.LastModified ?? new Date(0), etag: head.ETag ?? '' }
}

/** A small object's bytes; E_LIMIT (before reading it) where it holds more than `maxBytes`. */
export async function getObjectBytes (client: S3Client, bucket: string, key: string, maxBytes: number): Promise<Buffer> {
  const res = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }))
    .catch(err => { throw s3Error(err, where(bucket, key)) })
  const body = res.Body as Readable
  if ((res.ContentLength ?? 0) > maxBytes) {
    body.destroy()
    throw new VmapipeError('E_LIMIT', `${where(bucket, key)}: ${res.ContentLength} bytes, more than the ${maxBytes} expected`)
  }
  const chunks: Buffer[] = []
  let length = 0
  try {
    for await (const chunk of body) {
      length += (chunk as Buffer).length
      if (length > maxBytes) throw new VmapipeError('E_LIMIT', `${where(bucket, key)}: more than the ${maxBytes} bytes expected`)
      chunks.push(chunk as Buffer)
    }
  } catch (err) {
    body.destroy()
    throw s3Error(err, where(bucket, key))
  }
  return Buffer.concat(chunks)
}

/** Writes a small object whole (replacing one under the key). */
export async function putObjectBytes (client: S3Client, bucket: string, key: string, body: Buffer | string): Promise<void> {
  await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body }))
    .catch(err => { throw s3Error(err, where(bucket, key)) })
}

/** Whether an error answers a conditional header the store does not know (some say 501, some 400 naming the header). */
function refusesCondition (err: unknown): boolean {
  const e = err as { name?: string, message?: string, $metadata?: { httpStatusCode?: number } }
  if (e?.name === 'NotImplemented' || e?.$metadata?.httpStatusCode === 501) return true
  return e?.$metadata?.httpStatusCode === 400 && /if-none-match|conditional/i.test(`${e.name ?? ''} ${e.message ?? ''}`)
}

/**
 * Creates the object only where the key is free (`If-None-Match: *`): true
 * when this call created it, false when one was there (412, or 409 where a
 * create raced another). E_S3_UNSUPPORTED where the store refuses the condition.
 */
export async function putIfAbsent (client: S3Client, bucket: string, key: string, body: Buffer | string): Promise<boolean> {
  try {
    await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body, IfNoneMatch: '*' }))
    return true
  } catch (err) {
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode
    if (status === 412 || status === 409) return false
    if (refusesCondition(err)) {
      throw new VmapipeError('E_S3_UNSUPPORTED', `${where(bucket, key)}: the store does not create objects on condition (If-None-Match)`, { cause: err })
    }
    throw s3Error(err, where(bucket, key))
  }
}

/** Removes an object; one that is not there is not an error (S3 answers 204 either way). */
export async function deleteObject (client: S3Client, bucket: string, key: string): Promise<void> {
  await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: key }))
    .catch(err => { throw s3Error(err, `deleting ${where(bucket, key)}`) })
}

/**
 * Aborts the unfinished multipart uploads under `prefix` begun before
 * `olderThan` (all of them without it): what a killed run left behind, which
 * the store would keep, and bill, forever. Returns how many were aborted.
 */
export async function abortStaleUploads (client: S3Client, bucket: string, prefix: string, olderThan?: Date): Promise<number> {
  let aborted = 0
  let keyMarker: string | undefined
  let idMarker: string | undefined
  do {
    const page = await client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: prefix, KeyMarker: keyMarker, UploadIdMarker: idMarker }))
      .catch(err => { throw s3Error(err, `listing the uploads under ${where(bucket, prefix)}`) })
    for (const u of page.Uploads ?? []) {
      if (u.Key === undefined || u.UploadId === undefined) continue
      if (olderThan !== undefined && u.Initiated !== undefined && u.Initiated >= olderThan) continue
      try {
        await client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: u.Key, UploadId: u.UploadId }))
        aborted++
      } catch (err) {
        // Finished or aborted by another run since the listing.
        if (s3Error(err, '').code !== 'E_S3_NOT_FOUND') throw s3Error(err, `aborting the upload of ${where(bucket, u.Key)}`)
      }
    }
    const more = page.IsTruncated === true
    keyMarker = more ? page.NextKeyMarker : undefined
    idMarker = more ? page.NextUploadIdMarker : undefined
  } while (keyMarker !== undefined)
  return aborted
}
