/**
 * An output file that appears under its final name only when complete: bytes
 * go to a temporary file beside it, which is synced and given the name on
 * commit (never over a file that appeared meanwhile, unless forced) and
 * removed on abort; the temporary files of runs that died (SIGKILL, a power
 * cut) beside it are removed on the next opening. `-` is stdout.
 */
import { WriteStream, fstatSync, readFileSync } from 'node:fs'
import { link, open, readdir, rename, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { createHash, randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import { finished } from 'node:stream/promises'
import { Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import { giveBack } from './slabs.js'

export interface Output {
  stream: Writable
  /** The descriptor behind `stream`, for programs that write there themselves. */
  fd: number
  name: string
  /**
   * Where `fd`'s offset stands when it is a regular file that may be written
   * directly, front to back and by position (not opened to append): a writer
   * that does so only ends `stream`.
   */
  fileOffset?: number
  /** The temporary file being written, until commit (absent for stdout). */
  partial?: string
  /** After the stream has finished: sync and give the file its name. */
  commit: () => Promise<void>
  /** Remove what was written. */
  abort: () => Promise<void>
  /** Temporary files beside the output that dead runs had left, removed on opening it. */
  removedStale: string[]
}

const PARTIAL_MARK = '.partial-'

/**
 * Who wrote a temporary file: a process on a host. The pid alone would name
 * a stranger once it is reused, so its start time (clock ticks after boot,
 * /proc/PID/stat) goes with it; the host is a hash, for targets that several
 * hosts share (NFS).
 */
interface Owner { pid: number, start: number, host: string }

/** A process's start time, or undefined when it is not running (or /proc cannot tell). */
function startOf (pid: number | 'self'): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    // The command name (field 2, in parentheses) may hold spaces; field 22 counts from after it.
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19])
  } catch {
    return undefined
  }
}

function running (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** This process. */
export const ME: Owner = { pid: process.pid, start: startOf('self') ?? 0, host: createHash('sha256').update(hostname()).digest('hex').slice(0, 8) }

/** This process, as it is written into the names of its temporary files: `PID-START-HOST`. */
export const ownerTag = `${ME.pid}-${ME.start}-${ME.host}`

/** The owner written into a temporary name by ownerTag, if there is one (names from older versions have none). */
export function ownerOf (name: string): Owner | undefined {
  const m = /partial-(\d+)-(\d+)-([0-9a-f]{8})-[0-9A-Za-z]+$/.exec(name)
  return m === null ? undefined : { pid: Number(m[1]), start: Number(m[2]), host: m[3] }
}

/**
 * Whether the run that owns a temporary file is gone, so that the file is a
 * leftover anyone may remove: 'dead' (this host, and its pid is not running
 * or is running another program since), 'live', 'foreign' (another host:
 * its processes cannot be seen from here) or 'unknown' (no owner in the name).
 */
export function ownerState (name: string): 'dead' | 'live' | 'foreign' | 'unknown' {
  const owner = ownerOf(name)
  if (owner === undefined) return 'unknown'
  if (owner.host !== ME.host) return 'foreign'
  return processRuns(owner.pid, owner.start) ? 'live' : 'dead'
}

/** Whether process `pid` of this host, started at `start` (0: not known), is running; a pid reused by another program is not. */
export function processRuns (pid: number, start: number): boolean {
  if (pid === ME.pid) return start === ME.start || start === 0
  if (!running(pid)) return false
  const now = startOf(pid)
  // Without /proc the pid is all there is to go by; with it, a different start time is a reused pid.
  return now === undefined || start === 0 || now === start
}

/** The prefix of the temporary names used beside `name`. */
function partialPrefix (name: string): string {
  return `.${name}${PARTIAL_MARK}`
}

/** A fresh temporary name beside `path`, for a file that gets `path` only when complete; it names its owner (ownerTag). */
export function partialPath (path: string): string {
  return join(dirname(path), `${partialPrefix(basename(path))}${ownerTag}-${randomBytes(4).toString('hex')}`)
}

/** Whether a file name is one of those temporary names: a leftover, after a crash. */
function isPartialName (name: string): boolean {
  return name.startsWith('.') && name.includes(PARTIAL_MARK)
}

/**
 * Removes the temporary files in `dir` that runs which are gone left behind
 * (SIGKILL, a power cut): those of final names that `belongs` accepts, whose
 * owner is dead. A live run's file is never touched, nor one of another host;
 * one without an owner (an older version's) only when `unowned` says the
 * caller knows no run can be writing it (it holds the lock). Returns the
 * names removed.
 */
export async function removeStalePartials (dir: string, belongs: (finalName: string) => boolean, unowned = false): Promise<string[]> {
  const removed: string[] = []
  for (const file of await readdir(dir).catch(() => [] as string[])) {
    if (!isPartialName(file) || !belongs(file.slice(1, file.lastIndexOf(PARTIAL_MARK)))) continue
    const state = ownerState(file)
    if (state !== 'dead' && !(state === 'unknown' && unowned)) continue
    if (await unlink(join(dir, file)).then(() => true, () => false)) removed.push(file)
  }
  return removed
}

export async function openOutput (path: string, options: { force?: boolean } = {}): Promise<Output> {
  if (path === '-') {
    const fileOffset = regularFileOffset(1)
    return {
      stream: stdoutWritable(),
      fd: 1,
      name: 'stdout',
      ...(fileOffset !== undefined ? { fileOffset } : {}),
      commit: async () => {},
      abort: async () => {},
      removedStale: [],
    }
  }
  const existing = await stat(path).catch(() => undefined)
  // A character device or FIFO (/dev/null, a pipe) is a stream: written in place, never replaced by a file.
  if (existing !== undefined && (existing.isCharacterDevice() || existing.isFIFO())) return await openInPlace(path)
  if (existing !== undefined && options.force !== true) {
    throw new VmapipeError('E_TARGET_EXISTS', `${path} exists already (set force to replace it)`, { option: 'force' })
  }
  if (existing?.isBlockDevice() === true) return await openInPlace(path)
  const removedStale = await removeStalePartials(dirname(path), name => name === basename(path))
  const temp = partialPath(path)
  const handle = await open(temp, 'wx', 0o644).catch(err => { throw ioError(err, `cannot create ${temp}`) })
  const { stream, close } = writeStreamOn(handle)
  const abort = async (): Promise<void> => {
    stream.destroy()
    await close().catch(() => {})
    await unlink(temp).catch(() => {})
  }
  const commit = async (): Promise<void> => {
    try {
      if (!stream.writableFinished) await finished(stream)
      await handle.sync()
      await close()
      await (options.force === true ? rename(temp, path) : linkInPlace(temp, path))
    } catch (err) {
      await abort()
      throw ioError(err, `writing ${path}`)
    }
  }
  return { stream, fd: handle.fd, name: path, fileOffset: 0, partial: temp, commit, abort, removedStale }
}

/**
 * Gives `temp` the name `path` unless something took that name while it was
 * being written (another run): a hard link fails then where a rename would
 * replace it. Where hard links are not to be had, a check and a rename.
 */
async function linkInPlace (temp: string, path: string): Promise<void> {
  const taken = (): VmapipeError => new VmapipeError('E_TARGET_EXISTS', `${path} was created by someone else while this run wrote it (set force to replace it)`,
    { option: 'force' })
  try {
    await link(temp, path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw taken()
    if (await stat(path).then(() => true, () => false)) throw taken()
    await rename(temp, path)
    return
  }
  await unlink(temp)
}

/** fs.WriteStream's constructor, which its typings leave out. */
const FileStream = WriteStream as unknown as new (path: string, options: { fd: number, highWaterMark: number, autoClose: boolean }) => WriteStream
type Callback = (err?: Error | null) => void

/** A file stream that gives each chunk back (io/slabs.ts) once it is written: the archive writer passes records' data on as it is. */
class GivingBackStream extends FileStream {
  override _write (chunk: Buffer, encoding: BufferEncoding, callback: Callback): void {
    super._write(chunk, encoding, err => {
      giveBack(chunk)
      callback(err)
    })
  }

  override _writev (chunks: Array<{ chunk: Buffer, encoding: BufferEncoding }>, callback: Callback): void {
    super._writev?.(chunks, err => {
      for (const { chunk } of chunks) giveBack(chunk)
      callback(err)
    })
  }
}

function writeStreamOn (handle: FileHandle): { stream: WriteStream, close: () => Promise<void> } {
  const stream = new GivingBackStream('', { fd: handle.fd, highWaterMark: 1 << 20, autoClose: false })
  let closed = false
  return {
    stream,
    close: async () => {
      if (closed) return
      closed = true
      await handle.close()
    },
  }
}

/** A device or FIFO: nothing to rename, nothing to remove; a block device is synced. */
async function openInPlace (path: string): Promise<Output> {
  const handle = await open(path, 'w').catch(err => { throw ioError(err, `cannot open ${path}`) })
  const { stream, close } = writeStreamOn(handle)
  return {
    stream,
    fd: handle.fd,
    name: path,
    commit: async () => {
      try {
        if (!stream.writableFinished) await finished(stream)
        // Character devices and FIFOs cannot be synced (EINVAL); that is not a failure.
        await handle.sync().catch((err: NodeJS.ErrnoException) => { if (err.code !== 'EINVAL' && err.code !== 'EROFS') throw err })
        await close()
      } catch (err) {
        stream.destroy()
        await close().catch(() => {})
        throw ioError(err, `writing ${path}`)
      }
    },
    abort: async () => {
      stream.destroy()
      await close().catch(() => {})
    },
    removedStale: [],
  }
}

/**
 * A Writable in front of stdout for pipelines: process.stdout itself never
 * reports 'finish' (it cannot be ended), so pump would wait forever. Each
 * chunk is done when stdout has taken it; errors (EPIPE, ENOSPC) come back.
 */
function stdoutWritable (): Writable {
  const failures: Error[] = []
  const onError = (err: Error): void => { failures.push(err) }
  process.stdout.on('error', onError)
  const settle = (err: Error | null | undefined, callback: (err?: Error | null) => void): void => {
    callback(err ?? failures[0] ?? null)
  }
  return new Writable({
    highWaterMark: 1 << 20,
    writev (chunks, callback) {
      const last = chunks.length - 1
      // Each chunk is given back (io/slabs.ts) once stdout has written it.
      chunks.forEach(({ chunk }, i) => process.stdout.write(chunk as Buffer, err => {
        giveBack(chunk as Buffer)
        if (i === last) settle(err, callback)
      }))
    },
    final (callback) {
      process.stdout.off('error', onError)
      settle(null, callback)
    },
  })
}

const O_APPEND = 0o2000

/**
 * The offset of descriptor `fd` when it is a regular file not opened to
 * append (where a positioned write would go to the end instead), from
 * /proc/self/fdinfo; undefined otherwise, or where /proc cannot tell.
 */
function regularFileOffset (fd: number): number | undefined {
  try {
    if (!fstatSync(fd).isFile()) return undefined
    const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'latin1')
    const pos = /^pos:\s*(\d+)$/m.exec(info)
    const flags = /^flags:\s*([0-7]+)$/m.exec(info)
    if (pos === null || flags === null || (parseInt(flags[1], 8) & O_APPEND) !== 0) return undefined
    return Number(pos[1])
  } catch {
    return undefined
  }
}

/** fsync by path: a file, or a directory so that the names made in it last. */
export async function syncPath (path: string): Promise<void> {
  const handle = await open(path, 'r')
  try { await handle.sync() } finally { await handle.close() }
}

/** Writes a small file under a temporary name beside it and renames it into place. */
export async function writeFileAtomically (path: string, data: string | Buffer): Promise<void> {
  const temp = partialPath(path)
  await writeFile(temp, data, { mode: 0o644 }).catch(err => { throw ioError(err, `cannot write ${path}`) })
  await rename(temp, path).catch(async err => { await unlink(temp).catch(() => {}); throw ioError(err, `cannot write ${path}`) })
}
