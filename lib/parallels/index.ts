/**
 * Parallels disks: an expandable image (.hds) alone, or a bundle (.hdd): a
 * directory with DiskDescriptor.xml naming its images, snapshots as layers.
 */
import { join } from 'node:path'
import type { DeviceInfo, DiskOutput, FileWrites, FormatDescriptor, OutputOptions } from '../contracts.js'
import { isParallels } from './format.js'
import { ParallelsImage } from './image.js'
import { streamParallels } from './stream.js'
import { ParallelsBundleWriter, ParallelsWriter } from './writer.js'
import { ParallelsBundle, isDescriptor } from './bundle.js'

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

type Create = (path: string, size: number, options: { clusterSize?: number, queue: FileWrites }) => Promise<ParallelsWriter | ParallelsBundleWriter>

function output (name: string, device: DeviceInfo, options: OutputOptions, create: Create): DiskOutput {
  const clusterSize = options.clusterSize === undefined ? {} : { clusterSize: options.clusterSize }
  return { names: [name], create: async (dir, writes) => await create(join(dir, name), device.size, { ...clusterSize, queue: writes }) }
}

export const parallels: FormatDescriptor<'parallels'> = {
  name: 'parallels',
  kind: 'image',
  detect: isParallels,
  open: async path => await ParallelsImage.open(path),
  stream: async (input, options) => await streamParallels(input, options.where ?? 'stdin'),
  writer: (device, options) => output(`disk-${device.name}.hds`, device, options, async (...a) => await ParallelsWriter.create(...a)),
  outputOptions: ['clusterSize'],
}

export const parallelsBundle: FormatDescriptor<'parallels-bundle'> = {
  name: 'parallels-bundle',
  kind: 'image',
  detect: isDescriptor,
  directory: true,
  open: async path => await ParallelsBundle.open(path),
  writer: (device, options) => output(`disk-${device.name}.hdd`, device, options, async (...a) => await ParallelsBundleWriter.create(...a)),
  outputOptions: ['clusterSize'],
}
