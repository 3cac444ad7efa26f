/**
 * Disk sources for packing: a path or stdin, its format told by magic bytes
 * (raw is the fallback), opened far enough to know its size, then read as a
 * record stream for a given device id. Raw is streamed; image formats are
 * read by random access (stdin is first copied to a temporary file).
 */
import type { Readable } from 'node:stream'
import { VmapipeError } from './errors.js'
import { chain } from './io/chain.js'
import { type Input, openInput, peek, readHead, spillToFile } from './io/input.js'
import { type ProgressSink, counter } from './io/progress.js'
import { RawReader } from './raw/reader.js'
import { openRawDisk } from './raw/disk.js'
import { type RandomAccessDisk, diskRecords, dirtyRecords } from './disk.js'
import { isNbdUri, openNbdDisk } from './nbd/client.js'

/** An image format read by random access: how to recognise it and open it. */
interface ImageFormat {
  magic: (head: Buffer) => boolean
  open: (path: string, spec: DiskSpec) => Promise<RandomAccessDisk>
}

const IMAGE_FORMATS: Record<string, ImageFormat> = {}

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
  /** Directory for a temporary copy of an image read from stdin. */
  tmpDir?: string
  /** Read only the clusters this dirty bitmap of an NBD export marks (an incremental backup). */
  dirtyBitmap?: string
}

export interface DiskSource {
  name: string
  path: string
  format: DiskFormat
  size: number
  /**
   * Records for dirty clusters only (an incremental source): what an overlay
   * on the previous backup takes, not what a complete archive needs.
   */
  incremental?: boolean
  /** The disk as records for device id `device`; call once. */
  records: (device: number, progress?: ProgressSink) => Promise<Readable>
  /** Releases the input if records() is never called. */
  close: () => void
}

/** Bytes enough to recognise every format we read. */
const DETECT_BYTES = 512
/** Batches an NBD source reads at once, so that several requests are in flight. */
const NBD_READ_AHEAD = 8

/** The format a disk's first bytes announce; raw when none does. */
export function detectDiskFormat (head: Buffer): DiskFormat {
  return Object.entries(IMAGE_FORMATS).find(([, f]) => f.magic(head))?.[0] ?? 'raw'
}

export async function openDisk (spec: DiskSpec): Promise<DiskSource> {
  if (spec.format !== undefined && !(DISK_FORMATS as readonly string[]).includes(spec.format)) {
    throw new VmapipeError('E_USAGE', `unknown disk format ${spec.format} (known: ${DISK_FORMATS.join(', ')})`)
  }
  if (isNbdUri(spec.path)) return await openNbdSource(spec)
  if (spec.dirtyBitmap !== undefined) throw new VmapipeError('E_USAGE', `${spec.path}: a dirty bitmap is read from an NBD export (nbd://... or nbd+unix://...)`)
  const input = openInput(spec.path)
  try {
    const head = await peek(input.stream, DETECT_BYTES)
    const format = spec.format ?? detectDiskFormat(head)
    const image = IMAGE_FORMATS[format]
    if (image === undefined) return openRaw(spec, input)
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
      disk = await image.open(spilled.path, spec)
    } finally {
      await spilled.remove()
    }
  } else {
    input.stream.destroy()
    disk = await image.open(spec.path, spec)
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

/**
 * A disk for random access (to serve it): an image format told by its magic
 * bytes, else a raw file or block device.
 */
export async function openRandomAccessDisk (spec: DiskSpec): Promise<{ format: DiskFormat, disk: RandomAccessDisk }> {
  const format = spec.format ?? detectDiskFormat(await readHead(spec.path, DETECT_BYTES))
  const image = IMAGE_FORMATS[format]
  return { format, disk: image === undefined ? await openRawDisk(spec.path) : await image.open(spec.path, spec) }
}

/** An NBD export: allocated clusters only are read, or with a dirty bitmap only the dirty ones. */
async function openNbdSource (spec: DiskSpec): Promise<DiskSource> {
  const bitmap = spec.dirtyBitmap
  const disk = await openNbdDisk(spec.path, bitmap !== undefined ? { dirtyBitmaps: [bitmap] } : {})
  return {
    name: spec.name,
    path: spec.path,
    format: 'nbd',
    size: disk.size,
    ...(bitmap !== undefined ? { incremental: true } : {}),
    records: async (device, progress) => {
      const options = { readAhead: NBD_READ_AHEAD, ...(progress !== undefined ? { progress } : {}) }
      return bitmap === undefined ? diskRecords(disk, device, options) : dirtyRecords(disk, bitmap, device, options)
    },
    close: () => { disk.close().catch(() => {}) },
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
