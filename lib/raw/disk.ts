/**
 * A raw image file or block device as a RandomAccessDisk: positional reads,
 * and a map that calls everything data (Node cannot ask the file system
 * where the holes are).
 */
import { open } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'
import type { RandomAccessDisk } from '../disk.js'
import { sizeOf } from '../io/input.js'

export async function openRawDisk (path: string): Promise<RandomAccessDisk> {
  const handle = await open(path, 'r').catch(err => { throw ioError(err, `cannot open ${path}`) })
  const size = sizeOf(await handle.stat())
  if (size === undefined || size === 0) {
    await handle.close()
    throw new VmapipeError('E_USAGE', size === undefined ? `${path} is neither a regular file nor a block device` : `${path} is empty`)
  }
  let closed = false
  return {
    size,
    map: async (offset, length) => [{ offset, length, data: true }],
    read: async (buf, offset) => {
      let done = 0
      while (done < buf.length) {
        const { bytesRead } = await handle.read(buf, done, buf.length - done, offset + done).catch(err => { throw ioError(err, `reading ${path}`) })
        // Past the end (the file shrank under us): zeros, as for any unstored range.
        if (bytesRead === 0) {
          buf.fill(0, done)
          return
        }
        done += bytesRead
      }
    },
    close: async () => {
      if (closed) return
      closed = true
      await handle.close()
    },
  }
}
