/**
 * Parallels disks: an expandable image (.hds) alone, or a bundle (.hdd): a
 * directory with DiskDescriptor.xml naming its images, snapshots as layers.
 */
export {
  parseHeader, encodeHeader, parseBat, encodeBat, parseFormatExtension, encodeFormatExtension, isParallels,
  type ParallelsHeader, type BitmapFeature, type FormatExtension,
} from './format.js'
export { ParallelsImage, ParallelsBitmap } from './image.js'
export { streamParallels } from './stream.js'
export { ParallelsWriter, ParallelsBundleWriter, type ParallelsWriterOptions, type BitmapInput } from './writer.js'
export { ParallelsBundle, snapshotChain, type BundleLayer } from './bundle.js'
export {
  parseDescriptor, buildDescriptor, addSnapshotImage, topOf, TOP_GUID, ROOT_PARENT,
  type DiskDescriptor, type DescriptorImage, type DescriptorStorage,
} from './disk-descriptor.js'

export { parallels, parallelsBundle } from './descriptor.js'
