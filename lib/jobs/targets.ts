/**
 * What each device of an archive becomes in a target directory, in the
 * format chosen: the format's own writer from the registry. The saved RAM
 * state is always raw vmstate.bin.
 */
import type { DeviceInfo, DiskOutput, DiskWriter, OutputOptions as FormatOptions, ProgressSink } from '../contracts.js'
import type { CopySource } from '../io/data-runs.js'
import { VmapipeError } from '../errors.js'
import { VMSTATE_NAME } from '../record.js'
import { rawOutput } from '../raw/index.js'
import { OUTPUT_FORMATS, formatNamed } from './registry.js'

export interface OutputOptions extends FormatOptions {
  /** A name in the registry's OUTPUT_FORMATS; default raw. */
  format?: string
}

/** What `device` becomes in `options.format`. */
export function diskOutput (device: DeviceInfo, options: OutputOptions = {}): DiskOutput {
  const format = formatNamed(options.format ?? 'raw', OUTPUT_FORMATS)
  const given: FormatOptions = {
    ...(options.dataFile === true ? { dataFile: true } : {}),
    ...(options.clusterSize !== undefined ? { clusterSize: options.clusterSize } : {}),
  }
  const refused = (Object.keys(given) as Array<keyof FormatOptions>).find(o => format.outputOptions?.includes(o) !== true)
  if (refused !== undefined) throw new VmapipeError('E_OPTION', `the ${format.name} format takes no ${refused} option`, { option: refused })
  if (device.name === VMSTATE_NAME) return rawOutput('vmstate.bin', device)
  // OUTPUT_FORMATS holds only formats that have a writer.
  return (format.writer as NonNullable<typeof format.writer>)(device, given)
}

/** Formats whose writers can take a disk by position (copyFrom) instead of records. */
const COPYING = new Set(['raw', 'qcow2', 'parallels', 'parallels-bundle'])

/**
 * Whether every disk writer `options` choose can copy an indexed disk by
 * position (raw, qcow2, Parallels): an uncompressed archive file is then
 * read in large pieces instead of streamed as records.
 */
export function copiesByPosition (options: OutputOptions): boolean {
  const format = options.format ?? 'raw'
  // A raw file has no data file: that refusal is the record path's to make.
  return COPYING.has(format) && !(format === 'raw' && options.dataFile === true)
}

/** A writer that can take a disk by position (raw, qcow2, Parallels: copyFrom, then finish). */
type CopyingWriter = DiskWriter & { copyFrom: (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal) => Promise<void> }

export function canCopy (writer: DiskWriter): writer is CopyingWriter {
  return typeof (writer as Partial<CopyingWriter>).copyFrom === 'function'
}
