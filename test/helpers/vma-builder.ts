/**
 * A small VMA encoder for tests, written from the format notes on its own and
 * sharing no code with lib/, so that the reader is checked against a second
 * opinion. It can also break every rule on request.
 */
import { createHash } from 'node:crypto'
import { Rng } from './random.js'

export interface BuildDevice { id: number, name: string, size: number, data: Buffer }
export interface BuildConfig { name: string, data: Buffer }

/** One blockinfo slot: a cluster of a device (mask derived from the data unless given). */
export interface Slot { dev: number, cluster: number, mask?: number, data?: Buffer }

export interface BuildSpec {
  uuid?: Buffer
  ctime?: number
  configs: BuildConfig[]
  devices: BuildDevice[]
  /** Extents in archive order; each a list of slots (at most 59). */
  extents: Slot[][]
}

export const TEST_UUID = Buffer.from('0123456789abcdef0123456789abcdef', 'hex')

function md5Zeroed (buf: Buffer, field: number): Buffer {
  const copy = Buffer.from(buf)
  copy.fill(0, field, field + 16)
  return createHash('md5').update(copy).digest()
}

/** The blob table as the reference writes it: entries from position 1, u16 LE length + bytes. */
class Blobs {
  table: number[] = [0]
  add (bytes: Buffer): number {
    const at = this.table.length
    this.table.push(bytes.length & 0xff, bytes.length >> 8, ...bytes)
    return at
  }
}

export function buildHeader (spec: Pick<BuildSpec, 'uuid' | 'ctime' | 'configs' | 'devices'>, tweak?: (head: Buffer) => void): Buffer {
  const blobs = new Blobs()
  const fixed = Buffer.alloc(12288)
  fixed.write('VMA\0', 0, 'latin1')
  fixed.writeUInt32BE(1, 4)
  ;(spec.uuid ?? TEST_UUID).copy(fixed, 8)
  fixed.writeBigUInt64BE(BigInt(spec.ctime ?? 1700000000), 24)
  spec.configs.forEach((c, i) => {
    fixed.writeUInt32BE(blobs.add(Buffer.from(c.name + '\0', 'utf8')), 2044 + 4 * i)
    fixed.writeUInt32BE(blobs.add(c.data), 3068 + 4 * i)
  })
  for (const d of spec.devices) {
    fixed.writeUInt32BE(blobs.add(Buffer.from(d.name + '\0', 'utf8')), 4096 + 32 * d.id)
    fixed.writeBigUInt64BE(BigInt(d.size), 4096 + 32 * d.id + 8)
  }
  const used = blobs.table.length
  const tableSize = Math.ceil(used / 512) * 512
  const head = Buffer.concat([fixed, Buffer.alloc(tableSize)])
  Buffer.from(blobs.table).copy(head, 12288)
  head.writeUInt32BE(12288, 48)
  head.writeUInt32BE(used, 52)
  head.writeUInt32BE(head.length, 56)
  tweak?.(head)
  md5Zeroed(head, 32).copy(head, 32)
  return head
}

/** Slot data as stored: the mask and the non-zero 4 KiB blocks of the cluster. */
export function packCluster (devices: BuildDevice[], slot: Slot): { mask: number, blocks: Buffer[] } {
  const dev = devices.find(d => d.id === slot.dev)
  const cluster = slot.data ?? (dev ? dev.data.subarray(slot.cluster * 65536, slot.cluster * 65536 + 65536) : Buffer.alloc(0))
  let mask = 0
  const blocks: Buffer[] = []
  for (let b = 0; b < 16; b++) {
    const block = Buffer.alloc(4096)
    if (b * 4096 < cluster.length) cluster.copy(block, 0, b * 4096, Math.min(cluster.length, b * 4096 + 4096))
    if (slot.mask !== undefined ? (slot.mask >> b) & 1 : block.some(x => x !== 0)) {
      mask |= 1 << b
      blocks.push(block)
    }
  }
  return { mask, blocks }
}

export interface ExtentTweak {
  blockCount?: number
  /** Changes the header bytes before the checksum is computed. */
  header?: (head: Buffer) => void
  /** Changes the header bytes after the checksum is computed. */
  after?: (head: Buffer) => void
}

export function buildExtent (spec: Pick<BuildSpec, 'uuid' | 'devices'>, slots: Slot[], tweak: ExtentTweak = {}): Buffer {
  const head = Buffer.alloc(512)
  const data: Buffer[] = []
  slots.forEach((slot, i) => {
    const { mask, blocks } = packCluster(spec.devices, slot)
    const info = (BigInt(mask) << 48n) | (BigInt(slot.dev) << 32n) | BigInt(slot.cluster)
    head.writeBigUInt64BE(info, 40 + 8 * i)
    data.push(...blocks)
  })
  head.write('VMAE', 0, 'latin1')
  head.writeUInt16BE(tweak.blockCount ?? data.length, 6)
  ;(spec.uuid ?? TEST_UUID).copy(head, 8)
  tweak.header?.(head)
  md5Zeroed(head, 24).copy(head, 24)
  tweak.after?.(head)
  return Buffer.concat([head, ...data])
}

export function buildArchive (spec: BuildSpec): Buffer {
  return Buffer.concat([buildHeader(spec), ...spec.extents.map(slots => buildExtent(spec, slots))])
}

/**
 * Every cluster of every device, shuffled and mixed across devices, cut into
 * extents of 1..59 slots. vmstate clusters keep their order among themselves.
 */
export function scatter (rng: Rng, devices: BuildDevice[]): Slot[][] {
  const slots: Slot[] = []
  const ordered: Slot[] = []
  for (const d of devices) {
    for (let c = 0; c * 65536 < d.size; c++) (d.name === 'vmstate' ? ordered : slots).push({ dev: d.id, cluster: c })
  }
  rng.shuffle(slots)
  // vmstate clusters go to random places but keep their order: insert from the last.
  const places = ordered.map(() => rng.int(slots.length + 1)).sort((a, b) => a - b)
  for (let i = ordered.length - 1; i >= 0; i--) slots.splice(places[i], 0, ordered[i])
  const extents: Slot[][] = []
  for (let i = 0; i < slots.length;) {
    const n = 1 + rng.int(59)
    extents.push(slots.slice(i, i + n))
    i += n
  }
  return extents
}

export { Rng }
