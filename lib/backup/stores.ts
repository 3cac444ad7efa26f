/** The store a job's target names: s3://BUCKET/PREFIX/, or a local directory. */
import { type BackupStore, DirectoryStore } from './store.js'

export async function openStore (target: string): Promise<BackupStore> {
  return await DirectoryStore.open(target)
}
