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
import { type ClusterRecord, type DeviceInfo, CLUSTER_SIZE, clusterFromBytes } from '../record.js'
import { ByteQueue } from '../util/byte-queue.js'
import { ClusterSet } from '../util/cluster-set.js'
import { WriteQueue } from '../io/write-queue.js'
import { type StreamedImage, diskRecords } from '../disk.js'
import { chain } from '../io/chain.js'
import { peek } from '../io/input.js'
import { counter } from '../io/progress.js'
import { INCOMPAT, type Qcow2Header, diskSize, guestClusters, isQcow2, l1EntriesUsed, l2Entries, parseHeader, readL1Entry, readL2Entry } from './format.js'
import { Qcow2Image } from './reader.js'

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

async function * records (input: Readable, device: DeviceInfo, dir: string): AsyncGenerator<ClusterRecord> {
  const path = join(dir, `vmapipe-qcow2-${process.pid}-${randomBytes(6).toString('hex')}`)
  let spill: FileHandle | undefined
  try {
    spill = await open(path, 'wx+', 0o600).catch(err => { throw ioError(err, `cannot create a temporary file in ${dir}`) })
    const queue = new WriteQueue()
    const emitted = new ClusterSet()
    const bytes = new ByteQueue()
    let header: Qcow2Header | undefined
    let l1: Buffer | undefined
    let l1Filled = 0
    const l2At = new Map<number, number>() // L2 table offset -> L1 index
    const hosts = new HostMap()
    let pos = 0
    // Input chunks are never reused, so a piece of one can wait in the write queue as it is.
    const store = async (b: Buffer, at: number): Promise<void> => { await queue.write((spill as FileHandle).fd, b, at, 'writing a temporary file') }

    const onCluster = async function * (c: Buffer): AsyncGenerator<ClusterRecord> {
      const h = header as Qcow2Header
      const clusterSize = 2 ** h.clusterBits
      const at = pos
      pos += c.length
      const guest = hosts.get(at / clusterSize)
      if (guest >= 0 && c.length === clusterSize) {
        yield * emit(c, guest, clusterSize)
        return
      }
      await store(c, at)
      if (l1 !== undefined && at + c.length > h.l1Offset && at < h.l1Offset + l1.length) {
        const from = Math.max(0, h.l1Offset - at)
        l1Filled += c.copy(l1, Math.max(0, at - h.l1Offset), from, Math.min(c.length, h.l1Offset + l1.length - at))
        if (l1Filled === l1.length) {
          for (let i = 0; i < l1EntriesUsed(h); i++) {
            const l2 = readL1Entry(l1, i, clusterSize, NO_FILE_LIMIT, h.l1Offset)
            if (l2 > at) l2At.set(l2, i)
          }
        }
      }
      const l1Index = l2At.get(at)
      if (l1Index !== undefined && c.length === clusterSize) learnL2(c, l1Index, at, h)
    }

    /** Records the L2 table's data clusters that still lie ahead. */
    const learnL2 = (table: Buffer, l1Index: number, at: number, h: Qcow2Header): void => {
      const entries = l2Entries(h.clusterBits, (h.incompatible & INCOMPAT.EXTENDED_L2) !== 0)
      const clusterSize = 2 ** h.clusterBits
      // A record is 64 KiB of guest data: smaller clusters are left to the final pass.
      if (clusterSize < CLUSTER_SIZE) return
      // Only the disk's own entries, checked as the file reader checks them (the end of the file is not known yet).
      for (let i = 0; i < entries && l1Index * entries + i < guestClusters(h); i++) {
        const entry = readL2Entry(h, table, i, at, l1Index * entries + i, NO_FILE_LIMIT)
        if ((entry.kind === 'data' || (entry.kind === 'subclusters' && entry.allocated === 0xffffffff)) && entry.host >= pos) {
          hosts.set(entry.host / clusterSize, l1Index * entries + i)
        }
      }
    }

    const emit = function * (c: Buffer, guest: number, clusterSize: number): Generator<ClusterRecord> {
      const first = guest * clusterSize
      for (let off = 0; off < clusterSize && first + off < device.size; off += CLUSTER_SIZE) {
        const cluster = (first + off) / CLUSTER_SIZE
        if (!emitted.add(cluster)) throw new VmapipeError('E_QCOW2_L2', `guest cluster ${guest} is mapped twice`, { offset: pos - clusterSize })
        yield clusterFromBytes(device.id, cluster, c.subarray(off, Math.min(off + CLUSTER_SIZE, device.size - first)))
      }
    }

    for await (const chunk of input) {
      bytes.push(chunk as Buffer)
      if (header === undefined) {
        const peek = bytes.peek(24)
        if (peek === null) continue
        const clusterBits = peek.readUInt32BE(20)
        const head = bytes.peek(Math.min(2 ** Math.min(Math.max(clusterBits, 9), 21), 2 << 20))
        if (head === null) continue
        header = parseHeader(head, NO_FILE_LIMIT)
        if (header.backing !== undefined || (header.incompatible & INCOMPAT.DATA_FILE) !== 0) {
          throw new VmapipeError('E_USAGE', 'a qcow2 image from stdin may not refer to a backing or data file; give its path instead')
        }
        if (header.size !== device.size) throw new VmapipeError('E_INPUT_SIZE', `the image is ${header.size} bytes, not ${device.size}`)
        l1 = Buffer.alloc(header.l1Size * 8)
      }
      const clusterSize = 2 ** header.clusterBits
      for (let c = bytes.take(clusterSize); c !== null; c = bytes.take(clusterSize)) yield * onCluster(c)
    }
    if (header === undefined) throw new VmapipeError('E_QCOW2_HEADER', 'the input ended before a qcow2 header', { offset: bytes.length })
    const rest = bytes.take(bytes.length)
    if (rest !== null && rest.length > 0) yield * onCluster(rest)
    await queue.drain()
    await spill.truncate(pos).catch(err => { throw ioError(err, 'writing a temporary file') })
    const image = await Qcow2Image.open(path, { standalone: true })
    await unlink(path).catch(() => {})
    // The final pass checks the whole image and brings what did not stream.
    for await (const rec of diskRecords(image, device.id, { skip: emitted })) yield rec as ClusterRecord
  } finally {
    await spill?.close().catch(() => {})
    await unlink(path).catch(() => {})
  }
}
