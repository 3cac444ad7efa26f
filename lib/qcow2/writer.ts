/**
 * Qcow2FileWriter: a DiskWriter making a qcow2 v3 image (64 KiB clusters,
 * 16-bit refcounts). Data clusters are appended in the order records arrive,
 * right after the header cluster; zero clusters stay unallocated (or carry
 * the zero flag in an overlay, so they hide the backing file). At the end the
 * L2 tables, L1 table and refcount structures follow the data and the header
 * is written last: the file is compact, with every cluster used once.
 *
 * With an external data file, guest data goes to a sparse raw file at its own
 * offsets (usable on its own: data_file_raw) and the qcow2 holds only
 * metadata, every guest cluster mapped to the same offset in the data file.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, DiskWriter, RandomAccessDisk, FileWrites, ProgressSink } from '../contracts.js'
import { CLUSTER_SIZE, clusterCount } from '../record.js'
import { RawFileWriter } from '../raw/writer.js'
import { WriteQueue, abandonFile, completeFile } from '../io/write-queue.js'
import { giveBack } from '../io/slabs.js'
import type { Writable } from 'node:stream'
import { drained } from '../io/drained.js'
import { type CopySource, clusterPieces, copyDataRuns } from '../io/data-runs.js'
import { COPIED, type RefcountLayout, ZERO_FLAG, encodeHeader, l2Entries, refcountLayout, writeEntry } from './format.js'

const CLUSTER_BITS = 16
const ENTRIES = l2Entries(CLUSTER_BITS, false)
/** In the guest -> host map: a cluster that reads as zeros (overlays only). */
const ZERO = 0xffffffff
const REFCOUNT_ONE = Buffer.from([0, 1])

export interface Qcow2WriterOptions {
  /** Keep guest data in this raw file; `name` is how the header refers to it (relative to the image). */
  dataFile?: { path: string, name: string }
  /** Make an overlay on this image: unwritten clusters read from it, zero clusters hide it. */
  backing?: { name: string, format: string }
  queue?: FileWrites
}

/**
 * The guest -> host cluster map, one Uint32Array per L2 table allocated on
 * first use: memory follows what is written, not the disk's size.
 */
class ClusterMap {
  readonly tables = new Map<number, Uint32Array>()

  set (guest: number, host: number): void {
    const index = Math.floor(guest / ENTRIES)
    let table = this.tables.get(index)
    if (table === undefined) {
      table = new Uint32Array(ENTRIES)
      this.tables.set(index, table)
    }
    table[guest % ENTRIES] = host
  }
}

export class Qcow2FileWriter implements DiskWriter {
  private readonly map = new ClusterMap()
  /** Next host cluster for data; cluster 0 is the header. */
  private nextHost = 1

  private constructor (
    private readonly file: FileHandle,
    private readonly path: string,
    private readonly size: number,
    private readonly queue: FileWrites,
    private readonly options: Qcow2WriterOptions,
    private readonly data?: RawFileWriter
  ) {}

  /** Creates `path` (which must not exist) for a disk of `size` bytes. */
  static async create (path: string, size: number, options: Qcow2WriterOptions = {}): Promise<Qcow2FileWriter> {
    if (options.dataFile !== undefined && options.backing !== undefined) {
      throw new VmapipeError(
        'E_OPTION', 'a qcow2 with a raw data file cannot have a backing file',
        { option: 'dataFile' })
    }
    const queue = options.queue ?? new WriteQueue()
    const file = await open(path, 'wx', 0o644).catch(err => { throw ioError(err, `cannot create ${path}`) })
    try {
      const data = options.dataFile === undefined ? undefined : await RawFileWriter.create(options.dataFile.path, size, queue)
      return new Qcow2FileWriter(file, path, size, queue, options, data)
    } catch (err) {
      await file.close()
      throw err
    }
  }

  write (rec: ClusterRecord): Promise<void> | undefined {
    if (rec.cluster >= clusterCount(this.size)) throw new VmapipeError('E_RECORD', 'cluster past the device end', { cluster: rec.cluster })
    if (this.data !== undefined) return this.data.write(rec)
    if (rec.mask === 0) {
      if (this.options.backing !== undefined) this.map.set(rec.cluster, ZERO)
      return undefined
    }
    const pieces = clusterPieces(rec, this.size)
    const host = this.nextHost++
    this.map.set(rec.cluster, host)
    // A partly zero cluster as its data runs and shared zeros (nothing copied); the queue merges them and the clusters around into one writev.
    let wait: Promise<void> | undefined
    const shift = host * CLUSTER_SIZE - rec.cluster * CLUSTER_SIZE
    for (const [position, bytes] of pieces) wait = this.queue.write(this.file.fd, bytes, position + shift, `writing ${this.path}`) ?? wait
    // A WriteQueue holds what it still has to write as loans of its own (io/slabs.ts); any other keeps the record's.
    if (this.queue instanceof WriteQueue) giveBack(rec.data)
    return wait
  }

  /**
   * Writes the data of `disk` (of this writer's size) instead of records: each
   * run of data clusters read into a reused buffer and written at the next
   * host clusters with one write (holes inside a cluster read as
   * zeros, all-zero clusters left unallocated). Not for an overlay, whose zero
   * clusters must hide the backing file. Call finish() after.
   */
  async copyFrom (disk: CopySource, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    if (this.options.backing !== undefined) throw new Error('copyFrom writes no overlay')
    if (this.data !== undefined) {
      await this.data.copyFrom(disk, progress, signal)
      return
    }
    await copyDataRuns(disk, { fd: this.file.fd, path: this.path }, (first, bytes, write) => {
      write(bytes, this.nextHost * CLUSTER_SIZE)
      for (let c = 0; c * CLUSTER_SIZE < bytes.length; c++) this.map.set(first + c, this.nextHost++)
    }, progress, signal)
  }

  async finish (): Promise<void> {
    await this.data?.finish()
    const guestClusters = clusterCount(this.size)
    const { l1Size, l1Clusters } = l1Layout(this.size)
    // A raw data file maps every guest cluster to itself, as QEMU does for data_file_raw.
    const tableIndexes = this.data !== undefined ? Array.from({ length: l1Size }, (_, i) => i) : [...this.map.tables.keys()].sort((a, b) => a - b)
    const l2Start = this.nextHost
    const l1Start = l2Start + tableIndexes.length
    const refs = refcountLayout(l1Start + l1Clusters, CLUSTER_BITS)
    const blocksStart = l1Start + l1Clusters
    const tableStart = blocksStart + refs.blocks

    for (const [n, index] of tableIndexes.entries()) await this.put(this.l2Table(index, guestClusters), l2Start + n)
    const meta = metadata({
      size: this.size,
      l2Tables: tableIndexes.map((index, n) => [index, l2Start + n]),
      l1Start,
      blocksStart,
      tableStart,
      refs,
      ...(this.options.dataFile ? { dataFile: { name: this.options.dataFile.name, raw: true } } : {}),
      ...(this.options.backing ? { backing: this.options.backing } : {}),
    })
    await this.put(meta.l1, l1Start)
    await this.put(meta.blocks, blocksStart)
    await this.put(meta.table, tableStart)
    await this.put(meta.header, 0)
    await completeFile(this.queue, this.file, refs.total * CLUSTER_SIZE, this.path)
  }

  async abort (): Promise<void> {
    await this.data?.abort()
    await abandonFile(this.queue, this.file)
  }

  private async put (bytes: Buffer, cluster: number): Promise<void> {
    await this.queue.write(this.file.fd, bytes, cluster * CLUSTER_SIZE, `writing ${this.path}`)
  }

  private l2Table (index: number, guestClusters: number): Buffer {
    const l2 = Buffer.alloc(CLUSTER_SIZE)
    const first = index * ENTRIES
    if (this.data !== undefined) {
      for (let i = 0; i < ENTRIES && first + i < guestClusters; i++) writeEntry(l2, i * 8, (first + i) * CLUSTER_SIZE, COPIED)
      return l2
    }
    const hosts = this.map.tables.get(index) as Uint32Array
    for (let i = 0; i < ENTRIES; i++) {
      const host = hosts[i]
      if (host === ZERO) l2.writeUInt32BE(ZERO_FLAG, i * 8 + 4)
      else if (host !== 0) writeEntry(l2, i * 8, host * CLUSTER_SIZE, COPIED)
    }
    return l2
  }
}

interface MetadataSpec {
  size: number
  /** [L1 index, host cluster] of each L2 table written. */
  l2Tables: Array<[number, number]>
  l1Start: number
  blocksStart: number
  tableStart: number
  refs: RefcountLayout
  dataFile?: { name: string, raw: boolean }
  backing?: { name: string, format: string }
}

/** L1 entries for a disk of `size` bytes, and the clusters they fill. */
function l1Layout (size: number): { l1Size: number, l1Clusters: number } {
  const l1Size = Math.ceil(clusterCount(size) / ENTRIES)
  return { l1Size, l1Clusters: Math.ceil(l1Size * 8 / CLUSTER_SIZE) }
}

/** The L1 table, refcount blocks and table, and header of an image whose every cluster is in use once. */
function metadata (spec: MetadataSpec): { l1: Buffer, blocks: Buffer, table: Buffer, header: Buffer } {
  const { l1Size, l1Clusters } = l1Layout(spec.size)
  const l1 = Buffer.alloc(l1Clusters * CLUSTER_SIZE)
  for (const [index, host] of spec.l2Tables) writeEntry(l1, index * 8, host * CLUSTER_SIZE, COPIED)
  const blocks = Buffer.alloc(spec.refs.blocks * CLUSTER_SIZE)
  // A refcount of 1 (big-endian) for every cluster in use.
  blocks.fill(REFCOUNT_ONE, 0, spec.refs.total * 2)
  const table = Buffer.alloc(spec.refs.tableClusters * CLUSTER_SIZE)
  for (let b = 0; b < spec.refs.blocks; b++) writeEntry(table, b * 8, (spec.blocksStart + b) * CLUSTER_SIZE)
  const header = encodeHeader({
    clusterBits: CLUSTER_BITS,
    // QEMU reads the size in whole sectors, rounding down; qemu-img convert -O qcow2 rounds up, the padding zero.
    size: Math.ceil(spec.size / 512) * 512,
    l1Size,
    l1Offset: spec.l1Start * CLUSTER_SIZE,
    refcountTableOffset: spec.tableStart * CLUSTER_SIZE,
    refcountTableClusters: spec.refs.tableClusters,
    ...(spec.dataFile ? { dataFile: spec.dataFile } : {}),
    ...(spec.backing ? { backing: spec.backing } : {}),
  })
  return { l1, blocks, table, header }
}

/**
 * Writes a whole qcow2 image of `disk` to a stream, tables first: header, L1,
 * refcounts, L2 tables, then the data clusters in guest order. The layout is
 * learnt from disk.map() (cheap for an indexed archive), so nothing waits in
 * memory or in a temporary file. Returns the bytes written.
 */
export async function writeQcow2Stream (disk: RandomAccessDisk, out: Writable): Promise<number> {
  const { l1Size, l1Clusters } = l1Layout(disk.size)
  // Pass 1: which guest clusters hold data, counted per L2 table.
  const perTable = new Uint32Array(l1Size)
  await forEachDataCluster(disk, cluster => { perTable[Math.floor(cluster / ENTRIES)]++ })
  const tables = [...perTable.keys()].filter(i => perTable[i] > 0)
  const dataClusters = perTable.reduce((n, c) => n + c, 0)
  const l1Start = 1
  // The refcount structures follow the L1 table; their size depends on the total, which includes them.
  const refs = refcountLayout(1 + l1Clusters + tables.length + dataClusters, CLUSTER_BITS)
  const blocksStart = l1Start + l1Clusters
  const tableStart = blocksStart + refs.blocks
  const l2Start = tableStart + refs.tableClusters
  const dataStart = l2Start + tables.length
  const meta = metadata({ size: disk.size, l2Tables: tables.map((index, n) => [index, l2Start + n]), l1Start, blocksStart, tableStart, refs })
  let written = 0
  const put = async (bytes: Buffer): Promise<void> => {
    written += bytes.length
    if (!out.write(bytes)) await drained(out)
  }
  for (const part of [meta.header, meta.l1, meta.blocks, meta.table]) await put(part)
  // Pass 2: the L2 tables; data clusters will follow in guest order, so a running count places each.
  let host = dataStart
  for (const index of tables) {
    const l2 = Buffer.alloc(CLUSTER_SIZE)
    await forEachDataCluster(disk, cluster => { writeEntry(l2, (cluster % ENTRIES) * 8, (host++) * CLUSTER_SIZE, COPIED) },
      index * ENTRIES * CLUSTER_SIZE, ENTRIES * CLUSTER_SIZE)
    await put(l2)
  }
  // Pass 3: the data, whole clusters (the last one padded), read in runs of up to 1 MiB.
  let first = 0
  let count = 0
  const flush = async (): Promise<void> => {
    if (count === 0) return
    const bytes = Buffer.alloc(count * CLUSTER_SIZE)
    await disk.read(bytes.subarray(0, Math.min(bytes.length, disk.size - first * CLUSTER_SIZE)), first * CLUSTER_SIZE)
    count = 0
    await put(bytes)
  }
  await forEachDataCluster(disk, async cluster => {
    if (count > 0 && (cluster !== first + count || count === 16)) await flush()
    if (count === 0) first = cluster
    count++
  })
  await flush()
  return written
}

/** Calls `fn` for each 64 KiB guest cluster in [offset, offset + length) that the map says holds data, in order. */
async function forEachDataCluster (disk: RandomAccessDisk, fn: (cluster: number) => void | Promise<void>, offset = 0, length = disk.size): Promise<void> {
  const end = Math.min(disk.size, offset + length)
  const step = 1 << 30
  for (let at = offset; at < end; at += step) {
    let last = -1
    for (const e of await disk.map(at, Math.min(step, end - at))) {
      if (!e.data) continue
      for (let c = Math.max(Math.floor(e.offset / CLUSTER_SIZE), last + 1); c * CLUSTER_SIZE < e.offset + e.length; c++) {
        await fn(c)
        last = c
      }
    }
  }
}
