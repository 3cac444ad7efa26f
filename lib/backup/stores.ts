/** The store a job's target names: s3://BUCKET/PREFIX/, or a local directory. */
import type { S3StoreOptions } from './s3-store.js'
import { type BackupStore, DirectoryStore } from './store.js'

/** Whether a target is a bucket (here, not from lib/s3/: a job to a directory loads no AWS SDK). */
const isBucket = (target: string): boolean => /^s3:\/\//i.test(target)

export async function openStore (target: string, options: S3StoreOptions = {}): Promise<BackupStore> {
  if (!isBucket(target)) return await DirectoryStore.open(target)
  const { S3BackupStore } = await import('./s3-store.js')
  return new S3BackupStore(target, options)
}
