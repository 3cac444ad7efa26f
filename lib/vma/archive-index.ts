/**
 * Uncompressed VMA archives in regular files, read by position. walkArchive
 * reads the header and the 512-byte extent headers only (the data between
 * them is skipped), with the streaming reader's checks in its order: that is
 * all verify needs. The index built on it keeps two typed arrays per device:
 * each cluster's mask and the archive offset of its first data block, 10
 * bytes per cluster. Each device is then a RandomAccessDisk: its map comes
 * from the masks, its reads are positional reads of the blocks, runs that lie
 * together in the archive read at once.
 */
import { VmapipeError, ioError } from '../errors.js'
import type { ArchiveInfo, DeviceInfo, Extent, ProgressSink, RandomAccessDisk } from '../contracts.js'
import { detectCompression } from '../io/compression.js'
import { BLOCK_SIZE, CLUSTER_SIZE, clusterCount, popcount16 } from '../record.js'
import { type TrackedDevice, firstIncomplete, trackDevice, trackExtent } from './tracker.js'
import { type PositionalReader, openFileReader } from '../io/pread.js'
import {
  type ExtentHeader, type VmaHeader,
  EXTENT_HEADER_SIZE, archiveInfo, HEADER_PREFIX_SIZE, MAX_EXTENT_CLUSTERS, VMA_MAGIC, checkMagic, parseExtentHeader, parseHeader, readHeaderSize,
} from './format.js'

export interface ArchiveIndex {
  info: ArchiveInfo
  /** Extent headers read. */
  extents: number
  /** A device of the archive as a disk; the archive stays open until the index and every such disk are closed. */
  disk: (device: DeviceInfo) => IndexedDisk
  close: () => Promise<void>
}

/** What walkArchive has found so far: after a failure, what came before it. */
export interface ArchiveWalk {
  header?: VmaHeader
  /** The devices chosen by WalkOptions.select (default all), once the header is read. */
  selected?: DeviceInfo[]
  info?: ArchiveInfo
  /** Devices by dev_id, once the header is read. */
  devices: Array<TrackedDevice | undefined>
  extents: number
  /** Archive bytes a streaming reader would have taken by now (VmaReader.offset). */
  offset: number
}

interface WalkOptions {
  /**
   * Chooses, once the header is read, the devices that must be complete at
   * the end (default all), as VmaReaderOptions.select; it may throw.
   */
  select?: (devices: DeviceInfo[]) => DeviceInfo[]
  signal?: AbortSignal
  /** Receives the archive bytes passed (read or skipped). */
  progress?: ProgressSink
  /** Called once the header is read (walk.offset is then its size), before any extent. */
  header?: (header: VmaHeader) => void
  /** Called with each extent header and the archive offset where it starts. */
  extent?: (extent: ExtentHeader, offset: number) => void
}

const UNPACK: Record<string, string> = { zstd: 'zstd -d', gzip: 'gunzip -k', lzo: 'lzop -d' }

/**
 * Opens `path` for positional reads: E_NOT_SEEKABLE when it is not a regular
 * file or is compressed (those can only be streamed).
 */
export async function openArchiveFile (path: string): Promise<PositionalReader> {
  const file = await openFileReader(path, 'random access needs one (a pipe or device can only be streamed, e.g. with vma extract)')
  try {
    await refuseCompressed(file)
    return file
  } catch (err) {
    await file.close()
    throw err instanceof VmapipeError ? err : ioError(err, `reading ${path}`)
  }
}

async function refuseCompressed (file: PositionalReader): Promise<void> {
  const head = Buffer.alloc(MAGIC_BYTES)
  const compression = detectCompression(head.subarray(0, await file.read(head, 0)))
  if (compression !== 'none') {
    throw new VmapipeError(
      'E_NOT_SEEKABLE',
      `${file.name} is compressed with ${compression}; random access needs an uncompressed archive (${UNPACK[compression]} ${file.name})`
    )
  }
}

/** Enough bytes to tell a compressed file (compression.ts DETECT_BYTES). */
const MAGIC_BYTES = 9
/** Extent headers are read in windows of this size, so that a sparse archive's headers, close together, come in one read. */
const WINDOW = 1 << 16

/**
 * Reads the header and every extent header of `file`, skipping the data, and
 * makes every check the streaming reader (VmaReader) makes, in its order and
 * with its error codes and offsets; fills `walk` as it goes. Resolves with the
 * header once every cluster of every device was found exactly once.
 */
export async function walkArchive (file: PositionalReader, walk: ArchiveWalk, options: WalkOptions = {}): Promise<VmaHeader> {
  const fileSize = file.size
  let passed = 0
  const advance = (to: number): void => {
    walk.offset = to
    if (to > passed) options.progress?.add(to - passed)
    passed = Math.max(passed, to)
  }
  const prefix = Buffer.alloc(HEADER_PREFIX_SIZE)
  const got = await file.read(prefix, 0)
  if (got >= VMA_MAGIC.length) checkMagic(prefix)
  if (got < HEADER_PREFIX_SIZE) {
    throw new VmapipeError('E_VMA_TRUNCATED', got === 0 ? 'the input is empty' : 'the archive ends inside its header (header_size unknown)', { offset: got })
  }
  const headerSize = readHeaderSize(prefix)
  advance(HEADER_PREFIX_SIZE)
  const head = Buffer.alloc(headerSize)
  if (await file.read(head, 0) < headerSize) {
    throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside its header (header_size ${headerSize})`, { offset: fileSize })
  }
  advance(headerSize)
  const header = parseHeader(head)
  walk.header = header
  walk.info = archiveInfo(header)
  walk.selected = options.select?.(header.devices) ?? header.devices
  for (const info of header.devices) walk.devices[info.id] = trackDevice(info)
  options.header?.(header)

  const window = Buffer.allocUnsafe(WINDOW)
  let windowAt = 0
  let windowLength = 0
  for (let pos = headerSize; pos < fileSize;) {
    if (options.signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
    if (pos < windowAt || pos + EXTENT_HEADER_SIZE > windowAt + windowLength) {
      windowAt = pos
      windowLength = await file.read(window, pos)
      if (windowLength < EXTENT_HEADER_SIZE) {
        throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside the extent that starts at byte ${pos}`, { offset: fileSize })
      }
    }
    advance(pos + EXTENT_HEADER_SIZE)
    const extent = parseExtentHeader(window.subarray(pos - windowAt, pos - windowAt + EXTENT_HEADER_SIZE), header.uuidBytes, pos)
    trackExtent(walk.devices, extent, pos)
    walk.extents++
    options.extent?.(extent, pos)
    let data = pos + EXTENT_HEADER_SIZE
    for (const e of extent.entries) {
      const bytes = popcount16(e.mask) * BLOCK_SIZE
      if (data + bytes > fileSize) {
        advance(data)
        throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside the extent that starts at byte ${pos}`, { offset: fileSize })
      }
      data += bytes
    }
    advance(data)
    pos = data
  }
  const selected = new Set(walk.selected)
  const missing = firstIncomplete(walk.devices.filter((d): d is TrackedDevice => d !== undefined && selected.has(d.info)))
  if (missing !== undefined) throw new VmapipeError('E_VMA_MISSING', missing.message, { offset: fileSize, device: missing.dev.info.name })
  return header
}

interface IndexedDevice {
  tracked: TrackedDevice
  masks: Uint16Array
  /** Archive offset of each cluster's first stored block (unused for mask 0). */
  offsets: Float64Array
}

/** The index of the archive at `source`: a path, or a reader by position (an object in a store), closed with the index. */
export async function openArchiveIndex (source: string | PositionalReader): Promise<ArchiveIndex> {
  const file = typeof source === 'string' ? await openArchiveFile(source) : source
  try {
    if (typeof source !== 'string') await refuseCompressed(file)
    return await indexArchive(file)
  } catch (err) {
    await file.close()
    throw err instanceof VmapipeError ? err : ioError(err, `reading ${file.name}`)
  }
}

/**
 * The index of an archive file, which it owns once built (closing the index
 * and every disk closes the file; on failure the caller closes it).
 */
export async function indexArchive (file: PositionalReader, options: Pick<WalkOptions, 'signal' | 'select'> = {}): Promise<ArchiveIndex> {
  const devices: Array<IndexedDevice | undefined> = []
  const walk: ArchiveWalk = { devices: [], extents: 0, offset: 0 }
  const header = await walkArchive(file, walk, {
    ...options,
    header: () => {
      // A complete archive needs an extent header per 59 clusters: a header that
      // declares more than the file can hold is refused before anything is allocated for it.
      const chosen = walk.selected as DeviceInfo[]
      const headerSize = walk.offset
      const declared = chosen.reduce((n, d) => n + clusterCount(d.size), 0)
      const room = Math.floor((file.size - headerSize) / EXTENT_HEADER_SIZE) * MAX_EXTENT_CLUSTERS
      if (declared > room) {
        throw new VmapipeError('E_VMA_TRUNCATED',
          `the archive's ${file.size} bytes cannot hold the ${declared} clusters its header declares: it is cut short or damaged`, { offset: file.size })
      }
      for (const info of chosen) {
        const n = clusterCount(info.size)
        devices[info.id] = { tracked: walk.devices[info.id] as TrackedDevice, masks: new Uint16Array(n), offsets: new Float64Array(n) }
      }
    },
    extent: (extent, pos) => {
      let data = pos + EXTENT_HEADER_SIZE
      for (const e of extent.entries) {
        const d = devices[e.devId]
        if (d !== undefined) {
          d.masks[e.cluster] = e.mask
          d.offsets[e.cluster] = data
        }
        data += popcount16(e.mask) * BLOCK_SIZE
      }
    },
  })
  let users = 1
  const release = async (): Promise<void> => {
    if (--users === 0) await file.close()
  }
  const once = (fn: () => Promise<void>): () => Promise<void> => {
    let done = false
    return async () => {
      if (done) return
      done = true
      await fn()
    }
  }
  return {
    info: archiveInfo(header),
    extents: walk.extents,
    disk: device => {
      const d = devices[device.id]
      if (d === undefined || d.tracked.info.name !== device.name) {
        throw new VmapipeError('E_NOT_FOUND', `the archive has no device ${device.name} with id ${device.id}`)
      }
      users++
      return deviceDisk(file, d, once(release))
    },
    close: once(release),
  }
}

/**
 * Calls `fn` for each run of [offset, offset + length) that is stored (with
 * its archive offset) or zero (archive offset -1), runs split at cluster
 * boundaries and where the mask changes. Bytes past the device end are zero.
 */
function walk (d: IndexedDevice, offset: number, length: number, fn: (at: number, length: number, archiveOffset: number) => void): void {
  const end = offset + length
  const inside = Math.min(end, d.tracked.info.size)
  let at = offset
  while (at < inside) {
    const cluster = Math.floor(at / CLUSTER_SIZE)
    const base = cluster * CLUSTER_SIZE
    const mask = d.masks[cluster]
    const block = Math.floor((at - base) / BLOCK_SIZE)
    const stored = (mask >>> block) & 1
    let next = block + 1
    while (next < 16 && ((mask >>> next) & 1) === stored) next++
    const runEnd = Math.min(base + next * BLOCK_SIZE, inside)
    const archiveOffset = stored === 1 ? d.offsets[cluster] + popcount16(mask & ((1 << block) - 1)) * BLOCK_SIZE + (at - base - block * BLOCK_SIZE) : -1
    fn(at, runEnd - at, archiveOffset)
    at = runEnd
  }
  if (end > at) fn(at, end - at, -1)
}

/** A device of an indexed archive: a RandomAccessDisk that can also be read without the thread pool. */
export interface IndexedDisk extends RandomAccessDisk {
  /**
   * read(), as synchronous positional reads: for a caller that copies the
   * disk and would otherwise pay a thread-pool round trip for every run of
   * stored blocks (a partly zero cluster has several).
   */
  readSync: (buf: Buffer, offset: number) => void
}

interface Run { at: number, length: number, archiveOffset: number }

function deviceDisk (file: PositionalReader, d: IndexedDevice, close: () => Promise<void>): IndexedDisk {
  /** Zeros the holes of [offset, offset + buf.length) in buf; returns the stored runs, those next to each other in the archive and in buf as one. */
  const plan = (buf: Buffer, offset: number): Run[] => {
    const runs: Run[] = []
    walk(d, offset, buf.length, (at, n, archiveOffset) => {
      if (archiveOffset < 0) {
        buf.fill(0, at - offset, at - offset + n)
        return
      }
      const last = runs[runs.length - 1]
      if (last !== undefined && last.at + last.length === at - offset && last.archiveOffset + last.length === archiveOffset) last.length += n
      else runs.push({ at: at - offset, length: n, archiveOffset })
    })
    return runs
  }
  const shorter = (r: Run): VmapipeError =>
    new VmapipeError('E_VMA_TRUNCATED', `${file.name} is shorter than when it was indexed`, { offset: r.archiveOffset, device: d.tracked.info.name })
  return {
    size: d.tracked.info.size,
    map: async (offset, length) => {
      const out: Extent[] = []
      walk(d, offset, length, (at, n, archiveOffset) => {
        const data = archiveOffset >= 0
        const last = out[out.length - 1]
        if (last !== undefined && last.data === data) last.length += n
        else out.push({ offset: at, length: n, data })
      })
      return out
    },
    read: async (buf, offset) => {
      await Promise.all(plan(buf, offset).map(async r => {
        if (await file.read(buf.subarray(r.at, r.at + r.length), r.archiveOffset) < r.length) throw shorter(r)
      }))
    },
    readSync: (buf, offset) => {
      const readAt = file.readSync
      if (readAt === undefined) throw new VmapipeError('E_NOT_SEEKABLE', `${file.name} is read by requests, not by synchronous reads`)
      for (const r of plan(buf, offset)) {
        if (readAt(buf.subarray(r.at, r.at + r.length), r.archiveOffset) < r.length) throw shorter(r)
      }
    },
    close,
  }
}
