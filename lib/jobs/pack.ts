/**
 * Packing: disks and config blobs into a VMA archive, streamed.
 *
 *   disk sources -> RecordMerger -> VmaWriter -> compressor -> output
 */
import { randomUUID } from 'node:crypto'
import type { Writable } from 'node:stream'
import { type Stage, runStages } from '../io/chain.js'
import { readFile } from 'node:fs/promises'
import { basename } from 'node:path'
import { VmapipeError, ioError } from '../errors.js'
import type { ArchiveInfo, ConfigBlob, ProgressSink } from '../contracts.js'
import { type Compression, compressesToFd, createCompressingSink, createCompressor } from '../io/compression.js'
import { RecordMerger } from './merge.js'
import type { DiskSource } from './sources.js'
import { VmaWriter, type WriterStats, type WriterTarget, vmaDeviceSize } from '../vma/writer.js'
import { FileAppender } from '../io/write-queue.js'

export interface PackOptions {
  configs?: ConfigBlob[]
  /** Default: a random uuid. */
  uuid?: string
  /** Seconds since the epoch; default now. */
  ctime?: number
  compression?: Compression
  /** Receives the count of disk bytes read. */
  progress?: ProgressSink
  /** Aborting stops with E_INTERRUPTED. */
  signal?: AbortSignal
  /**
   * Read the disks together and mix their clusters in extents, as a live
   * backup does, instead of one after another. Off by default: reading one
   * disk at a time measured faster (bench/pack.ts) and never seeks between
   * disks on rotating media.
   */
  interleave?: boolean
}

/** Config files by path, stored under their base names unless named. */
export async function readConfigFiles (files: Array<string | { name?: string, path: string }>): Promise<ConfigBlob[]> {
  return await Promise.all(files.map(async c => {
    const { name, path } = typeof c === 'string' ? { name: basename(c), path: c } : { name: c.name ?? basename(c.path), path: c.path }
    return { name, data: await readFile(path).catch(err => { throw ioError(err, `cannot read config ${path}`) }) }
  }))
}

export interface PackResult {
  info: ArchiveInfo
  stats: WriterStats
}

/**
 * Writes the archive to `output`; resolves once it has all been handed over.
 * Given the descriptor behind `output` (`fd`), zstd and lzop write there
 * directly, and `output` is only ended; so does the archive writer when
 * `fd` is a regular file (`fileOffset`, io/output.ts), leaving room for each
 * extent's header instead of holding the extent until it is complete.
 */
export async function packArchive (
  disks: DiskSource[], output: { stream: Writable, fd?: number, fileOffset?: number }, options: PackOptions = {}
): Promise<PackResult> {
  const partial = disks.find(d => d.incremental === true)
  if (partial !== undefined) {
    throw new VmapipeError('E_OPTION', `${partial.name} is an incremental source (dirty clusters only); a VMA archive needs every cluster`)
  }
  const info: ArchiveInfo = {
    kind: 'archive',
    uuid: options.uuid ?? randomUUID(),
    ctime: options.ctime ?? Math.floor(Date.now() / 1000),
    configs: options.configs ?? [],
    devices: disks.map((d, i) => ({ id: i + 1, name: d.name, size: vmaDeviceSize(d.size) })),
  }
  // One disk needs no merging: its records go straight to the writer, a batch at a time where it is read by random access.
  const single = disks.length === 1
  const batched = single && disks[0].batches !== undefined
  const sources = await Promise.all(disks.map(async (d, i) => await (batched ? d.batches ?? d.records : d.records)(i + 1, options.progress)))
  const records = single ? sources[0] : new RecordMerger(info, sources, options.interleave !== true)
  const compression = options.compression ?? 'none'
  const inFile: WriterTarget | undefined = compression === 'none' && output.fd !== undefined && output.fileOffset !== undefined
    ? new FileAppender(output.fd, output.fileOffset, 'writing the archive')
    : undefined
  const writer = new VmaWriter(single ? info : undefined, batched, inFile)
  const direct = output.fd !== undefined && compressesToFd(compression)
  const tail: Stage[] = direct
    ? [{ stream: createCompressingSink(compression, output.fd as number), what: `compressing with ${compression}` }]
    : [
        ...(compression === 'none' ? [] : [{ stream: createCompressor(compression), what: `compressing with ${compression}` }]),
        { stream: output.stream, what: 'writing the archive' },
      ]
  await runStages([{ stream: records, what: 'reading a disk' }, { stream: writer, what: 'building the archive' }, ...tail], options.signal)
  if (direct) await new Promise<void>(resolve => output.stream.end(resolve))
  return { info, stats: writer.stats }
}
