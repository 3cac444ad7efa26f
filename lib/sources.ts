/**
 * Disk sources for packing: a path or stdin, its format told by magic bytes
 * (raw is the fallback), opened far enough to know its size, then read as a
 * record stream for a given device id. Raw is streamed; image formats are
 * read by random access, or from stdin front to back where the format can
 * (else stdin is first copied to a temporary file).
 */
import type { Readable } from 'node:stream'
import { VmapipeError } from './errors.js'
import { chain } from './io/chain.js'
import { type Input, openInput, peek, spillToFile } from './io/input.js'
import { type ProgressSink, counter } from './io/progress.js'
import { RawReader } from './raw/reader.js'
import { type RandomAccessDisk, diskRecords } from './disk.js'
import { isQcow2 } from './qcow2/format.js'
import { Qcow2Image } from './qcow2/reader.js'
import { qcow2StreamRecords, streamedQcow2Size } from './qcow2/stream.js'
import type { DeviceInfo } from './record.js'

/** An image format read by random access: how to recognise it and open it. */
interface ImageFormat {
  magic: (head: Buffer) => boolean
  /** `copied`: the image is a temporary copy of stdin, so names of other files in it mean nothing. */
  open: (path: string, spec: DiskSpec, copied: boolean) => Promise<RandomAccessDisk>
  /** Reading from stdin front to back, where the format allows it: the size from the first bytes, then records. */
  stream?: {
    size: (head: Buffer) => number
    records: (input: Readable, device: DeviceInfo, spec: DiskSpec) => Readable
  }
}

const IMAGE_FORMATS: Record<string, ImageFormat> = {
  qcow2: {
    magic: isQcow2,
    open: async (path, spec, copied) => await Qcow2Image.open(path, {
      ...(spec.followBacking === true ? { followBacking: true } : {}),
      ...(spec.backing !== undefined ? { backing: spec.backing } : {}),
      standalone: copied,
    }),
    stream: {
      size: streamedQcow2Size,
      records: (input, device, spec) => qcow2StreamRecords(input, device, spec.tmpDir !== undefined ? { tmpDir: spec.tmpDir } : {}),
    },
  },
}

export const DISK_FORMATS = ['raw', ...Object.keys(IMAGE_FORMATS)] as const
export type DiskFormat = string

export interface DiskSpec {
  /** Device name in the archive, e.g. drive-scsi0. */
  name: string
  /** A path, or - for stdin. */
  path: string
  /** Skip detection and read as this format. */
  format?: DiskFormat
  /** Bytes; needed for raw input whose size cannot be seen (stdin, pipes). */
  size?: number
  /** Read a backing chain instead of refusing an image that has one. */
  followBacking?: boolean
  /** Use this backing file for the image, wherever it lies (qcow2). */
  backing?: string
  /** Directory for a temporary copy of an image read from stdin. */
  tmpDir?: string
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
export function detectDiskFormat (head: Buffer): DiskFormat {
  return Object.entries(IMAGE_FORMATS).find(([, f]) => f.magic(head))?.[0] ?? 'raw'
}

export async function openDisk (spec: DiskSpec): Promise<DiskSource> {
  if (spec.format !== undefined && !(DISK_FORMATS as readonly string[]).includes(spec.format)) {
    throw new VmapipeError('E_USAGE', `unknown disk format ${spec.format} (known: ${DISK_FORMATS.join(', ')})`)
  }
  const input = openInput(spec.path)
  try {
    const head = await peek(input.stream, DETECT_BYTES)
    const format = spec.format ?? detectDiskFormat(head)
    const image = IMAGE_FORMATS[format]
    if (image === undefined) return openRaw(spec, input)
    if (spec.path === '-' && image.stream !== undefined) return streamImage(spec, input, format, head, image.stream)
    return await openImage(spec, input, format, image)
  } catch (err) {
    input.stream.destroy()
    throw err
  }
}

async function openImage (spec: DiskSpec, input: Input, format: DiskFormat, image: ImageFormat): Promise<DiskSource> {
  let disk: RandomAccessDisk
  if (spec.path === '-') {
    // An image wants random access: copy stdin to an unlinked temporary file first.
    const spilled = await spillToFile(input.stream, spec.tmpDir)
    try {
      disk = await image.open(spilled.path, spec, true)
    } finally {
      await spilled.remove()
    }
  } else {
    input.stream.destroy()
    disk = await image.open(spec.path, spec, false)
  }
  return {
    name: spec.name,
    path: spec.path,
    format,
    size: disk.size,
    records: async device => diskRecords(disk, device),
    close: () => { disk.close().catch(() => {}) },
  }
}

function streamImage (spec: DiskSpec, input: Input, format: DiskFormat, head: Buffer, stream: NonNullable<ImageFormat['stream']>): DiskSource {
  const size = stream.size(head)
  return {
    name: spec.name,
    path: spec.path,
    format,
    size,
    records: async (device, progress) => stream.records(
      progress ? chain(input.stream, await counter(progress)) : input.stream,
      { id: device, name: spec.name, size },
      spec,
    ),
    close: () => { input.stream.destroy() },
  }
}

function openRaw (spec: DiskSpec, input: Input): DiskSource {
  if (spec.size !== undefined && input.size !== undefined && spec.size !== input.size) {
    throw new VmapipeError('E_INPUT_SIZE', `${input.name} is ${input.size} bytes, not the ${spec.size} declared`, { device: spec.name })
  }
  const size = spec.size ?? input.size
  if (size === undefined) throw new VmapipeError('E_USAGE', `the size of ${input.name} cannot be seen; give it (--size, or size=BYTES: in -d)`)
  if (size === 0) throw new VmapipeError('E_USAGE', `${input.name} is empty; a VMA device needs at least one byte`)
  return {
    name: spec.name,
    path: spec.path,
    format: 'raw',
    size,
    records: async (device, progress) => chain(input.stream, ...(progress ? [await counter(progress)] : []), new RawReader({ id: device, name: spec.name, size })),
    close: () => { input.stream.destroy() },
  }
}
