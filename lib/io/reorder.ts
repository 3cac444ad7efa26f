/**
 * Holds clusters that arrive before their turn, for a writer that must emit a
 * device front to back (a pipe). A bounded amount stays in memory; the rest
 * goes to an unlinked temporary file at the cluster's own offset, so the file
 * is a sparse image of what is waiting and the index is one bit per cluster.
 *
 * Spill writes and read-backs are synchronous: the writer has nothing else to
 * do meanwhile, and a thread-pool round trip per write, with several writes
 * to one file contending for its lock, cost more than the copies themselves.
 * Memory is fixed: the in-memory clusters sit in slots made once, and what
 * goes to the file or comes back from it lies in slabs (io/slabs.ts).
 */
import { closeSync, openSync, unlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { ioError } from '../errors.js'
import type { ClusterRecord } from '../contracts.js'
import { CLUSTER_SIZE, expandCluster } from '../record.js'
import { ClusterSet } from '../util/cluster-set.js'
import { WriteQueue } from './write-queue.js'
import { readUpToSync } from './pread.js'
import { SLAB_SIZE, giveBack, lend, scratch, takeSlab } from './slabs.js'

export interface ReorderOptions {
  /**
   * Bytes of early clusters kept in memory before spilling (default 1 MiB).
   * Small on purpose: the spill file sits in the page cache anyway.
   */
  memoryLimit?: number
  /** Directory for the spill file (default the system's temporary directory). */
  tmpDir?: string
}

/** Clusters read back from the spill file at once: a slab. */
const READ_RUN = SLAB_SIZE / CLUSTER_SIZE

/**
 * expandCluster for a writer that gives the bytes back (giveBack) once they
 * are written: a cluster with holes is put together in a loan of a slab
 * (scratch) instead of a new buffer per cluster.
 */
export function expandLent (rec: ClusterRecord, deviceSize: number): Buffer {
  if (rec.mask === 0 || rec.mask === 0xffff) return expandCluster(rec, deviceSize)
  // The loan itself is returned (a view of it would not be one).
  const lent = scratch(Math.min(CLUSTER_SIZE, deviceSize - rec.cluster * CLUSTER_SIZE))
  expandCluster(rec, deviceSize, lent)
  return lent
}

export class ReorderBuffer {
  /** Cluster -> the slot that holds its bytes. */
  private readonly memory = new Map<number, Buffer>()
  /** Free slots, and how many more may be made. */
  private readonly slots: Buffer[] = []
  private slotsLeft: number
  /** Clusters in the spill file, and clusters of zeros (never written, never read: they are filled in). */
  private readonly spilled = new ClusterSet()
  private readonly zeros = new ClusterSet()
  private readonly tmpDir: string
  /** Back-to-front clusters (a reversed disk) merge as well as front-to-back ones: one write per slab's worth. */
  private readonly queue = new WriteQueue({ sync: true })
  private fd = -1
  /** Bytes written to the spill file so far (for reports). */
  spilledBytes = 0

  constructor (private readonly deviceSize: number, options: ReorderOptions = {}) {
    this.slotsLeft = Math.floor((options.memoryLimit ?? 1 << 20) / CLUSTER_SIZE)
    this.tmpDir = options.tmpDir ?? tmpdir()
  }

  has (cluster: number): boolean {
    return this.memory.has(cluster) || this.spilled.has(cluster) || this.zeros.has(cluster)
  }

  /** Keeps a copy of `rec` until take(); its data is not held after the call. Throws when the spill file cannot be written. */
  put (rec: ClusterRecord): void {
    if (rec.mask === 0) {
      this.zeros.add(rec.cluster)
      return
    }
    const slot = this.slot()
    if (slot !== undefined) {
      const bytes = expandCluster(rec, this.deviceSize, slot)
      if (bytes.buffer !== slot.buffer) bytes.copy(slot)
      this.memory.set(rec.cluster, slot)
      return
    }
    this.spilled.add(rec.cluster)
    const bytes = expandLent(rec, this.deviceSize)
    this.spilledBytes += bytes.length
    // The queue holds a loan of its own until the bytes are written; a synchronous one never asks to be waited for.
    void this.queue.write(this.spillFd(), bytes, rec.cluster * CLUSTER_SIZE, 'writing the spill file')
    giveBack(bytes)
  }

  /**
   * Removes and returns cluster `cluster` as whole bytes (clipped to the device),
   * together with the spilled clusters that follow it, up to a slab's worth.
   * Call `release` once the bytes are no longer needed: their memory is reused.
   */
  async take (cluster: number): Promise<{ bytes: Buffer, clusters: number, release: () => void }> {
    const slot = this.memory.get(cluster)
    if (slot !== undefined) {
      this.memory.delete(cluster)
      const bytes = slot.subarray(0, Math.min(CLUSTER_SIZE, this.deviceSize - cluster * CLUSTER_SIZE))
      return { bytes, clusters: 1, release: () => { this.slots.push(slot) } }
    }
    let clusters = 0
    while (clusters < READ_RUN && (this.spilled.has(cluster + clusters) || this.zeros.has(cluster + clusters))) clusters++
    // A turn of the event loop first: a stream that wrote synchronously (stdout on a file) calls back only after it,
    // and its callback is what gives the last read's slab back.
    await new Promise(resolve => setImmediate(resolve))
    const start = cluster * CLUSTER_SIZE
    const slab = takeSlab() as Buffer
    const bytes = lend(slab.subarray(0, Math.min(clusters * CLUSTER_SIZE, this.deviceSize - start)))
    giveBack(slab)
    if (this.fd >= 0) await this.queue.drain()
    // Each stretch of spilled clusters is one read; zeros are filled in (a hole read back would cost page cache).
    for (let i = 0; i < clusters;) {
      const data = this.spilled.has(cluster + i)
      const from = i
      for (; i < clusters && this.spilled.has(cluster + i) === data; i++) (data ? this.spilled : this.zeros).delete(cluster + i)
      const piece = bytes.subarray(from * CLUSTER_SIZE, i * CLUSTER_SIZE)
      piece.fill(0, data ? readUpToSync(this.fd, piece, start + from * CLUSTER_SIZE, 'the spill file') : 0)
    }
    return { bytes, clusters, release: () => { giveBack(bytes) } }
  }

  close (): void {
    if (this.fd >= 0) closeSync(this.fd)
    this.fd = -1
  }

  /** A free slot, or a new one while the memory limit allows. */
  private slot (): Buffer | undefined {
    const free = this.slots.pop()
    if (free !== undefined || this.slotsLeft === 0) return free
    this.slotsLeft--
    return Buffer.allocUnsafeSlow(CLUSTER_SIZE)
  }

  private spillFd (): number {
    if (this.fd < 0) {
      const path = join(this.tmpDir, `vmapipe-spill-${process.pid}-${randomBytes(6).toString('hex')}`)
      try {
        this.fd = openSync(path, 'wx+', 0o600)
        // Unlinked at once: a crash leaves nothing behind.
        unlinkSync(path)
      } catch (err) {
        throw ioError(err, `cannot create a spill file in ${this.tmpDir}`)
      }
    }
    return this.fd
  }
}
