/**
 * qcow2 structures (../shared/specs/qcow2.txt): the header with its
 * extensions, L1/L2 entries and the refcount layout. Pure functions over
 * Buffers; offsets become Numbers only after range checks (2^53 is far
 * beyond any real image).
 */
import { VmapipeError } from '../errors.js'

export const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]) // "QFI\xfb"
const V2_HEADER_LENGTH = 72
const V3_HEADER_LENGTH = 104
/** What we write: v3 with the compression_type byte, padded to a multiple of 8. */
const WRITE_HEADER_LENGTH = 112
const MIN_CLUSTER_BITS = 9
/** QEMU's limit: 2 MiB clusters. */
const MAX_CLUSTER_BITS = 21
/** QEMU's limit on the L1 table. */
const MAX_L1_BYTES = 32 << 20
const MAX_BACKING_NAME = 1023

export const INCOMPAT = { DIRTY: 1, CORRUPT: 2, DATA_FILE: 4, COMPRESSION: 8, EXTENDED_L2: 16 } as const
const KNOWN_INCOMPAT = 0x1f
const AUTOCLEAR = { BITMAPS: 1, DATA_FILE_RAW: 2 } as const

const EXT = {
  END: 0,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const

/** Where the tables are: what a header says and what the writer decides. */
export interface Qcow2Geometry {
  clusterBits: number
  /** Virtual size in bytes. */
  size: number
  l1Size: number
  l1Offset: number
  refcountTableOffset: number
  refcountTableClusters: number
}

export interface Qcow2Header extends Qcow2Geometry {
  version: 2 | 3
  incompatible: number
  autoclear: number
  refcountOrder: number
  headerLength: number
  backing?: { name: string, format?: string }
  dataFile?: string
  /** Bitmaps extension: where the directory lies. */
  bitmaps?: { count: number, directorySize: number, directoryOffset: number }
}

const fail = (message: string, offset: number): VmapipeError => new VmapipeError('E_QCOW2_HEADER', message, { offset })

/** A u64 that must be a real file offset or size: checked against 2^53 before use. */
function u64 (buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at)
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw fail(`${what} ${v} is beyond any real image`, at)
  return Number(v)
}

export function isQcow2 (head: Buffer): boolean {
  return head.length >= 4 && head.subarray(0, 4).equals(QCOW2_MAGIC)
}

/**
 * Decodes and checks the header from the image's first bytes (at least the
 * first cluster, or the whole file if smaller). `fileSize` bounds every offset.
 */
export function parseHeader (head: Buffer, fileSize: number): Qcow2Header {
  if (head.length < V2_HEADER_LENGTH) throw fail(`a qcow2 header needs ${V2_HEADER_LENGTH} bytes, the file has ${head.length}`, 0)
  if (!isQcow2(head)) throw fail('not a qcow2 image (magic)', 0)
  const version = head.readUInt32BE(4)
  if (version !== 2 && version !== 3) throw fail(`unsupported qcow2 version ${version}`, 4)
  const clusterBits = head.readUInt32BE(20)
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw fail(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`, 20)
  }
  const clusterSize = 2 ** clusterBits
  const size = diskSize(u64(head, 24, 'size'))
  if (head.readUInt32BE(32) !== 0) throw fail('encrypted images are not supported', 32)
  const l1Size = head.readUInt32BE(36)
  const l1Offset = u64(head, 40, 'l1_table_offset')
  const refcountTableOffset = u64(head, 48, 'refcount_table_offset')
  const refcountTableClusters = head.readUInt32BE(56)
  let incompatible = 0
  let autoclear = 0
  let refcountOrder = 4
  let headerLength = V2_HEADER_LENGTH
  if (version === 3) {
    if (head.length < V3_HEADER_LENGTH) throw fail('truncated v3 header', 0)
    const incompat = head.readBigUInt64BE(72)
    if ((incompat & ~BigInt(KNOWN_INCOMPAT)) !== 0n) throw fail(`unknown incompatible features 0x${(incompat & ~BigInt(KNOWN_INCOMPAT)).toString(16)}`, 72)
    incompatible = Number(incompat)
    autoclear = Number(head.readBigUInt64BE(88) & 0xffffffffn)
    refcountOrder = head.readUInt32BE(96)
    headerLength = head.readUInt32BE(100)
    if (refcountOrder > 6) throw fail(`refcount_order ${refcountOrder} above 6`, 96)
    if (headerLength < V3_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize || headerLength > head.length) {
      throw fail(`header_length ${headerLength} is not a multiple of 8 within the first cluster`, 100)
    }
    if ((incompatible & INCOMPAT.COMPRESSION) !== 0) throw fail('compression types other than deflate (zstd) are not supported', 72)
    if ((incompatible & INCOMPAT.CORRUPT) !== 0) throw fail('the image is marked corrupt; repair it with qemu-img check -r all first', 72)
    if ((incompatible & INCOMPAT.EXTENDED_L2) !== 0 && clusterBits < 14) throw fail('extended L2 entries need clusters of 16 KiB or more', 20)
  }
  if (size > 0 && l1Size < Math.ceil(size / clusterSize / l2Entries(clusterBits, (incompatible & INCOMPAT.EXTENDED_L2) !== 0))) {
    throw fail(`l1_size ${l1Size} is too small for a ${size}-byte disk`, 36)
  }
  if (l1Size * 8 > MAX_L1_BYTES) throw fail(`l1_size ${l1Size} needs more than ${MAX_L1_BYTES} bytes`, 36)
  checkTable(l1Offset, l1Size * 8, clusterSize, fileSize, 'L1 table', 40)
  checkTable(refcountTableOffset, refcountTableClusters * clusterSize, clusterSize, fileSize, 'refcount table', 48)
  const header: Qcow2Header = {
    version, clusterBits, size, l1Size, l1Offset, refcountTableOffset, refcountTableClusters, incompatible, autoclear, refcountOrder, headerLength,
  }
  const ext = version === 3 ? parseExtensions(head, headerLength, Math.min(clusterSize, head.length)) : {}
  if (ext.dataFile !== undefined) header.dataFile = ext.dataFile
  if (ext.bitmaps !== undefined) header.bitmaps = ext.bitmaps
  const backingOffset = u64(head, 8, 'backing_file_offset')
  if (backingOffset !== 0) {
    const length = head.readUInt32BE(16)
    if (length === 0 || length > MAX_BACKING_NAME) throw fail(`backing file name of ${length} bytes (1..${MAX_BACKING_NAME})`, 16)
    if (backingOffset + length > head.length) throw fail('the backing file name lies outside the first cluster', 8)
    header.backing = {
      name: head.subarray(backingOffset, backingOffset + length).toString('utf8'),
      ...(ext.backingFormat !== undefined ? { format: ext.backingFormat } : {}),
    }
  }
  if ((incompatible & INCOMPAT.DATA_FILE) !== 0 && header.backing !== undefined && (autoclear & AUTOCLEAR.DATA_FILE_RAW) !== 0) {
    throw fail('a raw external data file cannot have a backing file', 88)
  }
  return header
}

function checkTable (offset: number, bytes: number, clusterSize: number, fileSize: number, what: string, field: number): void {
  if (offset % clusterSize !== 0) throw fail(`${what} offset ${offset} is not cluster aligned`, field)
  if (bytes > 0 && (offset === 0 || offset + bytes > fileSize)) {
    throw fail(`${what} at ${offset} (${bytes} bytes) lies outside the ${fileSize}-byte file`, field)
  }
}

interface Extensions { dataFile?: string, backingFormat?: string, bitmaps?: Qcow2Header['bitmaps'] }

function parseExtensions (head: Buffer, start: number, end: number): Extensions {
  const ext: Extensions = {}
  let at = start
  while (at + 8 <= end) {
    const type = head.readUInt32BE(at)
    const length = head.readUInt32BE(at + 4)
    if (type === EXT.END) break
    if (at + 8 + length > end) throw fail(`header extension 0x${type.toString(16)} of ${length} bytes runs past the first cluster`, at)
    const data = head.subarray(at + 8, at + 8 + length)
    if (type === EXT.DATA_FILE) ext.dataFile = data.toString('utf8')
    else if (type === EXT.BACKING_FORMAT) ext.backingFormat = data.toString('utf8')
    else if (type === EXT.CRYPTO) throw fail('encrypted images are not supported', at)
    else if (type === EXT.BITMAPS) {
      if (length < 24) throw fail('bitmaps extension too short', at)
      ext.bitmaps = {
        count: data.readUInt32BE(0),
        directorySize: u64(data, 8, 'bitmap_directory_size'),
        directoryOffset: u64(data, 16, 'bitmap_directory_offset'),
      }
    }
    at += 8 + Math.ceil(length / 8) * 8
  }
  return ext
}

/** L2 entries per table. */
export function l2Entries (clusterBits: number, extended: boolean): number {
  return 2 ** clusterBits / (extended ? 16 : 8)
}

/** One guest cluster's L2 entry, decoded. */
export type L2Entry =
  | { kind: 'unallocated' }
  | { kind: 'zero' }
  | { kind: 'data', host: number }
  | { kind: 'compressed', host: number, bytes: number }
  /** Extended L2: per subcluster, allocated (data at host + i * sub) or reads as zero. */
  | { kind: 'subclusters', host: number, allocated: number, zero: number }

const TWO32 = 2 ** 32

/** The disk size a header's size field gives: whole 512-byte sectors, as QEMU reads it (it rounds down). */
export function diskSize (field: number): number {
  return field - field % 512
}

/**
 * Guest clusters of the disk. QEMU looks up L1 and L2 entries only for these,
 * so entries past the end are never read, nor checked, by either reader.
 */
export function guestClusters (h: Qcow2Header): number {
  return Math.ceil(h.size / 2 ** h.clusterBits)
}

/** L1 entries that cover the disk. */
export function l1EntriesUsed (h: Qcow2Header): number {
  return Math.ceil(guestClusters(h) / l2Entries(h.clusterBits, (h.incompatible & INCOMPAT.EXTENDED_L2) !== 0))
}

/**
 * The L2 entry of guest `cluster`, at `index` in the table that lies at file
 * offset `l2Offset`, read as QEMU reads it (qcow2_get_cluster_type and
 * qcow2_get_host_offset): reserved bits are ignored; offset 0 is unallocated
 * unless an external data file and the COPIED flag make it that file's first
 * cluster; the zero flag is refused in version 2 and ignored with extended L2;
 * compressed clusters keep whatever subcluster bits they have. What QEMU
 * fails to read is refused: unaligned offsets, subclusters allocated without
 * an offset or both allocated and zero, compressed clusters with a data file,
 * data-file clusters away from their guest offset. Beyond QEMU, data past
 * `fileSize` is refused (QEMU reads zeros there; qemu-img check calls it
 * corruption): an image cut short must not read as a shorter disk.
 * The one check for every L2 entry, from a file and from a stream.
 */
export function readL2Entry (h: Qcow2Header, table: Buffer, index: number, l2Offset: number, cluster: number, fileSize: number): L2Entry {
  const extended = (h.incompatible & INCOMPAT.EXTENDED_L2) !== 0
  const dataFile = (h.incompatible & INCOMPAT.DATA_FILE) !== 0
  const clusterSize = 2 ** h.clusterBits
  const at = index * (extended ? 16 : 8)
  const hi = table.readUInt32BE(at)
  const lo = table.readUInt32BE(at + 4)
  const bad = (why: string): VmapipeError => new VmapipeError('E_QCOW2_L2', `L2 entry ${index} (guest cluster ${cluster}) ${why}`, { offset: l2Offset + at })
  // Data in an external data file may lie past its end: that reads as zeros, as in QEMU.
  const inFile = (host: number, what: string): void => {
    if (!dataFile && host >= fileSize) throw bad(`points to ${what} at ${host}, past the end of the ${fileSize}-byte file`)
  }
  const checkHost = (host: number): void => {
    if (host % clusterSize !== 0) throw bad(`points to ${host}, which is not cluster aligned`)
    if (dataFile && host !== cluster * clusterSize) throw bad(`maps to ${host} in the data file, not to its own offset`)
  }
  if ((hi & 0x40000000) !== 0) {
    if (dataFile) throw bad('is a compressed cluster in an image with an external data file')
    // Compressed: x = 62 - (cluster_bits - 8) bits of offset, then the sector count.
    const x = 62 - (h.clusterBits - 8)
    const raw = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo)
    const host = Number(raw & ((1n << BigInt(x)) - 1n))
    const sectors = Number(raw >> BigInt(x))
    inFile(host, 'compressed data')
    return { kind: 'compressed', host, bytes: (sectors + 1) * 512 - (host % 512) }
  }
  // >>> 0: a JavaScript & is signed, and bit 31 of the low word would make the offset negative.
  const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
  const allocatedAt0 = host === 0 && !(dataFile && (hi & 0x80000000) !== 0)
  const zeroFlag = !extended && (lo & 1) !== 0
  if (zeroFlag && h.version < 3) throw bad('has the zero flag, which version 2 images do not have')
  if (extended) {
    const zero = table.readUInt32BE(at + 8)
    const allocated = table.readUInt32BE(at + 12)
    if (allocatedAt0) {
      if (allocated !== 0) throw bad('allocates subclusters without an offset')
      return zero === 0 ? { kind: 'unallocated' } : { kind: 'subclusters', host: 0, allocated: 0, zero }
    }
    if ((allocated & zero) !== 0) throw bad('marks a subcluster both allocated and zero')
    checkHost(host)
    if (allocated !== 0) inFile(host, 'data')
    return { kind: 'subclusters', host, allocated, zero }
  }
  if (zeroFlag) {
    if (host !== 0) checkHost(host)
    return { kind: 'zero' }
  }
  if (allocatedAt0) return { kind: 'unallocated' }
  checkHost(host)
  inFile(host, 'data')
  return { kind: 'data', host }
}

/**
 * Decodes L1 entry `index`: the L2 table's offset, or 0. As in QEMU, reserved
 * bits are ignored and an unaligned offset is refused; an L2 table past the
 * end of the file is refused too (QEMU reads zeros there).
 */
export function readL1Entry (l1: Buffer, index: number, clusterSize: number, fileSize: number, l1Offset: number): number {
  const hi = l1.readUInt32BE(index * 8)
  const lo = l1.readUInt32BE(index * 8 + 4)
  const at = l1Offset + index * 8
  const offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
  if (offset === 0) return 0
  if (offset % clusterSize !== 0) throw new VmapipeError('E_QCOW2_L1', `L1 entry ${index} points to ${offset}, which is not cluster aligned`, { offset: at })
  if (offset + clusterSize > fileSize) {
    throw new VmapipeError('E_QCOW2_L1', `L1 entry ${index} points to an L2 table at ${offset}, past the end of the ${fileSize}-byte file`, { offset: at })
  }
  return offset
}

/** Writes a u64 made of an offset below 2^56 and flag bits 56..63 (as a BigInt shift would, without BigInt). */
export function writeEntry (buf: Buffer, at: number, offset: number, flagsHigh = 0): void {
  buf.writeUInt32BE(((Math.floor(offset / TWO32) & 0x00ffffff) | flagsHigh) >>> 0, at)
  buf.writeUInt32BE(offset % TWO32, at + 4)
}

export const COPIED = 0x80000000
export const ZERO_FLAG = 1

/** Where the metadata goes and how big it is, for an image whose host clusters are all used. */
export interface RefcountLayout {
  /** Refcount blocks needed. */
  blocks: number
  /** Clusters of the refcount table. */
  tableClusters: number
  /** All clusters of the image file, the refcount structures included. */
  total: number
}

/**
 * Sizes the refcount structures (16-bit refcounts) for a file of `used`
 * clusters plus those structures themselves, every cluster refcounted once.
 */
export function refcountLayout (used: number, clusterBits: number): RefcountLayout {
  const clusterSize = 2 ** clusterBits
  const perBlock = clusterSize / 2
  let blocks = 0
  let tableClusters = 0
  for (;;) {
    const total = used + blocks + tableClusters
    const needBlocks = Math.ceil(total / perBlock)
    const needTable = Math.max(1, Math.ceil(needBlocks * 8 / clusterSize))
    if (needBlocks === blocks && needTable === tableClusters) return { blocks, tableClusters, total }
    blocks = needBlocks
    tableClusters = needTable
  }
}

export interface HeaderSpec extends Qcow2Geometry {
  dataFile?: { name: string, raw: boolean }
  backing?: { name: string, format: string }
}

/** A v3 header with its extensions (and backing file name), in one cluster. */
export function encodeHeader (spec: HeaderSpec): Buffer {
  const clusterSize = 2 ** spec.clusterBits
  const head = Buffer.alloc(clusterSize)
  QCOW2_MAGIC.copy(head, 0)
  head.writeUInt32BE(3, 4)
  head.writeUInt32BE(spec.clusterBits, 20)
  writeEntry(head, 24, spec.size)
  head.writeUInt32BE(spec.l1Size, 36)
  writeEntry(head, 40, spec.l1Offset)
  writeEntry(head, 48, spec.refcountTableOffset)
  head.writeUInt32BE(spec.refcountTableClusters, 56)
  head.writeUInt32BE(spec.dataFile ? INCOMPAT.DATA_FILE : 0, 76)
  head.writeUInt32BE(spec.dataFile?.raw === true ? AUTOCLEAR.DATA_FILE_RAW : 0, 92)
  head.writeUInt32BE(4, 96)
  head.writeUInt32BE(WRITE_HEADER_LENGTH, 100)
  let at = WRITE_HEADER_LENGTH
  const extension = (type: number, data: Buffer): void => {
    head.writeUInt32BE(type, at)
    head.writeUInt32BE(data.length, at + 4)
    data.copy(head, at + 8)
    at += 8 + Math.ceil(data.length / 8) * 8
  }
  if (spec.backing) extension(EXT.BACKING_FORMAT, Buffer.from(spec.backing.format))
  if (spec.dataFile) extension(EXT.DATA_FILE, Buffer.from(spec.dataFile.name))
  at += 8 // the end-of-extensions marker: type 0, length 0
  if (spec.backing) {
    const name = Buffer.from(spec.backing.name)
    if (name.length > MAX_BACKING_NAME) throw new VmapipeError('E_LIMIT', `backing file name longer than ${MAX_BACKING_NAME} bytes`)
    writeEntry(head, 8, at)
    head.writeUInt32BE(name.length, 16)
    name.copy(head, at)
  }
  return head
}
