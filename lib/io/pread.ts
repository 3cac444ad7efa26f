/** Positional reads of a whole range, for image readers. */
import type { FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'

/** Reads exactly buf.length bytes at `position`; the caller knows the file holds them. */
export async function readFully (file: FileHandle, buf: Buffer, position: number, where: string): Promise<void> {
  let done = 0
  while (done < buf.length) {
    const { bytesRead } = await file.read(buf, done, buf.length - done, position + done).catch(err => { throw ioError(err, `reading ${where}`) })
    if (bytesRead === 0) throw new VmapipeError('E_IO', `${where} ended at byte ${position + done} while being read; did it change?`)
    done += bytesRead
  }
}
