/**
 * A qcow2 image read front to back from a stream (stdin), without a copy of
 * the whole image when its layout allows it. Clusters are taken one by one:
 * the L1 and L2 tables are parsed as they pass, and a data cluster whose L2
 * entry has already been seen becomes records at once. Everything else (the
 * tables, data that comes before its L2 table, compressed data, clusters
 * smaller than a record) goes to a sparse temporary file at its own offset.
 * At the end that file is opened as an ordinary Qcow2Image, which checks the
 * whole image and yields the clusters not yet emitted. Images written front
 * to back by qemu-img (each L2 table before its data) stream with little
 * spilled; images whose tables come last (ours) spill their data.
 */
import { open, unlink, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, DeviceInfo, StreamedImage } from '../contracts.js'
import { CLUSTER_SIZE, clusterFromBytes, clusterRecord } from '../record.js'
import { ByteQueue } from '../util/byte-queue.js'
import { ClusterSet } from '../util/cluster-set.js'
import { WriteQueue } from '../io/write-queue.js'
import { diskRecords } from '../io/disk-records.js'
import { giveBack, lend } from '../io/slabs.js'
import { chain } from '../io/chain.js'
import { peek } from '../io/input.js'
import { counter } from '../io/progress.js'
import { INCOMPAT, type Qcow2Header, diskSize, guestClusters, isQcow2, l1EntriesUsed, l2Entries, parseHeader, readL1Entry, readL2Entry } from './format.js'
import { Qcow2Image } from './image.js'

const UNKNOWN = -1
/** A host cluster named by two L2 entries: spilled, so that both read it. */
const SHARED = -2

/** Where each data cluster seen in an L2 table goes: host cluster -> guest cluster, paged. */
class HostMap {
  private readonly pages = new Map<number, Float64Array>()
  set (host: number, guest: number): void {
    const index = Math.floor(host / 8192)
    let page = this.pages.get(index)
    if (page === undefined) { page = new Float64Array(8192).fill(UNKNOWN); this.pages.set(index, page) }
    page[host % 8192] = page[host % 8192] === UNKNOWN ? guest : SHARED
  }

  get (host: number): number {
    return this.pages.get(Math.floor(host / 8192))?.[host % 8192] ?? UNKNOWN
  }
}

const NO_FILE_LIMIT = Number.MAX_SAFE_INTEGER

/**
 * A qcow2 image arriving on `input`: its size from the first bytes (the whole
 * header is checked once it has arrived), then its records.
 */
export async function streamQcow2 (input: Readable, options: { tmpDir?: string } = {}): Promise<StreamedImage> {
  const head = await peek(input, 32)
  if (head.length < 32 || !isQcow2(head)) throw new VmapipeError('E_QCOW2_HEADER', 'not a qcow2 header', { offset: 0 })
  const raw = head.readBigUInt64BE(24)
  if (raw > BigInt(Number.MAX_SAFE_INTEGER)) throw new VmapipeError('E_QCOW2_HEADER', `size ${raw} is beyond any real image`, { offset: 24 })
  const size = diskSize(Number(raw))
  return {
    size,
    records: async (device, progress) =>
      qcow2StreamRecords(progress ? chain(input, await counter(progress)) : input, { id: device, name: 'stdin', size }, options),
  }
}

export function qcow2StreamRecords (input: Readable, device: DeviceInfo, options: { tmpDir?: string } = {}): Readable {
  return Readable.from(records(input, device, options.tmpDir ?? tmpdir()), { objectMode: true, highWaterMark: 16 })
}

/**
 * What one pass over the stream has learnt: the header, the L1 table as it
 * fills, where L2 tables lie, which host clusters hold which guest clusters,
 * and what has been emitted; clusters that cannot become records yet go to
 * the spill file at their own offset.
 */
class StreamPass {
  readonly emitted = new ClusterSet()
  /** Bytes of the image seen so far. */
  pos = 0
  private readonly queue = new WriteQueue()
  private readonly l1: Buffer
  private l1Filled = 0
  /** L2 table offset -> L1 index. */
  private readonly l2At = new Map<number, number>()
  private readonly hosts = new HostMap()
  private readonly clusterSize: number

  constructor (readonly header: Qcow2Header, private readonly device: DeviceInfo, private readonly spill: FileHandle) {
    this.l1 = Buffer.alloc(header.l1Size * 8)
    this.clusterSize = 2 ** header.clusterBits
  }

  /**
   * The next cluster of the image (the last may be short): its records, if its L2 entry has passed. The caller
   * holds `c` until the generator is done; each record's data is a loan of its own (io/slabs.ts).
   */
  * cluster (c: Buffer): Generator<ClusterRecord, Promise<void> | undefined> {
    const at = this.pos
    this.pos += c.length
    const guest = this.hosts.get(at / this.clusterSize)
    if (guest >= 0 && c.length === this.clusterSize) {
      yield * this.emit(c, guest)
      return undefined
    }
    // The write queue takes a loan of its own when `c` lies in a slab.
    const written = this.queue.write(this.spill.fd, c, at, 'writing a temporary file')
    this.learnL1(c, at)
    const l1Index = this.l2At.get(at)
    if (l1Index !== undefined && c.length === this.clusterSize) this.learnL2(c, l1Index, at)
    return written
  }

  /** All clusters given: the spill file holds every byte that was not emitted. */
  async finish (): Promise<void> {
    await this.queue.drain()
    await this.spill.truncate(this.pos).catch(err => { throw ioError(err, 'writing a temporary file') })
  }

  /** Copies the part of the L1 table in `c`; once it is whole, notes the L2 tables still ahead. */
  private learnL1 (c: Buffer, at: number): void {
    const h = this.header
    if (at + c.length <= h.l1Offset || at >= h.l1Offset + this.l1.length) return
    const from = Math.max(0, h.l1Offset - at)
    this.l1Filled += c.copy(this.l1, Math.max(0, at - h.l1Offset), from, Math.min(c.length, h.l1Offset + this.l1.length - at))
    if (this.l1Filled !== this.l1.length) return
    for (let i = 0; i < l1EntriesUsed(h); i++) {
      const l2 = readL1Entry(this.l1, i, this.clusterSize, NO_FILE_LIMIT, h.l1Offset)
      if (l2 > at) this.l2At.set(l2, i)
    }
  }

  /** Records the L2 table's data clusters that still lie ahead. */
  private learnL2 (table: Buffer, l1Index: number, at: number): void {
    const h = this.header
    const entries = l2Entries(h.clusterBits, (h.incompatible & INCOMPAT.EXTENDED_L2) !== 0)
    // A record is 64 KiB of guest data: smaller clusters are left to the final pass.
    if (this.clusterSize < CLUSTER_SIZE) return
    // Only the disk's own entries, checked as the file reader checks them (the end of the file is not known yet).
    for (let i = 0; i < entries && l1Index * entries + i < guestClusters(h); i++) {
      const entry = readL2Entry(h, table, i, at, l1Index * entries + i, NO_FILE_LIMIT)
      if ((entry.kind === 'data' || (entry.kind === 'subclusters' && entry.allocated === 0xffffffff)) && entry.host >= this.pos) {
        this.hosts.set(entry.host / this.clusterSize, l1Index * entries + i)
      }
    }
  }

  private * emit (c: Buffer, guest: number): Generator<ClusterRecord> {
    const first = guest * this.clusterSize
    const size = this.device.size
    for (let off = 0; off < this.clusterSize && first + off < size; off += CLUSTER_SIZE) {
      const cluster = (first + off) / CLUSTER_SIZE
      if (!this.emitted.add(cluster)) throw new VmapipeError('E_QCOW2_L2', `guest cluster ${guest} is mapped twice`, { offset: this.pos - this.clusterSize })
      const rec = clusterFromBytes(this.device.id, cluster, c.subarray(off, Math.min(off + CLUSTER_SIZE, size - first)))
      yield clusterRecord(rec.device, cluster, rec.mask, lend(rec.data))
    }
  }
}

/** The header, once enough of the stream has arrived to hold it (its cluster, at most 2 MiB); null until then. */
function headerOf (bytes: ByteQueue, device: DeviceInfo): Qcow2Header | null {
  const fixed = bytes.peek(24)
  if (fixed === null) return null
  const clusterBits = fixed.readUInt32BE(20)
  const head = bytes.peek(Math.min(2 ** Math.min(Math.max(clusterBits, 9), 21), 2 << 20))
  if (head === null) return null
  const header = parseHeader(head, NO_FILE_LIMIT)
  if (header.backing !== undefined || (header.incompatible & INCOMPAT.DATA_FILE) !== 0) {
    throw new VmapipeError('E_NOT_SEEKABLE', 'a qcow2 image from stdin may not refer to a backing or data file; give its path instead')
  }
  if (header.size !== device.size) throw new VmapipeError('E_INPUT_SIZE', `the image is ${header.size} bytes, not ${device.size}`)
  return header
}

async function * records (input: Readable, device: DeviceInfo, dir: string): AsyncGenerator<ClusterRecord> {
  const path = join(dir, `vmapipe-qcow2-${process.pid}-${randomBytes(6).toString('hex')}`)
  let spill: FileHandle | undefined
  try {
    spill = await open(path, 'wx+', 0o600).catch(err => { throw ioError(err, `cannot create a temporary file in ${dir}`) })
    // Chunks lent from slabs (a pipe's, io/slabs.ts) are given back once a cluster is done with them.
    const bytes = new ByteQueue({ done: giveBack })
    let pass: StreamPass | undefined
    for await (const chunk of input) {
      bytes.push(chunk as Buffer)
      if (pass === undefined) {
        const header = headerOf(bytes, device)
        if (header === null) continue
        pass = new StreamPass(header, device, spill)
      }
      const clusterSize = 2 ** pass.header.clusterBits
      // yield* here (an async generator over a sync one) awaits what cluster() returns: the spill write, when it asks to be waited for.
      for (let c = bytes.peek(clusterSize); c !== null; c = bytes.peek(clusterSize)) {
        yield * pass.cluster(c)
        bytes.skip(clusterSize)
      }
    }
    if (pass === undefined) throw new VmapipeError('E_QCOW2_HEADER', 'the input ended before a qcow2 header', { offset: bytes.length })
    if (bytes.length > 0) yield * pass.cluster(bytes.peek(bytes.length) as Buffer)
    await pass.finish()
    const image = await Qcow2Image.open(path, { standalone: true })
    await unlink(path).catch(() => {})
    // The final pass checks the whole image and brings what did not stream.
    for await (const rec of diskRecords(image, device.id, { skip: pass.emitted })) yield rec as ClusterRecord
  } finally {
    await spill?.close().catch(() => {})
    await unlink(path).catch(() => {})
  }
}
