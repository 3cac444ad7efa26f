/**
 * Holds clusters that arrive before their turn, for a writer that must emit a
 * device front to back (a pipe). A bounded amount stays in memory; the rest
 * goes to an unlinked temporary file at the cluster's own offset, so the file
 * is a sparse image of what is waiting and the index is one bit per cluster.
 */
import { closeSync, openSync, read, unlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { ioError } from '../errors.js'
import type { ClusterRecord } from '../contracts.js'
import { CLUSTER_SIZE, expandCluster } from '../record.js'
import { ClusterSet } from '../util/cluster-set.js'
import { WriteQueue } from './write-queue.js'

export interface ReorderOptions {
  /**
   * Bytes of early clusters kept in memory before spilling (default 1 MiB).
   * Small on purpose: the spill file sits in the page cache anyway.
   */
  memoryLimit?: number
  /** Directory for the spill file (default the system's temporary directory). */
  tmpDir?: string
}

/** Clusters read back from the spill file at once. */
const READ_RUN = 16
/** Read buffers kept for reuse. */
const POOL = 4

export class ReorderBuffer {
  private readonly memory = new Map<number, ClusterRecord>()
  private memoryBytes = 0
  private readonly spilled = new ClusterSet()
  private readonly memoryLimit: number
  private readonly tmpDir: string
  private readonly queue = new WriteQueue({ maxInFlight: 4 })
  private fd = -1
  private readonly free: Buffer[] = []
  /** Bytes written to the spill file so far (for reports). */
  spilledBytes = 0

  constructor (private readonly deviceSize: number, options: ReorderOptions = {}) {
    this.memoryLimit = options.memoryLimit ?? 1 << 20
    this.tmpDir = options.tmpDir ?? tmpdir()
  }

  has (cluster: number): boolean {
    return this.memory.has(cluster) || this.spilled.has(cluster)
  }

  /** Keeps a copy of `rec` until take(); its data is not held after the call. May return a promise to wait on. */
  put (rec: ClusterRecord): Promise<void> | undefined {
    if (rec.mask === 0) {
      // Nothing to store: an absent range of the sparse spill file reads as zeros.
      this.spilled.add(rec.cluster)
      return undefined
    }
    if (this.memoryBytes + rec.data.length <= this.memoryLimit) {
      this.memory.set(rec.cluster, { ...rec, data: Buffer.from(rec.data) })
      this.memoryBytes += rec.data.length
      return undefined
    }
    this.spilled.add(rec.cluster)
    const bytes = expandCluster(rec, this.deviceSize)
    this.spilledBytes += bytes.length
    return this.queue.write(this.spillFd(), bytes, rec.cluster * CLUSTER_SIZE, 'writing the spill file')
  }

  /**
   * Removes and returns cluster `cluster` as whole bytes (clipped to the device),
   * together with the spilled clusters that follow it, up to READ_RUN. Call
   * `release` once the bytes are no longer needed: read buffers are reused, as
   * a reversed disk would otherwise make gigabytes of garbage.
   */
  async take (cluster: number): Promise<{ bytes: Buffer, clusters: number, release: () => void }> {
    const rec = this.memory.get(cluster)
    if (rec !== undefined) {
      this.memory.delete(cluster)
      this.memoryBytes -= rec.data.length
      return { bytes: expandCluster(rec, this.deviceSize), clusters: 1, release: () => {} }
    }
    let clusters = 0
    while (clusters < READ_RUN && this.spilled.has(cluster + clusters)) this.spilled.delete(cluster + clusters++)
    const start = cluster * CLUSTER_SIZE
    const buffer = this.free.pop() ?? Buffer.allocUnsafe(READ_RUN * CLUSTER_SIZE)
    const bytes = buffer.subarray(0, Math.min(clusters * CLUSTER_SIZE, this.deviceSize - start))
    let got = 0
    if (this.fd >= 0) {
      await this.queue.drain()
      got = await readAll(this.fd, bytes, start)
    }
    bytes.fill(0, got)
    return { bytes, clusters, release: () => { if (this.free.length < POOL) this.free.push(buffer) } }
  }

  close (): void {
    if (this.fd >= 0) closeSync(this.fd)
    this.fd = -1
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

/** Reads until `bytes` is full or the file ends; returns the bytes read. */
async function readAll (fd: number, bytes: Buffer, position: number): Promise<number> {
  let done = 0
  while (done < bytes.length) {
    const n = await new Promise<number>((resolve, reject) => {
      read(fd, bytes, done, bytes.length - done, position + done, (err, got) => { if (err) reject(ioError(err, 'reading the spill file')); else resolve(got) })
    })
    if (n === 0) break
    done += n
  }
  return done
}
