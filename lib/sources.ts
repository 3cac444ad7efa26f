/**
 * Disk sources for packing: a path or stdin, its format told by magic bytes
 * (raw is the fallback; formats other tools read are refused), opened far
 * enough to know its size, then read as a record stream for a given device id.
 * Raw is streamed; image formats are read by random access, or from stdin
 * front to back where the format can (else stdin is first copied to a
 * temporary file).
 */
import { statSync } from 'node:fs'
import type { Readable } from 'node:stream'
import { VmapipeError } from './errors.js'
import { chain } from './io/chain.js'
import { type Input, openInput, peek, readHead, sizeOf, spillToFile } from './io/input.js'
import { TAIL_BYTES, refuseForeign } from './foreign.js'
import { type ProgressSink, counter } from './io/progress.js'
import { RawReader } from './raw/reader.js'
import { RawImage } from './raw/image.js'
import { type RandomAccessDisk, type StreamedImage, diskRecords, dirtyRecords } from './disk.js'
import { isNbdUri, openNbdDisk } from './nbd/client.js'
import { isParallels } from './parallels/format.js'
import { ParallelsImage, streamParallels } from './parallels/reader.js'
import { ParallelsBundle, isDescriptor } from './parallels/bundle.js'
import { isQcow2 } from './qcow2/format.js'
import { Qcow2Image } from './qcow2/reader.js'
import { streamQcow2 } from './qcow2/stream.js'

/** An image format read by random access: how to recognise it and open it. */
interface ImageFormat {
  magic: (head: Buffer) => boolean
  /** `copied`: the image is a temporary copy of stdin, so names of other files in it mean nothing. */
  open: (path: string, spec: DiskSpec, copied: boolean) => Promise<RandomAccessDisk>
  /** Reads the image from stdin as it comes; undefined (nothing read) when this one cannot be, and it is copied first. */
  stream?: (input: Readable, spec: DiskSpec) => Promise<StreamedImage | undefined>
  /** The format opens a directory. */
  directory?: boolean
}

const IMAGE_FORMATS: Record<string, ImageFormat> = {
  qcow2: {
    magic: isQcow2,
    open: async (path, spec, copied) => await Qcow2Image.open(path, {
      ...(spec.followBacking === true ? { followBacking: true } : {}),
      ...(spec.backing !== undefined ? { backing: spec.backing } : {}),
      standalone: copied,
    }),
    stream: async (input, spec) => await streamQcow2(input, spec),
  },
  parallels: {
    magic: isParallels,
    open: async path => await ParallelsImage.open(path),
    stream: async input => await streamParallels(input, 'stdin'),
  },
  'parallels-bundle': {
    magic: isDescriptor,
    open: async path => await ParallelsBundle.open(path),
    stream: async () => { throw new VmapipeError('E_USAGE', 'a DiskDescriptor.xml names its images by path: give the bundle\'s path, not stdin') },
    directory: true,
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
  /** Read only the clusters this dirty bitmap of an NBD export marks (an incremental backup). */
  dirtyBitmap?: string
  /** Milliseconds an NBD server has to answer each request (default 60 s). */
  nbdTimeout?: number
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

/**
 * The format a file's first bytes announce; raw when none does. A format that
 * other tools read is refused (a fixed VHD, known by its footer, only where
 * the end of the file can be read).
 */
async function detect (path: string, head: Buffer, size: number | undefined): Promise<DiskFormat> {
  const format = detectDiskFormat(head)
  if (format !== 'raw') return format
  const tailAt = path !== '-' && size !== undefined && size > TAIL_BYTES ? size - TAIL_BYTES : undefined
  const tail = tailAt === undefined ? undefined : { bytes: await readHead(path, TAIL_BYTES, tailAt), offset: tailAt }
  refuseForeign(path, head, tail)
  return format
}

function checkFormat (format: DiskFormat | undefined): void {
  if (format !== undefined && !(DISK_FORMATS as readonly string[]).includes(format)) {
    throw new VmapipeError('E_USAGE', `unknown disk format ${format} (known: ${DISK_FORMATS.join(', ')})`)
  }
}

const isDirectory = (path: string): boolean => path !== '-' && statSync(path, { throwIfNoEntry: false })?.isDirectory() === true

/** A directory is an image only in a format that opens directories. */
async function openDirectory (path: string, format: DiskFormat | undefined, spec: DiskSpec): Promise<{ format: DiskFormat, disk: RandomAccessDisk }> {
  const chosen = format ?? Object.keys(IMAGE_FORMATS).find(f => IMAGE_FORMATS[f].directory === true) as DiskFormat
  if (IMAGE_FORMATS[chosen]?.directory !== true) throw new VmapipeError('E_USAGE', `${path} is a directory, not a ${chosen} image`)
  return { format: chosen, disk: await IMAGE_FORMATS[chosen].open(path, spec, false) }
}

/** Opens a path (file, block device or directory) by random access, in its own format or raw; for `vma info`. */
export async function openImageFile (path: string, format?: DiskFormat): Promise<{ format: DiskFormat, disk: RandomAccessDisk }> {
  checkFormat(format)
  // Looking at an image (or serving it) reads its whole chain; each file still has to lie beside the one naming it.
  const spec = { name: path, path, followBacking: true }
  if (isDirectory(path)) return await openDirectory(path, format, spec)
  const chosen = format ?? await detect(path, await readHead(path, DETECT_BYTES), sizeOf(statSync(path)))
  const image = IMAGE_FORMATS[chosen]
  return { format: chosen, disk: image === undefined ? await RawImage.open(path) : await image.open(path, spec, false) }
}

/** Opens every disk or none: after a failure those already open are released. */
export async function openDisks (specs: DiskSpec[]): Promise<DiskSource[]> {
  const disks: DiskSource[] = []
  try {
    for (const spec of specs) disks.push(await openDisk(spec))
  } catch (err) {
    closeDisks(disks)
    throw err
  }
  return disks
}

/** Releases disks whose records were never asked for. */
export function closeDisks (disks: DiskSource[]): void {
  for (const d of disks) d.close()
}

export async function openDisk (spec: DiskSpec): Promise<DiskSource> {
  checkFormat(spec.format)
  if (isDirectory(spec.path)) {
    const { format, disk } = await openDirectory(spec.path, spec.format, spec)
    return imageSource(spec, format, disk)
  }
  if (isNbdUri(spec.path)) return await openNbdSource(spec)
  if (spec.dirtyBitmap !== undefined) throw new VmapipeError('E_USAGE', `${spec.path}: a dirty bitmap is read from an NBD export (nbd://... or nbd+unix://...)`)
  const input = openInput(spec.path)
  try {
    const head = await peek(input.stream, DETECT_BYTES)
    const format = spec.format ?? await detect(spec.path, head, input.size)
    const image = IMAGE_FORMATS[format]
    if (image === undefined) return openRaw(spec, input)
    return await openImage(spec, input, format, image)
  } catch (err) {
    input.stream.destroy()
    throw err
  }
}

async function openImage (spec: DiskSpec, input: Input, format: DiskFormat, image: ImageFormat): Promise<DiskSource> {
  const streamed = spec.path === '-' ? await image.stream?.(input.stream, spec) : undefined
  if (streamed !== undefined) {
    return { name: spec.name, path: spec.path, format, size: streamed.size, records: streamed.records, close: () => { input.stream.destroy() } }
  }
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
  return imageSource(spec, format, disk)
}

function imageSource (spec: DiskSpec, format: DiskFormat, disk: RandomAccessDisk): DiskSource {
  return {
    name: spec.name,
    path: spec.path,
    format,
    size: disk.size,
    records: async device => diskRecords(disk, device),
    close: () => { disk.close().catch(() => {}) },
  }
}

/** An NBD export: allocated clusters only are read, or with a dirty bitmap only the dirty ones. */
async function openNbdSource (spec: DiskSpec): Promise<DiskSource> {
  const bitmap = spec.dirtyBitmap
  const disk = await openNbdDisk(spec.path, {
    ...(bitmap !== undefined ? { dirtyBitmaps: [bitmap] } : {}),
    ...(spec.nbdTimeout !== undefined ? { timeout: spec.nbdTimeout } : {}),
  })
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
    records: async (device, progress) =>
      chain(input.stream, ...(progress ? [await counter(progress)] : []), new RawReader({ id: device, name: spec.name, size })),
    close: () => { input.stream.destroy() },
  }
}
