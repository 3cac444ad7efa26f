/**
 * The Parallels descriptors, apart from the folder's public entry (index.ts)
 * so that the registry can list them without loading the readers and the
 * writers: those are imported when an image is first opened, streamed or written.
 */
import { join } from 'node:path'
import type { DeviceInfo, DiskOutput, DiskWriter, FileWrites, FormatDescriptor, OutputOptions } from '../contracts.js'
import { isParallels } from './format.js'

type Writers = typeof import('./writer.js')
type Create = (writers: Writers, path: string, size: number, options: { clusterSize?: number, queue: FileWrites }) => Promise<DiskWriter>

function output (name: string, device: DeviceInfo, options: OutputOptions, create: Create): DiskOutput {
  const clusterSize = options.clusterSize === undefined ? {} : { clusterSize: options.clusterSize }
  return {
    names: [name],
    create: async (dir, writes) => await create(await import('./writer.js'), join(dir, name), device.size, { ...clusterSize, queue: writes }),
  }
}

/** A DiskDescriptor.xml's first bytes. */
function isDescriptor (head: Buffer): boolean {
  return head.toString('utf8').includes('<Parallels_disk_image')
}

export const parallels: FormatDescriptor<'parallels'> = {
  name: 'parallels',
  kind: 'image',
  detect: isParallels,
  open: async path => await (await import('./image.js')).ParallelsImage.open(path),
  stream: async (input, options) => await (await import('./stream.js')).streamParallels(input, options.where ?? 'stdin'),
  writer: (device, options) => output(`disk-${device.name}.hds`, device, options, async (w, ...a) => await w.ParallelsWriter.create(...a)),
  outputOptions: ['clusterSize'],
}

export const parallelsBundle: FormatDescriptor<'parallels-bundle'> = {
  name: 'parallels-bundle',
  kind: 'image',
  detect: isDescriptor,
  directory: true,
  open: async path => await (await import('./bundle.js')).ParallelsBundle.open(path),
  writer: (device, options) => output(`disk-${device.name}.hdd`, device, options, async (w, ...a) => await w.ParallelsBundleWriter.create(...a)),
  outputOptions: ['clusterSize'],
}
