/**
 * A backup store in an S3 bucket under a prefix: the archive streamed
 * straight into a multipart upload (no temporary file; the object appears
 * under its key only when the upload completes), sidecars as small objects,
 * the lock per VM as an object made by conditional create (object-lock.ts),
 * and the unfinished uploads of killed runs aborted.
 */
import type { S3Client } from '@aws-sdk/client-s3'
import { finished } from 'node:stream/promises'
import { VmapipeError } from '../errors.js'
import {
  type S3Log, type S3Options, abortStaleUploads, createS3Upload, deleteObject, formatS3Url, getObjectBytes, listObjects, openS3Read, parseS3Url,
  putIfAbsent, putObjectBytes, s3Client,
} from '../s3/index.js'
import type { Lock } from './lock.js'
import { type LockObjects, acquireObjectLock } from './object-lock.js'
import { type ArchiveOutput, type BackupStore, type LeftoverReport, type StoredFile, vmPrefix } from './store.js'

/** Lock objects are a few hundred bytes; anything bigger under the key is not one of ours. */
const LOCK_MAX_BYTES = 64 * 1024
/** Without the lock (`"lock": "none"`), an unfinished upload is another run's until it is this old. */
const UNLOCKED_STALE_MS = 24 * 3600_000

export interface S3StoreOptions extends S3Options {
  /** Where uploads report parts, retries and their rate. */
  log?: S3Log
  /** The lock's time to live (renewed every third of it); default 10 minutes. */
  lockTtlMs?: number
}

export class S3BackupStore implements BackupStore {
  readonly kind = 's3'
  readonly location: string
  private readonly client: S3Client
  private readonly bucket: string
  /** '' or ending in '/'. */
  private readonly prefix: string

  constructor (target: string, private readonly options: S3StoreOptions = {}) {
    const { bucket, key } = parseS3Url(target)
    this.bucket = bucket
    // s3://bucket/pve1 and s3://bucket/pve1/ are the same prefix: backups are never named by a bare key.
    this.prefix = key === '' || key.endsWith('/') ? key : `${key}/`
    this.location = formatS3Url({ bucket, key: this.prefix })
    this.client = s3Client(options)
  }

  locate (name: string): string {
    return formatS3Url({ bucket: this.bucket, key: this.prefix + name })
  }

  async list (prefix: string): Promise<StoredFile[]> {
    const files: StoredFile[] = []
    for await (const o of listObjects(this.client, this.bucket, this.prefix + prefix)) {
      const name = o.key.slice(this.prefix.length)
      // Only the prefix's own level, as a directory lists: not the locks, nor another prefix below it.
      if (!name.includes('/')) files.push({ name, size: o.size, modified: o.lastModified })
    }
    return files
  }

  async openArchive (name: string): Promise<ArchiveOutput> {
    const key = this.prefix + name
    const upload = createS3Upload(this.client, this.bucket, key, this.options.log !== undefined ? { log: this.options.log } : {})
    const complete = (): boolean => upload.writableFinished
    return {
      stream: upload,
      readBack: async () => openS3Read(this.client, this.bucket, key),
      // The upload completed when the stream finished: the object is there.
      commit: async () => {
        if (!complete()) throw new VmapipeError('E_IO', `${this.locate(name)}: the upload did not complete`)
      },
      abort: async () => {
        if (complete()) {
          await deleteObject(this.client, this.bucket, key)
          return
        }
        // destroy() aborts the multipart upload; 'close' comes once the store has been told.
        if (!upload.destroyed) upload.destroy()
        await finished(upload).catch(() => {})
      },
      report: () => ({ ...upload.stats }),
    }
  }

  async writeFile (name: string, data: string): Promise<void> {
    await putObjectBytes(this.client, this.bucket, this.prefix + name, data)
  }

  async remove (name: string): Promise<void> {
    await deleteObject(this.client, this.bucket, this.prefix + name)
  }

  async lock (vmid: number, what: string): Promise<Lock> {
    const objects: LockObjects = {
      create: async (key, body) => await putIfAbsent(this.client, this.bucket, key, body).catch(err => {
        if ((err as VmapipeError).code !== 'E_S3_UNSUPPORTED') throw err
        throw new VmapipeError('E_S3_UNSUPPORTED', `${what}: the store refuses conditional creates (If-None-Match: * on PUT), which the lock per VM ` +
          `needs across hosts; without a lock, runs of one VM must never overlap (${(err as Error).message})`, { option: 'lock', cause: err })
      }),
      read: async key => {
        try {
          return (await getObjectBytes(this.client, this.bucket, key, LOCK_MAX_BYTES)).toString('utf8')
        } catch (err) {
          if ((err as VmapipeError).code === 'E_S3_NOT_FOUND') return undefined
          throw err
        }
      },
      put: async (key, body) => { await putObjectBytes(this.client, this.bucket, key, body) },
      remove: async key => { await deleteObject(this.client, this.bucket, key) },
      locate: key => formatS3Url({ bucket: this.bucket, key }),
    }
    return await acquireObjectLock(objects, `${this.prefix}locks/vzdump-qemu-${vmid}.lock`, what,
      this.options.lockTtlMs !== undefined ? { ttlMs: this.options.lockTtlMs } : {})
  }

  async removeLeftovers (vmid: number, report: LeftoverReport, locked: boolean): Promise<void> {
    // Under the lock no other run writes this VM's keys: every unfinished upload of them was left by a run that was killed.
    // Without it, only one begun longer ago than any backup takes.
    const olderThan = locked ? undefined : new Date(Date.now() - UNLOCKED_STALE_MS)
    const aborted = await abortStaleUploads(this.client, this.bucket, this.prefix + vmPrefix(vmid), olderThan)
    const what = `aborted ${aborted} unfinished upload${aborted === 1 ? '' : 's'} of VM ${vmid} left by runs that were killed`
    report(what, { abortedUploads: aborted }, aborted > 0)
  }

  close (): void {
    this.client.destroy()
  }
}
