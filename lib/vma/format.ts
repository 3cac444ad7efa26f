/**
 * VMA structures: decoding (and, for the writer, encoding) of the archive
 * header and the 512-byte extent headers. Pure functions over Buffers.
 * Layout: ../shared/specs/vma_spec.txt, corrected by VMA-NOTES.md.
 */
import { createHash } from 'node:crypto'
import { VmapipeError } from '../errors.js'
import { formatUuid, isUuid, uuidBytes } from '../util/uuid.js'
import type { ArchiveInfo, ConfigBlob, DeviceInfo } from '../contracts.js'
import { CLUSTER_SIZE, MAX_CLUSTERS, popcount16 } from '../record.js'

export const VMA_MAGIC = Buffer.from('VMA\0', 'latin1')
export const EXTENT_MAGIC = Buffer.from('VMAE', 'latin1')
/** sizeof(VmaHeader): everything before the blob buffer. */
export const HEADER_FIXED_SIZE = 12288
/** The reference writer builds the header in a 512 KiB buffer; nothing larger is real. */
export const MAX_HEADER_SIZE = 512 * 1024
export const EXTENT_HEADER_SIZE = 512
/** Slots in an extent header; readers accept 1..59 used. */
export const MAX_EXTENT_CLUSTERS = 59
/** The reference writer flushes an extent at 58 clusters; we write what it writes. */
export const WRITER_EXTENT_CLUSTERS = 58
/** dev_ids 1..254; the reference keeps 255 free. */
const MAX_DEVICES = 254
export const MAX_CONFIGS = 256
/** Bytes needed to learn header_size. */
export const HEADER_PREFIX_SIZE = 60
export const MAX_BLOB_SIZE = 65535

const OFF = {
  version: 4, uuid: 8, ctime: 24, md5: 32, blobOffset: 48, blobSize: 52, headerSize: 56,
  configNames: 2044, configData: 3068, devInfo: 4096,
} as const
const DEV_INFO_SIZE = 32
const EXTENT_OFF = { reserved: 4, blockCount: 6, uuid: 8, md5: 24, blockInfo: 40 } as const
const ZERO_MD5 = Buffer.alloc(16)

export interface VmaHeader {
  uuid: string
  uuidBytes: Buffer
  ctime: number
  configs: ConfigBlob[]
  devices: DeviceInfo[]
}

/** The header as the first item of a record stream. */
export function archiveInfo (header: VmaHeader): ArchiveInfo {
  return { kind: 'archive', uuid: header.uuid, ctime: header.ctime, configs: header.configs, devices: header.devices }
}

/** One used blockinfo slot of an extent header. */
export interface ExtentEntry {
  slot: number
  mask: number
  devId: number
  cluster: number
}

export interface ExtentHeader {
  blockCount: number
  entries: ExtentEntry[]
}

/** MD5 of `buf` as if the 16 bytes at `at` were zero (how VMA checksums its headers). */
function md5WithHole (buf: Buffer, at: number): Buffer {
  return createHash('md5').update(buf.subarray(0, at)).update(ZERO_MD5).update(buf.subarray(at + 16)).digest()
}

export function checkMagic (start: Buffer): void {
  if (!start.subarray(0, 4).equals(VMA_MAGIC)) {
    throw new VmapipeError('E_VMA_MAGIC', `not a VMA archive: magic is 0x${start.subarray(0, 4).toString('hex')}, expected 0x564d4100 ("VMA\\0")`,
      { offset: 0 })
  }
}

/** Checks the magic and returns header_size, from the first HEADER_PREFIX_SIZE bytes. */
export function readHeaderSize (prefix: Buffer): number {
  checkMagic(prefix)
  const size = prefix.readUInt32BE(OFF.headerSize)
  if (size <= HEADER_FIXED_SIZE || size > MAX_HEADER_SIZE) {
    throw new VmapipeError('E_VMA_HEADER_SIZE', `header_size ${size} is outside ${HEADER_FIXED_SIZE + 1}..${MAX_HEADER_SIZE}`, { offset: OFF.headerSize })
  }
  return size
}

/** Returns the blob-table index: blob position (relative to the blob buffer) -> its bytes. */
function indexBlobs (head: Buffer): Map<number, Buffer> {
  const blobOffset = head.readUInt32BE(OFF.blobOffset)
  const blobSize = head.readUInt32BE(OFF.blobSize)
  if (blobOffset < HEADER_FIXED_SIZE) {
    throw new VmapipeError('E_VMA_BLOB', `blob_buffer_offset ${blobOffset} points inside the fixed header`, { offset: OFF.blobOffset })
  }
  if (blobOffset + blobSize > head.length) {
    throw new VmapipeError('E_VMA_BLOB', `blob buffer ${blobOffset}+${blobSize} runs past header_size ${head.length}`, { offset: OFF.blobSize })
  }
  const blobs = new Map<number, Buffer>()
  const end = blobOffset + blobSize
  // Position 0 means "none", so the first blob starts at 1.
  for (let pos = blobOffset + 1; pos + 2 <= end;) {
    const len = head.readUInt16LE(pos)
    if (pos + 2 + len <= end) blobs.set(pos - blobOffset, head.subarray(pos + 2, pos + 2 + len))
    pos += 2 + len
  }
  return blobs
}

/**
 * Names become file names on extraction, so anything that could climb or hide
 * is refused: in an archive read (E_VMA_NAME, with its offset) and in one about
 * to be written (E_OPTION).
 */
function checkName (name: string, what: string, offset?: number): void {
  if (name === '' || name === '.' || name.includes('..') || /[/\\\x00-\x1f\x7f]/.test(name)) {
    const message = `${what} name ${JSON.stringify(name)} is not a safe file name (empty, '..', '/', '\\', NUL or a control character)`
    throw offset === undefined ? new VmapipeError('E_OPTION', message) : new VmapipeError('E_VMA_NAME', message, { offset })
  }
}

/**
 * The longest names an archive is written with, in bytes: what Proxmox's own
 * `vma extract` restores (measured with pve-vma 10.0.2). It writes a device
 * as tmp-disk-NAME.raw and a config blob through a temporary NAME.XXXXXX, and
 * a file name holds 255 bytes. VMA itself would hold 65534 (blobs have a
 * 2-byte size), but an archive whose restore fails is no backup.
 */
const MAX_NAME_BYTES = { device: 255 - 'tmp-disk-.raw'.length, config: 255 - '.XXXXXX'.length } as const

/** Refuses (E_LIMIT) a name longer than Proxmox can restore, saying the limit. */
function checkNameLength (name: string, what: keyof typeof MAX_NAME_BYTES): void {
  const bytes = Buffer.byteLength(name)
  if (bytes > MAX_NAME_BYTES[what]) {
    const cut = name.length > 40 ? `${name.slice(0, 40)}...` : name
    throw new VmapipeError('E_LIMIT',
      `${what} name ${JSON.stringify(cut)} is ${bytes} bytes; at most ${MAX_NAME_BYTES[what]} can be restored by Proxmox's vma extract ` +
      `(it writes ${what === 'device' ? 'tmp-disk-NAME.raw' : 'NAME.XXXXXX'}, and a file name holds 255 bytes)`)
  }
}

function blobString (blobs: Map<number, Buffer>, ptr: number, what: string, fieldOffset: number): string {
  const blob = blobs.get(ptr)
  if (blob === undefined) throw new VmapipeError('E_VMA_BLOB', `${what} points to ${ptr}, which is not a blob`, { offset: fieldOffset })
  if (blob.length === 0 || blob[blob.length - 1] !== 0) {
    throw new VmapipeError('E_VMA_BLOB', `${what} is not NUL-terminated`, { offset: fieldOffset })
  }
  const name = blob.subarray(0, blob.length - 1).toString('utf8')
  checkName(name, what, fieldOffset)
  return name
}

/** Decodes and checks a whole header (header_size bytes). */
export function parseHeader (head: Buffer): VmaHeader {
  const headerSize = readHeaderSize(head)
  if (head.length !== headerSize) throw new Error(`parseHeader needs exactly ${headerSize} bytes`)
  const md5 = md5WithHole(head, OFF.md5)
  if (!md5.equals(head.subarray(OFF.md5, OFF.md5 + 16))) {
    throw new VmapipeError('E_VMA_HEADER_MD5',
      `header checksum mismatch: stored ${head.subarray(OFF.md5, OFF.md5 + 16).toString('hex')}, computed ${md5.toString('hex')}`, { offset: OFF.md5 })
  }
  const version = head.readUInt32BE(OFF.version)
  if (version !== 1) throw new VmapipeError('E_VMA_VERSION', `unsupported VMA version ${version} (only 1 exists)`, { offset: OFF.version })
  const ctime = head.readBigUInt64BE(OFF.ctime)
  if (ctime > BigInt(Number.MAX_SAFE_INTEGER)) throw new VmapipeError('E_VMA_HEADER', `ctime ${ctime} is not a plausible time`, { offset: OFF.ctime })
  const blobs = indexBlobs(head)

  const devices: DeviceInfo[] = []
  const names = new Set<string>()
  for (let id = 1; id < 256; id++) {
    const at = OFF.devInfo + id * DEV_INFO_SIZE
    const ptr = head.readUInt32BE(at)
    const size = head.readBigUInt64BE(at + 8)
    // The reference skips slots without a size; a size without a name is damage.
    if (size === 0n) continue
    const name = blobString(blobs, ptr, `device ${id}`, at)
    if (size > BigInt(MAX_CLUSTERS * CLUSTER_SIZE)) {
      throw new VmapipeError('E_VMA_HEADER', `device ${name} claims ${size} bytes, more than VMA's 32-bit cluster numbers can address`, { offset: at + 8 })
    }
    if (names.has(name)) throw new VmapipeError('E_VMA_NAME', `two devices are named ${name}`, { offset: at })
    names.add(name)
    devices.push({ id, name, size: Number(size) })
  }
  if (devices.length === 0) throw new VmapipeError('E_VMA_NO_DEVICES', 'the archive declares no devices', { offset: OFF.devInfo })

  const configs: ConfigBlob[] = []
  const configNames = new Set<string>()
  for (let i = 0; i < MAX_CONFIGS; i++) {
    const namePtr = head.readUInt32BE(OFF.configNames + 4 * i)
    const dataPtr = head.readUInt32BE(OFF.configData + 4 * i)
    if (namePtr === 0 || dataPtr === 0) continue
    const name = blobString(blobs, namePtr, `config ${i}`, OFF.configNames + 4 * i)
    const data = blobs.get(dataPtr)
    if (data === undefined) {
      throw new VmapipeError('E_VMA_BLOB', `config ${name} data points to ${dataPtr}, which is not a blob`, { offset: OFF.configData + 4 * i })
    }
    if (configNames.has(name)) throw new VmapipeError('E_VMA_NAME', `two config blobs are named ${name}`, { offset: OFF.configNames + 4 * i })
    configNames.add(name)
    configs.push({ name, data: Buffer.from(data) })
  }

  const uuidBytes = Buffer.from(head.subarray(OFF.uuid, OFF.uuid + 16))
  return { uuid: formatUuid(uuidBytes), uuidBytes, ctime: Number(ctime), configs, devices }
}

/**
 * Decodes and checks one extent header. `offset` is where it starts in the
 * archive, for error messages. Slots with dev_id 0 are unused and skipped.
 */
export function parseExtentHeader (buf: Buffer, uuid: Buffer, offset: number): ExtentHeader {
  const md5 = md5WithHole(buf, EXTENT_OFF.md5)
  if (!md5.equals(buf.subarray(EXTENT_OFF.md5, EXTENT_OFF.md5 + 16))) {
    if (!buf.subarray(0, 4).equals(EXTENT_MAGIC)) {
      throw new VmapipeError('E_VMA_EXTENT_MAGIC', `expected an extent header ("VMAE"), found 0x${buf.subarray(0, 4).toString('hex')}`, { offset })
    }
    throw new VmapipeError('E_VMA_EXTENT_MD5', 'extent header checksum mismatch', { offset: offset + EXTENT_OFF.md5 })
  }
  if (!buf.subarray(EXTENT_OFF.uuid, EXTENT_OFF.uuid + 16).equals(uuid)) {
    throw new VmapipeError('E_VMA_EXTENT_UUID',
      `extent uuid ${formatUuid(buf.subarray(EXTENT_OFF.uuid, EXTENT_OFF.uuid + 16))} differs from the archive's ${formatUuid(uuid)}`,
      { offset: offset + EXTENT_OFF.uuid })
  }
  if (!buf.subarray(0, 4).equals(EXTENT_MAGIC) || buf.readUInt16BE(EXTENT_OFF.reserved) !== 0) {
    throw new VmapipeError('E_VMA_EXTENT_MAGIC', 'wrong extent magic or reserved field', { offset })
  }
  const blockCount = buf.readUInt16BE(EXTENT_OFF.blockCount)
  const entries: ExtentEntry[] = []
  let blocks = 0
  for (let slot = 0; slot < MAX_EXTENT_CLUSTERS; slot++) {
    const at = EXTENT_OFF.blockInfo + slot * 8
    const devId = buf[at + 3]
    if (devId === 0) continue
    const mask = buf.readUInt16BE(at)
    blocks += popcount16(mask)
    entries.push({ slot, mask, devId, cluster: buf.readUInt32BE(at + 4) })
  }
  if (blocks !== blockCount) {
    throw new VmapipeError('E_VMA_BLOCK_COUNT', `extent block_count is ${blockCount} but its masks hold ${blocks} blocks`,
      { offset: offset + EXTENT_OFF.blockCount })
  }
  return { blockCount, entries }
}

/** Where slot `slot`'s blockinfo lies inside an extent header. */
export function blockInfoOffset (slot: number): number {
  return EXTENT_OFF.blockInfo + slot * 8
}

/** What a header is made from. */
export interface HeaderSpec {
  uuid: Buffer
  ctime: number
  configs: ConfigBlob[]
  devices: DeviceInfo[]
}

/** Builds the blob buffer as the reference does: entries from position 1, u16 LE length + bytes. */
class BlobTable {
  private readonly parts: Buffer[] = [Buffer.alloc(1)]
  length = 1

  add (bytes: Buffer, what: string): number {
    if (bytes.length > MAX_BLOB_SIZE) {
      throw new VmapipeError('E_LIMIT', `${what} is ${bytes.length} bytes; a VMA blob holds at most ${MAX_BLOB_SIZE}`)
    }
    const at = this.length
    const size = Buffer.alloc(2)
    size.writeUInt16LE(bytes.length)
    this.parts.push(size, bytes)
    this.length += 2 + bytes.length
    return at
  }

  bytes (): Buffer { return Buffer.concat(this.parts) }
}

/** Encodes a header with its checksum; refuses what the format (or the reference) cannot hold. */
export function encodeHeader (spec: HeaderSpec): Buffer {
  if (spec.configs.length > MAX_CONFIGS) throw new VmapipeError('E_LIMIT', `${spec.configs.length} config blobs; VMA holds at most ${MAX_CONFIGS}`)
  if (spec.devices.length === 0) throw new VmapipeError('E_LIMIT', 'an archive needs at least one device')
  if (spec.devices.length > MAX_DEVICES) throw new VmapipeError('E_LIMIT', `${spec.devices.length} devices; VMA holds at most ${MAX_DEVICES}`)
  const fixed = Buffer.alloc(HEADER_FIXED_SIZE)
  VMA_MAGIC.copy(fixed, 0)
  fixed.writeUInt32BE(1, OFF.version)
  spec.uuid.copy(fixed, OFF.uuid)
  fixed.writeBigUInt64BE(BigInt(spec.ctime), OFF.ctime)
  const blobs = new BlobTable()
  const zeroTerminated = (name: string): Buffer => Buffer.from(`${name}\0`, 'utf8')
  spec.configs.forEach((c, i) => {
    checkName(c.name, 'config')
    checkNameLength(c.name, 'config')
    fixed.writeUInt32BE(blobs.add(zeroTerminated(c.name), `config name ${c.name}`), OFF.configNames + 4 * i)
    fixed.writeUInt32BE(blobs.add(c.data, `config ${c.name}`), OFF.configData + 4 * i)
  })
  const ids = new Set<number>()
  for (const d of spec.devices) {
    checkName(d.name, 'device')
    checkNameLength(d.name, 'device')
    if (!Number.isInteger(d.id) || d.id < 1 || d.id > MAX_DEVICES || ids.has(d.id)) {
      throw new VmapipeError('E_LIMIT', `device id ${d.id} is not a free id in 1..${MAX_DEVICES}`)
    }
    if (d.size <= 0 || d.size > MAX_CLUSTERS * CLUSTER_SIZE) {
      throw new VmapipeError('E_LIMIT', `device ${d.name} has size ${d.size}; VMA takes 1 byte to 256 TiB`)
    }
    ids.add(d.id)
    const at = OFF.devInfo + d.id * DEV_INFO_SIZE
    fixed.writeUInt32BE(blobs.add(zeroTerminated(d.name), `device name ${d.name}`), at)
    fixed.writeBigUInt64BE(BigInt(d.size), at + 8)
  }
  const table = blobs.bytes()
  const headerSize = HEADER_FIXED_SIZE + Math.ceil(table.length / 512) * 512
  if (headerSize > MAX_HEADER_SIZE) {
    throw new VmapipeError('E_LIMIT', `the config blobs and names need a ${headerSize}-byte header; VMA readers take at most ${MAX_HEADER_SIZE}`)
  }
  const head = Buffer.alloc(headerSize)
  fixed.copy(head)
  table.copy(head, HEADER_FIXED_SIZE)
  head.writeUInt32BE(HEADER_FIXED_SIZE, OFF.blobOffset)
  head.writeUInt32BE(table.length, OFF.blobSize)
  head.writeUInt32BE(headerSize, OFF.headerSize)
  md5WithHole(head, OFF.md5).copy(head, OFF.md5)
  return head
}

/** Encodes one extent header for the given slots (at most MAX_EXTENT_CLUSTERS). */
export function encodeExtentHeader (uuid: Buffer, slots: Array<Omit<ExtentEntry, 'slot'>>): Buffer {
  const head = Buffer.alloc(EXTENT_HEADER_SIZE)
  EXTENT_MAGIC.copy(head, 0)
  let blocks = 0
  slots.forEach((s, i) => {
    const at = EXTENT_OFF.blockInfo + i * 8
    head.writeUInt16BE(s.mask, at)
    head[at + 3] = s.devId
    head.writeUInt32BE(s.cluster, at + 4)
    blocks += popcount16(s.mask)
  })
  head.writeUInt16BE(blocks, EXTENT_OFF.blockCount)
  uuid.copy(head, EXTENT_OFF.uuid)
  md5WithHole(head, EXTENT_OFF.md5).copy(head, EXTENT_OFF.md5)
  return head
}

/** "01234567-89ab-..." -> 16 bytes. */
export function parseUuid (text: string): Buffer {
  if (!isUuid(text)) throw new VmapipeError('E_OPTION', `${text} is not a uuid (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)`, { option: 'uuid' })
  return uuidBytes(text)
}
