/**
 * Raw writers. RawFileWriter: a sparse file written by position, holes where
 * the records say zero, exact size. RawStreamWriter: the device front to back
 * on a stream (stdout), zeros included, early clusters parked in a
 * ReorderBuffer so memory stays flat whatever the order.
 */
import { WriteStream } from 'node:fs'
import { Socket } from 'node:net'
import { open, type FileHandle } from 'node:fs/promises'
import type { Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, DeviceInfo, DiskWriter, FileWrites, ProgressSink } from '../contracts.js'
import { clusterCount, forEachRun } from '../record.js'
import { ReorderBuffer, type ReorderOptions, expandLent } from '../io/reorder.js'
import { drained } from '../io/drained.js'
import { WriteQueue, abandonFile, completeFile, writeAllSync } from '../io/write-queue.js'
import { giveBack } from '../io/slabs.js'
import { type CopySource, mapWindows } from '../io/data-runs.js'

export class RawFileWriter implements DiskWriter {
  private constructor (
    private readonly file: FileHandle,
    private readonly path: string,
    private readonly size: number,
    private readonly queue: FileWrites
  ) {}

  /** Creates `path` (which must not exist) for a device of `size` bytes. */
  static async create (path: string, size: number, queue: FileWrites = new WriteQueue()): Promise<RawFileWriter> {
    try {
      return new RawFileWriter(await open(path, 'wx', 0o644), path, size, queue)
    } catch (err) {
      throw ioError(err, `cannot create ${path}`)
    }
  }

  write (rec: ClusterRecord): Promise<void> | undefined {
    let wait: Promise<void> | undefined
    forEachRun(rec, this.size, (position, bytes) => {
      wait = this.queue.write(this.file.fd, bytes, position, `writing ${this.path}`) ?? wait
    })
    // A WriteQueue holds what it still has to write as loans of its own (io/slabs.ts); any other keeps the record's.
    if (this.queue instanceof WriteQueue) giveBack(rec.data)
    return wait
  }

  /**
   * Writes the data of `disk` (of this writer's size) instead of records:
   * its stored extents in pieces of up to COPY_CHUNK through one reused
   * buffer, each piece one positional write, holes left as holes. Reads and
   * writes are synchronous (a disk whose readSync is cheap, from the page
   * cache): a thread-pool round trip per run of stored blocks costs more than
   * the copy of a short run. The event loop gets a turn after every piece.
   * Reports the bytes read to `progress`. Call finish() after.
   */
  async copyFrom (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    const buf = Buffer.allocUnsafeSlow(COPY_CHUNK)
    let sinceTurn = 0
    for await (const extents of mapWindows(disk)) {
      for (const e of extents) {
        if (!e.data) continue
        for (let done = 0; done < e.length;) {
          const n = Math.min(COPY_CHUNK, e.length - done)
          const piece = buf.subarray(0, n)
          const position = e.offset + done
          disk.readSync(piece, position)
          try {
            writeAllSync(this.file.fd, [piece], position)
          } catch (err) {
            throw ioError(err, `writing ${this.path}`)
          }
          progress?.add(n)
          done += n
          sinceTurn += n
          if (sinceTurn >= COPY_CHUNK) {
            sinceTurn = 0
            await new Promise(resolve => setImmediate(resolve))
            if (signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
          }
        }
      }
    }
  }

  async finish (): Promise<void> {
    await completeFile(this.queue, this.file, this.size, this.path)
  }

  async abort (): Promise<void> {
    await abandonFile(this.queue, this.file)
  }
}

/** copyFrom's pieces: large, so that each costs one read and one write. */
const COPY_CHUNK = 1 << 20

export class RawStreamWriter implements DiskWriter {
  private next = 0
  private readonly clusters: number
  private readonly reorder: ReorderBuffer
  private failure?: Error
  private readonly onError = (err: Error): void => { this.failure ??= ioError(err, 'writing the output stream') }

  /** The output is done with a chunk when it calls back (it wrote it, not passed it on): records may be given back then. */
  private readonly writesOut: boolean

  constructor (private readonly out: Writable, private readonly device: DeviceInfo, options: ReorderOptions = {}) {
    this.writesOut = out instanceof Socket || out instanceof WriteStream || out === process.stdout
    this.clusters = clusterCount(device.size)
    this.reorder = new ReorderBuffer(device.size, options)
    out.on('error', this.onError)
  }

  /** Bytes that had to wait in the spill file (for reports). */
  get spilledBytes (): number { return this.reorder.spilledBytes }

  write (rec: ClusterRecord): Promise<void> | undefined {
    if (this.failure !== undefined) throw this.failure
    if (rec.cluster < this.next || this.reorder.has(rec.cluster)) {
      throw new VmapipeError('E_RECORD', 'cluster given twice', { device: this.device.name, cluster: rec.cluster })
    }
    if (rec.cluster >= this.clusters) {
      throw new VmapipeError('E_RECORD', 'cluster past the device end', { device: this.device.name, cluster: rec.cluster })
    }
    if (rec.cluster !== this.next) {
      this.reorder.put(rec)
      giveBack(rec.data)
      return undefined
    }
    const data = rec.data
    const bytes = expandLent(rec, this.device.size)
    const flowing = this.writesOut ? this.send(bytes, () => { giveBack(data); giveBack(bytes) }) : this.out.write(bytes)
    this.next++
    if (this.reorder.has(this.next)) return this.catchUp()
    return flowing ? undefined : this.drained()
  }

  async finish (): Promise<void> {
    this.reorder.close()
    if (this.failure !== undefined) throw this.failure
    if (this.next < this.clusters) {
      throw new VmapipeError('E_RECORD', `the records stopped before the device was complete (${this.clusters - this.next} clusters never came)`,
        { device: this.device.name, cluster: this.next })
    }
    await this.drained()
    this.out.off('error', this.onError)
  }

  async abort (): Promise<void> {
    this.reorder.close()
    this.out.off('error', this.onError)
  }

  /** Emits the parked clusters that are now due. */
  private async catchUp (): Promise<void> {
    while (this.reorder.has(this.next)) {
      const { bytes, clusters, release } = await this.reorder.take(this.next)
      this.next += clusters
      if (!(this.writesOut ? this.send(bytes, release) : this.out.write(bytes, release))) await this.drained()
      if (this.failure !== undefined) throw this.failure
    }
  }

  /**
   * Writes `bytes` to an output that is done with a chunk when it calls back, and calls `done` once, when it is: at once
   * where the stream wrote them at once (stdout on a file, a pipe with room), whose callback would come only on the next
   * tick, after the rest of the records that arrive in the same turn, every one of them holding its slab till then.
   */
  private send (bytes: Buffer, done: () => void): boolean {
    let pending = true
    const once = (): void => {
      if (pending) done()
      pending = false
    }
    const flowing = this.out.write(bytes, once)
    if (this.out.writableLength === 0) once()
    return flowing
  }

  private async drained (): Promise<void> {
    await drained(this.out)
    if (this.failure !== undefined) throw this.failure
  }
}
