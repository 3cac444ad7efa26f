/**
 * Raw disks: the guest's bytes and nothing else. Raw has no magic, so it is
 * what detection falls back to when no other format claims a file.
 */
import { join } from 'node:path'
import type { DeviceInfo, DiskOutput, FormatDescriptor } from '../contracts.js'
import { chain } from '../io/chain.js'
import { counter } from '../io/progress.js'
import { RawImage } from './image.js'
import { RawReader } from './stream.js'
import { RawFileWriter } from './writer.js'

export { RawImage } from './image.js'
export { dataExtents } from './holes.js'
export { RawReader } from './stream.js'
export { RawFileWriter, RawStreamWriter } from './writer.js'
export type { ReorderOptions } from '../io/reorder.js'

/** A device as a raw file named `name`. */
export function rawOutput (name: string, device: DeviceInfo): DiskOutput {
  return { names: [name], create: async (dir, writes) => await RawFileWriter.create(join(dir, name), device.size, writes) }
}

export const raw: FormatDescriptor<'raw'> = {
  name: 'raw',
  kind: 'image',
  detect: () => false,
  open: async path => await RawImage.open(path),
  stream: async (input, options) => {
    const size = options.size
    if (size === undefined) return undefined
    const device = { id: 0, name: options.where ?? 'stdin', size }
    return {
      size,
      records: async (id, progress) => chain(input, ...(progress ? [await counter(progress)] : []), new RawReader({ ...device, id })),
    }
  },
  writer: device => rawOutput(`disk-${device.name}.raw`, device),
}
