/**
 * Copying a disk by position into an image file: the 64 KiB clusters that
 * hold data, as runs of neighbours read into reused buffers and written
 * with a positional write each (the qcow2 and Parallels writers' copyFrom).
 */
import { fdatasync } from 'node:fs'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, Extent, ProgressSink, RandomAccessDisk } from '../contracts.js'
import { CLUSTER_SIZE, ZERO_CLUSTER, forEachRun } from '../record.js'
import { writeAll } from './write-queue.js'

/** What a copy reads: a disk's map, and its bytes read synchronously (cheap from the page cache). */
export type CopySource = Pick<RandomAccessDisk, 'map' | 'size'> & { readSync: (buf: Buffer, offset: number) => void }

/** Clusters read and written at once: 1 MiB. */
const COPY_CLUSTERS = 16
/**
 * The map is asked for this much of the disk at a time: its extents die
 * young, where those of 256 MiB lived through collections and made V8 double
 * its young generation (4 MiB more RSS at 1 GiB).
 */
const MAP_WINDOW = 8 << 20
/** Bytes written between background syncs. */
const FLUSH_EVERY = 64 << 20

/** `disk`'s map in order, a window of MAP_WINDOW bytes at a time (one await a window, none an extent). */
export async function * mapWindows (disk: Pick<RandomAccessDisk, 'map' | 'size'>): AsyncGenerator<Extent[]> {
  for (let at = 0; at < disk.size; at += MAP_WINDOW) yield await disk.map(at, Math.min(MAP_WINDOW, disk.size - at))
}

/**
 * Calls `fn` for each run of neighbouring 64 KiB clusters of `disk` that hold
 * data (any stored byte), in order, cut into pieces of at most `most`
 * clusters: the first cluster, the count, and the stored bytes in the piece
 * (for progress; they add up to the disk's stored bytes).
 */
async function forEachDataRun (
  disk: Pick<RandomAccessDisk, 'map' | 'size'>, most: number, fn: (first: number, count: number, stored: number) => void | Promise<void>
): Promise<void> {
  let first = 0
  let end = 0
  let stored = 0
  const flush = async (): Promise<void> => {
    for (let c = first; c < end; c += most) {
      const count = Math.min(most, end - c)
      const part = Math.min(stored, count * CLUSTER_SIZE)
      stored -= part
      await fn(c, count, part)
    }
  }
  for await (const extents of mapWindows(disk)) {
    for (const e of extents) {
      if (!e.data) continue
      const from = Math.floor(e.offset / CLUSTER_SIZE)
      const to = Math.ceil((e.offset + e.length) / CLUSTER_SIZE)
      if (from > end || end === 0) {
        await flush()
        first = from
      }
      end = Math.max(end, to)
      stored += e.length
    }
  }
  await flush()
}

/** Places a run: writes its bytes (or pieces of them) where they go in the image. */
type Place = (first: number, bytes: Buffer, write: (piece: Buffer, position: number) => void) => void

/** Buffers a copy reads into: one being read while the other's writes are under way (reading from the page cache is the quicker side). */
const BUFFERS = 2

/**
 * Copies the data clusters of `disk` into `file`: each run (whole
 * clusters, zero-filled where nothing is stored, clipped to the disk's end)
 * read synchronously into one of two reused buffers (cheap from the page
 * cache) and given to `place`, whose writes go to the thread pool while the
 * next run is read: on two cores the copies overlap. Every FLUSH_EVERY bytes
 * an fdatasync starts in the background, so that the file's final sync finds
 * little left to write back. Stops with E_INTERRUPTED when `signal` is
 * aborted. Reports the stored bytes read to `progress`.
 */
export async function copyDataRuns (
  disk: CopySource, file: { fd: number, path: string }, place: Place, progress?: ProgressSink, signal?: AbortSignal
): Promise<void> {
  const free: Buffer[] = Array.from({ length: BUFFERS }, () => Buffer.allocUnsafeSlow(COPY_CLUSTERS * CLUSTER_SIZE))
  let busy = 0
  let failure: Error | undefined
  let wake = (): void => {}
  const settle = (err: Error | null): void => {
    if (err !== null) failure ??= ioError(err, `writing ${file.path}`)
    busy--
    wake()
  }
  const until = async (done: () => boolean): Promise<void> => {
    while (!done()) await new Promise<void>(resolve => { wake = resolve })
  }
  let sinceFlush = 0
  let flushing = false
  const flushSome = (): void => {
    if (sinceFlush < FLUSH_EVERY || flushing) return
    sinceFlush = 0
    flushing = true
    busy++
    fdatasync(file.fd, err => { flushing = false; settle(err) })
  }
  try {
    await forEachDataRun(disk, COPY_CLUSTERS, async (first, count, stored) => {
      await until(() => free.length > 0 || failure !== undefined)
      if (failure !== undefined) throw failure
      if (signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
      const buf = free.pop() as Buffer
      const bytes = buf.subarray(0, Math.min(count * CLUSTER_SIZE, disk.size - first * CLUSTER_SIZE))
      disk.readSync(bytes, first * CLUSTER_SIZE)
      // The buffer is free again once every write of it has ended.
      let pending = 1
      const release = (): void => { if (--pending === 0) free.push(buf) }
      place(first, bytes, (piece, position) => {
        pending++
        busy++
        writeAll(file.fd, [piece], position, err => { release(); settle(err) })
      })
      release()
      progress?.add(stored)
      sinceFlush += bytes.length
      flushSome()
      // A turn of the event loop per run, even where every write is done at once (signals, timers).
      if (free.length > 0) await new Promise(resolve => setImmediate(resolve))
    })
  } finally {
    await until(() => busy === 0)
  }
  if (failure !== undefined) throw failure
}

/**
 * The pieces that make record `rec`'s whole cluster, clipped to a device of
 * `deviceSize` bytes, in order as [position, bytes]: its data runs, and the
 * gaps between them as views of shared zeros (nothing copied), so that a
 * queue that merges neighbours writes the cluster, and clusters written next
 * to it, in one writev. Checks the record as forEachRun does.
 */
export function clusterPieces (rec: ClusterRecord, deviceSize: number): Array<[number, Buffer]> {
  const pieces: Array<[number, Buffer]> = []
  let at = rec.cluster * CLUSTER_SIZE
  forEachRun(rec, deviceSize, (position, bytes) => {
    if (position > at) pieces.push([at, ZERO_CLUSTER.subarray(0, position - at)])
    pieces.push([position, bytes])
    at = position + bytes.length
  })
  const end = Math.min(rec.cluster * CLUSTER_SIZE + CLUSTER_SIZE, deviceSize)
  if (end > at) pieces.push([at, ZERO_CLUSTER.subarray(0, end - at)])
  return pieces
}
