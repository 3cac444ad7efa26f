/** qcow2 images: read by random access or as they stream in, written with or without an external data file. */
import { join } from 'node:path'
import type { FormatDescriptor } from '../contracts.js'
import { isQcow2 } from './format.js'
import { Qcow2Image } from './image.js'
import { streamQcow2 } from './stream.js'
import { Qcow2FileWriter } from './writer.js'

export { QCOW2_MAGIC, isQcow2, parseHeader, encodeHeader, type Qcow2Header, type Qcow2Geometry, type HeaderSpec } from './format.js'
export { Qcow2Image, type Qcow2OpenOptions } from './image.js'
export { streamQcow2 } from './stream.js'
export { Qcow2FileWriter, writeQcow2Stream, type Qcow2WriterOptions } from './writer.js'

export const qcow2: FormatDescriptor<'qcow2'> = {
  name: 'qcow2',
  kind: 'image',
  detect: isQcow2,
  open: async (path, options) => await Qcow2Image.open(path, options),
  stream: async (input, options) => await streamQcow2(input, options.tmpDir !== undefined ? { tmpDir: options.tmpDir } : {}),
  writer: (device, options) => {
    const image = `disk-${device.name}.qcow2`
    const data = options.dataFile === true ? `disk-${device.name}.raw` : undefined
    return {
      names: data === undefined ? [image] : [image, data],
      create: async (dir, writes) => await Qcow2FileWriter.create(join(dir, image), device.size, {
        queue: writes,
        ...(data !== undefined ? { dataFile: { path: join(dir, data), name: data } } : {}),
      }),
    }
  },
  outputOptions: ['dataFile'],
}
