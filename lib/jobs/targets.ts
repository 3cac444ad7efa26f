/**
 * What each device of an archive becomes in a target directory, in the
 * format chosen: the format's own writer from the registry. The saved RAM
 * state is always raw vmstate.bin.
 */
import type { DeviceInfo, DiskOutput, OutputOptions as FormatOptions } from '../contracts.js'
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
