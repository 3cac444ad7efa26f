/**
 * VMA, Proxmox's backup archive: several disks and config files in one
 * stream. Read front to back (VmaReader), written front to back (VmaWriter),
 * or, uncompressed in a file, opened by random access through an index of
 * its extents (openArchiveIndex).
 */
export {
  VMA_MAGIC, EXTENT_MAGIC, HEADER_FIXED_SIZE, MAX_HEADER_SIZE, EXTENT_HEADER_SIZE, MAX_EXTENT_CLUSTERS, MAX_CONFIGS, MAX_BLOB_SIZE,
  parseHeader, parseExtentHeader, encodeHeader, encodeExtentHeader,
  type VmaHeader, type ExtentHeader, type ExtentEntry, type HeaderSpec,
} from './format.js'
export { VmaReader, type VmaReaderOptions, type DeviceStats } from './stream.js'
export { VmaWriter, type WriterStats } from './writer.js'
export { openArchiveIndex, type ArchiveIndex } from './archive-index.js'
export type { PositionalReader } from '../io/pread.js'

export { vma } from './descriptor.js'
