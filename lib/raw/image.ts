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
import { readFully, readFullySync } from '../io/pread.js'
import { dataExtents } from './holes.js'

/** Bytes of the file whose holes are looked up at once: a sparse disk takes a few lookups per gigabyte, not one per read. */
const MAP_WINDOW = 64 << 20

export class RawImage implements RandomAccessDisk {
  /** The last lookup: extents in order, covering [window.start, window.end). */
  private window = { start: 0, end: 0, extents: [] as Extent[] }

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
    if (end <= offset) return []
    if (offset < this.window.start || end > this.window.end) {
      const windowEnd = Math.min(this.size, Math.max(end, offset + MAP_WINDOW))
      this.window = { start: offset, end: windowEnd, extents: await dataExtents(this.file.fd, offset, windowEnd - offset) }
    }
    const extents = this.window.extents
    // The first extent ending past `offset`, by bisection (a fragmented file has many).
    let lo = 0
    let hi = extents.length - 1
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (extents[mid].offset + extents[mid].length <= offset) lo = mid + 1
      else hi = mid
    }
    const out: Extent[] = []
    for (let i = lo; i < extents.length && extents[i].offset < end; i++) {
      const from = Math.max(offset, extents[i].offset)
      out.push({ offset: from, length: Math.min(end, extents[i].offset + extents[i].length) - from, data: extents[i].data })
    }
    return out
  }

  async read (buf: Buffer, offset: number): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.size - offset))
    await readFully(this.file, buf.subarray(0, inside), offset, this.path)
    buf.fill(0, inside)
  }

  /** read() by synchronous reads, for a server that copies from the page cache (nbd/server.ts readDisk). */
  readSync (buf: Buffer, offset: number): void {
    const inside = Math.max(0, Math.min(buf.length, this.size - offset))
    readFullySync(this.file.fd, buf.subarray(0, inside), offset, this.path)
    buf.fill(0, inside)
  }

  async describe (): Promise<DiskDescription> {
    return { format: 'raw', size: this.size }
  }

  async close (): Promise<void> {
    await this.file.close()
  }
}
