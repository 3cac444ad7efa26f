/**
 * An output file that appears under its final name only when complete: bytes
 * go to a temporary file beside it, which is synced and renamed on commit and
 * removed on abort. `-` is stdout.
 */
import { createWriteStream, type WriteStream } from 'node:fs'
import { open, rename, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { finished } from 'node:stream/promises'
import { Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'

export interface Output {
  stream: Writable
  /** The descriptor behind `stream`, for programs that write there themselves. */
  fd: number
  name: string
  /** The temporary file being written, until commit (absent for stdout). */
  partial?: string
  /** After the stream has finished: sync and give the file its name. */
  commit: () => Promise<void>
  /** Remove what was written. */
  abort: () => Promise<void>
}

const PARTIAL_MARK = '.partial-'

/** The prefix of the temporary names used beside `name`. */
function partialPrefix (name: string): string {
  return `.${name}${PARTIAL_MARK}`
}

/** A fresh temporary name beside `path`, for a file that gets `path` only when complete. */
export function partialPath (path: string): string {
  return join(dirname(path), `${partialPrefix(basename(path))}${randomBytes(4).toString('hex')}`)
}

/** Whether a file name is one of those temporary names: a leftover, after a crash. */
export function isPartialName (name: string): boolean {
  return name.startsWith('.') && name.includes(PARTIAL_MARK)
}

export async function openOutput (path: string, options: { force?: boolean } = {}): Promise<Output> {
  if (path === '-') return { stream: stdoutWritable(), fd: 1, name: 'stdout', commit: async () => {}, abort: async () => {} }
  const existing = await stat(path).catch(() => undefined)
  // A character device or FIFO (/dev/null, a pipe) is a stream: written in place, never replaced by a file.
  if (existing !== undefined && (existing.isCharacterDevice() || existing.isFIFO())) return await openInPlace(path)
  if (existing !== undefined && options.force !== true) {
    throw new VmapipeError('E_TARGET_EXISTS', `${path} exists already (use --force to replace it)`)
  }
  if (existing?.isBlockDevice() === true) return await openInPlace(path)
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
      await rename(temp, path)
    } catch (err) {
      await abort()
      throw ioError(err, `writing ${path}`)
    }
  }
  return { stream, fd: handle.fd, name: path, partial: temp, commit, abort }
}

function writeStreamOn (handle: FileHandle): { stream: WriteStream, close: () => Promise<void> } {
  const stream = createWriteStream('', { fd: handle.fd, highWaterMark: 1 << 20, autoClose: false })
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
  }
}

/**
 * A Writable in front of stdout for pipelines: process.stdout itself never
 * reports 'finish' (it cannot be ended), so pump would wait forever. Each
 * chunk is done when stdout has taken it; errors (EPIPE, ENOSPC) come back.
 */
export function stdoutWritable (): Writable {
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
      chunks.forEach(({ chunk }, i) => process.stdout.write(chunk as Buffer, i === last ? err => { settle(err, callback) } : undefined))
    },
    final (callback) {
      process.stdout.off('error', onError)
      settle(null, callback)
    },
  })
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
