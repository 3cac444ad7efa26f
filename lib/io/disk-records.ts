/**
 * Random access to a disk image of any format, and the walk that turns one
 * into records. Image readers (qcow2, Parallels, NBD, VMA archives) implement
 * RandomAccessDisk; diskRecords() reads only what the map says holds data.
 */
import { Readable } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { ClusterRecord, DirtyBitmap, DiskDescription, Extent, ProgressSink, RandomAccessDisk } from '../contracts.js'
import { BLOCK_SIZE, CLUSTER_SIZE, ZERO_CLUSTER, clusterCount, clusterFromBytes, clusterRecord, popcount16 } from '../record.js'
import type { ClusterSet } from '../util/cluster-set.js'
import { SLAB_SIZE, giveBack, lend, slabSource } from './slabs.js'

/** Guest bytes mapped in the first step when summing up a map, so that a fragmented one never becomes one huge array. */
const SUM_STEP = 1 << 30
const MIN_SUM_STEP = 64 << 20

/**
 * A checkpoint for long loops: call it often (it costs a clock read); about
 * every 50 ms it yields to the event loop, so that signal handlers and timers
 * run, and once `signal` is aborted it throws E_INTERRUPTED.
 */
export function checkpoint (signal?: AbortSignal): () => Promise<void> {
  let last = Date.now()
  return async () => {
    if (Date.now() - last < 50) return
    await new Promise(resolve => setImmediate(resolve))
    last = Date.now()
    if (signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
  }
}

/**
 * The bytes of [0, size) in ranges `map` gives that `counts` accepts:
 * allocated bytes, dirty bytes. The step grows while the map comes back fast
 * and in few ranges, so a huge sparse disk takes a few calls, not one per
 * gigabyte, and shrinks when a call is slow, so that signals are seen.
 */
export async function mappedBytes<T extends { length: number }> (
  map: (offset: number, length: number) => Promise<T[]>, size: number, counts: (range: T) => boolean, signal?: AbortSignal
): Promise<number> {
  const pause = checkpoint(signal)
  let bytes = 0
  let step = SUM_STEP
  for (let offset = 0; offset < size;) {
    const length = Math.min(step, size - offset)
    const started = Date.now()
    const ranges = await map(offset, length)
    const took = Date.now() - started
    for (const range of ranges) if (counts(range)) bytes += range.length
    offset += length
    if (ranges.length < 64 && took < 20) step *= 2
    else if (ranges.length > 4096 || took > 200) step = Math.max(MIN_SUM_STEP, step / 2)
    await pause()
  }
  return bytes
}

export async function describeBitmaps (bitmaps: DirtyBitmap[]): Promise<NonNullable<DiskDescription['bitmaps']>> {
  return await Promise.all(bitmaps.map(async b => ({ id: b.id, granularity: b.granularity, dirtyBytes: await b.dirtyBytes() })))
}

export interface DiskRecordsOptions {
  /** The ranges worth reading (default: the disk's map); a cluster touching none is not read. */
  extents?: (offset: number, length: number) => Promise<Extent[]>
  /**
   * Give clusters that are not read no record at all, instead of a mask-0
   * one: the records of an overlay, where such clusters are left to the layer below.
   */
  skipUnread?: boolean
  /** Clusters to leave out entirely: not read, no record (they were emitted some other way). */
  skip?: ClusterSet
  /**
   * Batches read at once (default 1): reading ahead hides the latency of each read (NBD). For a file one
   * suffices, the stream holding the batch before: with 2, vma create of 1 GiB peaked 2-3 MiB higher, no faster.
   */
  readAhead?: number
  /** Receives the count of guest bytes passed, read or not. */
  progress?: ProgressSink
  /**
   * Push each batch's records as one array (ClusterRecord[]) instead of one
   * item per record: one stream hop per batch, for a consumer that takes
   * arrays (the archive writer); most of a sparse disk's cost was the hop per
   * empty cluster.
   */
  batched?: boolean
}

/** Guest bytes looked at per step: one slab (io/slabs.ts). */
const BATCH = 16 * CLUSTER_SIZE
/** Slabs one walk may make: its read-ahead and what the archive writer has not written yet. */
const NEW_SLABS = 12
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
  const slabs = slabSource(NEW_SLABS)
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
      const batch = recordsAt(disk, extents, device, first, offset, length, options, slabs)
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
      void batches.shift()
      waiting = false
      let more = true
      if (options.batched === true) { if (records.length > 0) more = stream.push(records) } else for (const r of records) more = stream.push(r)
      // An empty batch pushes nothing, so nothing would ask for the next one.
      if (more || records.length === 0) pump(stream)
    }, (err: Error) => stream.destroy(err))
  }
  return new Readable({
    objectMode: true,
    // 16 records, or one batch of them.
    highWaterMark: options.batched === true ? 1 : 16,
    read () { pump(this) },
    destroy (err, callback) {
      disk.close().then(() => callback(err), () => callback(err))
    },
  })
}

/**
 * The clusters that dirty bitmap `id` of `disk` marks, as records for device
 * id `device`: each such cluster whole, as it reads now (mask 0 when it reads
 * as zeros now, which an overlay must store, not leave to the layer below);
 * the other clusters get no record and are not read.
 */
export function dirtyRecords (disk: RandomAccessDisk, id: string, device: number, options: Pick<DiskRecordsOptions, 'readAhead' | 'progress'> = {}): Readable {
  const bitmaps = disk.bitmaps ?? []
  const bitmap = bitmaps.find(b => b.id === id)
  if (bitmap === undefined) {
    throw new VmapipeError('E_NOT_FOUND', `the disk has no dirty bitmap ${id} (it has ${bitmaps.map(b => b.id).join(', ') || 'none'})`)
  }
  const dirty = async (offset: number, length: number): Promise<Extent[]> =>
    (await bitmap.map(offset, length)).map(r => ({ offset: r.offset, length: r.length, data: r.dirty }))
  return diskRecords(disk, device, { ...options, extents: dirty, skipUnread: true })
}

async function recordsAt (
  disk: RandomAccessDisk, extents: NonNullable<DiskRecordsOptions['extents']>, device: number, first: number, offset: number, length: number,
  options: DiskRecordsOptions, slabs: () => Buffer | undefined
): Promise<ClusterRecord[]> {
  const count = Math.ceil(length / CLUSTER_SIZE)
  const skipped = (i: number): boolean => options.skip?.has(first + i) === true
  if (options.skip !== undefined && Array.from({ length: count }, (_, i) => i).every(skipped)) return []
  const wanted = new Uint8Array(count)
  for (const e of await extents(offset, length)) {
    if (!e.data) continue
    const from = Math.max(0, Math.floor((e.offset - offset) / CLUSTER_SIZE))
    const to = Math.min(count, Math.ceil((e.offset + e.length - offset) / CLUSTER_SIZE))
    wanted.fill(1, from, to)
  }
  for (let i = 0; i < count; i++) if (skipped(i)) wanted[i] = 2
  // A slab when one is free: each record's data is then a loan, which the archive writer's output gives back once written.
  const slab = wanted.includes(1) && length <= SLAB_SIZE ? slabs() : undefined
  const buf = slab?.subarray(0, length) ?? (wanted.includes(1) ? Buffer.allocUnsafe(length) : EMPTY)
  // One read per run of wanted clusters, all at once.
  const reads: Array<Promise<void>> = []
  for (let i = 0; i < count;) {
    if (wanted[i] !== 1) { i++; continue }
    let end = i
    while (end < count && wanted[end] === 1) end++
    reads.push(disk.read(buf.subarray(i * CLUSTER_SIZE, Math.min(length, end * CLUSTER_SIZE)), offset + i * CLUSTER_SIZE))
    i = end
  }
  await Promise.all(reads)
  const records: ClusterRecord[] = []
  const words = wordsOf(buf)
  for (let i = 0; i < count; i++) {
    if (wanted[i] === 1) {
      const start = i * CLUSTER_SIZE
      const end = Math.min(length, start + CLUSTER_SIZE)
      if ((end - start) % BLOCK_SIZE === 0) records.push(packedCluster(buf, words, device, first + i, start, end))
      else {
        // The device's last cluster, ending inside a block.
        const rec = clusterFromBytes(device, first + i, buf.subarray(start, end))
        records.push(clusterRecord(device, rec.cluster, rec.mask, lend(rec.data)))
      }
    } else if (wanted[i] === 0 && options.skipUnread !== true) records.push(clusterRecord(device, first + i, 0, EMPTY))
  }
  // Not after a failure: the other reads may still be filling it.
  if (slab !== undefined) giveBack(slab)
  return records
}

const ZERO_BLOCK: Buffer = Buffer.alloc(BLOCK_SIZE)

/** `buf` as 32-bit words, to look at the head of each block without a call; undefined when it is not 4-byte aligned. */
function wordsOf (buf: Buffer): Uint32Array | undefined {
  return buf.byteOffset % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : undefined
}

/**
 * The record of the whole 4 KiB blocks in buf[start, end), as clusterFromBytes
 * makes it, but cheaper per byte: a block whose first 16 bytes are not all
 * zero is data without a call (most data blocks), the others are compared
 * natively with a shared zero block (a cluster that looks empty, once as a
 * whole). Data blocks with zero blocks between them are moved together in
 * place, so that the record's data is a view of `buf` (a loan where `buf`
 * is a slab), never a new buffer.
 */
function packedCluster (buf: Buffer, words: Uint32Array | undefined, device: number, cluster: number, start: number, end: number): ClusterRecord {
  const blocks = (end - start) / BLOCK_SIZE
  let mask = 0
  let doubtful = 0
  for (let b = 0; b < blocks; b++) {
    const w = (start + b * BLOCK_SIZE) >>> 2
    if (words !== undefined && (words[w] | words[w + 1] | words[w + 2] | words[w + 3]) !== 0) mask |= 1 << b
    else doubtful |= 1 << b
  }
  if (mask === 0 && ZERO_CLUSTER.compare(buf, start, end, 0, end - start) === 0) return clusterRecord(device, cluster, 0, EMPTY)
  for (let b = 0; doubtful !== 0; b++, doubtful >>>= 1) {
    const at = start + b * BLOCK_SIZE
    if ((doubtful & 1) === 1 && ZERO_BLOCK.compare(buf, at, at + BLOCK_SIZE) !== 0) mask |= 1 << b
  }
  if (mask === 0) return clusterRecord(device, cluster, 0, EMPTY)
  const firstBlock = 31 - Math.clz32(mask & -mask)
  const run = mask >>> firstBlock
  const size = popcount16(mask) * BLOCK_SIZE
  if ((run & (run + 1)) === 0) {
    const from = start + firstBlock * BLOCK_SIZE
    return clusterRecord(device, cluster, mask, lend(buf.subarray(from, from + size)))
  }
  let to = start
  for (let b = 0; b < blocks; b++) {
    if (((mask >>> b) & 1) === 0) continue
    const from = start + b * BLOCK_SIZE
    if (from !== to) buf.copyWithin(to, from, from + BLOCK_SIZE)
    to += BLOCK_SIZE
  }
  return clusterRecord(device, cluster, mask, lend(buf.subarray(start, start + size)))
}
