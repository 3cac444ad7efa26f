/**
 * Live restore: an archive that cannot be indexed (compressed, a pipe,
 * stdin) served while it is read. One pass reads it front to back with the
 * streaming reader, checking it as verify does, and writes each device's
 * data to a sparse cache file (holes for zero blocks); each device is a
 * CacheDisk that serves what the pass has passed and waits for the rest.
 * With `keepDir` the cache files are staged there and become the restored
 * disks (named as extract names them, config blobs beside them) once the
 * pass completes; otherwise they are unlinked as soon as they are open, so
 * nothing stays behind, whatever ends the process.
 */
import { mkdtemp, open, rename, rm, rmdir, unlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import { runRecordPipeline } from './archive.js'
import { checkClashes, checkFileNames, prepareTarget, stagingPrefix } from './extract.js'
import { diskOutput } from './targets.js'
import { createDecompressor } from '../io/compression.js'
import type { Input } from '../io/input.js'
import { syncPath } from '../io/output.js'
import { formatBytes } from '../io/progress.js'
import { giveBack } from '../io/slabs.js'
import type { ArchiveInfo, ClusterRecord, DeviceInfo, ProgressSink, StreamItem } from '../contracts.js'
import { VMSTATE_NAME } from '../record.js'
import { VmaReader } from '../vma/stream.js'
import { CacheDisk } from './live-cache.js'

/** The logging a live restore does: pino's Logger fits. */
export interface LiveLog {
  info: (fields: Record<string, unknown>, message: string) => void
  error: (fields: Record<string, unknown>, message: string) => void
}

export interface LiveOptions {
  /** Where the cache files go (default the temporary directory); they are unlinked at once. */
  cacheDir?: string
  /** Keep the restored disks here (a new directory, or one left empty): the cache is staged in it and renamed into place when the pass completes. */
  keepDir?: string
  log?: LiveLog
  /** A progress display for the pass, started with the input's size when known (a terminal's bar). */
  progress?: { start: (total?: number) => ProgressSink | undefined, stop: () => void }
  /** Milliseconds between progress lines in the log (default 10 s). */
  progressInterval?: number
  /** Aborting stops the pass: reads still waiting fail with E_INTERRUPTED. */
  signal?: AbortSignal
}

export interface LiveOutcome {
  /** The pass read the whole archive and found it complete and consistent. */
  ok: boolean
  /** Why it stopped, when not ok. */
  error?: VmapipeError
  /** Final paths of the restored files (keepDir only). */
  kept: string[]
  /** Bytes of the input (as read, compressed) and of the decompressed archive. */
  inputBytes: number
  archiveBytes: number
  seconds: number
}

export interface LiveArchive {
  info: ArchiveInfo
  /** The archive's disks (vmstate left out), served from their cache files; the archive is closed when all are. */
  disks: CacheDisk[]
  /** Settles (never rejects) when the pass has ended and, with keepDir, the disks are in place. */
  outcome: Promise<LiveOutcome>
  /** Stops the pass if it is still running, closes the cache files and removes whatever was not kept. */
  close: () => Promise<void>
}

const CACHE_PREFIX = 'vmapipe-cache-'

/**
 * Starts the pass over `input` and resolves once its header is read and the
 * cache files exist; a failure before that rejects (and leaves nothing).
 */
export async function openLiveArchive (input: Input, options: LiveOptions = {}): Promise<LiveArchive> {
  const started = Date.now()
  const stop = new AbortController()
  const files: Array<{ disk: CacheDisk, name: string }> = []
  // Reads waiting for the pass fail at once: a server shutting down does not wait for the input to be torn down.
  const onAbort = (): void => {
    const interrupted = new VmapipeError('E_INTERRUPTED', 'interrupted')
    for (const f of files) f.disk.fail(interrupted)
    stop.abort()
  }
  const store = await openStore(options)
  options.signal?.addEventListener('abort', onAbort, { once: true })
  const closeFiles = async (): Promise<void> => { await Promise.allSettled(files.map(async f => await f.disk.file.close())) }

  let inputBytes = 0
  const bar = options.progress?.start(input.size)
  const counted: ProgressSink = { add: n => { inputBytes += n; bar?.add(n) } }
  const reader = new VmaReader()
  // The cache files are made once, by the sink when the header reaches it, or here when the pass failed before it did:
  // a pass that fails right after the header (a small damaged archive) still serves what it passed.
  let began: (() => void) | undefined
  const beginning = new Promise<void>(resolve => { began = resolve })
  let creating: Promise<void> | undefined
  const start = async (info: ArchiveInfo): Promise<void> => {
    began?.()
    creating ??= store.create(info).then(made => { files.push(...made) })
    await creating
  }
  const sink = new LiveSink(start, files)
  const pass = runRecordPipeline(input.stream, createDecompressor(), reader, sink, { progress: counted, signal: stop.signal })
  try {
    await Promise.race([beginning, pass]).catch(err => { if (reader.info === undefined) throw err })
    await start(reader.info as ArchiveInfo)
  } catch (err) {
    options.progress?.stop()
    options.signal?.removeEventListener('abort', onAbort)
    await closeFiles()
    await store.discard()
    throw err
  }
  const info = reader.info as ArchiveInfo
  const log = options.log
  const name = input.name
  log?.info({ archive: name, ...store.where, devices: info.devices.map(d => d.name) }, `${name}: serving while the pass reads the archive`)
  const report = (): void => log?.info(progressFields(inputBytes, reader.offset, input.size, started), progressLine(name, inputBytes, input.size, started))
  const timer = setInterval(report, options.progressInterval ?? 10_000)
  timer.unref()

  const outcome = pass.then(async (): Promise<LiveOutcome> => {
    const paths = await store.keep(files.map(f => f.disk.file))
    return { ok: true, kept: paths, inputBytes, archiveBytes: reader.offset, seconds: (Date.now() - started) / 1000 }
  }).catch(async (err: unknown): Promise<LiveOutcome> => {
    const error = err instanceof VmapipeError ? err : ioError(err, `reading ${name}`)
    // What reached the sink before the failure is written first, and served.
    await sink.settled().catch(() => {})
    for (const f of files) f.disk.fail(error)
    // The files stay open (and readable) through their descriptors; nothing stays under a name.
    await store.discard()
    return { ok: false, error, kept: [], inputBytes, archiveBytes: reader.offset, seconds: (Date.now() - started) / 1000 }
  }).then(result => {
    clearInterval(timer)
    options.progress?.stop()
    options.signal?.removeEventListener('abort', onAbort)
    const fields = { archive: name, inputBytes: result.inputBytes, archiveBytes: result.archiveBytes, seconds: result.seconds }
    if (result.ok) {
      const rate = `${formatBytes(result.inputBytes / Math.max(result.seconds, 0.001))}/s`
      log?.info({ ...fields, kept: result.kept }, result.kept.length > 0
        ? `${name}: pass complete (${rate}), disks restored into ${options.keepDir}`
        : `${name}: pass complete (${rate}), every cluster is served from the cache`)
    } else if (result.error?.code === 'E_INTERRUPTED') {
      log?.info(fields, `${name}: the pass was stopped before the end of the archive`)
    } else {
      const { code, offset, device, cluster } = result.error as VmapipeError
      log?.error({ ...fields, code, offset, device, cluster }, `${name}: the pass stopped: ${result.error?.message}; ` +
        'what it passed is still served, reads of the rest fail' + (options.keepDir !== undefined ? `; nothing is kept in ${options.keepDir}` : ''))
    }
    return result
  })

  const disks = files.map(f => f.disk).filter(d => d.device.name !== VMSTATE_NAME)
  let closing: Promise<void> | undefined
  const close = async (): Promise<void> => {
    closing ??= (async () => {
      onAbort()
      await outcome
      await closeFiles()
      await store.discard()
    })()
    await closing
  }
  let users = disks.length
  for (const d of disks) {
    let released = false
    d.close = async () => {
      if (released) return
      released = true
      if (--users === 0) await close()
    }
  }
  return { info, disks, outcome, close }
}

/** Where the cache files live, and what becomes of them. */
interface Store {
  /** For the log: the cache or the keep directory. */
  where: Record<string, string>
  /** Creates a cache file per device (sized, sparse) once the header is known. */
  create: (info: ArchiveInfo) => Promise<Array<{ disk: CacheDisk, name: string }>>
  /** The pass is complete: sync and name the files; returns their final paths (none without keepDir). */
  keep: (files: Array<{ sync: () => Promise<void> }>) => Promise<string[]>
  /** Removes whatever is left under a name; may be called more than once. */
  discard: () => Promise<void>
}

async function openStore (options: LiveOptions): Promise<Store> {
  const keepDir = options.keepDir
  if (keepDir === undefined) return await cacheStore(options.cacheDir ?? tmpdir())
  const { created } = await prepareTarget(keepDir, false)
  const staging = await mkdtemp(join(keepDir, stagingPrefix(created))).catch(async err => {
    if (created) await rmdir(keepDir).catch(() => {})
    throw ioError(err, `cannot write in ${keepDir}`)
  })
  let names: string[] = []
  let done = false
  return {
    where: { keep: keepDir },
    create: async info => {
      const outputs = info.devices.map(device => ({ device, output: diskOutput(device) }))
      checkClashes(info, outputs.flatMap(d => d.output.names))
      checkFileNames(info, outputs)
      for (const c of info.configs) {
        await writeFile(join(staging, c.name), c.data, { flag: 'wx', mode: 0o644 }).catch(err => { throw ioError(err, `cannot write ${c.name}`) })
      }
      names = [...info.configs.map(c => c.name), ...outputs.map(d => d.output.names[0])]
      return await cacheFiles(outputs.map(({ device, output }) => ({ device, dir: staging, name: output.names[0], mode: 0o644 })))
    },
    keep: async files => {
      try {
        for (const f of files) await f.sync()
        for (const name of names) await rename(join(staging, name), join(keepDir, name))
        await rmdir(staging)
        await syncPath(keepDir)
      } catch (err) {
        throw ioError(err, `moving the restored disks into ${keepDir}`)
      }
      done = true
      return names.map(n => join(keepDir, n))
    },
    discard: async () => {
      if (done) return
      await rm(staging, { recursive: true, force: true }).catch(() => {})
      if (created) await rmdir(keepDir).catch(() => {})
    },
  }
}

/** A private directory for the files while they are created; they are unlinked at once, and it is removed. */
async function cacheStore (dir: string): Promise<Store> {
  const where = await mkdtemp(join(dir, CACHE_PREFIX)).catch(err => { throw ioError(err, `cannot create a cache directory in ${dir}`) })
  const discard = async (): Promise<void> => { await rm(where, { recursive: true, force: true }).catch(() => {}) }
  return {
    where: { cache: dir },
    create: async info => {
      // vmstate is not served, and nothing is kept: it is read and checked, not stored.
      const devices = info.devices.filter(d => d.name !== VMSTATE_NAME)
      const files = await cacheFiles(devices.map(device => ({ device, dir: where, name: `dev-${device.id}`, mode: 0o600 })))
      for (const f of files) await unlink(join(where, f.name)).catch(err => { throw ioError(err, `removing the cache file ${f.name}`) })
      await discard()
      return files
    },
    keep: async () => [],
    discard,
  }
}

/** Creates the files; if one cannot be, those that were are closed again (the caller removes the directory). */
async function cacheFiles (wanted: Array<{ device: DeviceInfo, dir: string, name: string, mode: number }>): Promise<Array<{ disk: CacheDisk, name: string }>> {
  const made = await Promise.allSettled(wanted.map(async w => await cacheFile(w.dir, w.name, w.device, w.mode)))
  const failed = made.find((m): m is PromiseRejectedResult => m.status === 'rejected')
  const files = made.flatMap(m => m.status === 'fulfilled' ? [m.value] : [])
  if (failed === undefined) return files
  await Promise.allSettled(files.map(async f => await f.disk.file.close()))
  throw failed.reason
}

async function cacheFile (dir: string, name: string, device: DeviceInfo, mode: number): Promise<{ disk: CacheDisk, name: string }> {
  const path = join(dir, name)
  const file = await open(path, 'wx+', mode).catch(err => { throw ioError(err, `cannot create ${path}`) })
  try {
    await file.truncate(device.size)
  } catch (err) {
    await file.close().catch(() => {})
    throw ioError(err, `cannot size ${path}`)
  }
  return { disk: new CacheDisk(device, file, path), name }
}

/**
 * Items the sink takes at once: their writes go out together. Each record pins its 1 MiB slab until written, so the
 * queue (two batches) sets how many slabs the pass keeps: 64 made the decompressor find none free and take fresh ones,
 * 14 MiB of buffers and 81 MiB peak for `vma serve` of a zstd archive; 16 (1 MiB writes) keep 8 slabs, 74 MiB, as fast.
 */
const BATCH = 16

/**
 * The end of the pass: the header opens the cache files; each batch of
 * records is written (adjacent runs of a file merged into one writev) and
 * only then marked as passed, so that a read never sees a block not yet
 * written. Records wait in a queue of its own (at most two batches), which
 * is written out even when the pipeline is torn down by a failure upstream:
 * what reached the sink before a damaged spot is served.
 */
class LiveSink extends Writable {
  private readonly byId = new Map<number, CacheDisk>()
  private readonly queue: StreamItem[] = []
  private draining?: Promise<void>
  private failure?: Error
  /** The callback of the write that waits for room in the queue. */
  private waiting?: () => void

  constructor (private readonly start: (info: ArchiveInfo) => Promise<void>, private readonly files: Array<{ disk: CacheDisk }>) {
    super({ objectMode: true, highWaterMark: 1 })
  }

  override _write (item: StreamItem, _enc: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.failure !== undefined) { callback(this.failure); return }
    this.queue.push(item)
    this.drain()
    if (this.queue.length < BATCH) callback()
    else this.waiting = () => callback(this.failure ?? null)
  }

  override _final (callback: (err?: Error | null) => void): void {
    this.settled().then(() => callback(), callback)
  }

  /** Resolves once everything queued is written, also after the pipeline was torn down; rejects if a write failed. */
  async settled (): Promise<void> {
    while (this.draining !== undefined) await this.draining
    if (this.failure !== undefined) throw this.failure
  }

  private drain (): void {
    this.draining ??= (async () => {
      try {
        while (this.queue.length > 0 && this.failure === undefined) {
          const items = this.queue.splice(0, BATCH)
          this.release()
          await this.take(items)
        }
      } catch (err) {
        this.failure = err as Error
        this.queue.length = 0
        this.release()
        this.destroy(this.failure)
      } finally {
        this.draining = undefined
      }
    })()
  }

  private release (): void {
    const waiting = this.waiting
    this.waiting = undefined
    waiting?.()
  }

  private async take (items: StreamItem[]): Promise<void> {
    const records: Array<{ disk: CacheDisk, rec: ClusterRecord }> = []
    for (const item of items) {
      if (item.kind === 'archive') {
        await this.start(item)
        for (const f of this.files) this.byId.set(f.disk.device.id, f.disk)
        continue
      }
      const disk = this.byId.get(item.device)
      if (disk !== undefined) records.push({ disk, rec: item })
      else giveBack(item.data)
    }
    await Promise.all(mergedWrites(records).map(async w => await writeAll(w.disk, w.buffers, w.position)))
    // The data is in the file now: its slabs go round again (io/slabs.ts) instead of being garbage at the speed of the pass.
    for (const { disk, rec } of records) {
      giveBack(rec.data)
      disk.passed(rec.cluster, rec.mask)
    }
  }
}

interface Write { disk: CacheDisk, position: number, length: number, buffers: Buffer[] }

/** The records' data runs, those that follow each other in one file joined (a device read in order becomes few large writes). */
function mergedWrites (records: Array<{ disk: CacheDisk, rec: ClusterRecord }>): Write[] {
  const out: Write[] = []
  const last = new Map<CacheDisk, Write>()
  for (const { disk, rec } of records) {
    for (const { position, bytes } of disk.pieces(rec)) {
      const w = last.get(disk)
      if (w !== undefined && w.position + w.length === position) {
        w.buffers.push(bytes)
        w.length += bytes.length
        continue
      }
      const fresh = { disk, position, length: bytes.length, buffers: [bytes] }
      out.push(fresh)
      last.set(disk, fresh)
    }
  }
  return out
}

async function writeAll (disk: CacheDisk, buffers: Buffer[], position: number): Promise<void> {
  let rest = buffers
  let at = position
  while (rest.length > 0) {
    const { bytesWritten } = await disk.file.writev(rest, at).catch(err => { throw ioError(err, `writing the cache of ${disk.device.name}`) })
    if (bytesWritten === 0) throw new VmapipeError('E_IO', `writing the cache of ${disk.device.name}: the write made no progress`)
    at += bytesWritten
    let skip = bytesWritten
    while (rest.length > 0 && skip >= rest[0].length) { skip -= rest[0].length; rest = rest.slice(1) }
    if (skip > 0) rest = [rest[0].subarray(skip), ...rest.slice(1)]
  }
}

function progressFields (inputBytes: number, archiveBytes: number, total: number | undefined, started: number): Record<string, unknown> {
  const seconds = (Date.now() - started) / 1000
  const rate = seconds > 0 ? inputBytes / seconds : 0
  return {
    inputBytes,
    archiveBytes,
    bytesPerSecond: Math.round(rate),
    ...(total !== undefined ? { totalBytes: total, etaSeconds: rate > 0 ? Math.round((total - inputBytes) / rate) : undefined } : {}),
  }
}

function progressLine (name: string, inputBytes: number, total: number | undefined, started: number): string {
  const seconds = (Date.now() - started) / 1000
  const rate = seconds > 0 ? inputBytes / seconds : 0
  if (total === undefined || total === 0) return `${name}: pass at ${formatBytes(inputBytes)}, ${formatBytes(rate)}/s`
  const eta = rate > 0 ? `${Math.round((total - inputBytes) / rate)} s` : 'unknown'
  return `${name}: pass at ${formatBytes(inputBytes)} of ${formatBytes(total)} (${Math.floor(inputBytes / total * 100)}%), ${formatBytes(rate)}/s, ETA ${eta}`
}
