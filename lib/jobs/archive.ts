/**
 * Reading whole archives: the pipeline bytes -> decompress -> VmaReader, and
 * the read-side jobs built on it (header only, full verification).
 */
import { type Duplex, type Readable, Writable } from 'node:stream'
import { runStages } from '../io/chain.js'
import { VmapipeError } from '../errors.js'
import type { ArchiveInfo, DeviceInfo, ProgressSink, StreamItem } from '../contracts.js'
import { VMSTATE_NAME } from '../record.js'
import { type Compression, createDecompressor } from '../io/compression.js'
import { counter } from '../io/progress.js'
import { inSlabs, untouchedFilePath } from '../io/input.js'
import { giveBack } from '../io/slabs.js'
import { type DeviceStats, VmaReader, deviceStats } from '../vma/stream.js'
import { type ArchiveWalk, openArchiveFile, walkArchive } from '../vma/archive-index.js'
import type { PositionalReader } from '../io/pread.js'

export interface ReadOptions {
  /** Receives the count of input bytes (compressed, as read) as they pass. */
  progress?: ProgressSink
  /** Aborting stops the pipeline with E_INTERRUPTED. */
  signal?: AbortSignal
}

/**
 * Runs input -> [progress] -> decompressor -> reader -> sink and resolves when
 * the sink has finished, or rejects with the first error anywhere in the line,
 * once every stage has closed (a torn-down sink may still be closing files
 * that the caller then removes).
 */
export async function runRecordPipeline (input: Readable, decompress: Duplex, reader: VmaReader, sink: Writable, options: ReadOptions = {}): Promise<void> {
  try {
    await runStages([
      { stream: inSlabs(input), what: 'reading the archive' },
      ...(options.progress !== undefined ? [{ stream: await counter(options.progress), what: 'counting' }] : []),
      { stream: decompress, what: 'decompressing' },
      { stream: reader, what: 'reading the archive' },
      { stream: sink, what: 'writing' },
    ], options.signal)
  } catch (err) {
    throw annotate(err, reader)
  }
}

/** A decompression failure says where, in archive bytes, the data stopped making sense. */
function annotate<E> (err: E, reader: VmaReader): E | VmapipeError {
  if (err instanceof VmapipeError && err.code === 'E_COMPRESSED_DATA' && err.offset === undefined) {
    return new VmapipeError(err.code, err.message, { offset: reader.offset, cause: err })
  }
  return err
}

/**
 * Turns device names from the command line into devices of the archive.
 * `scsi0` stands for `drive-scsi0`, as Proxmox names its drives.
 */
export function findDevices (devices: DeviceInfo[], names: string[]): DeviceInfo[] {
  return names.map(name => {
    const found = devices.find(d => d.name === name) ?? devices.find(d => d.name === `drive-${name}`)
    if (found === undefined) {
      throw new VmapipeError('E_NOT_FOUND', `the archive has no device ${name} (it has ${devices.map(d => d.name).join(', ')})`)
    }
    return found
  })
}

/** The disks of an archive: every device but the saved RAM state. */
export function disksOf (devices: DeviceInfo[]): DeviceInfo[] {
  return devices.filter(d => d.name !== VMSTATE_NAME)
}

/** Reads just the header. Stops reading (and closes the input) right after. */
export async function readArchiveInfo (input: Readable, options: Pick<ReadOptions, 'signal'> = {}): Promise<{ info: ArchiveInfo, compression: Compression }> {
  const decompress = createDecompressor()
  const reader = new VmaReader({ requireComplete: false })
  // The header is all we want: having it, stop the line as an abort would.
  const got = new AbortController()
  let info: ArchiveInfo | undefined
  const header = new Writable({
    objectMode: true,
    write (item: ArchiveInfo, _enc, callback) {
      info ??= item
      got.abort()
      callback()
    },
  })
  const abort = (): void => { got.abort() }
  if (options.signal?.aborted === true) abort(); else options.signal?.addEventListener('abort', abort, { once: true })
  try {
    await runRecordPipeline(input, decompress, reader, header, { signal: got.signal })
  } catch (err) {
    if (info === undefined) throw err
  } finally {
    options.signal?.removeEventListener('abort', abort)
  }
  if (info === undefined) throw new VmapipeError('E_VMA_TRUNCATED', 'the input ended before the header')
  return { info, compression: decompress.chosen ?? 'none' }
}

export interface VerifyReport {
  ok: boolean
  /** The first problem, when not ok. */
  error?: VmapipeError
  info?: ArchiveInfo
  compression?: Compression
  extents: number
  /** Bytes of the decompressed archive read. */
  archiveBytes: number
  devices: DeviceStats[]
}

/**
 * Reads the whole archive and checks everything, completeness included.
 * Problems with the data make a report with ok=false; failures of the system
 * (unreadable input, missing tool) are thrown.
 */
export async function verifyArchive (input: Readable, options: ReadOptions = {}): Promise<VerifyReport> {
  const path = untouchedFilePath(input)
  const file = path === undefined ? undefined : await openSeekable(path)
  if (file !== undefined) {
    input.destroy()
    return await verifyFile(file, options)
  }
  const decompress = createDecompressor()
  const reader = new VmaReader()
  const discard = new Writable({
    objectMode: true,
    highWaterMark: 64,
    write: (item: StreamItem, _enc, cb) => {
      if (item.kind === 'cluster') giveBack(item.data)
      cb()
    },
  })
  let error: VmapipeError | undefined
  try {
    await runRecordPipeline(input, decompress, reader, discard, options)
  } catch (err) {
    if (!(err instanceof VmapipeError) || err.fault !== 'input') throw err
    error = err
  }
  const compression = decompress.chosen
  return {
    ok: error === undefined,
    ...(error !== undefined ? { error } : {}),
    ...(reader.info !== undefined ? { info: reader.info } : {}),
    ...(compression !== undefined ? { compression } : {}),
    extents: reader.extents,
    archiveBytes: reader.offset,
    devices: reader.deviceStats(),
  }
}

/**
 * An uncompressed archive in a regular file, open for positional reads, or
 * undefined when `path` can only be streamed (compressed, a pipe or device).
 */
export async function openSeekable (path: string): Promise<PositionalReader | undefined> {
  try {
    return await openArchiveFile(path)
  } catch (err) {
    if (err instanceof VmapipeError && err.code === 'E_NOT_SEEKABLE') return undefined
    throw err
  }
}

/**
 * verifyArchive of a file read by position: VMA's checksums cover the headers
 * only and every rule is about headers and masks, so the data blocks are
 * skipped, not read (the streaming reader reads them only to pass them on).
 */
async function verifyFile (file: PositionalReader, options: ReadOptions): Promise<VerifyReport> {
  const walk: ArchiveWalk = { devices: [], extents: 0, offset: 0 }
  let error: VmapipeError | undefined
  try {
    await walkArchive(file, walk, options)
  } catch (err) {
    if (!(err instanceof VmapipeError) || err.fault !== 'input') throw err
    error = err
  } finally {
    await file.close()
  }
  return {
    ok: error === undefined,
    ...(error !== undefined ? { error } : {}),
    ...(walk.info !== undefined ? { info: walk.info } : {}),
    compression: 'none',
    extents: walk.extents,
    archiveBytes: walk.offset,
    devices: deviceStats(walk.devices),
  }
}
