/**
 * Disk sources for packing: a path or stdin, its format told by magic bytes
 * (raw is the fallback), opened far enough to know its size, then read as a
 * record stream for a given device id.
 */
import type { Readable } from 'node:stream'
import { VmapipeError } from './errors.js'
import { chain } from './io/chain.js'
import { type Input, openInput, peek } from './io/input.js'
import { type ProgressSink, counter } from './io/progress.js'
import { RawReader } from './raw/reader.js'

export const DISK_FORMATS = ['raw'] as const
export type DiskFormat = typeof DISK_FORMATS[number]

export interface DiskSpec {
  /** Device name in the archive, e.g. drive-scsi0. */
  name: string
  /** A path, or - for stdin. */
  path: string
  /** Skip detection and read as this format. */
  format?: DiskFormat
  /** Bytes; needed for raw input whose size cannot be seen (stdin, pipes). */
  size?: number
}

export interface DiskSource {
  name: string
  path: string
  format: DiskFormat
  size: number
  /** The disk as records for device id `device`; call once. */
  records: (device: number, progress?: ProgressSink) => Promise<Readable>
  /** Releases the input if records() is never called. */
  close: () => void
}

/** Bytes enough to recognise every format we read. */
const DETECT_BYTES = 512

/** The format a disk's first bytes announce; raw when none does. */
export function detectDiskFormat (_head: Buffer): DiskFormat {
  return 'raw'
}

export async function openDisk (spec: DiskSpec): Promise<DiskSource> {
  const input = openInput(spec.path)
  try {
    const head = await peek(input.stream, DETECT_BYTES)
    const format = spec.format ?? detectDiskFormat(head)
    return openRaw(spec, input, format)
  } catch (err) {
    input.stream.destroy()
    throw err
  }
}

function openRaw (spec: DiskSpec, input: Input, format: DiskFormat): DiskSource {
  if (spec.size !== undefined && input.size !== undefined && spec.size !== input.size) {
    throw new VmapipeError('E_INPUT_SIZE', `${input.name} is ${input.size} bytes, not the ${spec.size} declared`, { device: spec.name })
  }
  const size = spec.size ?? input.size
  if (size === undefined) throw new VmapipeError('E_USAGE', `the size of ${input.name} cannot be seen; give it (--size, or size=BYTES: in -d)`)
  if (size === 0) throw new VmapipeError('E_USAGE', `${input.name} is empty; a VMA device needs at least one byte`)
  return {
    name: spec.name,
    path: spec.path,
    format,
    size,
    records: async (device, progress) => chain(input.stream, ...(progress ? [await counter(progress)] : []), new RawReader({ id: device, name: spec.name, size })),
    close: () => { input.stream.destroy() },
  }
}
