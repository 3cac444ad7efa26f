/** Scheduled backup jobs: the job file, the run, vzdump names, retention and the lock per VM. */
export { readJob, checkJob, type BackupJob, type JobDisk, type JobConfig, type JobLog } from './job.js'
export { runBackupJob, type BackupOptions, type BackupResult } from './run.js'
export { planPrune, type Retention, type PruneItem, type PruneMark } from './retention.js'
export { archiveName, imageName, parseArchiveName, sidecars, type ArchiveFile } from './naming.js'
export { acquireLock, type Lock } from './lock.js'
