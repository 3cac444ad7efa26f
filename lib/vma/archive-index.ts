/**
 * Random access into an uncompressed VMA archive in a regular file. The index
 * is built once by reading the header and the 512-byte extent headers only
 * (the data between them is skipped), with the streaming reader's checks,
 * and kept as two typed arrays per device: each cluster's mask and the
 * archive offset of its first data block, 10 bytes per cluster. Each device
 * is then a RandomAccessDisk: its map comes from the masks, its reads are
 * positional reads of the blocks, runs that lie together in the archive
 * read at once.
 */
import { VmapipeError, ioError } from '../errors.js'
import type { ArchiveInfo, DeviceInfo, Extent, RandomAccessDisk } from '../contracts.js'
import { detectCompression } from '../io/compression.js'
import { BLOCK_SIZE, CLUSTER_SIZE, clusterCount, popcount16 } from '../record.js'
import { type TrackedDevice, firstIncomplete, trackDevice, trackExtent } from './tracker.js'
import { type PositionalReader, openFileReader } from '../io/pread.js'
import {
  EXTENT_HEADER_SIZE, archiveInfo, HEADER_PREFIX_SIZE, MAX_EXTENT_CLUSTERS, VMA_MAGIC, checkMagic, parseExtentHeader, parseHeader, readHeaderSize,
} from './format.js'

export interface ArchiveIndex {
  info: ArchiveInfo
  /** Extent headers read. */
  extents: number
  /** A device of the archive as a disk; the archive stays open until the index and every such disk are closed. */
  disk: (device: DeviceInfo) => RandomAccessDisk
  close: () => Promise<void>
}

interface IndexedDevice {
  tracked: TrackedDevice
  masks: Uint16Array
  /** Archive offset of each cluster's first stored block (unused for mask 0). */
  offsets: Float64Array
}

const UNPACK: Record<string, string> = { zstd: 'zstd -d', gzip: 'gunzip -k', lzo: 'lzop -d' }

/** The index of the archive at `source`: a path, or a reader by position (an object in a store), closed with the index. */
export async function openArchiveIndex (source: string | PositionalReader): Promise<ArchiveIndex> {
  const reader = typeof source === 'string'
    ? await openFileReader(source, 'random access needs one (a pipe or device can only be streamed, e.g. with vma extract)')
    : source
  try {
    return await buildIndex(reader)
  } catch (err) {
    await reader.close()
    throw err instanceof VmapipeError ? err : ioError(err, `reading ${reader.name}`)
  }
}

async function buildIndex (reader: PositionalReader): Promise<ArchiveIndex> {
  const path = reader.name
  const fileSize = reader.size
  const prefix = Buffer.alloc(HEADER_PREFIX_SIZE)
  const got = await reader.read(prefix, 0)
  const compression = detectCompression(prefix.subarray(0, got))
  if (compression !== 'none') {
    throw new VmapipeError(
      'E_NOT_SEEKABLE',
      `${path} is compressed with ${compression}; random access needs an uncompressed archive (${UNPACK[compression]} ${path})`
    )
  }
  if (got >= VMA_MAGIC.length) checkMagic(prefix)
  if (got < HEADER_PREFIX_SIZE) {
    throw new VmapipeError('E_VMA_TRUNCATED', got === 0 ? 'the input is empty' : 'the archive ends inside its header', { offset: got })
  }
  const headerSize = readHeaderSize(prefix)
  const head = Buffer.alloc(headerSize)
  if (await reader.read(head, 0) < headerSize) {
    throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside its header (header_size ${headerSize})`, { offset: fileSize })
  }
  const header = parseHeader(head)

  // A complete archive needs an extent header per 59 clusters: a header that
  // declares more than the file can hold is refused before anything is allocated for it.
  const declared = header.devices.reduce((n, d) => n + clusterCount(d.size), 0)
  const room = Math.floor((fileSize - headerSize) / EXTENT_HEADER_SIZE) * MAX_EXTENT_CLUSTERS
  if (declared > room) {
    throw new VmapipeError('E_VMA_TRUNCATED',
      `the archive's ${fileSize} bytes cannot hold the ${declared} clusters its header declares: it is cut short or damaged`, { offset: fileSize })
  }
  const devices: Array<IndexedDevice | undefined> = []
  for (const info of header.devices) {
    const n = clusterCount(info.size)
    devices[info.id] = { tracked: trackDevice(info), masks: new Uint16Array(n), offsets: new Float64Array(n) }
  }
  const tracked = devices.map(d => d?.tracked)

  const buf = Buffer.alloc(EXTENT_HEADER_SIZE)
  let extents = 0
  for (let pos = headerSize; pos < fileSize; extents++) {
    if (await reader.read(buf, pos) < EXTENT_HEADER_SIZE) {
      throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside the extent header at byte ${pos}`, { offset: fileSize })
    }
    const extent = parseExtentHeader(buf, header.uuidBytes, pos)
    trackExtent(tracked, extent, pos)
    let data = pos + EXTENT_HEADER_SIZE
    for (const e of extent.entries) {
      const d = devices[e.devId] as IndexedDevice
      d.masks[e.cluster] = e.mask
      d.offsets[e.cluster] = data
      data += popcount16(e.mask) * BLOCK_SIZE
    }
    if (data > fileSize) throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside the extent that starts at byte ${pos}`, { offset: fileSize })
    pos = data
  }
  const missing = firstIncomplete(tracked.filter((d): d is TrackedDevice => d !== undefined))
  if (missing !== undefined) throw new VmapipeError('E_VMA_MISSING', missing.message, { offset: fileSize, device: missing.dev.info.name })

  let users = 1
  const release = async (): Promise<void> => {
    if (--users === 0) await reader.close()
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
    extents,
    disk: device => {
      const d = devices[device.id]
      if (d === undefined || d.tracked.info.name !== device.name) {
        throw new VmapipeError('E_NOT_FOUND', `the archive has no device ${device.name} with id ${device.id}`)
      }
      users++
      return deviceDisk(reader, d, once(release))
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

function deviceDisk (reader: PositionalReader, d: IndexedDevice, close: () => Promise<void>): RandomAccessDisk {
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
      // Runs next to each other in the archive and in buf become one read.
      const runs: Array<{ at: number, length: number, archiveOffset: number }> = []
      walk(d, offset, buf.length, (at, n, archiveOffset) => {
        if (archiveOffset < 0) {
          buf.fill(0, at - offset, at - offset + n)
          return
        }
        const last = runs[runs.length - 1]
        if (last !== undefined && last.at + last.length === at - offset && last.archiveOffset + last.length === archiveOffset) last.length += n
        else runs.push({ at: at - offset, length: n, archiveOffset })
      })
      await Promise.all(runs.map(async r => {
        if (await reader.read(buf.subarray(r.at, r.at + r.length), r.archiveOffset) < r.length) {
          const where = { offset: r.archiveOffset, device: d.tracked.info.name }
          throw new VmapipeError('E_VMA_TRUNCATED', `${reader.name} is shorter than when it was indexed`, where)
        }
      }))
    },
    close,
  }
}
