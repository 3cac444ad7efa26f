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
  /** Bytes of blocks kept (default 16 MiB: nbdcopy's four streams read ahead in it as fast as in 64). */
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

/** A cached block: its bytes once `ready`; `users` reads are waiting to copy from it. */
interface Block {
  buf: Buffer
  ready: Promise<void>
  users: number
  settled: boolean
}

/** Blocks between a read and the end of the one before within which reads count as in order. */
const NEAR_BLOCKS = 8

/** `key` by position; the object's ETag is pinned when it is opened, so a change under it is E_S3_PRECONDITION. */
export async function openS3Ranged (client: S3Client, bucket: string, key: string, options: S3RangedOptions = {}): Promise<S3RangedReader> {
  const { size, etag } = await headObject(client, bucket, key)
  const blockSize = Math.max(4096, options.blockSize ?? 64 * 1024)
  const cacheBlocks = Math.max(2, Math.floor((options.cacheBytes ?? 16 * 1024 * 1024) / blockSize))
  const aheadBlocks = Math.min(cacheBlocks >> 1, Math.floor((options.readAhead ?? 4 * 1024 * 1024) / blockSize))
  const blocks = Math.ceil(size / blockSize)
  const cache = new Map<number, Block>()
  /**
   * Buffers of blocks that left the cache, filled again by the next GETs: a new buffer per GET lived long enough in
   * the cache to reach V8's old generation, whose external memory is freed only by a full collection (vma serve
   * s3:// held 40-140 MiB of dead blocks).
   */
  const spare: Buffer[] = []
  const stats: S3RangedStats = { gets: 0, bytes: 0, hits: 0 }
  // A server makes a GET per few blocks: each one's "downloaded" line at debug, its resumes still warnings.
  const log = options.log
  const getLog: S3Log | undefined = log === undefined
    ? undefined
    : { info: (fields, message) => log.debug?.(fields, message), warn: (fields, message) => log.warn(fields, message) }
  const stop = new AbortController()
  /** The block after the last one read: a read that starts there is in order. */
  let next = -1

  /** Blocks [first, last] in one GET, each filled in its own buffer as the answer streams in. */
  const fetchRun = (first: number, last: number): Block[] => {
    stats.gets++
    const start = first * blockSize
    const end = Math.min(size, (last + 1) * blockSize)
    stats.bytes += end - start
    const run: Block[] = []
    for (let n = first; n <= last; n++) {
      const length = Math.min(blockSize, size - n * blockSize)
      const buf = (spare.pop() ?? Buffer.allocUnsafeSlow(blockSize)).subarray(0, length)
      run.push({ buf, ready: Promise.resolve(), users: 0, settled: false })
    }
    const filled = (async () => {
      let at = 0
      for await (const chunk of openS3Read(client, bucket, key, { start, end, etag, signal: stop.signal, log: getLog })) {
        for (let from = 0; from < (chunk as Buffer).length;) {
          const copied = (chunk as Buffer).copy(run[Math.floor(at / blockSize)].buf, at % blockSize, from)
          from += copied
          at += copied
        }
      }
    })()
    run.forEach((block, i) => {
      block.ready = filled.then(() => { block.settled = true })
      // A failed fetch is not kept: the next read asks again.
      block.ready.catch(() => { if (cache.get(first + i) === block) cache.delete(first + i) })
    })
    return run
  }

  /**
   * Drops the least recently used blocks past the bound; a block no read holds and no GET fills is kept for the next
   * GETs, as many as one read ahead takes.
   */
  const evict = (): void => {
    while (cache.size > cacheBlocks) {
      const [n, block] = cache.entries().next().value as [number, Block]
      cache.delete(n)
      if (block.settled && block.users === 0 && spare.length < aheadBlocks) spare.push(Buffer.from(block.buf.buffer, block.buf.byteOffset, blockSize))
    }
  }

  /** Blocks [first, last] (fetching the missing runs), and blocks up to `ahead` fetched too. */
  const want = (first: number, last: number, ahead: number): Block[] => {
    const wanted: Block[] = []
    let run = -1
    const flush = (end: number): void => {
      if (run < 0) return
      fetchRun(run, end).forEach((block, i) => {
        cache.set(run + i, block)
        if (run + i <= last) wanted.push(block)
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
    // Held until copied from: not given to another GET meanwhile.
    for (const block of wanted) block.users++
    evict()
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
      try {
        await Promise.all(wanted.map(async block => { await block.ready }))
        let filled = 0
        for (const [i, block] of wanted.entries()) {
          const from = i === 0 ? position - first * blockSize : 0
          filled += block.buf.copy(buf, filled, from, Math.min(block.buf.length, from + end - position - filled))
        }
        return filled
      } finally {
        for (const block of wanted) block.users--
      }
    },
    close: async () => {
      stop.abort()
      cache.clear()
    },
  }
}
