/**
 * Random access to a disk image of any format, and the walk that turns one
 * into records. Image readers (qcow2, Parallels, NBD, VMA archives) implement
 * RandomAccessDisk; diskRecords() reads only what the map says holds data.
 */
import { Readable } from 'node:stream'
import type { ProgressSink } from './io/progress.js'
import { type ClusterRecord, CLUSTER_SIZE, clusterCount, clusterFromBytes, clusterRecord } from './record.js'
import type { ClusterSet } from './util/cluster-set.js'

/** A range of the guest disk, and whether anything is stored there. */
export interface Extent {
  offset: number
  length: number
  /** false: nothing stored, reads as zeros (a hole, a zero cluster). */
  data: boolean
  /** Images made of layers: the layer that holds the data, 1 = the top one (0 for a hole). */
  depth?: number
}

/** A dirty bitmap an image carries: which ranges of the disk changed. */
export interface DirtyBitmap {
  id: string
  /** Bytes one bit stands for. */
  granularity: number
  /** Ranges covering [offset, offset + length), in order, dirty or clean. */
  map: (offset: number, length: number) => Promise<Array<{ offset: number, length: number, dirty: boolean }>>
  /** Bytes of the disk marked dirty. */
  dirtyBytes: () => Promise<number>
}

/** What `vma info` shows of an image. */
export interface DiskDescription {
  format: string
  size: number
  /** Guest bytes the image stores data for; undefined when the format cannot tell (raw). */
  allocated?: number
  clusterSize?: number
  allocatedClusters?: number
  /** Images made of layers: how many. */
  layers?: number
  bitmaps?: Array<{ id: string, granularity: number, dirtyBytes: number }>
  /** Anything else of note, by name (header magic, ignored features...). */
  details?: Record<string, string | number>
}

export interface RandomAccessDisk {
  /** Guest size in bytes. */
  readonly size: number
  /** Extents covering [offset, offset + length), in order, adjacent ones of a kind merged or not. */
  map: (offset: number, length: number) => Promise<Extent[]>
  /** Fills `buf` with the guest bytes at `offset` (zeros where nothing is stored). */
  read: (buf: Buffer, offset: number) => Promise<void>
  close: () => Promise<void>
  /** Dirty bitmaps stored in the image. */
  readonly bitmaps?: DirtyBitmap[]
  /** What the image is; without it `vma info` sums up map(). */
  describe?: () => Promise<DiskDescription>
}

/** An image read once as it streams in (stdin), without a temporary copy. */
export interface StreamedImage {
  size: number
  /** The disk as records for device id `device`; call once. */
  records: (device: number, progress?: ProgressSink) => Promise<Readable>
}

export async function describeBitmaps (bitmaps: DirtyBitmap[]): Promise<NonNullable<DiskDescription['bitmaps']>> {
  return await Promise.all(bitmaps.map(async b => ({ id: b.id, granularity: b.granularity, dirtyBytes: await b.dirtyBytes() })))
}

/** Guest bytes looked at per step. */
const BATCH = 16 * CLUSTER_SIZE
/** Steps under way at once: reading ahead hides the latency of each read (files, NBD). */
const AHEAD = 4
const EMPTY: Buffer = Buffer.alloc(0)

/**
 * The disk as ClusterRecords for device id `device`, front to back, but for
 * the clusters in `skip`. Clusters the map calls empty become mask-0 records
 * without a read; the rest are read in batches of 1 MiB, a few batches ahead,
 * and their zero blocks detected.
 */
export function diskRecords (disk: RandomAccessDisk, device: number, skip?: ClusterSet): Readable {
  const clusters = clusterCount(disk.size)
  let next = 0
  const ahead: Array<Promise<ClusterRecord[]>> = []
  let waiting = false
  const start = (): void => {
    while (ahead.length < AHEAD && next < clusters) {
      const first = next
      const offset = first * CLUSTER_SIZE
      const length = Math.min(BATCH, disk.size - offset)
      next += Math.ceil(length / CLUSTER_SIZE)
      const batch = recordsAt(disk, device, first, offset, length, skip)
      batch.catch(() => {}) // reported when its turn comes
      ahead.push(batch)
    }
  }
  return new Readable({
    objectMode: true,
    highWaterMark: 16,
    read () {
      if (waiting) return
      start()
      const batch = ahead.shift()
      if (batch === undefined) {
        this.push(null)
        return
      }
      waiting = true
      batch.then(records => {
        waiting = false
        for (const r of records) this.push(r)
        // A batch of only skipped clusters pushes nothing, so the stream would not ask again.
        if (records.length === 0) this._read(16)
      }, (err: Error) => this.destroy(err))
    },
    destroy (err, callback) {
      disk.close().then(() => callback(err), () => callback(err))
    },
  })
}

async function recordsAt (disk: RandomAccessDisk, device: number, first: number, offset: number, length: number, skip?: ClusterSet): Promise<ClusterRecord[]> {
  const count = Math.ceil(length / CLUSTER_SIZE)
  const wanted = (i: number): boolean => skip?.has(first + i) !== true
  if (skip !== undefined && !Array.from({ length: count }, (_, i) => i).some(wanted)) return []
  const extents = await disk.map(offset, length)
  const hasData = new Array<boolean>(count).fill(false)
  for (const e of extents) {
    if (!e.data) continue
    const from = Math.max(0, Math.floor((e.offset - offset) / CLUSTER_SIZE))
    const to = Math.min(count, Math.ceil((e.offset + e.length - offset) / CLUSTER_SIZE))
    for (let i = from; i < to; i++) hasData[i] = true
  }
  const records = async (): Promise<ClusterRecord[]> => {
    if (!hasData.some((data, i) => data && wanted(i))) return hasData.map((_, i) => clusterRecord(device, first + i, 0, EMPTY))
    const buf = Buffer.allocUnsafe(length)
    await disk.read(buf, offset)
    return hasData.map((data, i) => data
      ? clusterFromBytes(device, first + i, buf.subarray(i * CLUSTER_SIZE, Math.min(length, (i + 1) * CLUSTER_SIZE)))
      : clusterRecord(device, first + i, 0, EMPTY))
  }
  return (await records()).filter((_, i) => wanted(i))
}
