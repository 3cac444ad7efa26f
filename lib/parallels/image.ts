/**
 * Parallels expandable images (.hds) by random access: ParallelsImage reads a
 * file, with its dirty bitmaps.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'
import type { DirtyBitmap, DiskDescription, Extent, RandomAccessDisk } from '../contracts.js'
import { checkpoint, describeBitmaps, mappedBytes } from '../io/disk-records.js'
import { readFully } from '../io/pread.js'
import {
  type BitmapFeature, type FormatExtension, type ParallelsHeader, FLAG_EMPTY, HEADER_SIZE, SECTOR_SIZE,
  batEnd, checkHostCluster, clusterSize, dataOffset, entryOffset, entryUnit, parseBat, parseFormatExtension, parseHeader, visibleBat,
} from './format.js'

export class ParallelsImage implements RandomAccessDisk {
  readonly size: number
  readonly clusterSize: number
  readonly bitmaps: ParallelsBitmap[]
  /** The BAT as the reader sees it: all zero for an image flagged empty. */
  private readonly bat: Uint32Array

  private constructor (
    private readonly file: FileHandle,
    readonly path: string,
    readonly header: ParallelsHeader,
    bat: Uint32Array,
    readonly extension: FormatExtension | undefined
  ) {
    this.size = header.sectors * SECTOR_SIZE
    this.clusterSize = clusterSize(header)
    this.bat = visibleBat(header, bat)
    this.bitmaps = (extension?.bitmaps ?? []).map(b =>
      new ParallelsBitmap(b, this.size, this.clusterSize, async (buf, at) => { await readFully(file, buf, at, path) }))
  }

  /** Opens and checks `path`: header, every BAT entry, the Format Extension and its bitmaps' tables. */
  static async open (path: string): Promise<ParallelsImage> {
    const file = await open(path, 'r').catch(err => { throw ioError(err, `cannot open ${path}`) })
    try {
      const fileSize = (await file.stat()).size
      const head = Buffer.alloc(HEADER_SIZE)
      const { bytesRead } = await file.read(head, 0, HEADER_SIZE, 0)
      const header = parseHeader(head.subarray(0, bytesRead), path, fileSize)
      const batBytes = Buffer.alloc(batEnd(header) - HEADER_SIZE)
      await readFully(file, batBytes, HEADER_SIZE, path)
      const { bat, sorted } = parseBat(header, batBytes, path, fileSize)
      const extension = header.extOff === 0 ? undefined : await readExtension(file, header, sorted, fileSize, path)
      return new ParallelsImage(file, path, header, bat, extension)
    } catch (err) {
      await file.close()
      throw err
    }
  }

  async map (offset: number, length: number): Promise<Extent[]> {
    const extents: Extent[] = []
    const end = Math.min(offset + length, this.size)
    for (let pos = offset; pos < end;) {
      const index = Math.floor(pos / this.clusterSize)
      const stop = Math.min(end, (index + 1) * this.clusterSize)
      const data = this.bat[index] !== 0
      const last = extents[extents.length - 1]
      if (last !== undefined && last.data === data) last.length += stop - pos
      else extents.push({ offset: pos, length: stop - pos, data })
      pos = stop
    }
    return extents
  }

  async read (buf: Buffer, offset: number): Promise<void> {
    // Pieces that follow each other in the file are read with one call.
    let runStart = 0
    let runHost = -1
    let runLength = 0
    const flush = async (): Promise<void> => {
      const target = buf.subarray(runStart, runStart + runLength)
      if (runHost < 0) target.fill(0)
      else await readFully(this.file, target, runHost, this.path)
    }
    for (let done = 0; done < buf.length;) {
      const pos = offset + done
      const index = Math.floor(pos / this.clusterSize)
      const within = pos - index * this.clusterSize
      const take = Math.min(buf.length - done, this.clusterSize - within)
      const entry = pos < this.size ? this.bat[index] : 0
      const host = entry === 0 ? -1 : entryOffset(this.header, entry) + within
      const joins = runLength > 0 && (host < 0 ? runHost < 0 : runHost >= 0 && host === runHost + runLength)
      if (!joins) {
        if (runLength > 0) await flush()
        runStart = done
        runHost = host
        runLength = 0
      }
      runLength += take
      done += take
    }
    if (runLength > 0) await flush()
  }

  async describe (signal?: AbortSignal): Promise<DiskDescription> {
    const pause = checkpoint(signal)
    let allocated = 0
    let clusters = 0
    for (let i = 0; i < this.bat.length; i++) {
      if ((i & 0xffff) === 0) await pause()
      if (this.bat[i] === 0) continue
      clusters++
      allocated += Math.max(0, Math.min(this.clusterSize, this.size - i * this.clusterSize))
    }
    const details: Record<string, string | number> = { magic: this.header.magic, 'data offset': dataOffset(this.header) }
    if ((this.header.flags & FLAG_EMPTY) !== 0) details.flags = 'empty image'
    for (const other of this.extension?.others ?? []) details[`feature 0x${other.magic.toString(16)}`] = other.reason
    return {
      format: 'parallels',
      size: this.size,
      allocated,
      clusterSize: this.clusterSize,
      allocatedClusters: clusters,
      bitmaps: await describeBitmaps(this.bitmaps),
      details,
    }
  }

  async close (): Promise<void> {
    await this.file.close()
  }
}

/**
 * Reads and checks the Format Extension: its cluster, and each bitmap
 * cluster, must be a cluster of the data area that no BAT entry and no other
 * part of the extension uses.
 */
async function readExtension (file: FileHandle, h: ParallelsHeader, sortedBat: Uint32Array, fileSize: number, where: string): Promise<FormatExtension> {
  const used = new Set<number>()
  const claim = (offset: number, what: string, at: number): void => {
    checkHostCluster(h, offset, fileSize, what, where, 'E_PARALLELS_EXTENSION', at)
    const entry = offset / entryUnit(h)
    if (used.has(offset) || binarySearch(sortedBat, entry)) {
      throw new VmapipeError('E_PARALLELS_EXTENSION', `${where}: ${what} points to byte ${offset}, a cluster used already`, { offset: at })
    }
    used.add(offset)
  }
  const at = h.extOff * SECTOR_SIZE
  claim(at, 'ext_off', 56)
  const cluster = Buffer.alloc(clusterSize(h))
  await readFully(file, cluster, at, where)
  return parseFormatExtension(h, cluster, where, at, claim)
}

function binarySearch (sorted: Uint32Array, value: number): boolean {
  let lo = 0
  let hi = sorted.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1
    if (sorted[mid] === value) return true
    if (sorted[mid] < value) lo = mid + 1
    else hi = mid - 1
  }
  return false
}

/** A dirty bitmap of an image; its clusters are read when asked for. */
export class ParallelsBitmap implements DirtyBitmap {
  readonly id: string
  readonly granularity: number
  private cached?: { index: number, bits: Buffer }

  constructor (
    private readonly feature: BitmapFeature,
    private readonly diskSize: number,
    private readonly clusterBytes: number,
    private readonly readAt: (buf: Buffer, position: number) => Promise<void>
  ) {
    this.id = feature.id
    this.granularity = feature.granularity * SECTOR_SIZE
  }

  async map (offset: number, length: number): Promise<Array<{ offset: number, length: number, dirty: boolean }>> {
    const out: Array<{ offset: number, length: number, dirty: boolean }> = []
    const end = Math.min(offset + length, this.diskSize)
    const g = this.granularity
    const push = (from: number, to: number, dirty: boolean): void => {
      const start = Math.max(offset, from * g)
      const stop = Math.min(end, to * g)
      const last = out[out.length - 1]
      if (last !== undefined && last.dirty === dirty) last.length = stop - last.offset
      else out.push({ offset: start, length: stop - start, dirty })
    }
    const perChunk = this.clusterBytes * 8
    const lastGranule = Math.ceil(end / g)
    for (let granule = Math.floor(offset / g); granule < lastGranule;) {
      const chunk = Math.floor(granule / perChunk)
      const chunkEnd = Math.min(lastGranule, (chunk + 1) * perChunk)
      const entry = this.feature.l1[chunk]
      if (entry <= 1) {
        push(granule, chunkEnd, entry === 1)
        granule = chunkEnd
        continue
      }
      const bits = await this.chunk(chunk, entry)
      while (granule < chunkEnd) {
        const k = granule - chunk * perChunk
        const byte = bits[k >> 3]
        if ((k & 7) === 0 && granule + 8 <= chunkEnd && (byte === 0 || byte === 0xff)) {
          push(granule, granule + 8, byte === 0xff)
          granule += 8
        } else {
          push(granule, granule + 1, ((byte >> (k & 7)) & 1) === 1)
          granule++
        }
      }
    }
    return out
  }

  async dirtyBytes (): Promise<number> {
    return await mappedBytes(async (o, l) => await this.map(o, l), this.diskSize, e => e.dirty)
  }

  private async chunk (index: number, entry: number): Promise<Buffer> {
    if (this.cached?.index !== index) {
      const bits = Buffer.alloc(this.clusterBytes)
      await this.readAt(bits, entry * SECTOR_SIZE)
      this.cached = { index, bits }
    }
    return this.cached.bits
  }
}
