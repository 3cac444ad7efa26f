/**
 * Extraction: an archive's disks and config blobs into a new directory, or one
 * disk to a stream. Files are written in a hidden staging directory inside the
 * target and renamed to their final names only when every one is complete.
 */
import { createReadStream } from 'node:fs'
import { mkdir, mkdtemp, readdir, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Readable, Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import type { ArchiveInfo, DeviceInfo, DiskOutput, DiskWriter, ProgressSink } from '../contracts.js'
import { DeviceRouter } from './router.js'
import { RawStreamWriter } from '../raw/writer.js'
import { NbdDiskWriter, type NbdWriteStats } from '../nbd/writer.js'
import type { NbdAddress } from '../nbd/client.js'
import { type OutputOptions, canCopy, copiesByPosition, diskOutput } from './targets.js'
import { WriteQueue } from '../io/write-queue.js'
import { ownerOf, ownerState, ownerTag, syncPath } from '../io/output.js'
import { drained } from '../io/drained.js'
import { createDecompressor } from '../io/compression.js'
import { type ReadOptions, disksOf, findDevices, openSeekable, runRecordPipeline } from './archive.js'
import { VmaReader } from '../vma/stream.js'
import { type ArchiveIndex, type ArchiveWalk, type IndexedDisk, indexArchive, openArchiveIndex, walkArchive } from '../vma/archive-index.js'
import { untouchedFilePath } from '../io/input.js'
import type { PositionalReader } from '../io/pread.js'
import { writeQcow2Stream } from '../qcow2/writer.js'

export interface ExtractOptions extends ReadOptions {
  /** Only these devices (names, `scsi0` short for `drive-scsi0`); default all. */
  devices?: string[]
}

export interface ExtractToDirOptions extends ExtractOptions, OutputOptions {
  /** Allow an existing, empty target directory. */
  force?: boolean
}

export interface ExtractResult {
  info: ArchiveInfo
  /** Final paths written. */
  files: string[]
  /** Bytes of the decompressed archive read. */
  archiveBytes: number
}

export async function extractToDirectory (
  input: Readable, targetDir: string, options: ExtractToDirOptions = {}
): Promise<ExtractResult & { removedStale: string[] }> {
  const { created, removedStale } = await prepareTarget(targetDir, options.force ?? false)
  let staging: string | undefined
  try {
    staging = await mkdtemp(join(targetDir, stagingPrefix(created))).catch(err => { throw ioError(err, `cannot write in ${targetDir}`) })
    const stagingDir = staging
    const names: string[] = []
    const queue = new WriteQueue({ sync: true })
    const select = options.devices === undefined ? undefined : (devices: DeviceInfo[]) => findDevices(devices, options.devices as string[])
    /** Checks the names of what `selected` becomes (before any extent is read, as the streaming reader's order has it). */
    const plan = (info: ArchiveInfo, selected: DeviceInfo[]): Array<{ device: DeviceInfo, output: DiskOutput }> => {
      const disks = selected.map(device => ({ device, output: diskOutput(device, options) }))
      checkClashes(info, disks.flatMap(d => d.output.names))
      checkFileNames(info, disks)
      names.push(...info.configs.map(c => c.name), ...disks.flatMap(d => d.output.names))
      return disks
    }
    /** Writes the config files and creates each disk's writer, handing each to `add` at once (so that a failure aborts it). */
    const create = async (info: ArchiveInfo, disks: Array<{ device: DeviceInfo, output: DiskOutput }>, add: (device: number, w: DiskWriter) => void) => {
      for (const c of info.configs) {
        await writeFile(join(stagingDir, c.name), c.data, { flag: 'wx', mode: 0o644 }).catch(err => { throw ioError(err, `cannot write ${c.name}`) })
      }
      for (const d of disks) add(d.device.id, await d.output.create(stagingDir, queue))
    }
    // Raw files and images from an uncompressed archive file are copied by position, in large pieces; anything else takes the records.
    const file = copiesByPosition(options) ? await openUntouched(input) : undefined
    let done: { info: ArchiveInfo, archiveBytes: number }
    if (file !== undefined) {
      done = await copyToDirectory(file, select, plan, create, options)
    } else {
      const decompress = createDecompressor()
      const reader = new VmaReader(select === undefined ? {} : { select })
      const router = new DeviceRouter(async (info, add) => { await create(info, plan(info, reader.selected), add) })
      await runRecordPipeline(input, decompress, reader, router, options)
      done = { info: reader.info as ArchiveInfo, archiveBytes: reader.offset }
    }
    for (const name of names) {
      await rename(join(stagingDir, name), join(targetDir, name)).catch(err => { throw ioError(err, `cannot rename ${name} into place`) })
    }
    await rmdir(stagingDir)
    await syncPath(targetDir)
    return { info: done.info, files: names.map(n => join(targetDir, n)), archiveBytes: done.archiveBytes, removedStale }
  } catch (err) {
    if (staging !== undefined) await rm(staging, { recursive: true, force: true }).catch(() => {})
    if (created) await rmdir(targetDir).catch(() => {})
    throw err
  }
}

/**
 * The archive file behind `input` opened for positional reads, `input`
 * destroyed; undefined (input left alone) when it is not an uncompressed
 * archive file read from its start.
 */
async function openUntouched (input: Readable, path = untouchedFilePath(input)): Promise<PositionalReader | undefined> {
  const file = path === undefined ? undefined : await openSeekable(path)
  if (file !== undefined) input.destroy()
  return file
}

/**
 * The devices of a file's archive, checked as the streaming reader checks
 * them (walkArchive: the same errors in the same order, `chosen` called when
 * the header is read), then indexed. Closes the file if it fails.
 */
async function indexChecked (file: PositionalReader, options: ExtractOptions, chosen: (info: ArchiveInfo) => DeviceInfo[]): Promise<ArchiveIndex> {
  try {
    const walk: ArchiveWalk = { devices: [], extents: 0, offset: 0 }
    const signal = options.signal !== undefined ? { signal: options.signal } : {}
    await walkArchive(file, walk, { select: () => chosen(walk.info as ArchiveInfo), ...signal })
    const ids = new Set((walk.selected ?? []).map(d => d.id))
    return await indexArchive(file, { select: devices => devices.filter(d => ids.has(d.id)), ...signal })
  } catch (err) {
    await file.close()
    throw err
  }
}

/**
 * The devices `choose` picks from an archive file, each copied by position
 * (its writer's copyFrom) and finished; the writers not finished are aborted
 * on failure. `open` creates the writers, handing each to `add` at once.
 */
async function copyByPosition (
  file: PositionalReader,
  options: ExtractOptions,
  choose: (info: ArchiveInfo) => DeviceInfo[],
  open: (info: ArchiveInfo, add: (device: number, w: DiskWriter) => void) => Promise<void>
): Promise<{ info: ArchiveInfo, archiveBytes: number }> {
  let chosen: DeviceInfo[] = []
  const index = await indexChecked(file, options, info => {
    chosen = choose(info)
    return chosen
  })
  const writers: Array<{ device: DeviceInfo, writer: DiskWriter }> = []
  const finished = new Set<DiskWriter>()
  try {
    await open(index.info, (id, writer) => { writers.push({ device: chosen.find(d => d.id === id) as DeviceInfo, writer }) })
    // Progress counts archive bytes, as the streaming path does: the data as it is copied, the headers at the end.
    let counted = 0
    const progress: ProgressSink = { add: n => { counted += n; options.progress?.add(n) } }
    for (const { device, writer } of writers) {
      if (!canCopy(writer)) throw new Error(`the writer of ${device.name} cannot copy by position`)
      const disk = index.disk(device)
      try {
        await writer.copyFrom(disk, progress, options.signal)
      } finally {
        await disk.close()
      }
      await writer.finish()
      finished.add(writer)
    }
    options.progress?.add(Math.max(0, file.size - counted))
  } catch (err) {
    await Promise.allSettled(writers.filter(w => !finished.has(w.writer)).map(async w => { await w.writer.abort() }))
    throw err
  } finally {
    await index.close()
  }
  return { info: index.info, archiveBytes: file.size }
}

/** extractToDirectory from an archive file in raw, qcow2 or Parallels: each disk's data copied by position. */
async function copyToDirectory (
  file: PositionalReader,
  select: ((devices: DeviceInfo[]) => DeviceInfo[]) | undefined,
  plan: (info: ArchiveInfo, selected: DeviceInfo[]) => Array<{ device: DeviceInfo, output: DiskOutput }>,
  create: (info: ArchiveInfo, disks: Array<{ device: DeviceInfo, output: DiskOutput }>, add: (device: number, w: DiskWriter) => void) => Promise<void>,
  options: ExtractToDirOptions
): Promise<{ info: ArchiveInfo, archiveBytes: number }> {
  let disks: Array<{ device: DeviceInfo, output: DiskOutput }> = []
  return await copyByPosition(file, options, info => {
    const selected = select?.(info.devices) ?? info.devices
    disks = plan(info, selected)
    return selected
  }, async (info, add) => { await create(info, disks, add) })
}

export interface ExtractToStreamOptions extends ExtractOptions, Omit<OutputOptions, 'dataFile'> {
  /**
   * The archive's path, or an opener of a reader by position (an object in a store), when it has one: an uncompressed
   * archive lets qcow2 go out tables first, without a temporary copy.
   */
  archivePath?: string | (() => Promise<PositionalReader>)
  /** Where early clusters (raw) or the image being built wait (default the temporary directory). */
  tmpDir?: string
  /** raw: bytes of early clusters kept in memory before they spill. */
  memoryLimit?: number
}

/**
 * Writes one disk (the only one, or the one named) to `output` front to back.
 * Raw goes out as the clusters come, early ones parked in a spill buffer; an
 * image format needs its tables first, so it is built in a temporary
 * directory and copied out when complete.
 */
export async function extractToStream (
  input: Readable, output: Writable, options: ExtractToStreamOptions = {}
): Promise<ExtractResult & { device: DeviceInfo, spilledBytes: number }> {
  const format = options.format ?? 'raw'
  // An object in a store streams: one GET costs less than a ranged request per run.
  const path = typeof options.archivePath === 'string' ? options.archivePath : untouchedFilePath(input)
  const file = format === 'raw' ? await openUntouched(input, path) : undefined
  if (file !== undefined) {
    let device: DeviceInfo | undefined
    const index = await indexChecked(file, options, info => {
      device = pickOneDisk(info.devices, options.devices, 'stdout')
      return [device]
    })
    const disk = index.disk(device as DeviceInfo)
    try {
      await writeDiskTo(disk, output, file.size, options)
    } finally {
      await disk.close()
      await index.close()
    }
    return { info: index.info, files: [], archiveBytes: file.size, device: device as DeviceInfo, spilledBytes: 0 }
  }
  if (format === 'raw') {
    let writer: RawStreamWriter | undefined
    const result = await extractOneDisk(input, options, 'stdout', async device => {
      writer = new RawStreamWriter(output, device, {
        ...(options.tmpDir !== undefined ? { tmpDir: options.tmpDir } : {}),
        ...(options.memoryLimit !== undefined ? { memoryLimit: options.memoryLimit } : {}),
      })
      return writer
    })
    return { ...result, spilledBytes: writer?.spilledBytes ?? 0 }
  }
  if (format === 'qcow2' && options.archivePath !== undefined) {
    const streamed = await qcow2FromIndex(options.archivePath, output, options)
    if (streamed !== undefined) {
      input.destroy()
      return streamed
    }
  }
  const tmp = options.tmpDir ?? tmpdir()
  // A killed run's image would stay there for good: its owner is in the name, so the next run clears it.
  for (const name of await readdir(tmp).catch(() => [] as string[])) {
    if (name.startsWith(IMAGE_TMP) && ownerState(name) === 'dead') await rm(join(tmp, name), { recursive: true, force: true }).catch(() => {})
  }
  const dir = await mkdtemp(join(tmp, `${IMAGE_TMP}${ownerTag}-`)).catch(err => { throw ioError(err, 'cannot create a temporary directory') })
  try {
    let image = ''
    const result = await extractOneDisk(input, options, 'stdout', async device => {
      const out = diskOutput(device, { format, ...(options.clusterSize !== undefined ? { clusterSize: options.clusterSize } : {}) })
      image = join(dir, out.names[0])
      return await out.create(dir, new WriteQueue())
    })
    return { ...result, spilledBytes: await copyFileTo(image, output) }
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** Where an image for a stream is built: named with its owner (ownerTag). */
const IMAGE_TMP = 'vmapipe-image-partial-'

/**
 * qcow2 straight to a stream from an uncompressed archive file: an index of
 * its extent headers says where every cluster is, so the tables go out first
 * and the data follows in order, with no temporary copy. Undefined when the
 * archive cannot be indexed (compressed, a pipe): then it is built aside.
 */
async function qcow2FromIndex (
  path: string | (() => Promise<PositionalReader>), output: Writable, options: ExtractOptions
): Promise<(ExtractResult & { device: DeviceInfo, spilledBytes: number }) | undefined> {
  let index: ArchiveIndex
  try {
    index = await openArchiveIndex(typeof path === 'string' ? path : await path())
  } catch (err) {
    if (err instanceof VmapipeError && err.code === 'E_NOT_SEEKABLE') return undefined
    throw err
  }
  const device = pickOneDisk(index.info.devices, options.devices, 'stdout')
  const disk = index.disk(device)
  try {
    await writeQcow2Stream(disk, output)
  } finally {
    await disk.close()
    await index.close()
  }
  return { info: index.info, files: [], archiveBytes: 0, device, spilledBytes: 0 }
}

/** writeDiskTo's pieces, and how many may be on their way out at once. */
const STREAM_CHUNK = 1 << 20
const STREAM_BUFFERS = 2

/**
 * Writes all of `disk`, zeros included, front to back to a stream that may
 * never report 'finish' (stdout): read by position in pieces of STREAM_CHUNK
 * into reused buffers, a buffer read again once the stream has taken it
 * (the event loop runs while the stream takes the other).
 * Reports `archiveBytes` to `progress` in step; stops with E_INTERRUPTED when `signal` is aborted.
 */
async function writeDiskTo (disk: IndexedDisk, output: Writable, archiveBytes: number, options: Pick<ReadOptions, 'progress' | 'signal'>): Promise<void> {
  const free: Buffer[] = Array.from({ length: STREAM_BUFFERS }, () => Buffer.allocUnsafeSlow(STREAM_CHUNK))
  let failure: Error | undefined
  let wake = (): void => {}
  const waitForBuffer = async (): Promise<void> => { await new Promise<void>(resolve => { wake = resolve }) }
  const onError = (err: Error): void => { failure ??= err; wake() }
  output.on('error', onError)
  let reported = 0
  try {
    for (let at = 0; at < disk.size && failure === undefined;) {
      while (free.length === 0 && failure === undefined) await waitForBuffer()
      if (failure !== undefined) break
      const buf = free.pop() as Buffer
      const n = Math.min(STREAM_CHUNK, disk.size - at)
      // From the page cache, a synchronous read costs less than a thread-pool round trip per run of stored blocks.
      disk.readSync(buf.subarray(0, n), at)
      at += n
      output.write(buf.subarray(0, n), err => {
        if (err !== null && err !== undefined) failure ??= err
        free.push(buf)
        wake()
      })
      const due = Math.round(archiveBytes * at / disk.size)
      options.progress?.add(due - reported)
      reported = due
      // A turn of the event loop (signals, timers) per piece, even where the stream takes them at once.
      await new Promise(resolve => setImmediate(resolve))
      if (options.signal?.aborted === true) throw new VmapipeError('E_INTERRUPTED', 'interrupted')
    }
    while (free.length < STREAM_BUFFERS && failure === undefined) await waitForBuffer()
  } finally {
    // A stream that failed may still emit its error: the listener stays, so that it is not an uncaught one.
    if (failure === undefined) output.off('error', onError)
  }
  if (failure !== undefined) throw ioError(failure, 'writing the output stream')
}

/** Copies a file to a stream that may never report 'finish' (stdout); returns the bytes copied. */
async function copyFileTo (path: string, output: Writable): Promise<number> {
  let failure: Error | undefined
  const onError = (err: Error): void => { failure = err }
  output.on('error', onError)
  let bytes = 0
  try {
    for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) {
      bytes += (chunk as Buffer).length
      if (!output.write(chunk)) await drained(output)
      if (failure !== undefined) break
    }
  } finally {
    output.off('error', onError)
  }
  if (failure !== undefined) throw ioError(failure, 'writing the output stream')
  return bytes
}

/**
 * Restores one disk (the only one, or the one named) into a writable NBD
 * export at least as large: data written, zero blocks zeroed.
 */
export async function extractToNbd (
  input: Readable, target: NbdAddress | string, options: ExtractOptions & { nbdTimeout?: number } = {}
): Promise<ExtractResult & { device: DeviceInfo, written: NbdWriteStats }> {
  let writer: NbdDiskWriter | undefined
  const open = async (device: DeviceInfo): Promise<NbdDiskWriter> => {
    writer = await NbdDiskWriter.open(target, device, options.nbdTimeout !== undefined ? { timeout: options.nbdTimeout } : {})
    return writer
  }
  // An uncompressed archive file is copied by position, as into a directory: no records and no slabs.
  const file = await openUntouched(input)
  const result = file !== undefined
    ? await copyOneDisk(file, options, 'an NBD export', open)
    : await extractOneDisk(input, options, 'an NBD export', open)
  return { ...result, written: (writer as NbdDiskWriter).stats }
}

/** extractOneDisk from an archive file, the disk's data copied by position. */
async function copyOneDisk (
  file: PositionalReader, options: ExtractOptions, destination: string, open: (device: DeviceInfo) => Promise<DiskWriter>
): Promise<ExtractResult & { device: DeviceInfo }> {
  let device: DeviceInfo | undefined
  const choose = (info: ArchiveInfo): DeviceInfo[] => {
    device = pickOneDisk(info.devices, options.devices, destination)
    return [device]
  }
  const done = await copyByPosition(file, options, choose, async (_info, add) => {
    const chosen = device as DeviceInfo
    add(chosen.id, await open(chosen))
  })
  return { ...done, files: [], device: device as DeviceInfo }
}

async function extractOneDisk (
  input: Readable, options: ExtractOptions, destination: string, open: (device: DeviceInfo) => Promise<DiskWriter>
): Promise<ExtractResult & { device: DeviceInfo }> {
  const decompress = createDecompressor()
  const reader = new VmaReader({ select: devices => [pickOneDisk(devices, options.devices, destination)] })
  const router = new DeviceRouter(async (_info, add) => {
    const device = reader.selected[0]
    add(device.id, await open(device))
  })
  await runRecordPipeline(input, decompress, reader, router, options)
  return { info: reader.info as ArchiveInfo, files: [], archiveBytes: reader.offset, device: reader.selected[0] }
}

function pickOneDisk (devices: DeviceInfo[], names: string[] | undefined, destination: string): DeviceInfo {
  const chosen = names === undefined ? disksOf(devices) : findDevices(devices, names)
  if (chosen.length !== 1) {
    throw new VmapipeError('E_OPTION', names === undefined
      ? `the archive holds ${chosen.length} disks (${chosen.map(d => d.name).join(', ')}); name one in the devices option to write it to ${destination}`
      : `only one device can be written to ${destination}`, { option: 'devices' })
  }
  return chosen[0]
}

/** Config blobs must not take a disk's name; all names were checked safe by the reader. */
export function checkClashes (info: ArchiveInfo, diskNames: string[]): void {
  const taken = new Set(diskNames)
  for (const c of info.configs) {
    if (taken.has(c.name)) throw new VmapipeError('E_NAME_CLASH', `config blob ${c.name} has the name of a disk file`)
  }
}

/** What a file name holds, in bytes (NAME_MAX). */
const NAME_MAX = 255

/**
 * Refuses, before anything is written, an archive whose names do not fit in
 * a file name (written by a tool that does not limit them, as Proxmox's own
 * vma create does not); one disk can still go to stdout.
 */
export function checkFileNames (info: ArchiveInfo, disks: Array<{ device: DeviceInfo, output: { names: string[] } }>): void {
  const tooLong = (name: string): boolean => Buffer.byteLength(name) > NAME_MAX
  for (const { device, output } of disks) {
    const name = output.names.find(tooLong)
    if (name !== undefined) {
      throw new VmapipeError('E_LIMIT',
        `device ${device.name} would be written as a file name of ${Buffer.byteLength(name)} bytes, more than a file name holds (${NAME_MAX}); ` +
        `write it to stdout with -d ${device.name}`, { device: device.name })
    }
  }
  const config = info.configs.find(c => tooLong(c.name))
  if (config !== undefined) {
    const bytes = Buffer.byteLength(config.name)
    throw new VmapipeError('E_LIMIT',
      `config blob ${config.name} has a name of ${bytes} bytes, more than a file name holds (${NAME_MAX}); read it with vma config`)
  }
}

const STAGING = '.vmapipe-partial-'

/**
 * The staging directory's name: it names its owner (ownerTag) so that a later
 * run can tell a dead run's staging from a live one's, and whether that run
 * created the target ('n', new) or was let into an existing one ('e').
 */
export function stagingPrefix (created: boolean): string {
  return `${STAGING}${ownerTag}-${created ? 'n' : 'e'}`
}

/**
 * Creates the target, or with `force` accepts an existing empty directory.
 * Staging directories that dead runs left in it (SIGKILL, a power cut) are
 * removed first, by any run; a target that such a run created and left with
 * nothing else in it counts as not there. A live run's staging is never
 * touched; one whose owner cannot be told (an older version's) only with
 * `force`. Returns whether the target is this run's to remove on failure,
 * and the stale staging removed.
 */
export async function prepareTarget (dir: string, force: boolean): Promise<{ created: boolean, removedStale: string[] }> {
  try {
    await mkdir(dir)
    return { created: true, removedStale: [] }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(err, `cannot create ${dir}`)
  }
  const st = await stat(dir).catch(err => { throw ioError(err, `cannot open ${dir}`) })
  if (!st.isDirectory()) throw new VmapipeError('E_TARGET_EXISTS', `${dir} exists already and is not a directory`)
  const entries = await readdir(dir).catch(err => { throw ioError(err, `cannot read ${dir}`) })
  const removedStale: string[] = []
  let deadRunCreated = false
  for (const name of entries.filter(e => e.startsWith(STAGING))) {
    const state = ownerState(name)
    const owner = ownerOf(name)
    if (state === 'live') throw new VmapipeError('E_TARGET_EXISTS', `${dir} is being extracted into by pid ${owner?.pid} right now (${name}); it is left alone`)
    if (state === 'foreign') {
      throw new VmapipeError('E_TARGET_EXISTS', `${dir} holds ${name}, the staging of an extract on another host; remove it if that run is gone`)
    }
    if (state === 'unknown' && !force) {
      throw new VmapipeError('E_TARGET_EXISTS', `${dir} holds ${name}, the staging of an extract whose owner cannot be told (an older version); ` +
        'set force to remove it if no extract is running there', { option: 'force' })
    }
    await rm(join(dir, name), { recursive: true, force: true }).catch(err => { throw ioError(err, `cannot remove the stale staging ${join(dir, name)}`) })
    removedStale.push(name)
    deadRunCreated ||= owner !== undefined && /-n[^-]*$/.test(name)
  }
  const removed = removedStale.length === 0 ? '' : `; removed ${removedStale.join(', ')}, left by an extract that is gone`
  const rest = entries.filter(e => !e.startsWith(STAGING))
  if (rest.length === 0 && deadRunCreated) return { created: true, removedStale }
  if (!force) {
    throw new VmapipeError('E_TARGET_EXISTS', `${dir} exists already (set force to extract into an existing empty directory)${removed}`,
      { option: 'force' })
  }
  if (rest.length > 0) throw new VmapipeError('E_TARGET_EXISTS', `${dir} is not an empty directory${removed}`)
  return { created: false, removedStale }
}
