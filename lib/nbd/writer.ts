/**
 * NbdDiskWriter: a DiskWriter that restores one device into a writable NBD
 * export. Data goes out as WRITE requests, adjacent blocks merged up to
 * 1 MiB, several in flight. Zeros: when the export can zero quickly
 * (NBD_CMD_FLAG_FAST_ZERO) all of the device's range is zeroed first and zero
 * blocks then cost nothing; otherwise they are WRITE_ZEROES without NO_HOLE
 * (the server may leave holes, as sparse files have), or written as zero
 * bytes when the export has no WRITE_ZEROES. TRIM is not used for zeros:
 * the spec leaves what a trimmed range reads as undefined.
 */
import { VmapipeError } from '../errors.js'
import type { ClusterRecord, DeviceInfo, DiskWriter, ProgressSink } from '../contracts.js'
import { type CopySource, mapWindows } from '../io/data-runs.js'
import { giveBack, lend } from '../io/slabs.js'
import { CLUSTER_SIZE, ZERO_CLUSTER, forEachRun } from '../record.js'
import { type NbdAddress, type NbdClientOptions, NbdClient, NbdReplyError } from './client.js'
import { COMMAND_FLAG, ERRNO, TRANSMISSION_FLAG } from './protocol.js'

/** Largest merged WRITE. */
const MAX_WRITE = 1024 * 1024
/** Largest WRITE_ZEROES: aligned, and well inside its 32-bit length. */
const MAX_ZEROES = 1024 * 1024 * 1024
/**
 * WRITE payload sent and not yet answered, at most (one more request may
 * start below it). Each byte holds its slab until the answer, and the input
 * reads into fresh buffers once its slabs are all out: 16 requests of 1 MiB
 * made a restore peak at 95-117 MiB, 2 MiB at 67-70 as fast (1 MiB saved no more).
 */
const MAX_BYTES_IN_FLIGHT = 2 * 1024 * 1024
/** Buffers a copy by position reads into: those whose WRITEs are in flight and one being read. */
const COPY_BUFFERS = MAX_BYTES_IN_FLIGHT / MAX_WRITE + 1

export interface NbdWriteStats {
  /** Bytes of data written. */
  dataBytes: number
  /** Whether the export was zeroed up front (fast zero). */
  prezeroed: boolean
}

/** A request being put together; `release` is called once it is answered (a copy's buffer is then free). */
interface Run { zero: boolean, offset: number, length: number, buffers: Buffer[], release?: () => void }

export class NbdDiskWriter implements DiskWriter {
  readonly stats: NbdWriteStats = { dataBytes: 0, prezeroed: false }
  private run?: Run
  /** Requests sent and not yet answered, and the data bytes among them (zeros written as bytes hold no slab). */
  private requests = 0
  private bytes = 0
  /** Woken at each answer: whoever waits for room (write()'s promises) or for the end (finish()). */
  private waiters: Array<() => void> = []
  private failure?: Error

  private constructor (readonly client: NbdClient, private readonly device: DeviceInfo) {}

  /** Connects to `target` and checks that it can take `device`. */
  static async open (target: NbdAddress | string, device: DeviceInfo, options: NbdClientOptions = {}): Promise<NbdDiskWriter> {
    const client = await NbdClient.connect(target, options)
    try {
      if ((client.flags & TRANSMISSION_FLAG.READ_ONLY) !== 0) throw new VmapipeError('E_OPTION', `${client.where} is read-only`)
      if (client.size < device.size) {
        throw new VmapipeError('E_LIMIT', `${client.where} is ${client.size} bytes; ${device.name} needs ${device.size}`, { device: device.name })
      }
      const writer = new NbdDiskWriter(client, device)
      await writer.zeroAll()
      return writer
    } catch (err) {
      await client.close().catch(() => {})
      throw err
    }
  }

  private can (flag: number): boolean {
    return (this.client.flags & flag) !== 0
  }

  /** Zeroes the device's range with fast zero requests, if the export offers them and they succeed. */
  private async zeroAll (): Promise<void> {
    if (!this.can(TRANSMISSION_FLAG.SEND_WRITE_ZEROES) || !this.can(TRANSMISSION_FLAG.SEND_FAST_ZERO)) return
    try {
      for (let at = 0; at < this.device.size; at += MAX_ZEROES) {
        await this.client.writeZeroes(at, Math.min(MAX_ZEROES, this.device.size - at), COMMAND_FLAG.FAST_ZERO)
      }
      this.stats.prezeroed = true
    } catch (err) {
      // ENOTSUP is the export saying "not quickly": zeros are then written where they are.
      if (!(err instanceof NbdReplyError && err.errno === ERRNO.ENOTSUP)) throw err
    }
  }

  write (rec: ClusterRecord): Promise<void> | undefined {
    if (this.failure !== undefined) throw this.failure
    const end = Math.min((rec.cluster + 1) * CLUSTER_SIZE, this.device.size)
    let cursor = rec.cluster * CLUSTER_SIZE
    let wait: Promise<void> | undefined
    forEachRun(rec, this.device.size, (position, bytes) => {
      if (position > cursor) wait = this.zero(cursor, position - cursor) ?? wait
      // Each piece a loan of its own, given back once its WRITE is answered: a record can end up in two requests.
      wait = this.add(false, position, bytes.length, lend(bytes)) ?? wait
      cursor = position + bytes.length
    })
    giveBack(rec.data)
    if (end > cursor) wait = this.zero(cursor, end - cursor) ?? wait
    return wait
  }

  /**
   * Writes `disk` (a device of an indexed archive file) by position instead of
   * records: its stored runs read synchronously into a few reused buffers of
   * up to MAX_WRITE, a WRITE each, its holes zeroed as write() zeroes them. No
   * slab, no record, no archive stream: a restore of 1 GiB into qemu-nbd
   * peaked at 62 MiB RSS, 70 from the records (the input's slabs, and the
   * records' objects promoted into the old generation).
   */
  async copyFrom (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    const piece = Math.min(MAX_WRITE, this.client.maxPayload)
    const free: Buffer[] = Array.from({ length: COPY_BUFFERS }, () => Buffer.allocUnsafeSlow(piece))
    for await (const extents of mapWindows(disk)) {
      for (const e of extents) {
        const end = e.offset + e.length
        // Holes in pieces too: where the export has no WRITE_ZEROES they go out as WRITEs of zeros, at most `piece` long.
        for (let from = e.offset; !e.data && from < end; from += piece) await this.zero(from, Math.min(piece, end - from))
        for (let from = e.offset; e.data && from < end; from += piece) {
          while (free.length === 0 && this.failure === undefined) await this.answer()
          if (this.failure !== undefined) throw this.failure
          if (signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
          const buf = free.pop() as Buffer
          const bytes = buf.subarray(0, Math.min(piece, end - from))
          disk.readSync(bytes, from)
          await this.submit()
          this.run = { zero: false, offset: from, length: bytes.length, buffers: [bytes], release: () => free.push(buf) }
          await this.submit()
          progress?.add(bytes.length)
        }
      }
    }
  }

  async finish (): Promise<void> {
    void this.submit()
    while (this.requests > 0) await this.answer()
    if (this.failure !== undefined) throw this.failure
    if (this.can(TRANSMISSION_FLAG.SEND_FLUSH)) await this.client.flush()
    await this.client.close()
  }

  async abort (): Promise<void> {
    this.run = undefined
    // Not given back: a request still in flight may hold them, and the garbage collector takes them as it would any buffer.
    this.client.destroy()
  }

  private zero (offset: number, length: number): Promise<void> | undefined {
    return this.stats.prezeroed ? undefined : this.add(true, offset, length)
  }

  /** Extends the pending run when `offset` continues it, else sends that run and starts another. */
  private add (zero: boolean, offset: number, length: number, bytes?: Buffer): Promise<void> | undefined {
    const run = this.run
    const limit = zero && this.can(TRANSMISSION_FLAG.SEND_WRITE_ZEROES) ? MAX_ZEROES : Math.min(MAX_WRITE, this.client.maxPayload)
    if (run !== undefined && run.zero === zero && run.offset + run.length === offset && run.length + length <= limit) {
      run.length += length
      if (bytes !== undefined) run.buffers.push(bytes)
      return undefined
    }
    const wait = this.submit()
    this.run = { zero, offset, length, buffers: bytes !== undefined ? [bytes] : [] }
    return wait
  }

  /**
   * Sends the pending run; returns a promise when the client has as many
   * requests in flight as it takes, or MAX_BYTES_IN_FLIGHT of data is.
   */
  private submit (): Promise<void> | undefined {
    const run = this.run
    if (run === undefined) return undefined
    this.run = undefined
    let request: Promise<void>
    let bytes = 0
    if (!run.zero) {
      this.stats.dataBytes += run.length
      bytes = run.length
      request = this.client.write(run.offset, run.buffers)
    } else if (this.can(TRANSMISSION_FLAG.SEND_WRITE_ZEROES)) {
      request = this.client.writeZeroes(run.offset, run.length)
    } else {
      const zeros: Buffer[] = []
      for (let at = 0; at < run.length; at += CLUSTER_SIZE) zeros.push(ZERO_CLUSTER.subarray(0, Math.min(CLUSTER_SIZE, run.length - at)))
      request = this.client.write(run.offset, zeros)
    }
    this.requests++
    this.bytes += bytes
    const answered = (): void => {
      // Given back when answered, not before: the slab must not be refilled while the socket may still send from it.
      if (bytes > 0) for (const b of run.buffers) giveBack(b)
      run.release?.()
      this.requests--
      this.bytes -= bytes
      const waiters = this.waiters
      this.waiters = []
      for (const w of waiters) w()
    }
    request.then(answered, (err: Error) => { this.failure ??= err; answered() })
    if (this.bytes < MAX_BYTES_IN_FLIGHT) return this.client.ready()
    return this.whenRoom()
  }

  /** Resolves once the payload in flight is below MAX_BYTES_IN_FLIGHT. */
  private async whenRoom (): Promise<void> {
    while (this.bytes >= MAX_BYTES_IN_FLIGHT) await this.answer()
  }

  /** Resolves at the next answer. */
  private async answer (): Promise<void> {
    await new Promise<void>(resolve => this.waiters.push(resolve))
  }
}
