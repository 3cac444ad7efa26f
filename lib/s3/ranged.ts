/**
 * An object read by position (an index of an archive, the disks `vma serve`
 * exports): ranged GETs of whole blocks, kept in a bounded cache, and the
 * blocks after a run of reads in order fetched ahead.
 */
import type { S3Client } from '@aws-sdk/client-s3'
import type { PositionalReader } from '../io/pread.js'
import { headObject } from './objects.js'
import { openS3Read } from './read.js'
import type { S3Log } from './log.js'
import { formatS3Url } from './url.js'

export interface S3RangedOptions {
  /** Bytes per GET and per cache entry (default 1 MiB). */
  blockSize?: number
  /** Blocks kept (default 64): memory is about this times blockSize. */
  cacheBlocks?: number
  /** Blocks fetched ahead of reads in order (default 4). */
  readAhead?: number
  log?: S3Log
}

/** Counts of a ranged reader: GETs made, and reads answered from the cache. */
export interface S3RangedStats {
  gets: number
  hits: number
}

export interface S3RangedReader extends PositionalReader {
  readonly stats: S3RangedStats
}

/** `key` by position; the object's ETag is pinned when it is opened, so a change under it is E_S3_PRECONDITION. */
export async function openS3Ranged (client: S3Client, bucket: string, key: string, options: S3RangedOptions = {}): Promise<S3RangedReader> {
  const { size, etag } = await headObject(client, bucket, key)
  const blockSize = options.blockSize ?? 1024 * 1024
  const cacheBlocks = Math.max(2, options.cacheBlocks ?? 64)
  const readAhead = Math.min(options.readAhead ?? 4, cacheBlocks - 1)
  const cache = new Map<number, Promise<Buffer>>()
  const stats: S3RangedStats = { gets: 0, hits: 0 }
  const stop = new AbortController()
  let lastBlock = -2

  const fetch = async (block: number): Promise<Buffer> => {
    stats.gets++
    const start = block * blockSize
    const stream = openS3Read(client, bucket, key, { start, end: Math.min(size, start + blockSize), etag, signal: stop.signal, log: options.log })
    const chunks: Buffer[] = []
    for await (const chunk of stream) chunks.push(chunk as Buffer)
    return Buffer.concat(chunks)
  }
  /** The block, from the cache or fetched; the least recently used blocks leave the cache past its bound. */
  const block = (n: number): Promise<Buffer> => {
    let got = cache.get(n)
    if (got !== undefined) {
      stats.hits++
      cache.delete(n)
    } else {
      got = fetch(n)
      // A failed fetch is not kept: the next read asks again.
      got.catch(() => { if (cache.get(n) === got) cache.delete(n) })
    }
    cache.set(n, got)
    while (cache.size > cacheBlocks) cache.delete(cache.keys().next().value as number)
    return got
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
      const wanted: Array<Promise<Buffer>> = []
      for (let n = first; n <= last; n++) wanted.push(block(n))
      if (first === lastBlock || first === lastBlock + 1) {
        for (let n = last + 1; n <= last + readAhead && n * blockSize < size; n++) if (!cache.has(n)) void block(n).catch(() => undefined)
      }
      lastBlock = last
      const blocks = await Promise.all(wanted)
      let filled = 0
      for (let i = 0; i < blocks.length; i++) {
        const from = i === 0 ? position - first * blockSize : 0
        filled += blocks[i].copy(buf, filled, from, Math.min(blocks[i].length, from + end - position - filled))
      }
      return filled
    },
    close: async () => {
      stop.abort()
      cache.clear()
    },
  }
}
