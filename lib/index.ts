/**
 * vmapipe: stream Proxmox VMA backups. The root holds the jobs and the pieces
 * a record pipeline is built from:
 *
 *   bytes -> createDecompressor() -> VmaReader -> DeviceRouter(a format's writer per device)
 *
 * Each format's own pieces (images, stream readers, writers, encoders) are
 * under its subpath: vmapipe/vma, vmapipe/qcow2, vmapipe/parallels,
 * vmapipe/raw; the NBD transport under vmapipe/nbd; backup jobs' parts under
 * vmapipe/backup.
 */
export type * from './contracts.js'
export { CLUSTER_SIZE, BLOCK_SIZE, VMSTATE_NAME } from './record.js'
export { VmapipeError, type ErrorCode, type ErrorDetails, type ErrorFault, type ErrorPlace } from './errors.js'
// Jobs
export { readArchiveInfo, verifyArchive, type ReadOptions, type VerifyReport } from './jobs/archive.js'
export {
  extractToDirectory, extractToStream, extractToNbd,
  type ExtractOptions, type ExtractToDirOptions, type ExtractToStreamOptions, type ExtractResult,
} from './jobs/extract.js'
export { openDisk, openImageFile, type DiskSpec, type DiskSource } from './jobs/sources.js'
export { packArchive, type PackOptions, type PackResult } from './jobs/pack.js'
export { describeImage, type DescribeOptions } from './jobs/info.js'
export { openExports, type OpenedExports } from './jobs/exports.js'
export { writeOverlay, type OverlayOptions, type OverlayResult } from './jobs/incremental.js'
export { runBackupJob, type BackupOptions, type BackupResult } from './backup/run.js'
export { openLiveArchive, type LiveArchive, type LiveLog, type LiveOptions, type LiveOutcome } from './jobs/live.js'
export { NbdServer, type NbdServerOptions, type NbdExport, type ListenAddress, type ServerLog } from './nbd/server.js'
// Formats, and what a device becomes in each
export { FORMATS, formatNamed, type FormatName } from './jobs/registry.js'
export { diskOutput, type OutputOptions } from './jobs/targets.js'
// Stream pieces
export { openInput, type Input } from './io/input.js'
export { openOutput, type Output } from './io/output.js'
export { openArchiveInput, openArchiveOutput, openS3Reader, type ArchiveOutput, type S3Access } from './jobs/s3.js'
export { createDecompressor, createCompressor, type Compression } from './io/compression.js'
export { runStages, type Stage } from './io/chain.js'
export { VmaReader, type VmaReaderOptions } from './vma/stream.js'
export { VmaWriter } from './vma/writer.js'
export { DeviceRouter } from './jobs/router.js'
export { RecordMerger } from './jobs/merge.js'
