/** Shared by the compression tests: the kinds with their programs, a PATH without any of them, and decoding in process. */
import { createHash } from 'node:crypto'
import { mkdirSync, symlinkSync } from 'node:fs'
import { join } from 'node:path'
import type { Duplex } from 'node:stream'
import { createDecompressor } from '../../lib/io/compression.js'
import { giveBack, inSlab } from '../../lib/io/slabs.js'
import { Rng } from './random.js'

export const KINDS: Array<{ kind: string, ext: string, pack: string, unpack: string }> = [
  { kind: 'zstd', ext: '.zst', pack: 'zstd -q -c', unpack: 'zstd -q -d -c' },
  { kind: 'lzo', ext: '.lzo', pack: 'lzop -c', unpack: 'lzop -d -c' },
  { kind: 'gzip', ext: '.gz', pack: 'gzip -c', unpack: 'gzip -d -c' },
]

/** A directory holding only a link to node: the PATH of a machine without any compression program. */
export function barePath (dir: string): string {
  const bin = join(dir, 'bare-bin')
  mkdirSync(bin)
  symlinkSync(process.execPath, join(bin, 'node'))
  return bin
}

/** The environment that runs the `zstd` and `lzop` programs, as earlier versions did. */
export const EXTERNAL = { VMAPIPE_EXTERNAL_COMPRESSION: '1' }

/** The last JSON log line of a run. */
export function lastLog (stderr: string): Record<string, unknown> {
  const lines = stderr.trim().split('\n').filter(l => l.startsWith('{'))
  return JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>
}

export const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

/** `mib` MiB that zstd and gzip shrink about 2:1 (bytes of 4 bits), with runs of zeros: many slabs' worth of output. */
export function compressible (mib: number, seed: number): Buffer {
  const data = new Rng(seed).fill(Buffer.alloc(mib << 20))
  for (let i = 0; i < data.length; i++) data[i] &= 15
  for (let at = 0; at < data.length; at += 5 << 20) data.fill(0, at, at + (1 << 20))
  return data
}

/** Feeds `pieces` to a decompressor (or `d`), each in writes of 1 MiB at most; calls `take` with each output chunk, in order. */
export async function decode (pieces: Buffer[], take: (chunk: Buffer) => void, d: Duplex = createDecompressor()): Promise<void> {
  const ended = new Promise<void>((resolve, reject) => { d.on('end', resolve); d.on('error', reject) })
  d.on('data', take)
  for (const piece of pieces) {
    for (let at = 0; at < piece.length; at += 1 << 20) {
      if (!d.write(piece.subarray(at, at + (1 << 20)))) await new Promise(resolve => d.once('drain', resolve))
    }
  }
  d.end()
  await ended
}

/**
 * decode() with a consumer that hashes each chunk and gives it back at once:
 * the hash, how many chunks, how many distinct buffers carried them, and how
 * many lay outside slabs.
 */
export async function decodeGivingBack (pieces: Buffer[], d?: Duplex): Promise<{ sha: string, chunks: number, buffers: number, outside: number }> {
  const hash = createHash('sha256')
  const buffers = new Set<ArrayBufferLike>()
  let chunks = 0
  let outside = 0
  await decode(pieces, chunk => {
    if (!inSlab(chunk)) outside++
    hash.update(chunk)
    buffers.add(chunk.buffer)
    chunks++
    giveBack(chunk)
  }, d)
  return { sha: hash.digest('hex'), chunks, buffers: buffers.size, outside }
}
