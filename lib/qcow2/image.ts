/**
 * Qcow2Image: a qcow2 file as a RandomAccessDisk. Versions 2 and 3, zero
 * clusters, compressed (deflate) clusters, extended L2 entries, an external
 * data file, and, when asked for, a backing chain. Every offset from the file
 * is checked before it is used; tables are loaded on demand and cached within
 * a fixed budget, so memory stays bounded whatever the image claims.
 */
import { open, realpath, type FileHandle } from 'node:fs/promises'
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path'
import { promisify } from 'node:util'
import { constants, createInflateRaw, inflateRaw } from 'node:zlib'
import { VmapipeError, ioError } from '../errors.js'
import type { DiskDescription, Extent, RandomAccessDisk } from '../contracts.js'
import { mappedBytes } from '../io/disk-records.js'
import { readFully } from '../io/pread.js'
import { readHead } from '../io/input.js'
import { RawImage } from '../raw/image.js'
import {
  type L2Entry, type Qcow2Header, INCOMPAT, isQcow2, l1EntriesUsed, l2Entries, parseHeader, readL1Entry, readL2Entry,
} from './format.js'

const inflate = promisify(inflateRaw)
/** Bytes of L2 tables kept in memory. */
const L2_CACHE_BYTES = 16 << 20
const MAX_CHAIN = 32

export interface Qcow2OpenOptions {
  /** Read the backing chain instead of refusing an image that has one. */
  followBacking?: boolean
  /** Use this file as the backing file, wherever it is (implies followBacking for the top image). */
  backing?: string
  /** Refuse references to other files (a data file, a backing file not given here): the image is a copy out of its place. */
  standalone?: boolean
}

/** How a piece of the guest disk is stored. */
type Piece =
  /** Reads as zeros: a zero cluster of this layer (depth 1) or nothing anywhere (depth 0). */
  | { kind: 'zero', depth: 0 | 1 }
  | { kind: 'backing' }
  | { kind: 'data', file: FileHandle, host: number }
  | { kind: 'compressed', host: number, bytes: number }

interface Opened { handle: FileHandle, size: number, path: string }

async function openFile (path: string): Promise<Opened> {
  try {
    const handle = await open(path, 'r')
    return { handle, size: (await handle.stat()).size, path }
  } catch (err) {
    throw ioError(err, `cannot open ${path}`)
  }
}

export class Qcow2Image implements RandomAccessDisk {
  readonly size: number
  readonly clusterSize: number
  private readonly extended: boolean
  private readonly entries: number
  private readonly l2Cache = new Map<number, Buffer>()
  private inflated?: { host: number, bytes: Buffer }
  /** The L2 table looked up last. */
  private lastL2?: { offset: number, table: Buffer }

  /** Use Qcow2Image.open(). */
  constructor (
    readonly path: string,
    readonly header: Qcow2Header,
    private readonly file: Opened,
    /** The L1 table, decoded and checked once: each L2 table's offset, 0 for none. */
    private readonly l2Offsets: Float64Array,
    private readonly data: Opened | undefined,
    readonly backing: RandomAccessDisk | undefined
  ) {
    this.size = header.size
    this.clusterSize = 2 ** header.clusterBits
    this.extended = (header.incompatible & INCOMPAT.EXTENDED_L2) !== 0
    this.entries = l2Entries(header.clusterBits, this.extended)
  }

  static async open (path: string, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    return await openChain(path, options, new Set(), 0)
  }

  /** For `vma info`: allocation counts what the whole chain stores. */
  async describe (signal?: AbortSignal): Promise<DiskDescription> {
    const allocated = await mappedBytes(async (o, l) => await this.map(o, l), this.size, e => e.data, signal)
    let layers = 1
    for (let d: RandomAccessDisk | undefined = this.backing; d !== undefined; d = d instanceof Qcow2Image ? d.backing : undefined) layers++
    return {
      format: 'qcow2',
      size: this.size,
      allocated,
      clusterSize: this.clusterSize,
      layers,
      details: {
        version: this.header.version,
        ...(this.extended ? { 'extended L2': 'yes' } : {}),
        ...(this.header.dataFile !== undefined ? { 'data file': this.header.dataFile } : {}),
        ...(this.header.backing !== undefined ? { 'backing file': this.header.backing.name } : {}),
      },
    }
  }

  async close (): Promise<void> {
    await this.file.handle.close().catch(() => {})
    if (this.data !== undefined) await this.data.handle.close().catch(() => {})
    await this.backing?.close()
  }

  async map (offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = []
    const push = (e: Extent): void => {
      const last = out[out.length - 1]
      if (last !== undefined && last.data === e.data && last.depth === e.depth && last.offset + last.length === e.offset) last.length += e.length
      else out.push(e)
    }
    await this.walk(offset, length, async (piece, at, len) => {
      if (piece.kind === 'backing') {
        // Whatever the backing chain holds lies one layer further down.
        for (const e of await this.fromBacking(at, len)) push({ ...e, depth: e.data || (e.depth ?? 0) > 0 ? (e.depth ?? 1) + 1 : 0 })
      } else push({ offset: at, length: len, data: piece.kind !== 'zero', depth: piece.kind === 'zero' ? piece.depth : 1 })
    })
    return out
  }

  async read (buf: Buffer, offset: number): Promise<void> {
    await this.walk(offset, buf.length, async (piece, at, len) => {
      const target = buf.subarray(at - offset, at - offset + len)
      switch (piece.kind) {
        case 'zero': target.fill(0); break
        // A file may end inside its last cluster (a raw data file even earlier); like QEMU, read zeros there.
        case 'data': await readFully(piece.file, target, piece.host, this.path, true); break
        case 'compressed': (await this.decompress(piece.host, piece.bytes)).copy(target, 0, at % this.clusterSize, at % this.clusterSize + len); break
        case 'backing': await this.readBacking(target, at); break
      }
    })
  }

  /**
   * Calls `fn` for each stretch of [offset, offset+length) stored one way, in
   * order; data pieces adjacent on disk are merged. Only a table not yet in
   * memory and `fn` are waited for: a cluster whose table is cached costs no
   * promise, as each cluster of a disk being packed would otherwise.
   */
  private async walk (offset: number, length: number, fn: (piece: Piece, at: number, len: number) => Promise<void>): Promise<void> {
    let pending: { piece: Piece, at: number, len: number } | undefined
    const span = this.entries * this.clusterSize
    for (let at = offset; at < offset + length;) {
      const l1Index = Math.floor(at / span)
      let pieces: Array<[Piece, number, number]>
      let base: number
      let end: number
      if (this.l2Offsets[l1Index] === 0) {
        // No L2 table: its whole span is one piece, so work follows the tables, not the virtual size.
        end = Math.min(offset + length, (l1Index + 1) * span)
        base = at
        pieces = [[this.unallocated(), 0, end - at]]
      } else {
        const cluster = Math.floor(at / this.clusterSize)
        base = cluster * this.clusterSize
        end = Math.min(offset + length, base + this.clusterSize)
        pieces = this.pieces(this.cachedEntry(cluster) ?? await this.entry(cluster), at - base, end - base)
      }
      for (const [piece, from, to] of pieces) {
        const pieceAt = base + from
        if (pending !== undefined && pending.at + pending.len === pieceAt && sameRun(pending.piece, piece, pending.len)) {
          pending.len += to - from
          continue
        }
        if (pending !== undefined) await fn(pending.piece, pending.at, pending.len)
        pending = { piece, at: pieceAt, len: to - from }
      }
      at = end
    }
    if (pending !== undefined) await fn(pending.piece, pending.at, pending.len)
  }

  /** The stretches of one cluster between `from` and `to` (bytes within the cluster). */
  private pieces (entry: L2Entry, from: number, to: number): Array<[Piece, number, number]> {
    switch (entry.kind) {
      case 'unallocated': return [[this.unallocated(), from, to]]
      case 'zero': return [[{ kind: 'zero', depth: 1 }, from, to]]
      case 'data': return [[{ kind: 'data', file: this.dataFile(), host: entry.host + from }, from, to]]
      case 'compressed': return [[{ kind: 'compressed', host: entry.host, bytes: entry.bytes }, from, to]]
      case 'subclusters': {
        const sub = this.clusterSize / 32
        const out: Array<[Piece, number, number]> = []
        for (let i = Math.floor(from / sub); i * sub < to; i++) {
          const a = Math.max(from, i * sub)
          const b = Math.min(to, (i + 1) * sub)
          const bit = 1 << i
          const piece: Piece = (entry.allocated & bit) !== 0
            ? { kind: 'data', file: this.dataFile(), host: entry.host + a }
            : (entry.zero & bit) !== 0 ? { kind: 'zero', depth: 1 } : this.unallocated()
          out.push([piece, a, b])
        }
        return out
      }
    }
  }

  /** What an unallocated stretch reads: the backing file, or zeros. */
  private unallocated (): Piece {
    return this.backing === undefined ? { kind: 'zero', depth: 0 } : { kind: 'backing' }
  }

  private dataFile (): FileHandle {
    return (this.data ?? this.file).handle
  }

  /** The L2 entry of guest cluster `cluster`, its data range checked against the file it lives in. */
  private async entry (cluster: number): Promise<L2Entry> {
    const l2Offset = this.l2Offsets[Math.floor(cluster / this.entries)]
    if (l2Offset === 0) return { kind: 'unallocated' }
    return readL2Entry(this.header, await this.l2Table(l2Offset), cluster % this.entries, l2Offset, cluster, this.file.size)
  }

  /** The L2 entry of `cluster` when its table is the one used last (each table serves many clusters in a row); else undefined. */
  private cachedEntry (cluster: number): L2Entry | undefined {
    const l2Offset = this.l2Offsets[Math.floor(cluster / this.entries)]
    if (l2Offset === 0 || this.lastL2?.offset !== l2Offset) return undefined
    return readL2Entry(this.header, this.lastL2.table, cluster % this.entries, l2Offset, cluster, this.file.size)
  }

  private async l2Table (offset: number): Promise<Buffer> {
    const table = await this.loadL2Table(offset)
    this.lastL2 = { offset, table }
    return table
  }

  private async loadL2Table (offset: number): Promise<Buffer> {
    const cached = this.l2Cache.get(offset)
    if (cached !== undefined) {
      // Refresh its place: the Map's order is the eviction order.
      this.l2Cache.delete(offset)
      this.l2Cache.set(offset, cached)
      return cached
    }
    const table = Buffer.allocUnsafe(this.clusterSize)
    await readFully(this.file.handle, table, offset, `${this.path} (the L2 table at ${offset})`)
    if ((this.l2Cache.size + 1) * this.clusterSize > L2_CACHE_BYTES) this.l2Cache.delete(this.l2Cache.keys().next().value as number)
    this.l2Cache.set(offset, table)
    return table
  }

  private async decompress (host: number, bytes: number): Promise<Buffer> {
    if (this.inflated?.host === host) return this.inflated.bytes
    const compressed = Buffer.allocUnsafe(Math.min(bytes, this.file.size - host))
    await readFully(this.file.handle, compressed, host, `${this.path} (the compressed cluster at ${host})`)
    let out: Buffer
    try {
      out = await inflateCluster(compressed, this.clusterSize)
    } catch (err) {
      throw new VmapipeError('E_QCOW2_DATA',
        `the compressed cluster at ${host} does not inflate to one ${this.clusterSize}-byte cluster: ${(err as Error).message}`, { offset: host })
    }
    if (out.length !== this.clusterSize) {
      throw new VmapipeError('E_QCOW2_DATA', `the compressed cluster at ${host} inflates to ${out.length} bytes, not ${this.clusterSize}`, { offset: host })
    }
    this.inflated = { host, bytes: out }
    return out
  }

  private async fromBacking (offset: number, length: number): Promise<Extent[]> {
    const backing = this.backing as RandomAccessDisk
    const inside = Math.max(0, Math.min(length, backing.size - offset))
    const extents = inside > 0 ? await backing.map(offset, inside) : []
    return inside < length ? [...extents, { offset: offset + inside, length: length - inside, data: false }] : extents
  }

  private async readBacking (target: Buffer, offset: number): Promise<void> {
    const backing = this.backing as RandomAccessDisk
    const inside = Math.max(0, Math.min(target.length, backing.size - offset))
    if (inside > 0) await backing.read(target.subarray(0, inside), offset)
    target.fill(0, inside)
  }
}

/**
 * The first `clusterSize` bytes `compressed` inflates to. Like QEMU (which
 * inflates into one cluster and stops when it is full), a stream that would
 * go on is cut at the cluster's end; one that ends short is for the caller.
 */
async function inflateCluster (compressed: Buffer, clusterSize: number): Promise<Buffer> {
  // Z_SYNC_FLUSH at the end: bytes after the deflate stream (up to the descriptor's sector) may follow.
  const options = { maxOutputLength: clusterSize, finishFlush: constants.Z_SYNC_FLUSH }
  try {
    return await inflate(compressed, options)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') throw err
  }
  const out = Buffer.alloc(clusterSize)
  let filled = 0
  const stream = createInflateRaw({ finishFlush: constants.Z_SYNC_FLUSH, chunkSize: clusterSize })
  stream.end(compressed)
  for await (const chunk of stream) {
    filled += (chunk as Buffer).copy(out, filled)
    if (filled === clusterSize) break
  }
  stream.destroy()
  return out.subarray(0, filled)
}

function sameRun (a: Piece, b: Piece, aLength: number): boolean {
  if (a.kind !== b.kind) return false
  if (a.kind === 'data' && b.kind === 'data') return a.file === b.file && a.host + aLength === b.host
  if (a.kind === 'zero' && b.kind === 'zero') return a.depth === b.depth
  return a.kind === 'backing'
}

/** Whether `path` lies inside `dir` (both real paths). */
function inside (dir: string, path: string): boolean {
  const rel = relative(dir, path)
  return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel) && !rel.split(sep).includes('..')
}

/**
 * Resolves a file an image names (data file, backing file) relative to the
 * image, refusing names that lead out of the image's directory.
 */
async function besideImage (imagePath: string, name: string, what: string): Promise<string> {
  const dir = await realpath(dirname(imagePath))
  const path = resolve(dir, name)
  const real = await realpath(path).catch(err => { throw ioError(err, `cannot open the ${what} ${name} of ${imagePath}`) })
  if (!inside(dir, real)) {
    throw new VmapipeError('E_QCOW2_BACKING', `the ${what} ${name} of ${imagePath} lies outside the image's directory; name it explicitly to use it`)
  }
  return real
}

async function openChain (path: string, options: Qcow2OpenOptions, seen: Set<string>, depth: number): Promise<Qcow2Image> {
  const real = await realpath(path).catch(err => { throw ioError(err, `cannot open ${path}`) })
  if (seen.has(real)) throw new VmapipeError('E_QCOW2_BACKING', `the backing chain loops back to ${path}`)
  if (depth > MAX_CHAIN) throw new VmapipeError('E_QCOW2_BACKING', `the backing chain is longer than ${MAX_CHAIN} images`)
  seen.add(real)
  const file = await openFile(path)
  const opened: Array<{ close: () => Promise<void> }> = [{ close: async () => await file.handle.close() }]
  try {
    const first = Buffer.alloc(Math.min(file.size, 2 << 20))
    await readFully(file.handle, first, 0, path)
    let header: Qcow2Header
    try {
      header = parseHeader(first, file.size)
    } catch (err) {
      throw err instanceof VmapipeError ? new VmapipeError(err.code, `${path}: ${err.message}`, { cause: err }) : err
    }
    const clusterSize = 2 ** header.clusterBits
    const l1 = Buffer.alloc(header.l1Size * 8)
    await readFully(file.handle, l1, header.l1Offset, `${path} (its L1 table)`)
    // Entries past the disk are never read (as in QEMU): they stay 0.
    const l2Offsets = new Float64Array(header.l1Size)
    for (let i = 0; i < l1EntriesUsed(header); i++) l2Offsets[i] = readL1Entry(l1, i, clusterSize, file.size, header.l1Offset)

    let data: Opened | undefined
    const refuseReference = (what: string): void => {
      if (options.standalone === true) {
        throw new VmapipeError(
          'E_NOT_SEEKABLE',
          `${path} came through stdin and refers to a ${what}, which cannot be found from there; give the image's path instead`
        )
      }
    }
    if ((header.incompatible & INCOMPAT.DATA_FILE) !== 0) {
      refuseReference('data file')
      if (header.dataFile === undefined) throw new VmapipeError('E_QCOW2_HEADER', `${path} keeps its data in an external file but does not name it`)
      data = await openFile(await besideImage(path, header.dataFile, 'data file'))
      opened.push({ close: async () => await (data as Opened).handle.close() })
    }
    let backing: RandomAccessDisk | undefined
    if (header.backing !== undefined || options.backing !== undefined) {
      if (options.backing === undefined) refuseReference('backing file')
      if (options.backing === undefined && options.followBacking !== true) {
        throw new VmapipeError('E_BACKING', `${path} has the backing file ${header.backing?.name ?? ''}; set followBacking to read the whole chain`,
          { option: 'followBacking' })
      }
      const backingPath = options.backing ?? await besideImage(path, (header.backing as { name: string }).name, 'backing file')
      backing = await openBacking(backingPath, header.backing?.format, seen, depth)
      opened.push(backing)
    }
    return new Qcow2Image(path, header, file, l2Offsets, data, backing)
  } catch (err) {
    for (const o of opened.reverse()) await o.close().catch(() => {})
    throw err
  }
}

/** A backing file: qcow2 (its own chain followed) or raw, by its format extension or its magic. */
async function openBacking (path: string, format: string | undefined, seen: Set<string>, depth: number): Promise<RandomAccessDisk> {
  const head = await readHead(path, 4)
  if (format === 'qcow2' || (format === undefined && isQcow2(head))) return await openChain(path, { followBacking: true }, seen, depth + 1)
  if (format !== undefined && format !== 'raw') {
    throw new VmapipeError('E_QCOW2_BACKING', `backing file ${path} is in format ${format}, which vmapipe does not read as a backing file`)
  }
  return await RawImage.open(path)
}
