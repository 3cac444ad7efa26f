/**
 * The image formats disks can be extracted to, and what each makes of one
 * device in a target directory. Format modules plug in here; the extraction
 * job stays the same for all.
 */
import { join } from 'node:path'
import { VmapipeError } from './errors.js'
import { type DeviceInfo, VMSTATE_NAME } from './record.js'
import type { DiskWriter } from './router.js'
import { RawFileWriter } from './raw/writer.js'
import { Qcow2FileWriter } from './qcow2/writer.js'
import type { WriteQueue } from './io/write-queue.js'
import { ParallelsBundleWriter, ParallelsWriter } from './parallels/writer.js'

export const OUTPUT_FORMATS = ['raw', 'qcow2', 'parallels', 'parallels-bundle'] as const
export type OutputFormat = typeof OUTPUT_FORMATS[number]

export interface OutputOptions {
  format?: OutputFormat
  /** qcow2: keep the data in a raw file beside the image (external data file). */
  dataFile?: boolean
  /** Cluster size in bytes, for formats that have clusters (Parallels: 1 MiB by default). */
  clusterSize?: number
}

export interface DiskOutput {
  /** Entries (files or directories) the disk occupies in the target directory. */
  names: string[]
  /** Creates the writer in `dir`, where the entries are staged until all are complete. */
  create: (dir: string, queue: WriteQueue) => Promise<DiskWriter>
}

/** What `device` becomes in `format`. The saved RAM state is always raw vmstate.bin. */
export function diskOutput (device: DeviceInfo, options: OutputOptions = {}): DiskOutput {
  const format = options.format ?? 'raw'
  if (options.dataFile === true && format !== 'qcow2') throw new VmapipeError('E_OPTION', 'a data file is a qcow2 feature (set format to qcow2)',
    { option: 'dataFile' })
  if (device.name === VMSTATE_NAME || format === 'raw') {
    const name = device.name === VMSTATE_NAME ? 'vmstate.bin' : `disk-${device.name}.raw`
    return { names: [name], create: async (dir, queue) => await RawFileWriter.create(join(dir, name), device.size, queue) }
  }
  if (format === 'qcow2') {
    const image = `disk-${device.name}.qcow2`
    const data = options.dataFile === true ? `disk-${device.name}.raw` : undefined
    return {
      names: data === undefined ? [image] : [image, data],
      create: async (dir, queue) => await Qcow2FileWriter.create(join(dir, image), device.size, {
        queue,
        ...(data !== undefined ? { dataFile: { path: join(dir, data), name: data } } : {}),
      }),
    }
  }
  const clusterSize = options.clusterSize === undefined ? {} : { clusterSize: options.clusterSize }
  if (format === 'parallels') {
    const name = `disk-${device.name}.hds`
    return { names: [name], create: async (dir, queue) => await ParallelsWriter.create(join(dir, name), device.size, { ...clusterSize, queue }) }
  }
  if (format === 'parallels-bundle') {
    const name = `disk-${device.name}.hdd`
    return { names: [name], create: async (dir, queue) => await ParallelsBundleWriter.create(join(dir, name), device.size, { ...clusterSize, queue }) }
  }
  throw new VmapipeError('E_OPTION', `unknown output format ${String(format)} (known: ${OUTPUT_FORMATS.join(', ')})`, { option: 'format' })
}
