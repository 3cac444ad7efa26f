/**
 * vmapipe: stream Proxmox VMA backups. The public face of the library.
 *
 *   bytes -> createDecompressor() -> VmaReader -> DeviceRouter(RawFileWriter | RawStreamWriter | ...)
 */
export * from './record.js'
export { VmapipeError, EXIT, type ErrorCode, type ErrorPlace } from './errors.js'
export { VmaReader, type VmaReaderOptions, type DeviceStats } from './vma/reader.js'
export {
  VMA_MAGIC, EXTENT_MAGIC, HEADER_FIXED_SIZE, MAX_HEADER_SIZE, EXTENT_HEADER_SIZE, MAX_EXTENT_CLUSTERS, MAX_CONFIGS, MAX_BLOB_SIZE,
  parseHeader, parseExtentHeader, type VmaHeader, type ExtentHeader, type ExtentEntry,
} from './vma/format.js'
export { VmaWriter, type WriterStats } from './vma/writer.js'
export { encodeHeader, encodeExtentHeader, type HeaderSpec } from './vma/format.js'
export { DeviceRouter, type DiskWriter, type WriterFactory } from './router.js'
export { RecordMerger } from './merge.js'
export { RawFileWriter, RawStreamWriter } from './raw/writer.js'
export { RawReader } from './raw/reader.js'
export { openDisk, detectDiskFormat, type DiskSpec, type DiskSource, type DiskFormat } from './sources.js'
export { packArchive, type PackOptions, type PackResult } from './pack.js'
export { openOutput, type Output } from './io/output.js'
export { WriteQueue, type WriteQueueOptions } from './io/write-queue.js'
export { type ReorderOptions } from './io/reorder.js'
export { createDecompressor, createCompressor, createCompressingSink, detectCompression, compressionForName, type Compression } from './io/compression.js'
export { openInput, type Input } from './io/input.js'
export { type ProgressSink } from './io/progress.js'
export { readArchiveInfo, verifyArchive, runRecordPipeline, findDevices, disksOf, type ReadOptions, type VerifyReport } from './archive.js'
export { extractToDirectory, extractToStream, extractToNbd, type ExtractOptions, type ExtractToDirOptions, type ExtractResult } from './extract.js'
export { diskOutput, OUTPUT_FORMATS, type OutputFormat, type OutputOptions, type DiskOutput } from './formats.js'
export {
  diskRecords, dirtyRecords, describeBitmaps,
  type RandomAccessDisk, type Extent, type DirtyBitmap, type DiskDescription, type StreamedImage, type DiskRecordsOptions,
} from './disk.js'
export { openImageFile } from './sources.js'
export { describeImage } from './info.js'
export { RawImage } from './raw/image.js'
export {
  parseHeader as parseParallelsHeader, encodeHeader as encodeParallelsHeader, parseBat, encodeBat, parseFormatExtension, encodeFormatExtension, isParallels,
  type ParallelsHeader, type BitmapFeature, type FormatExtension,
} from './parallels/format.js'
export { ParallelsImage, ParallelsBitmap, streamParallels } from './parallels/reader.js'
export { ParallelsWriter, ParallelsBundleWriter, type ParallelsWriterOptions, type BitmapInput } from './parallels/writer.js'
export { ParallelsBundle, snapshotChain, type BundleLayer } from './parallels/bundle.js'
export {
  parseDescriptor, buildDescriptor, addSnapshotImage, topOf, TOP_GUID, ROOT_PARENT,
  type DiskDescriptor, type DescriptorImage, type DescriptorStorage,
} from './parallels/descriptor.js'
export { Qcow2Image, type Qcow2OpenOptions } from './qcow2/reader.js'
export { Qcow2FileWriter, type Qcow2WriterOptions } from './qcow2/writer.js'
export { readJob, checkJob, type BackupJob, type JobDisk, type JobConfig } from './backup/job.js'
export { runBackupJob, type BackupOptions, type BackupResult } from './backup/run.js'
export { planPrune, type Retention, type PruneItem, type PruneMark } from './backup/retention.js'
export { archiveName, imageName, parseArchiveName, sidecars } from './backup/naming.js'
export { acquireLock, type Lock } from './backup/lock.js'
export { openVmaIndex, type VmaIndex } from './vma/index.js'
export { NbdServer, type NbdExport, type NbdServerOptions, type ServerLog, type ListenAddress } from './nbd/server.js'
export {
  NbdClient, NbdReplyError, openNbdDisk, parseNbdUri, isNbdUri, describeAddress,
  type NbdAddress, type NbdClientOptions, type NbdClientStats, type NbdDisk, type OpenNbdDiskOptions,
} from './nbd/client.js'
export { NbdDiskWriter, type NbdWriteStats } from './nbd/writer.js'
export { openExports, type OpenedExports } from './nbd/exports.js'
/** The NBD wire format: constants, encoders and decoders. */
export * as nbd from './nbd/protocol.js'
export { writeOverlay, writeImage, type OverlayOptions, type OverlayResult } from './incremental.js'
