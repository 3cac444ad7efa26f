/**
 * The raw descriptor, apart from the folder's public entry (index.ts) so that
 * the registry can list it without loading the reader and the writer: those
 * are imported when a raw disk is first opened, streamed or written.
 */
import { join } from 'node:path'
import type { DeviceInfo, DiskOutput, FormatDescriptor } from '../contracts.js'

/** A device as a raw file named `name`. */
export function rawOutput (name: string, device: DeviceInfo): DiskOutput {
  return {
    names: [name],
    create: async (dir, writes) => await (await import('./writer.js')).RawFileWriter.create(join(dir, name), device.size, writes),
  }
}

export const raw: FormatDescriptor<'raw'> = {
  name: 'raw',
  kind: 'image',
  detect: () => false,
  open: async path => await (await import('./image.js')).RawImage.open(path),
  stream: async (input, options) => {
    const size = options.size
    if (size === undefined) return undefined
    const [{ chain }, { counter }, { RawReader }] = await Promise.all([import('../io/chain.js'), import('../io/progress.js'), import('./stream.js')])
    const device = { id: 0, name: options.where ?? 'stdin', size }
    return {
      size,
      records: async (id, progress) => chain(input, ...(progress ? [await counter(progress)] : []), new RawReader({ ...device, id })),
    }
  },
  writer: device => rawOutput(`disk-${device.name}.raw`, device),
}
