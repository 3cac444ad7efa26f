/**
 * Writing Parallels images. ParallelsWriter: one .hds from 64 KiB records in
 * any order. The first data of an image cluster (1 MiB by default) gives it
 * the next free cluster at the file's end; its records are written there by
 * position, so nothing is gathered in memory and an all-zero cluster is never
 * allocated. The header (in_use set) comes first, the BAT and the closed
 * header last. ParallelsBundleWriter: the same image inside a .hdd bundle
 * directory with its DiskDescriptor.xml.
 */
import { mkdir, open, writeFile, type FileHandle } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, DiskWriter, RandomAccessDisk, FileWrites, ProgressSink } from '../contracts.js'
import { CLUSTER_SIZE, ZERO_CLUSTER, clusterCount } from '../record.js'
import { WriteQueue, abandonFile, completeFile } from '../io/write-queue.js'
import { giveBack } from '../io/slabs.js'
import { isUuid } from '../util/uuid.js'
import { ClusterSet } from '../util/cluster-set.js'
import { syncPath } from '../io/output.js'
import { type CopySource, clusterPieces, copyDataRuns } from '../io/data-runs.js'
import {
  type BitmapFeature, type ParallelsHeader, CLOSED, DEFAULT_CLUSTER_SIZE, HEADER_SIZE, IN_USE, MAGIC_CLUSTERS, MAX_BAT_ENTRIES, SECTOR_SIZE,
  batEnd, encodeBat, encodeFormatExtension, encodeHeader, geometry,
} from './format.js'
import { ROOT_PARENT, buildDescriptor, newGuid } from './disk-descriptor.js'

/** Largest cluster written: 1 GiB. */
const MAX_WRITE_CLUSTER = 1 << 30

/** A dirty bitmap to store: bit i (least significant first in each byte) marks bytes [i * granularity, (i + 1) * granularity) dirty. */
export interface BitmapInput {
  /** A UUID: Parallels names bitmaps by one. */
  id: string
  /** Bytes per bit: a power of two, 512 or more. */
  granularity: number
  bits: Buffer
}

export interface ParallelsWriterOptions {
  /** Image cluster size in bytes: a multiple of 64 KiB up to 1 GiB (default 1 MiB). */
  clusterSize?: number
  queue?: FileWrites
  bitmaps?: BitmapInput[]
  /**
   * Write a snapshot over these layers: every record is stored, zeros too (a
   * cluster present in a snapshot hides the layers below), and the parts of
   * a written cluster that no record covers are copied from the layers.
   */
  base?: RandomAccessDisk
}

/** Checks a cluster size given for writing. */
export function checkClusterSize (bytes: number): void {
  if (!Number.isSafeInteger(bytes) || bytes < CLUSTER_SIZE || bytes % CLUSTER_SIZE !== 0 || bytes > MAX_WRITE_CLUSTER) {
    throw new VmapipeError('E_OPTION', `cluster size ${bytes}: a Parallels image written here needs a multiple of 64 KiB (65536) up to 1 GiB`,
      { option: 'clusterSize' })
  }
}

export class ParallelsWriter implements DiskWriter {
  private readonly bat: Uint32Array
  private readonly clusterBytes: number
  /** File cluster the next newly written image cluster takes. */
  private next: number
  /** Snapshots: the 64 KiB clusters that records were written for. */
  private readonly covered = new ClusterSet()

  private constructor (
    private readonly file: FileHandle,
    private readonly path: string,
    private readonly size: number,
    readonly header: ParallelsHeader,
    private readonly queue: FileWrites,
    private readonly base?: RandomAccessDisk
  ) {
    this.bat = new Uint32Array(header.batEntries)
    this.clusterBytes = header.tracks * SECTOR_SIZE
    this.next = header.dataOff * SECTOR_SIZE / this.clusterBytes
  }

  /** Creates `path` (which must not exist) for a disk of `size` bytes, rounded up to whole sectors as qemu-img does. */
  static async create (path: string, size: number, options: ParallelsWriterOptions = {}): Promise<ParallelsWriter> {
    const clusterBytes = options.clusterSize ?? DEFAULT_CLUSTER_SIZE
    checkClusterSize(clusterBytes)
    const sectors = Math.ceil(size / SECTOR_SIZE)
    const tracks = clusterBytes / SECTOR_SIZE
    const batEntries = Math.ceil(sectors / tracks)
    if (batEntries > MAX_BAT_ENTRIES) {
      throw new VmapipeError('E_LIMIT', `a disk of ${size} bytes needs ${batEntries} clusters of ${clusterBytes} bytes, ` +
        `over the ${MAX_BAT_ENTRIES} a BAT may hold here; use a larger cluster size`)
    }
    const { cylinders, heads } = geometry(sectors)
    const header: ParallelsHeader = {
      magic: MAGIC_CLUSTERS,
      heads,
      cylinders,
      tracks,
      batEntries,
      sectors,
      inUse: IN_USE,
      dataOff: 0,
      flags: 0,
      extOff: 0,
    }
    header.dataOff = Math.ceil(batEnd(header) / clusterBytes) * tracks
    let file: FileHandle
    try {
      file = await open(path, 'wx', 0o644)
    } catch (err) {
      throw ioError(err, `cannot create ${path}`)
    }
    const writer = new ParallelsWriter(file, path, size, header, options.queue ?? new WriteQueue(), options.base)
    try {
      await writer.start(options.bitmaps ?? [])
    } catch (err) {
      await writer.abort()
      throw err
    }
    return writer
  }

  write (rec: ClusterRecord): Promise<void> | undefined {
    const wait = this.place(rec)
    // A WriteQueue holds what it still has to write as loans of its own (io/slabs.ts); any other keeps the record's.
    if (this.queue instanceof WriteQueue) giveBack(rec.data)
    return wait
  }

  private place (rec: ClusterRecord): Promise<void> | undefined {
    // Checked before cover() gives the cluster file space: forEachRun lets a record with no data past the end through.
    if (rec.cluster >= clusterCount(this.size)) throw new VmapipeError('E_RECORD', 'cluster past the device end', { cluster: rec.cluster })
    if (this.base !== undefined) this.cover(rec.cluster)
    const pieces = clusterPieces(rec, this.size)
    // Nothing but zeros: no write, and an image cluster nothing else touches stays unallocated.
    if (rec.data.equals(ZERO_CLUSTER.subarray(0, rec.data.length))) return undefined
    // The whole 64 KiB in place: one writev per run of clusters instead of one write per data run, each of which costs a hand-off to a thread.
    let wait: Promise<void> | undefined
    for (const [position, bytes] of pieces) wait = this.put(bytes, position) ?? wait
    return wait
  }

  /**
   * Writes the data of `disk` (of this writer's size) instead of records:
   * each run of data clusters read into a reused buffer and written with one
   * write per stretch whose image clusters lie one after another in the file
   * (all of a run, as image clusters are given file space in guest order). A
   * 64 KiB cluster with nothing stored stays unwritten, an image cluster with
   * nothing stored unallocated. Not for a snapshot. Call finish() after.
   */
  async copyFrom (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    if (this.base !== undefined) throw new Error('copyFrom writes no snapshot')
    await copyDataRuns(disk, { fd: this.file.fd, path: this.path }, (first, bytes, write) => {
      const start = first * CLUSTER_SIZE
      const end = start + bytes.length
      let from = start
      let fromHost = this.hostOffset(start)
      for (let at = (Math.floor(start / this.clusterBytes) + 1) * this.clusterBytes; at < end; at += this.clusterBytes) {
        const host = this.hostOffset(at)
        if (host === fromHost + at - from) continue
        write(bytes.subarray(from - start, at - start), fromHost)
        from = at
        fromHost = host
      }
      write(bytes.subarray(from - start), fromHost)
    }, progress, signal)
  }

  /** Where guest byte `position` lies in the file, its image cluster given the next free file cluster if it has none. */
  private hostOffset (position: number): number {
    const index = Math.floor(position / this.clusterBytes)
    return this.hostCluster(index) * this.clusterBytes + position - index * this.clusterBytes
  }

  /** Writes guest bytes at `position`, giving their image cluster the next free file cluster if it has none. */
  private put (bytes: Buffer, position: number): Promise<void> | undefined {
    return this.queue.write(this.file.fd, bytes, this.hostOffset(position), `writing ${this.path}`)
  }

  /** The file cluster of image cluster `index`, the next free one if it has none yet. */
  private hostCluster (index: number): number {
    if (this.bat[index] === 0) this.bat[index] = this.next++
    return this.bat[index]
  }

  /** Snapshots: the image cluster holding 64 KiB `cluster` is in this layer, and the record there is its own. */
  private cover (cluster: number): void {
    this.hostCluster(Math.floor(cluster * CLUSTER_SIZE / this.clusterBytes))
    this.covered.add(cluster)
  }

  /**
   * Snapshots: the parts of each written image cluster that no record
   * covered, from the layers below; parts that are zero there stay unwritten.
   * Only cover() allocates in a snapshot, so the non-zero BAT entries are the
   * written image clusters.
   */
  private async fillFromBase (base: RandomAccessDisk): Promise<void> {
    const perCluster = this.clusterBytes / CLUSTER_SIZE
    const guestClusters = clusterCount(this.size)
    for (let index = 0; index < this.bat.length; index++) {
      if (this.bat[index] === 0) continue
      const first = index * perCluster
      const end = Math.min(first + perCluster, guestClusters)
      let c = first
      while (c < end && this.covered.has(c)) c++
      if (c === end) continue
      // A buffer per image cluster: the queue holds its parts until they are written.
      const bytes = Buffer.alloc(Math.min(this.clusterBytes, this.size - first * CLUSTER_SIZE))
      await base.read(bytes, first * CLUSTER_SIZE)
      for (; c < end; c++) {
        if (this.covered.has(c)) continue
        const part = bytes.subarray((c - first) * CLUSTER_SIZE, (c - first + 1) * CLUSTER_SIZE)
        if (!part.equals(ZERO_CLUSTER.subarray(0, part.length))) await this.put(part, c * CLUSTER_SIZE)
      }
    }
  }

  async finish (): Promise<void> {
    if (this.base !== undefined) await this.fillFromBase(this.base)
    // completeFile drains the queue, so the waits these two hand back need no await.
    void this.queue.write(this.file.fd, encodeBat(this.bat), HEADER_SIZE, `writing the BAT of ${this.path}`)
    void this.queue.write(this.file.fd, encodeHeader({ ...this.header, inUse: CLOSED }), 0, `writing the header of ${this.path}`)
    await completeFile(this.queue, this.file, this.next * this.clusterBytes, this.path)
  }

  async abort (): Promise<void> {
    await abandonFile(this.queue, this.file)
  }

  /**
   * Writes the header marked in use and, when there are bitmaps, their
   * clusters and the Format Extension at the front of the data area, where
   * the data clusters after them keep them inside the image's end.
   */
  private async start (bitmaps: BitmapInput[]): Promise<void> {
    const pieces: Array<{ bytes: Buffer, at: number }> = []
    if (bitmaps.length > 0) {
      const extAt = this.next++ * this.clusterBytes
      const features = bitmaps.map(b => this.bitmapFeature(b, pieces))
      pieces.push({ bytes: encodeFormatExtension(this.clusterBytes, features), at: extAt })
      this.header.extOff = extAt / SECTOR_SIZE
    }
    pieces.push({ bytes: encodeHeader(this.header), at: 0 })
    for (const p of pieces) await this.queue.write(this.file.fd, p.bytes, p.at, `writing ${this.path}`)
    await this.queue.drain()
  }

  /** Lays out one bitmap: a cluster for each part that is neither all clear nor all set. */
  private bitmapFeature (b: BitmapInput, pieces: Array<{ bytes: Buffer, at: number }>): BitmapFeature {
    if (!isUuid(b.id)) throw new VmapipeError('E_OPTION', `dirty bitmap id ${b.id} is not a UUID`)
    if (b.granularity < SECTOR_SIZE || (b.granularity & (b.granularity - 1)) !== 0 || b.granularity > 2 ** 31) {
      throw new VmapipeError('E_OPTION', `dirty bitmap ${b.id}: granularity ${b.granularity} is not a power of two from 512 bytes to 2 GiB`)
    }
    const granularity = b.granularity / SECTOR_SIZE
    const granules = Math.ceil(this.header.sectors / granularity)
    if (b.bits.length * 8 < granules) {
      throw new VmapipeError('E_OPTION', `dirty bitmap ${b.id}: ${b.bits.length} bytes of bits, the disk needs ${Math.ceil(granules / 8)}`)
    }
    const perChunk = this.clusterBytes * 8
    const l1: number[] = []
    for (let first = 0; first < granules; first += perChunk) {
      const count = Math.min(perChunk, granules - first)
      const chunk = Buffer.alloc(this.clusterBytes)
      b.bits.copy(chunk, 0, first / 8, Math.ceil((first + count) / 8))
      if (count % 8 !== 0) chunk[count >> 3] &= (1 << (count % 8)) - 1
      const set = countBits(chunk)
      if (set === 0 || set === count) {
        l1.push(set === 0 ? 0 : 1)
        continue
      }
      const at = this.next++ * this.clusterBytes
      pieces.push({ bytes: chunk, at })
      l1.push(at / SECTOR_SIZE)
    }
    return { id: b.id.toLowerCase(), sectors: this.header.sectors, granularity, l1 }
  }
}

function countBits (buf: Buffer): number {
  let n = 0
  for (const byte of buf) {
    for (let b = byte; b !== 0; b &= b - 1) n++
  }
  return n
}

/**
 * A disk as a .hdd bundle: the directory `path`, its image and a
 * DiskDescriptor.xml naming it (one storage, the image as root and top
 * snapshot under a fresh GUID). The descriptor is written last, once the
 * image is complete.
 */
export class ParallelsBundleWriter implements DiskWriter {
  private constructor (private readonly path: string, private readonly image: ParallelsWriter, private readonly descriptor: string) {}

  static async create (path: string, size: number, options: ParallelsWriterOptions = {}): Promise<ParallelsBundleWriter> {
    await mkdir(path).catch(err => { throw ioError(err, `cannot create ${path}`) })
    const guid = newGuid()
    const file = `${basename(path)}.0.${guid}.hds`
    const image = await ParallelsWriter.create(join(path, file), size, options)
    const { sectors, tracks } = image.header
    const descriptor = buildDescriptor({
      diskSize: sectors,
      ...geometry(sectors),
      padding: 0,
      storages: [{ start: 0, end: sectors, blockSize: tracks, images: [{ guid, type: 'Compressed', file }] }],
      topGuid: guid,
      shots: [{ guid, parentGuid: ROOT_PARENT }],
    })
    return new ParallelsBundleWriter(path, image, descriptor)
  }

  write (rec: ClusterRecord): Promise<void> | undefined {
    return this.image.write(rec)
  }

  async copyFrom (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    await this.image.copyFrom(disk, progress, signal)
  }

  async finish (): Promise<void> {
    await this.image.finish()
    const xml = join(this.path, 'DiskDescriptor.xml')
    try {
      await writeFile(xml, this.descriptor, { flag: 'wx', mode: 0o644 })
      for (const p of [xml, this.path]) await syncPath(p)
    } catch (err) {
      throw ioError(err, `writing ${xml}`)
    }
  }

  async abort (): Promise<void> {
    await this.image.abort()
  }
}
