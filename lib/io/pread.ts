/** Positional reads of a whole range, for image readers. */
import type { FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'

/**
 * Reads exactly buf.length bytes at `position`; the caller knows the file
 * holds them, or with `zeroPastEnd` wants zeros past its end (as QEMU reads a
 * file that ends inside its last cluster).
 */
export async function readFully (file: FileHandle, buf: Buffer, position: number, where: string, zeroPastEnd = false): Promise<void> {
  const done = await readUpTo(file, buf, position, where)
  if (done === buf.length) return
  if (!zeroPastEnd) throw new VmapipeError('E_IO', `${where} ended at byte ${position + done} while being read; did it change?`)
  buf.fill(0, done)
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
