/**
 * VmaWriter: a Transform from records to archive bytes. The first item in
 * must be the ArchiveInfo (its devices and configs go into the header), unless
 * the constructor was given it; then ClusterRecords, one by one or in
 * arrays, in any order, any mix of devices. Clusters are grouped into
 * extents of 58 as the reference writer does. The writer refuses records that
 * would make an archive the reference reader rejects, and at the end insists
 * that every cluster of every device came exactly once.
 *
 * Given a file to write itself (`target`), the writer pushes nothing: each
 * cluster's data goes to the file as it comes, after room for its extent's
 * header, which the format puts before the data but which names every
 * cluster in it; the header is written into that room once the extent is
 * complete. The bytes are the same, and no extent waits in memory.
 */
import { Transform, type TransformCallback } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { ArchiveInfo, ClusterRecord } from '../contracts.js'
import { BLOCK_SIZE, clusterRecord, popcount16 } from '../record.js'
import { giveBack, lend } from '../io/slabs.js'
import { type TrackedDevice, firstIncomplete, trackCluster, trackDevice } from './tracker.js'
import { EXTENT_HEADER_SIZE, WRITER_EXTENT_CLUSTERS, encodeExtentHeader, encodeHeader, parseUuid } from './format.js'

export interface WriterStats {
  extents: number
  clusters: number
  dataBlocks: number
  /** Bytes pushed out (the uncompressed archive). */
  bytes: number
}

/**
 * The size VMA records for a disk of `size` bytes: whole 512-byte sectors, as
 * the reference writer records it (the padding reads as zeros). Proxmox's
 * `vma extract` restores only whole sectors of a size that is not one.
 */
export function vmaDeviceSize (size: number): number {
  return Math.ceil(size / 512) * 512
}

/** A file written front to back (io/write-queue.ts FileAppender), which can also write bytes into room left before. */
export interface WriterTarget {
  /** Writes `bytes` after those before; the writer gives its loan (io/slabs.ts) back after the call. */
  append: (bytes: Buffer) => void
  /** Writes `bytes` at `offset` from where the first append went. */
  rewrite: (bytes: Buffer, offset: number) => void
  /** Everything appended is written. */
  flush: () => void
}

export class VmaWriter extends Transform {
  readonly stats: WriterStats = { extents: 0, clusters: 0, dataBlocks: 0, bytes: 0 }
  private uuid?: Buffer
  private readonly devices = new Map<number, TrackedDevice>()
  private pending: ClusterRecord[] = []
  /** With a target: where the current extent's header goes. */
  private extentAt = 0

  /**
   * Given `info`, the writer starts with it (on the first record, so that its
   * errors come out of the stream), and takes ClusterRecords only. `batches`:
   * they come in arrays, so that one item waiting is as much as 16 records;
   * else 4 records wait (the extent gathered holds up to 58 already).
   */
  constructor (private info?: ArchiveInfo, batches = false, private readonly target?: WriterTarget) {
    super({ writableObjectMode: true, writableHighWaterMark: batches ? 1 : 4, readableHighWaterMark: 1 << 20 })
  }

  override _transform (item: ArchiveInfo | ClusterRecord | ClusterRecord[], _enc: BufferEncoding, callback: TransformCallback): void {
    try {
      this.startGiven()
      if (Array.isArray(item)) {
        for (const rec of item) this.add(rec)
        // A batch is a slab's worth: written now, its slab is free again when the next batch is read.
        this.target?.flush()
      } else if (item.kind === 'archive') this.start(item)
      else this.add(item)
      callback()
    } catch (err) {
      callback(err as Error)
    }
  }

  override _flush (callback: TransformCallback): void {
    try {
      this.startGiven()
      if (this.uuid === undefined) throw new VmapipeError('E_RECORD', 'the record stream ended before its ArchiveInfo')
      this.flushExtent()
      const missing = firstIncomplete(this.devices.values())
      if (missing !== undefined) throw new VmapipeError('E_RECORD', `the records stopped short: ${missing.message}`, { device: missing.dev.info.name })
      this.target?.flush()
      callback()
    } catch (err) {
      callback(err as Error)
    }
  }

  private startGiven (): void {
    if (this.info === undefined) return
    const info = this.info
    this.info = undefined
    this.start(info)
  }

  private start (info: ArchiveInfo): void {
    if (this.uuid !== undefined) throw new VmapipeError('E_RECORD', 'a second ArchiveInfo in one record stream')
    this.uuid = parseUuid(info.uuid)
    const devices = info.devices.map(d => ({ ...d, size: vmaDeviceSize(d.size) }))
    this.out(encodeHeader({ uuid: this.uuid, ctime: info.ctime, configs: info.configs, devices }))
    for (const d of devices) this.devices.set(d.id, trackDevice(d))
  }

  private add (rec: ClusterRecord): void {
    const d = this.devices.get(rec.device)
    if (d === undefined) {
      throw new VmapipeError('E_RECORD',
        this.uuid === undefined ? 'a record came before the ArchiveInfo' : `a record for device id ${rec.device}, which the archive does not declare`)
    }
    const place = { device: d.info.name, cluster: rec.cluster }
    if (rec.data.length !== popcount16(rec.mask) * BLOCK_SIZE) {
      throw new VmapipeError('E_RECORD', `data is ${rec.data.length} bytes, the mask needs ${popcount16(rec.mask) * BLOCK_SIZE}`, place)
    }
    const broken = trackCluster(d, rec.cluster, rec.mask)
    if (broken !== undefined) throw new VmapipeError('E_RECORD', broken.message, place)
    if (this.target !== undefined) {
      if (this.pending.length === 0) {
        this.extentAt = this.stats.bytes
        this.out(HEADER_ROOM)
      }
      this.out(rec.data)
      giveBack(rec.data)
      this.stats.dataBlocks += rec.data.length / BLOCK_SIZE
      rec = clusterRecord(rec.device, rec.cluster, rec.mask, EMPTY)
    }
    this.pending.push(rec)
    if (this.pending.length === WRITER_EXTENT_CLUSTERS) this.flushExtent()
  }

  private flushExtent (): void {
    if (this.pending.length === 0) return
    const records = this.pending
    this.pending = []
    const header = encodeExtentHeader(this.uuid as Buffer, records.map(r => ({ mask: r.mask, devId: r.device, cluster: r.cluster })))
    if (this.target !== undefined) {
      this.target.rewrite(header, this.extentAt)
      this.stats.clusters += records.length
      this.stats.extents++
      return
    }
    this.out(header)
    // Data that lies end to end in memory (whole clusters read into one buffer) goes out as one chunk: fewer chunks, fewer writes.
    let run: Buffer[] = []
    for (const r of records) {
      if (r.data.length === 0) continue
      const last = run[run.length - 1]
      if (last !== undefined && (last.buffer !== r.data.buffer || last.byteOffset + last.length !== r.data.byteOffset)) {
        this.out(joined(run))
        run = []
      }
      run.push(r.data)
      this.stats.dataBlocks += r.data.length / BLOCK_SIZE
    }
    if (run.length > 0) this.out(joined(run))
    this.stats.clusters += records.length
    this.stats.extents++
  }

  /** Bytes after those before: pushed, or written to the target. */
  private out (bytes: Buffer): void {
    this.stats.bytes += bytes.length
    if (this.target === undefined) this.push(bytes)
    else this.target.append(bytes)
  }
}

const EMPTY: Buffer = Buffer.alloc(0)
/** Room for an extent header, written before the header is known. */
const HEADER_ROOM: Buffer = Buffer.alloc(EXTENT_HEADER_SIZE)

/**
 * One view of buffers that lie end to end in one ArrayBuffer. A view of a
 * slab is lent (io/slabs.ts) before the pieces' loans are given back, so the
 * slab stays held until whoever writes the view gives it back.
 */
function joined (pieces: Buffer[]): Buffer {
  if (pieces.length === 1) return pieces[0]
  const first = pieces[0]
  const last = pieces[pieces.length - 1]
  const view = lend(Buffer.from(first.buffer, first.byteOffset, last.byteOffset + last.length - first.byteOffset))
  for (const p of pieces) giveBack(p)
  return view
}
