/**
 * Random access to a disk image of any format, and the walk that turns one
 * into records. Image readers (qcow2, Parallels, NBD, VMA archives) implement
 * RandomAccessDisk; diskRecords() reads only what the map says holds data.
 */
import { Readable } from 'node:stream'
import { VmapipeError } from './errors.js'
import type { ProgressSink } from './io/progress.js'
import { type ClusterRecord, CLUSTER_SIZE, clusterCount, clusterFromBytes, clusterRecord } from './record.js'

/** A range of the guest disk, and whether anything is stored there. */
export interface Extent {
  offset: number
  length: number
  /** false: nothing stored, reads as zeros (a hole, a zero cluster). */
  data: boolean
}

/** Which layer of a backing chain holds a range: 0 nothing, 1 the top image, 2 its backing file, ... */
export interface DepthExtent {
  offset: number
  length: number
  depth: number
}

/** A named dirty bitmap of a disk (Parallels, qcow2 persistent bitmaps, an NBD export's qemu:dirty-bitmap). */
export interface DirtyBitmap {
  name: string
  /** Extents covering [offset, offset + length), in order; data === true means dirty. */
  dirty: (offset: number, length: number) => Promise<Extent[]>
}

export interface RandomAccessDisk {
  /** Guest size in bytes. */
  readonly size: number
  /** Extents covering [offset, offset + length), in order, adjacent ones of a kind merged or not. */
  map: (offset: number, length: number) => Promise<Extent[]>
  /** Fills `buf` with the guest bytes at `offset` (zeros where nothing is stored). */
  read: (buf: Buffer, offset: number) => Promise<void>
  close: () => Promise<void>
  /**
   * For images with backing layers: which layer holds each part of
   * [offset, offset + length), in order. Without it a disk is one layer:
   * depth 1 where map says data, 0 elsewhere.
   */
  depth?: (offset: number, length: number) => Promise<DepthExtent[]>
  /** The disk's dirty bitmaps, for images that track changes. */
  bitmaps?: () => DirtyBitmap[]
}

export interface DiskRecordsOptions {
  /** The ranges worth reading (default: the disk's map); a cluster touching none is not read. */
  extents?: (offset: number, length: number) => Promise<Extent[]>
  /**
   * Give clusters that are not read no record at all, instead of a mask-0
   * one: the records of an overlay, where such clusters are left to the layer below.
   */
  skipUnread?: boolean
  /** Batches read at once (default 1); a disk across a network wants several. */
  readAhead?: number
  /** Receives the count of guest bytes passed, read or not. */
  progress?: ProgressSink
}

/** Guest bytes looked at per step. */
const BATCH = 16 * CLUSTER_SIZE
const EMPTY: Buffer = Buffer.alloc(0)

/**
 * The disk as ClusterRecords for device id `device`, front to back. Clusters
 * the map calls empty become mask-0 records without a read; runs of the rest
 * are read (in batches of 1 MiB, `readAhead` batches at a time) and their
 * zero blocks detected.
 */
export function diskRecords (disk: RandomAccessDisk, device: number, options: DiskRecordsOptions = {}): Readable {
  const clusters = clusterCount(disk.size)
  const extents = options.extents ?? (async (offset: number, length: number) => await disk.map(offset, length))
  const readAhead = Math.max(1, options.readAhead ?? 1)
  const batches: Array<Promise<ClusterRecord[]>> = []
  let next = 0
  let waiting = false
  const pump = (stream: Readable): void => {
    if (waiting || stream.destroyed) return
    while (batches.length < readAhead && next < clusters) {
      const first = next
      const offset = first * CLUSTER_SIZE
      const length = Math.min(BATCH, disk.size - offset)
      next += Math.ceil(length / CLUSTER_SIZE)
      const batch = recordsAt(disk, extents, device, first, offset, length, options.skipUnread === true)
      batch.then(() => options.progress?.add(length), () => {})
      batches.push(batch)
    }
    const head = batches[0]
    if (head === undefined) {
      stream.push(null)
      return
    }
    waiting = true
    head.then(records => {
      if (stream.destroyed) return
      batches.shift()
      waiting = false
      let more = true
      for (const r of records) more = stream.push(r)
      // An empty batch pushes nothing, so nothing would ask for the next one.
      if (more || records.length === 0) pump(stream)
    }, (err: Error) => stream.destroy(err))
  }
  return new Readable({
    objectMode: true,
    highWaterMark: 16,
    read () { pump(this) },
    destroy (err, callback) {
      disk.close().then(() => callback(err), () => callback(err))
    },
  })
}

/**
 * The clusters that dirty bitmap `name` of `disk` marks, as records for
 * device id `device`: each such cluster whole, as it reads now (mask 0 when it
 * reads as zeros now, which an overlay must store, not leave to the layer
 * below); the other clusters get no record and are not read.
 */
export function dirtyRecords (disk: RandomAccessDisk, name: string, device: number, options: Pick<DiskRecordsOptions, 'readAhead' | 'progress'> = {}): Readable {
  const bitmaps = disk.bitmaps?.() ?? []
  const bitmap = bitmaps.find(b => b.name === name)
  if (bitmap === undefined) {
    throw new VmapipeError('E_NOT_FOUND', `the disk has no dirty bitmap ${name} (it has ${bitmaps.map(b => b.name).join(', ') || 'none'})`)
  }
  return diskRecords(disk, device, { ...options, extents: bitmap.dirty, skipUnread: true })
}

async function recordsAt (disk: RandomAccessDisk, extents: NonNullable<DiskRecordsOptions['extents']>, device: number, first: number, offset: number, length: number, skipUnread: boolean): Promise<ClusterRecord[]> {
  const count = Math.ceil(length / CLUSTER_SIZE)
  const wanted = new Uint8Array(count)
  for (const e of await extents(offset, length)) {
    if (!e.data) continue
    const from = Math.max(0, Math.floor((e.offset - offset) / CLUSTER_SIZE))
    const to = Math.min(count, Math.ceil((e.offset + e.length - offset) / CLUSTER_SIZE))
    wanted.fill(1, from, to)
  }
  const buf = wanted.includes(1) ? Buffer.allocUnsafe(length) : EMPTY
  // One read per run of wanted clusters, all at once.
  const reads: Array<Promise<void>> = []
  for (let i = 0; i < count;) {
    if (wanted[i] === 0) { i++; continue }
    let end = i
    while (end < count && wanted[end] === 1) end++
    reads.push(disk.read(buf.subarray(i * CLUSTER_SIZE, Math.min(length, end * CLUSTER_SIZE)), offset + i * CLUSTER_SIZE))
    i = end
  }
  await Promise.all(reads)
  const records: ClusterRecord[] = []
  for (let i = 0; i < count; i++) {
    if (wanted[i] === 1) records.push(clusterFromBytes(device, first + i, buf.subarray(i * CLUSTER_SIZE, Math.min(length, (i + 1) * CLUSTER_SIZE))))
    else if (!skipUnread) records.push(clusterRecord(device, first + i, 0, EMPTY))
  }
  return records
}
