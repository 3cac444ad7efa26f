/**
 * The qcow2 descriptor, apart from the folder's public entry (index.ts) so
 * that the registry can list it without loading the reader and the writer:
 * those are imported when a qcow2 image is first opened, streamed or written.
 */
import { join } from 'node:path'
import type { FormatDescriptor } from '../contracts.js'
import { isQcow2 } from './format.js'

export const qcow2: FormatDescriptor<'qcow2'> = {
  name: 'qcow2',
  kind: 'image',
  detect: isQcow2,
  open: async (path, options) => await (await import('./image.js')).Qcow2Image.open(path, options),
  stream: async (input, options) => await (await import('./stream.js')).streamQcow2(input, options.tmpDir !== undefined ? { tmpDir: options.tmpDir } : {}),
  writer: (device, options) => {
    const image = `disk-${device.name}.qcow2`
    const data = options.dataFile === true ? `disk-${device.name}.raw` : undefined
    return {
      names: data === undefined ? [image] : [image, data],
      create: async (dir, writes) => await (await import('./writer.js')).Qcow2FileWriter.create(join(dir, image), device.size, {
        queue: writes,
        ...(data !== undefined ? { dataFile: { path: join(dir, data), name: data } } : {}),
      }),
    }
  },
  outputOptions: ['dataFile'],
}
