/**
 * What the fuzzer knows of each format, written apart from the library (from
 * the specs in ../shared/specs): where the fields and tables of a seed lie,
 * and the checksums to set again after an edit so that the parser looks
 * past them.
 */
import { createHash } from 'node:crypto'
import { type Field, type Seed, table } from './mutate.js'
import type { Rng } from './rng.js'

function md5WithHole (buf: Buffer, from: number, to: number, hole: number): Buffer {
  return createHash('md5').update(buf.subarray(from, hole)).update(Buffer.alloc(16)).update(buf.subarray(hole + 16, to)).digest()
}

const popcount16 = (m: number): number => { let n = 0; for (; m !== 0; m &= m - 1) n++; return n }

// ------------------------------------------------------------------ VMA (big-endian)

const VMA_EXTENT = 512
const VMA_ENTRIES = 59

function vmaExtents (buf: Buffer, from: number, visit: (at: number) => void): void {
  let at = from
  while (at + VMA_EXTENT <= buf.length && buf.toString('latin1', at, at + 4) === 'VMAE') {
    visit(at)
    let data = 0
    for (let i = 0; i < VMA_ENTRIES; i++) data += popcount16(buf.readUInt16BE(at + 40 + 8 * i)) * 4096
    at += VMA_EXTENT + data
  }
}

export function vmaSeed (name: string, bytes: Buffer): Seed {
  const headerSize = bytes.readUInt32BE(56)
  const fields: Field[] = [
    { at: 4, width: 4, le: false, name: 'version' },
    { at: 24, width: 8, le: false, name: 'ctime' },
    { at: 48, width: 4, le: false, name: 'blob_buffer_offset' },
    { at: 52, width: 4, le: false, name: 'blob_buffer_size' },
    { at: 56, width: 4, le: false, name: 'header_size' },
  ]
  for (let i = 0; i < 256; i++) {
    if (bytes.readUInt32BE(2044 + 4 * i) !== 0 || i < 2) {
      fields.push({ at: 2044 + 4 * i, width: 4, le: false, name: `config_names[${i}]` }, { at: 3068 + 4 * i, width: 4, le: false, name: `config_data[${i}]` })
    }
    const dev = 4096 + 32 * i
    if (bytes.readUInt32BE(dev) !== 0 || i < 3) {
      fields.push({ at: dev, width: 4, le: false, name: `dev[${i}].name` }, { at: dev + 8, width: 8, le: false, name: `dev[${i}].size` })
    }
  }
  const regions: Array<[number, number]> = [[0, 8192], [Math.min(headerSize, bytes.length), Math.min(headerSize, bytes.length)]]
  const cuts = [60, 4096, headerSize]
  vmaExtents(bytes, headerSize, at => {
    regions.push([at, at + VMA_EXTENT])
    cuts.push(at, at + VMA_EXTENT)
    fields.push({ at: at + 6, width: 2, le: false, name: `extent@${at}.block_count` })
    for (let i = 0; i < VMA_ENTRIES; i++) {
      const e = at + 40 + 8 * i
      if (bytes.readBigUInt64BE(e) === 0n && i > 2) continue
      fields.push(
        { at: e, width: 8, le: false, name: `extent@${at}[${i}]` },
        { at: e, width: 2, le: false, name: `extent@${at}[${i}].mask` },
        { at: e + 3, width: 1, le: false, name: `extent@${at}[${i}].dev` },
        { at: e + 4, width: 4, le: false, name: `extent@${at}[${i}].cluster` }
      )
    }
  })
  cuts.push(bytes.length)
  return { name, bytes, fields, regions: regions.filter(([a, b]) => b > a), cuts }
}

/** Sets the header's and each extent's MD5 again, as a writer would have. */
export function fixVma (buf: Buffer): void {
  if (buf.length < 60) return
  const headerSize = buf.readUInt32BE(56)
  if (headerSize < 60 || headerSize > buf.length) return
  md5WithHole(buf, 0, headerSize, 32).copy(buf, 32)
  vmaExtents(buf, headerSize, at => { md5WithHole(buf, at, at + VMA_EXTENT, at + 24).copy(buf, at + 24) })
}

/**
 * Appends `count` extents of mask-0 entries naming clusters spread over a
 * device made huge: an archive of a few hundred KiB that names clusters all
 * over a device of up to 2^48 bytes (what the cluster tracker must bear).
 */
export function sprayVma (buf: Buffer, rng: Rng): { bytes: Buffer, what: string } {
  if (buf.length < 4096 + 32) return { bytes: buf, what: 'too short to spray' }
  const size = 2 ** (40 + rng.below(9))
  const dev = 1
  buf.writeBigUInt64BE(BigInt(size), 4096 + 32 * dev + 8)
  const count = 64 + rng.below(2048)
  const extents = Buffer.alloc(count * VMA_EXTENT)
  const clusters = size / 65536
  for (let e = 0; e < count; e++) {
    const at = e * VMA_EXTENT
    extents.write('VMAE', at, 'latin1')
    buf.copy(extents, at + 8, 8, 24)
    for (let i = 0; i < VMA_ENTRIES; i++) {
      extents.writeUInt32BE(dev, at + 40 + 8 * i)
      extents.writeUInt32BE(Math.floor(rng.below(clusters)) >>> 0, at + 44 + 8 * i)
    }
  }
  return { bytes: Buffer.concat([buf, extents]), what: `device ${dev} made ${size} bytes, ${count} extents of mask-0 clusters spread over it` }
}

// ------------------------------------------------------------------------ NBD (big-endian)

const NBD_OPTION_REPLY = 0x0003e889045565a9n
const NBD_SIMPLE_REPLY = 0x67446698
const NBD_STRUCTURED_REPLY = 0x668e33ef
const NBD_REQUEST = 0x25609513
const NBD_IHAVEOPT = 0x49484156454f5054n

/** The numbers of an NBD conversation, found by their magics: what a server says (option replies, replies, chunks) or a client asks. */
export function nbdFields (b: Buffer): Field[] {
  const f: Field[] = []
  const u = (at: number, width: Field['width'], name: string): void => { if (at + width <= b.length) f.push({ at, width, le: false, name }) }
  for (let at = 0; at + 4 <= b.length; at++) {
    const word = b.readUInt32BE(at)
    if (at + 8 <= b.length && b.readBigUInt64BE(at) === NBD_OPTION_REPLY) {
      u(at + 8, 4, 'option'); u(at + 12, 4, 'reply type'); u(at + 16, 4, 'reply length')
      const type = at + 16 <= b.length ? b.readUInt32BE(at + 12) : 0
      if (type === 3 && at + 22 <= b.length) {
        // NBD_REP_INFO: NBD_INFO_EXPORT (size, flags) or NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum).
        u(at + 20, 2, 'info type')
        const info = b.readUInt16BE(at + 20)
        if (info === 0) { u(at + 22, 8, 'export size'); u(at + 30, 2, 'transmission flags') }
        if (info === 3) { u(at + 22, 4, 'minimum block'); u(at + 26, 4, 'preferred block'); u(at + 30, 4, 'maximum block') }
      }
      if (type === 4) u(at + 20, 4, 'meta context id')
    } else if (at + 8 <= b.length && b.readBigUInt64BE(at) === NBD_IHAVEOPT) {
      u(at + 8, 4, 'option'); u(at + 12, 4, 'option length')
      if (at === 8) u(at + 8, 2, 'handshake flags')
    } else if (word === NBD_SIMPLE_REPLY) {
      u(at + 4, 4, 'error'); u(at + 8, 8, 'cookie')
    } else if (word === NBD_STRUCTURED_REPLY) {
      u(at + 4, 2, 'chunk flags'); u(at + 6, 2, 'chunk type'); u(at + 8, 8, 'cookie'); u(at + 16, 4, 'chunk length')
      const type = at + 8 <= b.length ? b.readUInt16BE(at + 6) : 0
      if (type === 1 || type === 2) u(at + 20, 8, 'chunk offset')
      if (type === 2) u(at + 28, 4, 'hole length')
      if (type === 5) {
        u(at + 20, 4, 'context id')
        const length = at + 20 <= b.length ? b.readUInt32BE(at + 16) : 0
        for (let d = 4; d + 8 <= length && d < 4 + 8 * 32; d += 8) { u(at + 20 + d, 4, 'extent length'); u(at + 24 + d, 4, 'extent flags') }
      }
      if ((type & 0x8000) !== 0) { u(at + 20, 4, 'error'); u(at + 24, 2, 'message length') }
    } else if (word === NBD_REQUEST) {
      u(at + 4, 2, 'command flags'); u(at + 6, 2, 'command'); u(at + 8, 8, 'cookie'); u(at + 16, 8, 'offset'); u(at + 24, 4, 'length')
    }
  }
  return f
}

// --------------------------------------------------------------- qcow2 (big-endian)

const OFFSET_MASK = 0x00fffffffffffe00n

export function qcow2Seed (name: string, bytes: Buffer): Seed {
  const fields: Field[] = ([
    [4, 4, 'version'], [8, 8, 'backing_file_offset'], [16, 4, 'backing_file_size'], [20, 4, 'cluster_bits'], [24, 8, 'size'],
    [32, 4, 'crypt_method'], [36, 4, 'l1_size'], [40, 8, 'l1_table_offset'], [48, 8, 'refcount_table_offset'],
    [56, 4, 'refcount_table_clusters'], [60, 4, 'nb_snapshots'], [64, 8, 'snapshots_offset'], [72, 8, 'incompatible_features'],
    [80, 8, 'compatible_features'], [88, 8, 'autoclear_features'], [96, 4, 'refcount_order'], [100, 4, 'header_length'], [104, 1, 'compression_type'],
  ] as const).map(([at, width, n]) => ({ at, width, le: false, name: n }))
  const clusterBits = bytes.readUInt32BE(20)
  const cluster = 2 ** clusterBits
  const extended = bytes.readUInt32BE(4) >= 3 && (bytes.readBigUInt64BE(72) & 16n) !== 0n
  const l1Size = bytes.readUInt32BE(36)
  const l1At = Number(bytes.readBigUInt64BE(40))
  const regions: Array<[number, number]> = [[0, Math.min(cluster, 4096)], [l1At, l1At + 8 * l1Size]]
  const cuts = [32, 72, 104, l1At, l1At + 8 * l1Size]
  fields.push(...table('L1', l1At, l1Size, 8, false, bytes.length))
  for (let i = 0; i < l1Size && l1At + 8 * i + 8 <= bytes.length; i++) {
    const l2 = Number(bytes.readBigUInt64BE(l1At + 8 * i) & OFFSET_MASK)
    if (l2 === 0 || l2 >= bytes.length) continue
    regions.push([l2, l2 + cluster])
    cuts.push(l2, l2 + cluster)
    const step = extended ? 16 : 8
    for (let j = 0; j < cluster / step && l2 + j * step + 8 <= bytes.length; j++) {
      fields.push({ at: l2 + j * step, width: 8, le: false, name: `L2[${i}][${j}]` })
      if (extended) fields.push({ at: l2 + j * step + 8, width: 8, le: false, name: `L2[${i}][${j}].bitmap` })
    }
  }
  const rtAt = Number(bytes.readBigUInt64BE(48))
  const rtEntries = Math.min(bytes.readUInt32BE(56) * cluster / 8, 64)
  regions.push([rtAt, rtAt + 8 * rtEntries])
  cuts.push(rtAt)
  fields.push(...table('refcount_table', rtAt, rtEntries, 8, false, bytes.length))
  for (let i = 0; i < rtEntries && rtAt + 8 * i + 8 <= bytes.length; i++) {
    const rb = Number(bytes.readBigUInt64BE(rtAt + 8 * i) & OFFSET_MASK)
    if (rb === 0 || rb >= bytes.length) continue
    regions.push([rb, rb + 128])
    fields.push(...table(`refcount_block[${i}]`, rb, 64, 2, false, bytes.length))
  }
  cuts.push(bytes.length)
  return { name, bytes, fields, regions: regions.filter(([a, b]) => b > a && a < bytes.length), cuts }
}

/**
 * Makes the virtual size huge (1 GiB to 4 PiB) with an L1 table just large
 * enough for it: a small image that claims a huge disk, consistently (what
 * `vma info` must not walk cluster by cluster).
 */
export function growQcow2 (buf: Buffer, rng: Rng): { bytes: Buffer, what: string } {
  if (buf.length < 72) return { bytes: buf, what: 'too short to grow' }
  const clusterBits = buf.readUInt32BE(20)
  if (clusterBits < 9 || clusterBits > 21) return { bytes: buf, what: 'no cluster size to grow with' }
  const extended = buf.readUInt32BE(4) >= 3 && buf.length >= 80 && (buf.readBigUInt64BE(72) & 16n) !== 0n
  const perL2 = 2 ** clusterBits / (extended ? 16 : 8)
  const size = 2 ** (30 + rng.below(23))
  const l1Size = Math.ceil(size / 2 ** clusterBits / perL2)
  buf.writeBigUInt64BE(BigInt(size), 24)
  buf.writeUInt32BE(l1Size, 36)
  return { bytes: buf, what: `size ${size} with an L1 table of ${l1Size} entries` }
}

// ---------------------------------------------------------- Parallels (little-endian)

export function parallelsSeed (name: string, bytes: Buffer): Seed {
  const fields: Field[] = ([
    [16, 4, 'version'], [20, 4, 'heads'], [24, 4, 'cylinders'], [28, 4, 'tracks'], [32, 4, 'bat_entries'],
    [36, 8, 'nb_sectors'], [44, 4, 'inuse'], [48, 4, 'data_off'], [52, 4, 'flags'], [56, 8, 'ext_off'],
  ] as const).map(([at, width, n]) => ({ at, width, le: true, name: n }))
  const entries = bytes.readUInt32LE(32)
  fields.push(...table('BAT', 64, entries, 4, true, bytes.length))
  const batEnd = 64 + 4 * entries
  const regions: Array<[number, number]> = [[0, batEnd]]
  const cuts = [16, 64, batEnd, bytes.readUInt32LE(48) * 512]
  const ext = extensionAt(bytes)
  if (ext !== undefined) {
    regions.push([ext.at, ext.at + 512])
    cuts.push(ext.at)
    fields.push(...table('extension.u32', ext.at + 24, 96, 4, true, bytes.length), ...table('extension.u64', ext.at + 24, 48, 8, true, bytes.length))
  }
  cuts.push(bytes.length)
  return { name, bytes, fields, regions, cuts }
}

function extensionAt (buf: Buffer): { at: number, size: number } | undefined {
  if (buf.length < 64) return undefined
  const at = Number(buf.readBigUInt64LE(56)) * 512
  const size = buf.readUInt32LE(28) * 512
  if (at === 0 || size < 24 || at + size > buf.length) return undefined
  return { at, size }
}

/** Sets the Format Extension's MD5 again (over its cluster from byte 24). */
export function fixParallels (buf: Buffer): void {
  const ext = extensionAt(buf)
  if (ext === undefined) return
  createHash('md5').update(buf.subarray(ext.at + 24, ext.at + ext.size)).digest().copy(buf, ext.at + 8)
}

/**
 * The READs a client asked for (from its bytes) that the server's bytes do
 * not answer with chunks covering each byte exactly once: what a client must
 * not accept. Undefined when the conversation cannot be followed here.
 */
export function badReadReplies (fromClient: Buffer, fromServer: Buffer): string[] | undefined {
  const reads = new Map<bigint, { offset: number, length: number }>()
  let at = 4
  while (at + 16 <= fromClient.length && fromClient.readBigUInt64BE(at) === NBD_IHAVEOPT) at += 16 + fromClient.readUInt32BE(at + 12)
  for (; at + 28 <= fromClient.length && fromClient.readUInt32BE(at) === NBD_REQUEST; at += 28) {
    if (fromClient.readUInt16BE(at + 6) !== 0) continue
    reads.set(fromClient.readBigUInt64BE(at + 8), { offset: Number(fromClient.readBigUInt64BE(at + 16)), length: fromClient.readUInt32BE(at + 24) })
  }
  at = 18
  while (at + 20 <= fromServer.length && fromServer.readBigUInt64BE(at) === NBD_OPTION_REPLY) at += 20 + fromServer.readUInt32BE(at + 16)
  const covered = new Map<bigint, Array<[number, number]>>()
  const failed = new Set<bigint>()
  while (at + 16 <= fromServer.length) {
    const magic = fromServer.readUInt32BE(at)
    const cookie = fromServer.readBigUInt64BE(at + 8)
    const read = reads.get(cookie)
    if (magic === NBD_SIMPLE_REPLY) {
      if (fromServer.readUInt32BE(at + 4) !== 0) failed.add(cookie)
      else if (read !== undefined) covered.set(cookie, [...covered.get(cookie) ?? [], [read.offset, read.length]])
      at += 16 + (read !== undefined && !failed.has(cookie) ? read.length : 0)
    } else if (magic === NBD_STRUCTURED_REPLY && at + 20 <= fromServer.length) {
      const type = fromServer.readUInt16BE(at + 6)
      const length = fromServer.readUInt32BE(at + 16)
      if (at + 20 + length > fromServer.length) break
      if ((type & 0x8000) !== 0) failed.add(cookie)
      else if ((type === 1 && length >= 8) || (type === 2 && length >= 12)) {
        const offset = Number(fromServer.readBigUInt64BE(at + 20))
        covered.set(cookie, [...covered.get(cookie) ?? [], [offset, type === 1 ? length - 8 : fromServer.readUInt32BE(at + 28)]])
      }
      at += 20 + length
    } else {
      return undefined
    }
  }
  const bad: string[] = []
  for (const [cookie, read] of reads) {
    if (failed.has(cookie)) continue
    const pieces = (covered.get(cookie) ?? []).sort((a, b) => a[0] - b[0])
    let end = read.offset
    let ok = true
    for (const [offset, length] of pieces) {
      if (offset !== end) ok = false
      end = offset + length
    }
    if (ok && end === read.offset + read.length) continue
    bad.push(`READ of ${read.length} at ${read.offset} answered by ${JSON.stringify(pieces.slice(0, 8))}${pieces.length > 8 ? '...' : ''}`)
  }
  return bad
}
