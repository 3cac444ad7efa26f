/**
 * VmaReader: a Transform from archive bytes to records. The first item out is
 * the ArchiveInfo, then one ClusterRecord per cluster, in archive order. Every
 * check of the reference reader is made as the bytes pass (VMA-NOTES.md), and
 * at the end every cluster of every selected device must have arrived once.
 */
import { Transform, type TransformCallback } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { ArchiveInfo, DeviceInfo } from '../contracts.js'
import { BLOCK_SIZE, clusterRecord, popcount16 } from '../record.js'
import { type TrackedDevice, firstIncomplete, trackDevice, trackExtent } from './tracker.js'
import { ByteQueue } from '../util/byte-queue.js'
import { giveBack, lend, scratch } from '../io/slabs.js'
import {
  type ExtentHeader, EXTENT_HEADER_SIZE, HEADER_PREFIX_SIZE, VMA_MAGIC,
  archiveInfo, checkMagic, parseExtentHeader, parseHeader, readHeaderSize,
} from './format.js'

export interface VmaReaderOptions {
  /**
   * Chooses, once the header is read, the devices whose records are passed on
   * (default: all). The others are still read and checked, but not emitted.
   * It may throw, e.g. when a device asked for does not exist.
   */
  select?: (devices: DeviceInfo[]) => DeviceInfo[]
  /** Fail at the end when a selected device misses clusters (default true). */
  requireComplete?: boolean
}

export interface DeviceStats {
  device: DeviceInfo
  /** Clusters present in the archive. */
  clusters: number
  /** Of those, clusters stored with mask 0. */
  zeroClusters: number
  /** 4 KiB blocks stored with data. */
  dataBlocks: number
  /** Clusters the device should have. */
  expected: number
  /** First cluster that never arrived, or -1. */
  firstMissing: number
}

/** The counts of devices tracked by dev_id (the streaming reader's, or walkArchive's). */
export function deviceStats (devices: ReadonlyArray<TrackedDevice | undefined>): DeviceStats[] {
  const out: DeviceStats[] = []
  for (const d of devices) {
    if (d === undefined) continue
    out.push({
      device: d.info,
      clusters: d.seen.size,
      zeroClusters: d.zeroClusters,
      dataBlocks: d.dataBlocks,
      expected: d.clusters,
      firstMissing: d.seen.firstMissing(d.clusters),
    })
  }
  return out
}

const EMPTY: Buffer = Buffer.alloc(0)
/**
 * Records waiting to be taken, and archive bytes waiting to be parsed. Small:
 * parsing is quick and done in this thread, so more waiting would not make
 * the writer busier, only hold more slabs (io/slabs.ts).
 */
const RECORDS_OUT = 4
const BYTES_IN = 1 << 16

interface DeviceState extends TrackedDevice {
  selected: boolean
}

type Phase = 'prefix' | 'header' | 'extent' | 'data'

export class VmaReader extends Transform {
  /** Set once the header has been read. */
  info?: ArchiveInfo
  /** Extents read so far. */
  extents = 0

  /** Chunks lent from slabs (a pipe's, io/slabs.ts) are given back once parsed; a record's data is a loan of its own. */
  private readonly queue = new ByteQueue({ done: giveBack })
  private readonly select?: (devices: DeviceInfo[]) => DeviceInfo[]
  /** The devices whose records are emitted, once the header is read. */
  selected: DeviceInfo[] = []
  private readonly requireComplete: boolean
  private phase: Phase = 'prefix'
  private headerSize = 0
  private prefix = EMPTY
  private uuid = EMPTY
  private readonly devices: Array<DeviceState | undefined> = []
  private extent?: ExtentHeader
  private extentOffset = 0
  private entry = 0

  /** The callback of the chunk being parsed, while parsing waits for the records to be taken (_read). */
  private waiting?: TransformCallback

  constructor (options: VmaReaderOptions = {}) {
    super({ readableObjectMode: true, readableHighWaterMark: RECORDS_OUT, writableHighWaterMark: BYTES_IN })
    this.select = options.select
    this.requireComplete = options.requireComplete ?? true
  }

  /** Bytes of the (decompressed) archive consumed so far. */
  get offset (): number { return this.queue.consumed }

  /** Per-device counts, available once the header is read. */
  deviceStats (): DeviceStats[] {
    return deviceStats(this.devices)
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.queue.push(chunk)
    this.waiting = callback
    this.parseOn()
  }

  override _read (size: number): void {
    if (this.waiting !== undefined) this.parseOn()
    // Done with the chunk: Transform's own _read lets the next one in, whose callback it may just have put aside (the
    // reading side was full). Now, not at a later _read: a _read that pushed nothing leaves Readable asking for no other.
    if (this.waiting === undefined) super._read(size)
  }

  /** Parses on; the chunk is done with once all of it is parsed, not while the records wait to be taken. */
  private parseOn (): void {
    const callback = this.waiting as TransformCallback
    try {
      if (!this.parse()) return
    } catch (err) {
      this.waiting = undefined
      callback(err as Error)
      return
    }
    this.waiting = undefined
    callback()
  }

  override _flush (callback: TransformCallback): void {
    try {
      this.finish()
      callback()
    } catch (err) {
      callback(err as Error)
    }
  }

  /**
   * Parses what is queued: true once it needs more bytes, false when a record was pushed that the reading side has no
   * room for (then _read resumes it). Each record is a loan of a slab: records pushed regardless of room kept a whole
   * chunk's worth (up to a slab's, 16 records) waiting beyond the high-water mark, their slabs with them.
   */
  private parse (): boolean {
    for (;;) {
      switch (this.phase) {
        case 'prefix': {
          // Say "not a VMA" as soon as 4 bytes are in, even if the input is short.
          const magic = this.queue.peek(VMA_MAGIC.length)
          if (magic !== null) checkMagic(magic)
          const prefix = this.queue.take(HEADER_PREFIX_SIZE)
          if (prefix === null) return true
          this.headerSize = readHeaderSize(prefix)
          this.prefix = Buffer.from(prefix)
          this.phase = 'header'
          break
        }
        case 'header': {
          const rest = this.queue.take(this.headerSize - HEADER_PREFIX_SIZE)
          if (rest === null) return true
          this.startArchive(Buffer.concat([this.prefix, rest]))
          this.phase = 'extent'
          break
        }
        case 'extent': {
          this.extentOffset = this.queue.consumed
          const head = this.queue.take(EXTENT_HEADER_SIZE)
          if (head === null) return true
          this.extent = parseExtentHeader(head, this.uuid, this.extentOffset)
          trackExtent(this.devices, this.extent, this.extentOffset)
          this.extents++
          this.entry = 0
          this.phase = 'data'
          break
        }
        case 'data': {
          const entries = (this.extent as ExtentHeader).entries
          while (this.entry < entries.length) {
            const e = entries[this.entry]
            const bytes = popcount16(e.mask) * BLOCK_SIZE
            // Data that straddles two chunks (once per slab) is put together in shared scratch slabs, not a buffer of its own per record.
            const data = bytes === 0 ? EMPTY : this.queue.peek(bytes, scratch)
            if (data === null) return true
            // Lent before the queue moves on, which may give the last loan of its slab back; then the scratch loan, if any, ends.
            const room = !(this.devices[e.devId] as DeviceState).selected || this.push(clusterRecord(e.devId, e.cluster, e.mask, lend(data)))
            giveBack(data)
            this.queue.skip(bytes)
            this.entry++
            if (!room) return false
          }
          this.phase = 'extent'
          break
        }
      }
    }
  }

  private startArchive (head: Buffer): void {
    const header = parseHeader(head)
    this.selected = this.select?.(header.devices) ?? header.devices
    const selected = new Set(this.selected)
    for (const info of header.devices) this.devices[info.id] = { ...trackDevice(info), selected: selected.has(info) }
    this.uuid = header.uuidBytes
    this.info = archiveInfo(header)
    this.push(this.info)
  }

  private finish (): void {
    const end = this.queue.consumed + this.queue.length
    if (this.phase === 'prefix' || this.phase === 'header') {
      throw new VmapipeError('E_VMA_TRUNCATED',
        this.queue.length === 0 && end === 0 ? 'the input is empty' : `the archive ends inside its header (header_size ${this.headerSize || 'unknown'})`,
        { offset: end })
    }
    if (this.phase === 'data' || this.queue.length > 0) {
      throw new VmapipeError('E_VMA_TRUNCATED', `the archive ends inside the extent that starts at byte ${this.extentOffset}`, { offset: end })
    }
    if (!this.requireComplete) return
    const missing = firstIncomplete(this.devices.filter((d): d is DeviceState => d?.selected === true))
    if (missing !== undefined) throw new VmapipeError('E_VMA_MISSING', missing.message, { offset: end, device: missing.dev.info.name })
  }
}
