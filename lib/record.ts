/**
 * The one kind of item that flows through every pipeline, in VMA's own unit.
 * Readers turn bytes into these; writers turn these into bytes or files.
 */
import { VmapipeError } from './errors.js'
import type { ClusterRecord } from './contracts.js'

export const CLUSTER_SIZE = 65536
export const BLOCK_SIZE = 4096
export const BLOCKS_PER_CLUSTER = 16
const FULL_MASK = 0xffff
/** VMA stores cluster numbers in 32 bits. */
export const MAX_CLUSTERS = 2 ** 32
/** Name of the device that carries saved RAM instead of a disk. */
export const VMSTATE_NAME = 'vmstate'

/** Shared, never written: hand it out wherever zeros are needed. */
const ZERO_BLOCK: Buffer = Buffer.alloc(BLOCK_SIZE)
export const ZERO_CLUSTER: Buffer = Buffer.alloc(CLUSTER_SIZE)

export function clusterRecord (device: number, cluster: number, mask: number, data: Buffer): ClusterRecord {
  return { kind: 'cluster', device, cluster, mask, data }
}

export function popcount16 (mask: number): number {
  let m = mask - ((mask >>> 1) & 0x5555)
  m = (m & 0x3333) + ((m >>> 2) & 0x3333)
  m = (m + (m >>> 4)) & 0x0f0f
  return (m + (m >>> 8)) & 0x1f
}

export function clusterCount (size: number): number {
  return Math.ceil(size / CLUSTER_SIZE)
}

/** Mask of the blocks of `cluster` that lie (at least partly) inside a device of `size` bytes. */
export function blocksInside (size: number, cluster: number): number {
  const left = size - cluster * CLUSTER_SIZE
  if (left >= CLUSTER_SIZE) return FULL_MASK
  if (left <= 0) return 0
  return (1 << Math.ceil(left / BLOCK_SIZE)) - 1
}

/**
 * Calls `fn` once per run of consecutive data blocks in a record, with the
 * byte position in the device and the run's bytes, clipped to the device size.
 * Adjacent blocks become one call, so writers issue one write per run.
 */
export function forEachRun (rec: ClusterRecord, deviceSize: number, fn: (position: number, bytes: Buffer) => void): void {
  if (rec.data.length !== popcount16(rec.mask) * BLOCK_SIZE) {
    throw new VmapipeError('E_RECORD',
      `record data is ${rec.data.length} bytes but its mask 0x${rec.mask.toString(16)} needs ${popcount16(rec.mask) * BLOCK_SIZE}`, { cluster: rec.cluster })
  }
  if ((rec.mask & ~blocksInside(deviceSize, rec.cluster)) !== 0) {
    throw new VmapipeError('E_RECORD', `record has data past the device end (${deviceSize} bytes)`, { cluster: rec.cluster })
  }
  const base = rec.cluster * CLUSTER_SIZE
  let mask = rec.mask
  let block = 0
  let dataPos = 0
  while (mask !== 0) {
    while ((mask & 1) === 0) { mask >>>= 1; block++ }
    let run = 0
    while ((mask & 1) === 1) { mask >>>= 1; run++ }
    const position = base + block * BLOCK_SIZE
    const length = Math.min(run * BLOCK_SIZE, deviceSize - position)
    fn(position, rec.data.subarray(dataPos, dataPos + length))
    dataPos += run * BLOCK_SIZE
    block += run
  }
}

/**
 * The whole cluster as bytes (zeros included), clipped to the device end. A
 * cluster without holes (all data or all zeros) is a view of the record's data
 * or of shared zeros; one with holes is put together in `into` when it is
 * given (at least the clipped length), else in a new buffer.
 */
export function expandCluster (rec: ClusterRecord, deviceSize: number, into?: Buffer): Buffer {
  const length = Math.min(CLUSTER_SIZE, deviceSize - rec.cluster * CLUSTER_SIZE)
  if (rec.mask === 0) return ZERO_CLUSTER.subarray(0, length)
  if (rec.mask === FULL_MASK) return rec.data.subarray(0, length)
  const out = into?.subarray(0, length) ?? Buffer.allocUnsafe(length)
  const base = rec.cluster * CLUSTER_SIZE
  // Only the gaps between runs are zeroed: each byte is written once.
  let filled = 0
  forEachRun(rec, deviceSize, (position, bytes) => {
    out.fill(0, filled, position - base)
    filled = position - base + bytes.copy(out, position - base)
  })
  out.fill(0, filled)
  return out
}

/**
 * Makes a record from up to 64 KiB of disk bytes (less only for a device's last
 * cluster): zero 4 KiB blocks are left out through the mask. When the data
 * blocks are one run of whole blocks, the record's data is a subarray of
 * `bytes`, not a copy.
 */
export function clusterFromBytes (device: number, cluster: number, bytes: Buffer): ClusterRecord {
  // A whole zero cluster in one compare; else each block against the shared zeros, in place (no subarray per block).
  if (bytes.length === CLUSTER_SIZE && ZERO_CLUSTER.equals(bytes)) return clusterRecord(device, cluster, 0, EMPTY)
  let mask = 0
  for (let b = 0, at = 0; at < bytes.length; b++, at += BLOCK_SIZE) {
    const end = Math.min(at + BLOCK_SIZE, bytes.length)
    if (ZERO_BLOCK.compare(bytes, at, end, 0, end - at) !== 0) mask |= 1 << b
  }
  if (mask === 0) return clusterRecord(device, cluster, 0, EMPTY)
  const first = 31 - Math.clz32(mask & -mask)
  const run = mask >>> first
  const contiguous = (run & (run + 1)) === 0
  const end = (first + popcount16(mask)) * BLOCK_SIZE
  if (contiguous && end <= bytes.length) return clusterRecord(device, cluster, mask, bytes.subarray(first * BLOCK_SIZE, end))
  const data = Buffer.alloc(popcount16(mask) * BLOCK_SIZE)
  let at = 0
  for (let b = 0; b < BLOCKS_PER_CLUSTER; b++) {
    if ((mask >> b) & 1) {
      bytes.copy(data, at, b * BLOCK_SIZE, Math.min(bytes.length, (b + 1) * BLOCK_SIZE))
      at += BLOCK_SIZE
    }
  }
  return clusterRecord(device, cluster, mask, data)
}

const EMPTY: Buffer = Buffer.alloc(0)
