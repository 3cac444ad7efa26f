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
import { VmapipeError } from '../errors.js'
import type { FormatDescriptor, ProgressSink, RandomAccessDisk } from '../contracts.js'
import { type Input, openInput, peek, readHead, sizeOf, spillToFile } from '../io/input.js'
import { TAIL_BYTES, refuseForeign } from './foreign.js'
import { type DiskRecordsOptions, diskRecords, dirtyRecords } from '../io/disk-records.js'
import { isNbdUri, openNbdDisk } from '../nbd/client.js'
import { RawImage, raw } from '../raw/index.js'
import { type FormatName, FORMATS, detectFormat, formatNamed } from './registry.js'

export interface DiskSpec {
  /** Device name in the archive, e.g. drive-scsi0. */
  name: string
  /** A path, or - for stdin. */
  path: string
  /** Skip detection and read as this format (a name in the registry). */
  format?: string
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
  format: FormatName | 'nbd'
  size: number
  /**
   * Records for dirty clusters only (an incremental source): what an overlay
   * on the previous backup takes, not what a complete archive needs.
   */
  incremental?: boolean
  /** The disk as records for device id `device`; call once (this or batches). */
  records: (device: number, progress?: ProgressSink) => Promise<Readable>
  /** Where the disk is read by random access: the same records in arrays, a batch at a time (io/disk-records.ts `batched`). */
  batches?: (device: number, progress?: ProgressSink) => Promise<Readable>
  /** Releases the input if records() is never called. */
  close: () => void
}

/** Bytes enough to recognise every format we read. */
const DETECT_BYTES = 512
/**
 * Batches an NBD source reads at once, so that several requests are in flight.
 * More would outrun the slabs a walk may make (io/disk-records.ts NEW_SLABS,
 * with what the archive writer still holds): each batch past them is a fresh
 * MiB of garbage, which took pack-vma from an NBD export to 120 MiB RSS.
 * Two keep a request in flight while the other's reply is taken: with four,
 * pack-vma from qemu-nbd of 1 GiB peaked 1.5-2.5 MiB higher (1.5 MiB above
 * pack-vma of the file), no faster.
 */
const NBD_READ_AHEAD = 2

/**
 * The format a file's first bytes announce; raw when none does. A format that
 * other tools read, or an archive, is refused (a fixed VHD, known by its
 * footer, only where the end of the file can be read).
 */
async function detect (path: string, head: Buffer, size: number | undefined): Promise<FormatDescriptor> {
  const format = detectFormat(head)
  if (format.kind === 'image' && format !== raw) return format
  const tailAt = path !== '-' && size !== undefined && size > TAIL_BYTES ? size - TAIL_BYTES : undefined
  const tail = tailAt === undefined ? undefined : { bytes: await readHead(path, TAIL_BYTES, tailAt), offset: tailAt }
  refuseForeign(path, head, tail)
  return raw
}

const isDirectory = (path: string): boolean => path !== '-' && statSync(path, { throwIfNoEntry: false })?.isDirectory() === true

/** Opens `path` by random access in `format`. */
async function openAs (format: FormatDescriptor, path: string, spec: DiskSpec, standalone: boolean): Promise<RandomAccessDisk> {
  if (format.open === undefined) throw new VmapipeError('E_OPTION', `${path}: ${format.name} is not read by random access`, { option: 'format' })
  return await format.open(path, {
    ...(spec.followBacking === true ? { followBacking: true } : {}),
    ...(spec.backing !== undefined ? { backing: spec.backing } : {}),
    standalone,
  })
}

/** A directory is an image only in a format that opens directories. */
async function openDirectory (path: string, name: string | undefined, spec: DiskSpec): Promise<{ format: FormatDescriptor, disk: RandomAccessDisk }> {
  const format = name === undefined ? FORMATS.find(f => f.directory === true) : formatNamed(name)
  if (format?.directory !== true) throw new VmapipeError('E_OPTION', `${path} is a directory, not a ${name ?? 'disk'} image`, { option: 'format' })
  return { format, disk: await openAs(format, path, spec, false) }
}

/** Opens a path (file, block device or directory) by random access, in its own format or raw; for `vma info` and serving. */
export async function openImageFile (path: string, name?: string): Promise<{ format: FormatName, disk: RandomAccessDisk }> {
  const chosen = name === undefined ? undefined : formatNamed(name)
  // Looking at an image (or serving it) reads its whole chain; each file still has to lie beside the one naming it.
  const spec = { name: path, path, followBacking: true }
  if (isDirectory(path)) {
    const { format, disk } = await openDirectory(path, name, spec)
    return { format: format.name as FormatName, disk }
  }
  const format = chosen ?? await detect(path, await readHead(path, DETECT_BYTES), sizeOf(statSync(path)))
  return { format: format.name as FormatName, disk: await openAs(format, path, spec, false) }
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
  const chosen = spec.format === undefined ? undefined : formatNamed(spec.format)
  if (isDirectory(spec.path)) {
    const { format, disk } = await openDirectory(spec.path, spec.format, spec)
    return imageSource(spec, format, disk)
  }
  if (isNbdUri(spec.path)) return await openNbdSource(spec)
  if (spec.dirtyBitmap !== undefined) {
    throw new VmapipeError('E_OPTION', `${spec.path}: a dirty bitmap is read from an NBD export (nbd://... or nbd+unix://...)`, { option: 'dirtyBitmap' })
  }
  const input = openInput(spec.path)
  try {
    const head = await peek(input.stream, DETECT_BYTES)
    const format = chosen ?? await detect(spec.path, head, input.size)
    if (format === raw) return await openRaw(spec, input)
    return await openImage(spec, input, format)
  } catch (err) {
    input.stream.destroy()
    throw err
  }
}

async function openImage (spec: DiskSpec, input: Input, format: FormatDescriptor): Promise<DiskSource> {
  const name = format.name as FormatName
  if (spec.path === '-' && format.directory === true) {
    throw new VmapipeError('E_NOT_SEEKABLE', `a ${name} image is a directory whose files are named by path: give its path, not stdin`)
  }
  const streamOptions = { where: 'stdin', ...(spec.tmpDir !== undefined ? { tmpDir: spec.tmpDir } : {}) }
  const streamed = spec.path === '-' ? await format.stream?.(input.stream, streamOptions) : undefined
  if (streamed !== undefined) {
    return { name: spec.name, path: spec.path, format: name, size: streamed.size, records: streamed.records, close: () => { input.stream.destroy() } }
  }
  let disk: RandomAccessDisk
  if (spec.path === '-') {
    // An image wants random access: copy stdin to an unlinked temporary file first.
    const spilled = await spillToFile(input.stream, spec.tmpDir)
    try {
      disk = await openAs(format, spilled.path, spec, true)
    } finally {
      await spilled.remove()
    }
  } else {
    input.stream.destroy()
    disk = await openAs(format, spec.path, spec, false)
  }
  return imageSource(spec, format, disk)
}

function imageSource (spec: DiskSpec, format: FormatDescriptor, disk: RandomAccessDisk): DiskSource {
  return {
    name: spec.name,
    path: spec.path,
    format: format.name as FormatName,
    size: disk.size,
    records: async (device, progress) => diskRecords(disk, device, progress !== undefined ? { progress } : {}),
    batches: async (device, progress) => diskRecords(disk, device, { batched: true, ...(progress !== undefined ? { progress } : {}) }),
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
      const options = nbdReadOptions(progress)
      return bitmap === undefined ? diskRecords(disk, device, options) : dirtyRecords(disk, bitmap, device, options)
    },
    // A whole disk is read by random access like an image file, so it goes to the archive writer a batch at a time too.
    ...(bitmap === undefined
      ? { batches: async (device: number, progress?: ProgressSink) => diskRecords(disk, device, { ...nbdReadOptions(progress), batched: true }) }
      : {}),
    close: () => { disk.close().catch(() => {}) },
  }
}

function nbdReadOptions (progress?: ProgressSink): DiskRecordsOptions {
  return { readAhead: NBD_READ_AHEAD, ...(progress !== undefined ? { progress } : {}) }
}

async function openRaw (spec: DiskSpec, input: Input): Promise<DiskSource> {
  if (spec.size !== undefined && input.size !== undefined && spec.size !== input.size) {
    throw new VmapipeError('E_INPUT_SIZE', `${input.name} is ${input.size} bytes, not the ${spec.size} declared`, { device: spec.name })
  }
  const size = spec.size ?? input.size
  if (size === undefined) throw new VmapipeError('E_INPUT_SIZE_UNKNOWN', `the size of ${input.name} cannot be seen; give the size`, { option: 'size' })
  if (size === 0) throw new VmapipeError('E_LIMIT', `${input.name} is empty; a VMA device needs at least one byte`)
  if (spec.path !== '-' && statSync(spec.path).isFile()) {
    // A file is read by position: its holes are skipped without reading them, the rest in large reads.
    input.stream.destroy()
    return imageSource(spec, raw, await RawImage.open(spec.path))
  }
  const streamed = await raw.stream?.(input.stream, { size, where: spec.name }) as { records: DiskSource['records'] }
  return { name: spec.name, path: spec.path, format: 'raw', size, records: streamed.records, close: () => { input.stream.destroy() } }
}
