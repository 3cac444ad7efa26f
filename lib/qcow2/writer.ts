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
import { type ClusterRecord, CLUSTER_SIZE, clusterCount, expandCluster } from '../record.js'
import type { DiskWriter } from '../router.js'
import { RawFileWriter } from '../raw/writer.js'
import { WriteQueue, abandonFile, completeFile } from '../io/write-queue.js'
import { COPIED, ZERO_FLAG, encodeHeader, l2Entries, refcountLayout, writeEntry } from './format.js'

const CLUSTER_BITS = 16
const ENTRIES = l2Entries(CLUSTER_BITS, false)
/** In the guest -> host map: a cluster that reads as zeros (overlays only). */
const ZERO = 0xffffffff

export interface Qcow2WriterOptions {
  /** Keep guest data in this raw file; `name` is how the header refers to it (relative to the image). */
  dataFile?: { path: string, name: string }
  /** Make an overlay on this image: unwritten clusters read from it, zero clusters hide it. */
  backing?: { name: string, format: string }
  queue?: WriteQueue
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
    private readonly queue: WriteQueue,
    private readonly options: Qcow2WriterOptions,
    private readonly data?: RawFileWriter,
  ) {}

  /** Creates `path` (which must not exist) for a disk of `size` bytes. */
  static async create (path: string, size: number, options: Qcow2WriterOptions = {}): Promise<Qcow2FileWriter> {
    if (options.dataFile !== undefined && options.backing !== undefined) throw new VmapipeError('E_USAGE', 'a qcow2 with a raw data file cannot have a backing file')
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
    const host = this.nextHost++
    this.map.set(rec.cluster, host)
    return this.queue.write(this.file.fd, expandCluster(rec, this.size), host * CLUSTER_SIZE, `writing ${this.path}`)
  }

  async finish (): Promise<void> {
    await this.data?.finish()
    const guestClusters = clusterCount(this.size)
    const l1Size = Math.ceil(guestClusters / ENTRIES)
    // A raw data file maps every guest cluster to itself, as QEMU does for data_file_raw.
    const tableIndexes = this.data !== undefined ? Array.from({ length: l1Size }, (_, i) => i) : [...this.map.tables.keys()].sort((a, b) => a - b)
    const l2Start = this.nextHost
    const l1Start = l2Start + tableIndexes.length
    const l1Clusters = Math.ceil(l1Size * 8 / CLUSTER_SIZE)
    const refs = refcountLayout(l1Start + l1Clusters, CLUSTER_BITS)
    const blocksStart = l1Start + l1Clusters
    const tableStart = blocksStart + refs.blocks

    const l1 = Buffer.alloc(l1Clusters * CLUSTER_SIZE)
    for (const [n, index] of tableIndexes.entries()) {
      const host = l2Start + n
      writeEntry(l1, index * 8, host * CLUSTER_SIZE, COPIED)
      await this.put(this.l2Table(index, guestClusters), host)
    }
    await this.put(l1, l1Start)
    await this.put(refcountBlocks(refs.total, refs.blocks), blocksStart)
    const table = Buffer.alloc(refs.tableClusters * CLUSTER_SIZE)
    for (let b = 0; b < refs.blocks; b++) writeEntry(table, b * 8, (blocksStart + b) * CLUSTER_SIZE)
    await this.put(table, tableStart)
    await this.put(encodeHeader({
      clusterBits: CLUSTER_BITS,
      size: this.size,
      l1Size,
      l1Offset: l1Start * CLUSTER_SIZE,
      refcountTableOffset: tableStart * CLUSTER_SIZE,
      refcountTableClusters: refs.tableClusters,
      ...(this.options.dataFile ? { dataFile: { name: this.options.dataFile.name, raw: true } } : {}),
      ...(this.options.backing ? { backing: this.options.backing } : {}),
    }), 0)
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

/** Refcount blocks saying "1" for clusters 0..total-1 (every cluster of the file is in use once). */
function refcountBlocks (total: number, blocks: number): Buffer {
  const buf = Buffer.alloc(blocks * CLUSTER_SIZE)
  for (let c = 0; c < total; c++) buf.writeUInt16BE(1, c * 2)
  return buf
}
