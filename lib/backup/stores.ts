/** The store a job's target names: s3://BUCKET/PREFIX/, or a local directory. */
import { isS3Url } from '../s3/index.js'
import { S3BackupStore, type S3StoreOptions } from './s3-store.js'
import { type BackupStore, DirectoryStore } from './store.js'

export async function openStore (target: string, options: S3StoreOptions = {}): Promise<BackupStore> {
  return isS3Url(target) ? new S3BackupStore(target, options) : await DirectoryStore.open(target)
}
