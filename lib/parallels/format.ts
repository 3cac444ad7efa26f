/**
 * The Parallels expandable image (.hds), pure: header, BAT, Format Extension
 * and dirty bitmap structures encoded and decoded from Buffers, with every
 * check a strict reader makes (../shared/specs/parallels.rst). No I/O.
 */
import { createHash } from 'node:crypto'
import { VmapipeError } from '../errors.js'
import { formatUuid, uuidBytes } from '../util/uuid.js'

export const SECTOR_SIZE = 512
export const HEADER_SIZE = 64
/** Old images: BAT entries and data_off in sectors, data_off may be 0. */
const MAGIC_SECTORS = 'WithoutFreeSpace'
/** Current images: BAT entries in clusters, data_off cluster-aligned. */
export const MAGIC_CLUSTERS = 'WithouFreSpacExt'
const VERSION = 2
/** in_use while software has the image open for writing. */
export const IN_USE = 0x746f6e59
/** in_use once closed by software that knows the Format Extension. */
export const CLOSED = 0x312e3276
/** Header flag: the image reads as all zeros whatever its BAT says. */
export const FLAG_EMPTY = 1
export const DEFAULT_CLUSTER_SIZE = 1 << 20
/** 1 GiB of BAT (16 TiB of disk at 64 KiB clusters): more is refused before anything is allocated. */
export const MAX_BAT_ENTRIES = 2 ** 28
/** Clusters above 2 GiB are refused (QEMU's own limit is the same). */
const MAX_CLUSTER_SECTORS = 2 ** 22

const EXTENSION_MAGIC = 0xab234cef23dcea87n
const FEATURE_END = 0n
const FEATURE_DIRTY_BITMAP = 0x20385fae252cb34an
/** Feature flag: software that cannot load the feature must not use the image. */
const FEATURE_NECESSARY = 1n
/** Feature flag: software that does not know the feature keeps it as it is. */
const FEATURE_TRANSIT = 2n
const EXTENSION_HEADER_SIZE = 24
const FEATURE_HEADER_SIZE = 24
const BITMAP_HEADER_SIZE = 32

type Magic = typeof MAGIC_SECTORS | typeof MAGIC_CLUSTERS

export interface ParallelsHeader {
  magic: Magic
  heads: number
  cylinders: number
  /** Cluster size in sectors. */
  tracks: number
  batEntries: number
  /** Guest size in sectors. */
  sectors: number
  inUse: number
  /** Start of the data area in sectors; 0 (old magic only) means right after the BAT. */
  dataOff: number
  flags: number
  /** Format Extension cluster in sectors; 0 when there is none. */
  extOff: number
}

/** The magic alone claims a file, so that a damaged header is reported rather than read as raw. */
export function isParallels (head: Buffer): boolean {
  const magic = head.toString('latin1', 0, 16)
  return magic === MAGIC_SECTORS || magic === MAGIC_CLUSTERS
}

function fail (code: 'E_PARALLELS_HEADER' | 'E_PARALLELS_BAT' | 'E_PARALLELS_EXTENSION', where: string, message: string, offset?: number): VmapipeError {
  return new VmapipeError(code, `${where}: ${message}`, offset === undefined ? {} : { offset })
}

export const clusterSize = (h: ParallelsHeader): number => h.tracks * SECTOR_SIZE
export const batEnd = (h: ParallelsHeader): number => HEADER_SIZE + 4 * h.batEntries

/** Byte offset of the data area. */
export function dataOffset (h: ParallelsHeader): number {
  if (h.dataOff === 0) return Math.ceil(batEnd(h) / SECTOR_SIZE) * SECTOR_SIZE
  return h.dataOff * SECTOR_SIZE
}

/** Bytes one unit of a BAT entry stands for: a sector in old images, a cluster in current ones. */
export const entryUnit = (h: ParallelsHeader): number => h.magic === MAGIC_SECTORS ? SECTOR_SIZE : clusterSize(h)

/** The BAT as readers see it: an image flagged empty reads as all zeros, so its entries are cleared (in place). */
export function visibleBat (h: ParallelsHeader, bat: Uint32Array): Uint32Array {
  if ((h.flags & FLAG_EMPTY) !== 0) bat.fill(0)
  return bat
}

/** Byte offset in the file that a non-zero BAT entry stands for. */
export function entryOffset (h: ParallelsHeader, entry: number): number {
  return entry * entryUnit(h)
}

/**
 * Decodes and checks the 64-byte header. `fileSize` (when the file can be
 * seen) bounds the BAT and the data area.
 */
export function parseHeader (buf: Buffer, where: string, fileSize?: number): ParallelsHeader {
  if (buf.length < HEADER_SIZE) throw fail('E_PARALLELS_HEADER', where, `${buf.length} bytes, shorter than a Parallels header (${HEADER_SIZE})`, 0)
  const magic = buf.toString('latin1', 0, 16)
  if (magic !== MAGIC_SECTORS && magic !== MAGIC_CLUSTERS) {
    throw fail('E_PARALLELS_HEADER', where, 'not a Parallels image (magic is neither WithoutFreeSpace nor WithouFreSpacExt)', 0)
  }
  const version = buf.readUInt32LE(16)
  if (version !== VERSION) throw fail('E_PARALLELS_HEADER', where, `version ${version}, only ${VERSION} exists`, 16)
  const sectors64 = buf.readBigUInt64LE(36)
  if (magic === MAGIC_SECTORS && sectors64 >> 32n !== 0n) {
    throw fail('E_PARALLELS_HEADER', where, 'nb_sectors uses its high 32 bits, which WithoutFreeSpace images must leave clear', 36)
  }
  if (sectors64 > BigInt(Number.MAX_SAFE_INTEGER) / BigInt(SECTOR_SIZE)) {
    throw fail('E_PARALLELS_HEADER', where, `nb_sectors ${sectors64} is beyond any disk`, 36)
  }
  const h: ParallelsHeader = {
    magic,
    heads: buf.readUInt32LE(20),
    cylinders: buf.readUInt32LE(24),
    tracks: buf.readUInt32LE(28),
    batEntries: buf.readUInt32LE(32),
    sectors: Number(sectors64),
    inUse: buf.readUInt32LE(44),
    dataOff: buf.readUInt32LE(48),
    flags: buf.readUInt32LE(52),
    extOff: 0,
  }
  const extOff = buf.readBigUInt64LE(56)
  if (extOff > BigInt(Number.MAX_SAFE_INTEGER) / BigInt(SECTOR_SIZE)) throw fail('E_PARALLELS_HEADER', where, `ext_off ${extOff} is beyond any file`, 56)
  h.extOff = Number(extOff)
  if (h.tracks === 0) throw fail('E_PARALLELS_HEADER', where, 'cluster size (tracks) is 0', 28)
  if (h.tracks > MAX_CLUSTER_SECTORS) throw fail('E_PARALLELS_HEADER', where, `cluster of ${h.tracks} sectors is over the ${MAX_CLUSTER_SECTORS} allowed`, 28)
  if (h.inUse === IN_USE) {
    throw fail('E_PARALLELS_HEADER', where,
      'the image is marked in use: it was not closed cleanly and its BAT may not match its data (qemu-img check -r all repairs it)', 44)
  }
  if (h.inUse !== 0 && h.inUse !== CLOSED) throw fail('E_PARALLELS_HEADER', where, `in_use is 0x${h.inUse.toString(16)}, which is not allowed`, 44)
  if (h.sectors === 0) throw fail('E_PARALLELS_HEADER', where, 'the disk size (nb_sectors) is 0', 36)
  const needed = Math.ceil(h.sectors / h.tracks)
  if (h.batEntries < needed) {
    throw fail('E_PARALLELS_HEADER', where, `bat_entries ${h.batEntries} cannot cover ${h.sectors} sectors in clusters of ${h.tracks} (${needed} needed)`, 32)
  }
  if (h.batEntries > MAX_BAT_ENTRIES) throw fail('E_PARALLELS_HEADER', where, `bat_entries ${h.batEntries} is over the ${MAX_BAT_ENTRIES} allowed`, 32)
  if (fileSize !== undefined && batEnd(h) > fileSize) {
    throw fail('E_PARALLELS_HEADER', where, `the BAT of ${h.batEntries} entries ends at byte ${batEnd(h)}, past the end of the file (${fileSize} bytes)`, 32)
  }
  if (h.magic === MAGIC_CLUSTERS && h.dataOff === 0) throw fail('E_PARALLELS_HEADER', where, 'data_off is 0, which WithouFreSpacExt images do not allow', 48)
  if (h.magic === MAGIC_CLUSTERS && h.dataOff % h.tracks !== 0) {
    throw fail('E_PARALLELS_HEADER', where, `data_off ${h.dataOff} (sectors) is not aligned to the cluster size (${h.tracks} sectors)`, 48)
  }
  if (dataOffset(h) < batEnd(h)) {
    throw fail('E_PARALLELS_HEADER', where, `data_off points to byte ${dataOffset(h)}, inside the BAT (which ends at byte ${batEnd(h)})`, 48)
  }
  if (fileSize !== undefined && dataOffset(h) > fileSize) {
    throw fail('E_PARALLELS_HEADER', where, `data_off points to byte ${dataOffset(h)}, past the end of the file (${fileSize} bytes)`, 48)
  }
  return h
}

export function encodeHeader (h: ParallelsHeader): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE)
  buf.write(h.magic, 0, 'latin1')
  buf.writeUInt32LE(VERSION, 16)
  buf.writeUInt32LE(h.heads, 20)
  buf.writeUInt32LE(h.cylinders, 24)
  buf.writeUInt32LE(h.tracks, 28)
  buf.writeUInt32LE(h.batEntries, 32)
  buf.writeBigUInt64LE(BigInt(h.sectors), 36)
  buf.writeUInt32LE(h.inUse, 44)
  buf.writeUInt32LE(h.dataOff, 48)
  buf.writeUInt32LE(h.flags, 52)
  buf.writeBigUInt64LE(BigInt(h.extOff), 56)
  return buf
}

/**
 * Checks that a cluster the image uses (data, Format Extension or bitmap)
 * at byte `offset` lies in the data area, on a cluster boundary from its
 * start, and (when the size is known) wholly inside the file.
 */
export function checkHostCluster (
  h: ParallelsHeader, offset: number, fileSize: number | undefined, what: string, where: string, code: 'E_PARALLELS_BAT' | 'E_PARALLELS_EXTENSION', at: number
): void {
  const fault = hostClusterFault(offset, dataOffset(h), clusterSize(h), fileSize)
  if (fault !== undefined) throw fail(code, where, `${what} ${fault}`, at)
}

/**
 * What is wrong with a cluster at byte `offset` for checkHostCluster, to
 * follow the name of what points there; undefined when nothing is. Takes the
 * data area's start and the cluster size, and builds no text for a good
 * cluster, so that a BAT of millions of entries is checked cheaply.
 */
function hostClusterFault (offset: number, start: number, size: number, fileSize: number | undefined): string | undefined {
  if (offset < start) return `points to byte ${offset}, before the data area (byte ${start})`
  if ((offset - start) % size !== 0) {
    return `points to byte ${offset}, not on a cluster boundary of the data area (clusters of ${size} bytes from byte ${start})`
  }
  if (fileSize !== undefined && offset + size > fileSize) return `points to byte ${offset}, past the end of the file (${fileSize} bytes)`
  if (!Number.isSafeInteger(offset + size)) return 'points beyond any file'
  return undefined
}

/** Byte position in the file of BAT entry `index`. */
export const batEntryAt = (index: number): number => HEADER_SIZE + 4 * index

/**
 * Decodes the BAT (the `4 * batEntries` bytes after the header) and checks
 * every non-zero entry: in the data area, aligned, inside the file when its
 * size is known, and used once. Returns the entries and their non-zero values
 * sorted, which is file order.
 */
export function parseBat (h: ParallelsHeader, bytes: Buffer, where: string, fileSize?: number): { bat: Uint32Array, sorted: Uint32Array } {
  const bat = new Uint32Array(h.batEntries)
  const unit = entryUnit(h)
  const start = dataOffset(h)
  const size = clusterSize(h)
  let used = 0
  for (let i = 0; i < h.batEntries; i++) {
    const entry = bytes.readUInt32LE(4 * i)
    bat[i] = entry
    if (entry === 0) continue
    used++
    const fault = hostClusterFault(entry * unit, start, size, fileSize)
    if (fault !== undefined) throw fail('E_PARALLELS_BAT', where, `BAT entry ${i} ${fault}`, batEntryAt(i))
  }
  const sorted = new Uint32Array(used)
  for (let i = 0, j = 0; i < bat.length; i++) if (bat[i] !== 0) sorted[j++] = bat[i]
  sorted.sort()
  for (let j = 1; j < sorted.length; j++) {
    if (sorted[j] !== sorted[j - 1]) continue
    const index = bat.lastIndexOf(sorted[j])
    throw fail('E_PARALLELS_BAT', where,
      `BAT entry ${index} points to byte ${entryOffset(h, sorted[j])}, a cluster entry ${bat.indexOf(sorted[j])} uses already`, batEntryAt(index))
  }
  return { bat, sorted }
}

export function encodeBat (bat: Uint32Array): Buffer {
  const buf = Buffer.alloc(4 * bat.length)
  for (let i = 0; i < bat.length; i++) buf.writeUInt32LE(bat[i], 4 * i)
  return buf
}

/** A dirty bitmap as the Format Extension stores it. */
export interface BitmapFeature {
  /** UUID, lower case, no braces. */
  id: string
  /** Bitmap size in sectors: the disk's. */
  sectors: number
  /** Sectors one bit stands for; a power of two. */
  granularity: number
  /** Per cluster of bitmap data: 0 all clear, 1 all set, else the sector offset of the cluster holding it. */
  l1: number[]
}

/** A feature the reader does not know, kept (TRANSIT) or ignored. */
interface OtherFeature {
  magic: bigint
  flags: bigint
  /** Why it was left out: unknown, or a known feature that failed to load without NECESSARY. */
  reason: string
}

export interface FormatExtension {
  bitmaps: BitmapFeature[]
  /** Features not loaded: unknown TRANSIT features, and dropped ones. */
  others: OtherFeature[]
}

/** L1 entries a bitmap needs: one per cluster of bits. */
function bitmapL1Size (sectors: number, granularity: number, clusterBytes: number): number {
  return Math.ceil(Math.ceil(sectors / granularity) / (clusterBytes * 8))
}

const hex = (n: bigint): string => `0x${n.toString(16)}`

/** Checks (and claims) a cluster a bitmap uses; throws when it may not. */
type ClusterCheck = (offset: number, what: string, at: number) => void

/**
 * Decodes the Format Extension cluster found at byte `at`: magic, MD5 over
 * the cluster from byte 24, then features up to "end of features". An
 * unknown NECESSARY feature, or a dirty bitmap marked NECESSARY that does not
 * load, refuses the image; other failures drop the feature. `check` is shown
 * every bitmap cluster.
 */
export function parseFormatExtension (h: ParallelsHeader, cluster: Buffer, where: string, at: number, check: ClusterCheck): FormatExtension {
  const what = (offset: number): number => at + offset
  if (cluster.length < EXTENSION_HEADER_SIZE + FEATURE_HEADER_SIZE) throw fail('E_PARALLELS_EXTENSION', where, 'the Format Extension cluster is too small', at)
  const magic = cluster.readBigUInt64LE(0)
  if (magic !== EXTENSION_MAGIC) throw fail('E_PARALLELS_EXTENSION', where, `Format Extension magic is ${hex(magic)}, not ${hex(EXTENSION_MAGIC)}`, at)
  const md5 = createHash('md5').update(cluster.subarray(EXTENSION_HEADER_SIZE)).digest()
  if (!md5.equals(cluster.subarray(8, EXTENSION_HEADER_SIZE))) {
    throw fail('E_PARALLELS_EXTENSION', where, 'Format Extension checksum (MD5 from byte 24) does not match its contents', what(8))
  }
  const result: FormatExtension = { bitmaps: [], others: [] }
  let pos = EXTENSION_HEADER_SIZE
  for (;;) {
    if (pos + FEATURE_HEADER_SIZE > cluster.length) {
      throw fail('E_PARALLELS_EXTENSION', where, 'the features run past the Format Extension cluster without an end of features', what(pos))
    }
    const featureMagic = cluster.readBigUInt64LE(pos)
    const flags = cluster.readBigUInt64LE(pos + 8)
    const dataSize = cluster.readUInt32LE(pos + 16)
    const dataAt = pos + FEATURE_HEADER_SIZE
    if (featureMagic === FEATURE_END) return result
    if (dataAt + dataSize > cluster.length) {
      throw fail('E_PARALLELS_EXTENSION', where, `feature ${hex(featureMagic)} claims ${dataSize} bytes, past the Format Extension cluster`, what(pos + 16))
    }
    const data = cluster.subarray(dataAt, dataAt + dataSize)
    const necessary = (flags & FEATURE_NECESSARY) !== 0n
    if (featureMagic === FEATURE_DIRTY_BITMAP) {
      try {
        result.bitmaps.push(parseBitmapFeature(h, data, where, what(dataAt), check))
      } catch (err) {
        if (necessary) throw err
        result.others.push({ magic: featureMagic, flags, reason: `dropped: ${(err as Error).message}` })
      }
    } else if (necessary) {
      throw fail('E_PARALLELS_EXTENSION', where, `unknown Format Extension feature ${hex(featureMagic)} is marked NECESSARY`, what(pos))
    } else {
      result.others.push({ magic: featureMagic, flags, reason: (flags & FEATURE_TRANSIT) !== 0n ? 'unknown, kept (TRANSIT)' : 'unknown, ignored' })
    }
    pos = dataAt + Math.ceil(dataSize / 8) * 8
  }
}

function parseBitmapFeature (h: ParallelsHeader, data: Buffer, where: string, at: number, check: ClusterCheck): BitmapFeature {
  if (data.length < BITMAP_HEADER_SIZE) {
    throw fail('E_PARALLELS_EXTENSION', where, `dirty bitmap feature of ${data.length} bytes, shorter than its ${BITMAP_HEADER_SIZE}-byte header`, at)
  }
  const sectors = data.readBigUInt64LE(0)
  const id = formatUuid(data.subarray(8, 24))
  const granularity = data.readUInt32LE(24)
  const l1Size = data.readUInt32LE(28)
  if (sectors !== BigInt(h.sectors)) throw fail('E_PARALLELS_EXTENSION', where, `dirty bitmap ${id} covers ${sectors} sectors, the disk has ${h.sectors}`, at)
  if (granularity === 0 || (granularity & (granularity - 1)) !== 0 || granularity * SECTOR_SIZE > 0xffffffff) {
    throw fail('E_PARALLELS_EXTENSION', where, `dirty bitmap ${id} has granularity ${granularity} sectors, not a power of two below 4 GiB`, at + 24)
  }
  const expected = bitmapL1Size(h.sectors, granularity, clusterSize(h))
  if (l1Size !== expected) {
    throw fail('E_PARALLELS_EXTENSION', where, `dirty bitmap ${id} has ${l1Size} L1 entries, its size and granularity need ${expected}`, at + 28)
  }
  if (BITMAP_HEADER_SIZE + 8 * l1Size > data.length) {
    throw fail('E_PARALLELS_EXTENSION', where, `the L1 table of dirty bitmap ${id} runs past its feature data`, at + 28)
  }
  const l1: number[] = []
  for (let i = 0; i < l1Size; i++) {
    const entryAt = at + BITMAP_HEADER_SIZE + 8 * i
    const entry = data.readBigUInt64LE(BITMAP_HEADER_SIZE + 8 * i)
    if (entry > BigInt(Number.MAX_SAFE_INTEGER) / BigInt(SECTOR_SIZE)) {
      throw fail('E_PARALLELS_EXTENSION', where, `L1 entry ${i} of dirty bitmap ${id} points beyond any file`, entryAt)
    }
    if (entry > 1n) check(Number(entry) * SECTOR_SIZE, `L1 entry ${i} of dirty bitmap ${id}`, entryAt)
    l1.push(Number(entry))
  }
  return { id, sectors: h.sectors, granularity, l1 }
}

/** The Format Extension cluster holding `bitmaps`, checksum included. */
export function encodeFormatExtension (clusterBytes: number, bitmaps: BitmapFeature[]): Buffer {
  const cluster = Buffer.alloc(clusterBytes)
  cluster.writeBigUInt64LE(EXTENSION_MAGIC, 0)
  let pos = EXTENSION_HEADER_SIZE
  for (const b of bitmaps) {
    const dataSize = BITMAP_HEADER_SIZE + 8 * b.l1.length
    if (pos + FEATURE_HEADER_SIZE + dataSize + FEATURE_HEADER_SIZE > clusterBytes) {
      throw new VmapipeError('E_LIMIT',
        `dirty bitmaps need more than one Format Extension cluster of ${clusterBytes} bytes; use larger clusters or a coarser granularity`)
    }
    cluster.writeBigUInt64LE(FEATURE_DIRTY_BITMAP, pos)
    cluster.writeUInt32LE(dataSize, pos + 16)
    const data = pos + FEATURE_HEADER_SIZE
    cluster.writeBigUInt64LE(BigInt(b.sectors), data)
    uuidBytes(b.id).copy(cluster, data + 8)
    cluster.writeUInt32LE(b.granularity, data + 24)
    cluster.writeUInt32LE(b.l1.length, data + 28)
    b.l1.forEach((entry, i) => cluster.writeBigUInt64LE(BigInt(entry), data + BITMAP_HEADER_SIZE + 8 * i))
    pos = data + Math.ceil(dataSize / 8) * 8
  }
  createHash('md5').update(cluster.subarray(EXTENSION_HEADER_SIZE)).digest().copy(cluster, 8)
  return cluster
}

/** A guest geometry whose product is exactly `sectors` (heads up to 16, sectors per track up to 63). */
export function geometry (sectors: number): { cylinders: number, heads: number, sectorsPerTrack: number } {
  const heads = [16, 8, 4, 2, 1].find(n => sectors % n === 0) as number
  const sectorsPerTrack = [63, 32, 16, 8, 4, 2, 1].find(n => (sectors / heads) % n === 0) as number
  return { cylinders: sectors / heads / sectorsPerTrack, heads, sectorsPerTrack }
}
