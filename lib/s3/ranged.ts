/**
 * An object read by position (an index of an archive, the disks `vma serve`
 * exports): ranged GETs through a bounded cache of small blocks. A read far
 * from the one before fetches only the blocks it touches (an index reads a
 * 512-byte extent header every few MiB: a GET of 64 KiB each, not of the
 * archive); reads in order fetch ahead, the blocks missing next to each other
 * in one GET.
 */
import type { S3Client } from '@aws-sdk/client-s3'
import type { PositionalReader } from '../io/pread.js'
import { headObject } from './objects.js'
import { openS3Read } from './read.js'
import type { S3Log } from './log.js'
import { formatS3Url } from './url.js'

export interface S3RangedOptions {
  /** Bytes per cache entry, the least a GET fetches (default 64 KiB). */
  blockSize?: number
  /** Bytes of blocks kept (default 64 MiB). */
  cacheBytes?: number
  /** Bytes fetched ahead of reads in order (default 4 MiB). */
  readAhead?: number
  log?: S3Log
}

/** Counts of a ranged reader: GETs made, their bytes, and reads answered from the cache alone. */
export interface S3RangedStats {
  gets: number
  bytes: number
  hits: number
}

export interface S3RangedReader extends PositionalReader {
  readonly stats: S3RangedStats
}

/** Blocks between a read and the end of the one before within which reads count as in order. */
const NEAR_BLOCKS = 8

/** `key` by position; the object's ETag is pinned when it is opened, so a change under it is E_S3_PRECONDITION. */
export async function openS3Ranged (client: S3Client, bucket: string, key: string, options: S3RangedOptions = {}): Promise<S3RangedReader> {
  const { size, etag } = await headObject(client, bucket, key)
  const blockSize = Math.max(4096, options.blockSize ?? 64 * 1024)
  const cacheBlocks = Math.max(2, Math.floor((options.cacheBytes ?? 64 * 1024 * 1024) / blockSize))
  const aheadBlocks = Math.min(cacheBlocks >> 1, Math.floor((options.readAhead ?? 4 * 1024 * 1024) / blockSize))
  const blocks = Math.ceil(size / blockSize)
  const cache = new Map<number, Promise<Buffer>>()
  const stats: S3RangedStats = { gets: 0, bytes: 0, hits: 0 }
  const stop = new AbortController()
  /** The block after the last one read: a read that starts there is in order. */
  let next = -1

  /** Blocks [first, last] in one GET, each its own slice. */
  const fetchRun = (first: number, last: number): Array<Promise<Buffer>> => {
    stats.gets++
    const start = first * blockSize
    const end = Math.min(size, (last + 1) * blockSize)
    stats.bytes += end - start
    const whole = (async () => {
      // Filled as the answer streams in: no list of chunks, no second copy.
      const buf = Buffer.allocUnsafe(end - start)
      let filled = 0
      for await (const chunk of openS3Read(client, bucket, key, { start, end, etag, signal: stop.signal, log: options.log })) {
        filled += (chunk as Buffer).copy(buf, filled)
      }
      return buf.subarray(0, filled)
    })()
    const parts: Array<Promise<Buffer>> = []
    for (let n = first; n <= last; n++) {
      const at = (n - first) * blockSize
      const part = whole.then(b => b.subarray(at, at + blockSize))
      // A failed fetch is not kept: the next read asks again.
      part.catch(() => { if (cache.get(n) === part) cache.delete(n) })
      parts.push(part)
    }
    return parts
  }

  /**
   * Blocks [first, last] (fetching the missing runs), and blocks up to `ahead` fetched too; the least recently used
   * leave the cache past its bound.
   */
  const want = (first: number, last: number, ahead: number): Array<Promise<Buffer>> => {
    const wanted: Array<Promise<Buffer>> = []
    let run = -1
    const flush = (end: number): void => {
      if (run < 0) return
      fetchRun(run, end).forEach((part, i) => {
        cache.set(run + i, part)
        if (run + i <= last) wanted.push(part)
      })
      run = -1
    }
    for (let n = first; n <= ahead; n++) {
      const got = cache.get(n)
      if (got === undefined) {
        if (run < 0) run = n
        continue
      }
      flush(n - 1)
      if (n > last) continue
      // Touched: to the back of the LRU order.
      cache.delete(n)
      cache.set(n, got)
      wanted.push(got)
    }
    flush(ahead)
    while (cache.size > cacheBlocks) cache.delete(cache.keys().next().value as number)
    return wanted
  }

  return {
    name: formatS3Url({ bucket, key }),
    size,
    stats,
    read: async (buf, position) => {
      const end = Math.min(size, position + buf.length)
      if (end <= position) return 0
      const first = Math.floor(position / blockSize)
      const last = Math.floor((end - 1) / blockSize)
      let missing = false
      for (let n = first; n <= last && !missing; n++) missing = !cache.has(n)
      if (!missing) stats.hits++
      // Near where the last read ended: in order, give or take the reordering of parallel requests (nbdcopy's).
      const inOrder = next >= 0 && Math.abs(first - next) <= NEAR_BLOCKS
      // The window ahead is filled again once half of it has been read, so that each GET ahead is large.
      const refill = inOrder && !cache.has(Math.min(blocks - 1, last + (aheadBlocks >> 1)))
      const wanted = want(first, last, refill ? Math.max(last, Math.min(blocks - 1, last + aheadBlocks)) : last)
      next = last + 1
      const parts = await Promise.all(wanted)
      let filled = 0
      for (const [i, part] of parts.entries()) {
        const from = i === 0 ? position - first * blockSize : 0
        filled += part.copy(buf, filled, from, Math.min(part.length, from + end - position - filled))
      }
      return filled
    },
    close: async () => {
      stop.abort()
      cache.clear()
    },
  }
}
