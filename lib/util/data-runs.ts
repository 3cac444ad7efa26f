/**
 * Copying a disk by position into an image file: the 64 KiB clusters that
 * hold data, as runs of neighbours read into one reused buffer and written
 * with one positional write each (the qcow2 and Parallels writers' copyFrom).
 */
import { writeSync } from 'node:fs'
import { VmapipeError, ioError } from '../errors.js'
import type { ProgressSink, RandomAccessDisk } from '../contracts.js'
import { CLUSTER_SIZE } from '../record.js'

/** What a copy reads: a disk's map, and its bytes read synchronously (cheap from the page cache). */
export type CopySource = Pick<RandomAccessDisk, 'map' | 'size'> & { readSync: (buf: Buffer, offset: number) => void }

/** Clusters read and written at once: 1 MiB. */
export const COPY_CLUSTERS = 16
/** The map is asked for this much of the disk at a time, so that a fragmented disk's extents never pile up. */
const MAP_WINDOW = 256 << 20

/**
 * Calls `fn` for each run of neighbouring 64 KiB clusters of `disk` that hold
 * data (any stored byte), in order, cut into pieces of at most `most`
 * clusters: the first cluster, the count, and the stored bytes in the piece
 * (for progress; they add up to the disk's stored bytes).
 */
export async function forEachDataRun (
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
  for (let at = 0; at < disk.size; at += MAP_WINDOW) {
    for (const e of await disk.map(at, Math.min(MAP_WINDOW, disk.size - at))) {
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

/**
 * Copies the data clusters of `disk` through one reused buffer: `place` is
 * given each run (first cluster, bytes read, whole clusters zero-filled where
 * nothing is stored, clipped to the disk's end) to write. The event loop gets
 * a turn after every COPY_CLUSTERS of bytes; stops with E_INTERRUPTED when
 * `signal` is aborted. Reports the stored bytes read to `progress`.
 */
export async function copyDataRuns (
  disk: CopySource, place: (first: number, bytes: Buffer) => void, progress?: ProgressSink, signal?: AbortSignal
): Promise<void> {
  const buf = Buffer.allocUnsafeSlow(COPY_CLUSTERS * CLUSTER_SIZE)
  let sinceTurn = 0
  await forEachDataRun(disk, COPY_CLUSTERS, async (first, count, stored) => {
    const bytes = buf.subarray(0, Math.min(count * CLUSTER_SIZE, disk.size - first * CLUSTER_SIZE))
    disk.readSync(bytes, first * CLUSTER_SIZE)
    place(first, bytes)
    progress?.add(stored)
    sinceTurn += bytes.length
    if (sinceTurn < buf.length) return
    sinceTurn = 0
    await new Promise(resolve => setImmediate(resolve))
    if (signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
  })
}

/** pwrite until every byte is written, synchronously. */
export function writeFullySync (fd: number, bytes: Buffer, position: number, path: string): void {
  for (let done = 0; done < bytes.length;) {
    let n: number
    try {
      n = writeSync(fd, bytes, done, bytes.length - done, position + done)
    } catch (err) {
      throw ioError(err, `writing ${path}`)
    }
    if (n === 0) throw new VmapipeError('E_IO', `writing ${path} made no progress`)
    done += n
  }
}
