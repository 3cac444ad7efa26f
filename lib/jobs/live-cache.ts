/**
 * One disk of a live restore: a sparse cache file that the pass fills and a
 * RandomAccessDisk that serves it. A read of clusters the pass has written
 * is a positional read of the file; a read of one not yet written waits for
 * it, and fails once the pass has stopped without it. The map reports what
 * the pass has seen, block by block, and everything else as data (never a
 * hole that might not be one).
 */
import type { FileHandle } from 'node:fs/promises'
import { VmapipeError } from '../errors.js'
import type { ClusterRecord, DeviceInfo, Extent, RandomAccessDisk } from '../contracts.js'
import { readUpTo } from '../io/pread.js'
import { BLOCK_SIZE, CLUSTER_SIZE, clusterCount, forEachRun } from '../record.js'

/** Clusters per chunk of the mask table: a chunk is allocated only once the pass writes a cluster in it. */
const CHUNK_BITS = 16
const CHUNK = 1 << CHUNK_BITS

/**
 * Each cluster's mask once the pass has passed it, else unknown. Memory
 * follows the clusters seen (2 bytes and a bit each, in chunks of 65536
 * clusters = 4 GiB of disk), never the size the header claims.
 */
class ClusterMasks {
  private readonly chunks = new Map<number, { masks: Uint16Array, known: Uint32Array }>()

  set (cluster: number, mask: number): void {
    const key = Math.floor(cluster / CHUNK)
    let chunk = this.chunks.get(key)
    if (chunk === undefined) {
      chunk = { masks: new Uint16Array(CHUNK), known: new Uint32Array(CHUNK / 32) }
      this.chunks.set(key, chunk)
    }
    const low = cluster % CHUNK
    chunk.masks[low] = mask
    chunk.known[low >>> 5] |= 1 << (low & 31)
  }

  /** The cluster's mask, or -1 while the pass has not passed it. */
  get (cluster: number): number {
    const chunk = this.chunks.get(Math.floor(cluster / CHUNK))
    if (chunk === undefined) return -1
    const low = cluster % CHUNK
    return (chunk.known[low >>> 5] & (1 << (low & 31))) === 0 ? -1 : chunk.masks[low]
  }
}

interface Waiter { first: number, last: number, missing: number, resolve: () => void, reject: (err: Error) => void }

export class CacheDisk implements RandomAccessDisk {
  readonly size: number
  private readonly clusters: number
  private readonly masks = new ClusterMasks()
  private readonly waiters = new Set<Waiter>()
  /** Why clusters not yet passed will never come. */
  private failure?: Error

  /** Set by the archive, which closes when all its disks are closed. */
  close = async (): Promise<void> => {}

  constructor (readonly device: DeviceInfo, readonly file: FileHandle, private readonly path: string) {
    this.size = device.size
    this.clusters = clusterCount(device.size)
  }

  /** Where the record's data blocks go in the file: runs of adjacent blocks (zero blocks stay holes). */
  pieces (rec: ClusterRecord): Array<{ position: number, bytes: Buffer }> {
    const out: Array<{ position: number, bytes: Buffer }> = []
    forEachRun(rec, this.size, (position, bytes) => out.push({ position, bytes }))
    return out
  }

  /** The record's blocks are in the file: reads of its cluster may go ahead. */
  passed (cluster: number, mask: number): void {
    this.masks.set(cluster, mask)
    for (const w of this.waiters) {
      if (cluster < w.first || cluster > w.last || --w.missing > 0) continue
      this.waiters.delete(w)
      w.resolve()
    }
  }

  /** The pass has stopped: reads waiting for clusters it never reached fail, and so do later ones. */
  fail (err: Error): void {
    this.failure ??= err
    for (const w of this.waiters) w.reject(this.missingError(w.first))
    this.waiters.clear()
  }

  map = async (offset: number, length: number): Promise<Extent[]> => {
    const out: Extent[] = []
    const add = (at: number, n: number, data: boolean): void => {
      const last = out[out.length - 1]
      if (last !== undefined && last.data === data) last.length += n
      else out.push({ offset: at, length: n, data })
    }
    const end = offset + length
    const inside = Math.min(end, this.size)
    for (let at = offset; at < inside;) {
      const cluster = Math.floor(at / CLUSTER_SIZE)
      const base = cluster * CLUSTER_SIZE
      const mask = this.masks.get(cluster)
      const clusterEnd = Math.min(base + CLUSTER_SIZE, inside)
      if (mask < 0 || mask === 0xffff || mask === 0) {
        add(at, clusterEnd - at, mask !== 0)
        at = clusterEnd
        continue
      }
      const block = Math.floor((at - base) / BLOCK_SIZE)
      const stored = (mask >>> block) & 1
      let next = block + 1
      while (next < 16 && ((mask >>> next) & 1) === stored) next++
      const runEnd = Math.min(base + next * BLOCK_SIZE, inside)
      add(at, runEnd - at, stored === 1)
      at = runEnd
    }
    if (end > inside) add(Math.max(offset, inside), end - Math.max(offset, inside), false)
    return out
  }

  read = async (buf: Buffer, offset: number): Promise<void> => {
    if (buf.length === 0) return
    const first = Math.floor(offset / CLUSTER_SIZE)
    const last = Math.min(this.clusters - 1, Math.floor((offset + buf.length - 1) / CLUSTER_SIZE))
    let missing = 0
    let firstMissing = -1
    for (let c = first; c <= last; c++) {
      if (this.masks.get(c) >= 0) continue
      missing++
      if (firstMissing < 0) firstMissing = c
    }
    if (missing > 0) {
      if (this.failure !== undefined) throw this.missingError(firstMissing)
      await new Promise<void>((resolve, reject) => this.waiters.add({ first, last, missing, resolve, reject }))
    }
    // Holes and the bytes past the file's end read as zeros.
    const got = await readUpTo(this.file, buf, offset, this.path)
    buf.fill(0, got)
  }

  private missingError (cluster: number): VmapipeError {
    const cause = this.failure
    const code = cause instanceof VmapipeError ? cause.code : 'E_IO'
    return new VmapipeError(code, `the pass over the archive stopped before it reached this cluster: ${cause?.message ?? 'stopped'}`,
      { device: this.device.name, cluster, cause })
  }
}
