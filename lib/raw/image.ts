/**
 * RawImage: a raw disk file (or block device) by random access, for packing
 * a raw file, layers of other images (the Plain root of a Parallels bundle)
 * and `vma info`. Its map tells the file's holes apart where the file system
 * can (see holes.ts).
 */
import { open, type FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'
import type { DiskDescription, Extent, RandomAccessDisk } from '../contracts.js'
import { sizeOf } from '../io/input.js'
import { readFully } from '../io/pread.js'
import { dataExtents } from './holes.js'

export class RawImage implements RandomAccessDisk {
  private constructor (private readonly file: FileHandle, readonly path: string, readonly size: number) {}

  static async open (path: string): Promise<RawImage> {
    const file = await open(path, 'r').catch(err => { throw ioError(err, `cannot open ${path}`) })
    const size = sizeOf(await file.stat())
    if (size === undefined || size === 0) {
      await file.close()
      throw size === 0
        ? new VmapipeError('E_LIMIT', `${path} is empty; a disk needs at least one byte`)
        : new VmapipeError('E_NOT_SEEKABLE', `${path} is neither a file nor a block device`)
    }
    return new RawImage(file, path, size)
  }

  /** The file's holes are not data; everything is data where they cannot be found. */
  async map (offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size)
    return end > offset ? await dataExtents(this.file.fd, offset, end - offset) : []
  }

  async read (buf: Buffer, offset: number): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.size - offset))
    await readFully(this.file, buf.subarray(0, inside), offset, this.path)
    buf.fill(0, inside)
  }

  async describe (): Promise<DiskDescription> {
    return { format: 'raw', size: this.size }
  }

  async close (): Promise<void> {
    await this.file.close()
  }
}
