/** Positional reads of a whole range, for image readers. */
import { readSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'

/**
 * Reads exactly buf.length bytes at `position`; the caller knows the file
 * holds them, or with `zeroPastEnd` wants zeros past its end (as QEMU reads a
 * file that ends inside its last cluster).
 */
export async function readFully (file: FileHandle, buf: Buffer, position: number, where: string, zeroPastEnd = false): Promise<void> {
  const done = await readUpTo(file, buf, position, where)
  if (done === buf.length) return
  if (!zeroPastEnd) throw endedEarly(where, position + done)
  buf.fill(0, done)
}

/** readFully (without zeroPastEnd) by synchronous reads of a file descriptor. */
export function readFullySync (fd: number, buf: Buffer, position: number, where: string): void {
  const done = readUpToSync(fd, buf, position, where)
  if (done < buf.length) throw endedEarly(where, position + done)
}

function endedEarly (where: string, at: number): VmapipeError {
  return new VmapipeError('E_IO', `${where} ended at byte ${at} while being read; did it change?`)
}

/** Reads until `buf` is full or the file ends; returns the bytes read. */
export async function readUpTo (file: FileHandle, buf: Buffer, position: number, where: string): Promise<number> {
  let done = 0
  while (done < buf.length) {
    const { bytesRead } = await file.read(buf, done, buf.length - done, position + done).catch(err => { throw ioError(err, `reading ${where}`) })
    if (bytesRead === 0) break
    done += bytesRead
  }
  return done
}

/** readUpTo by synchronous reads of a file descriptor. */
export function readUpToSync (fd: number, buf: Buffer, position: number, where: string): number {
  let done = 0
  while (done < buf.length) {
    let n: number
    try {
      n = readSync(fd, buf, done, buf.length - done, position + done)
    } catch (err) {
      throw ioError(err, `reading ${where}`)
    }
    if (n === 0) break
    done += n
  }
  return done
}

/** Bytes read by position from a file or an object in a store: what an index of an archive reads. */
export interface PositionalReader {
  /** For messages. */
  name: string
  size: number
  /** Fills `buf` from `position`; fewer bytes (the count returned) only where the source ends. */
  read: (buf: Buffer, position: number) => Promise<number>
  /** read() without the thread pool, where the source is a file: copies from the page cache cost less than a round trip per read. */
  readSync?: (buf: Buffer, position: number) => number
  close: () => Promise<void>
}

/** A regular file as a PositionalReader; E_NOT_SEEKABLE for anything else (`why` says what needs random access). */
export async function openFileReader (path: string, why: string): Promise<PositionalReader> {
  const handle = await open(path, 'r').catch(err => { throw ioError(err, `cannot open ${path}`) })
  try {
    const stat = await handle.stat()
    if (!stat.isFile()) throw new VmapipeError('E_NOT_SEEKABLE', `${path} is not a regular file; ${why}`)
    return {
      name: path,
      size: stat.size,
      read: async (buf, position) => await readUpTo(handle, buf, position, path),
      readSync: (buf, position) => readUpToSync(handle.fd, buf, position, path),
      close: async () => await handle.close(),
    }
  } catch (err) {
    await handle.close()
    throw ioError(err, `cannot open ${path}`)
  }
}
