/**
 * LZO1X and the lzop container, in TypeScript, so .vma.lzo needs no `lzop`
 * program. The decoder reads every LZO1X variant lzop writes (-1 to -9 all
 * produce LZO1X streams); the encoder is a greedy LZO1X-1 style compressor.
 * Layout as in lzop 1.04's sources: a header, then blocks of
 * (uncompressed size, compressed size, checksums, data), then a zero size.
 */
import { crc32 } from 'node:zlib'

/** A problem in a compressed stream (LZO's, or zstd's in compression.ts); `at` is the byte of the compressed input where it was found. */
export class DataError extends Error {
  constructor (message: string, readonly at: number) { super(message) }
}

const M2_MAX_OFFSET = 0x0800
const M3_MAX_OFFSET = 0x4000
const M4_MAX_OFFSET = 0xbfff

function fail (what: string, at: number): never {
  throw new DataError(`LZO1X data ${what}`, at)
}

/** Where the last longLength() ended in the input (module state, so the decoder's locals stay in registers). */
let lengthEnd = 0

/** A length extended by zero bytes (255 each) and ended by a non-zero byte. */
function longLength (src: Uint8Array, ip: number, base: number, limit: number): number {
  let n = base
  while (true) {
    if (ip >= src.length) fail('ends early', ip)
    const b = src[ip++]
    if (b !== 0) { lengthEnd = ip; return n + b }
    n += 255
    if (n > limit) fail('has a run longer than its block', ip)
  }
}

/**
 * Decompresses one LZO1X block into `out`, which must be exactly the size
 * the container promised. Every read and copy is bounds-checked, so hostile
 * input ends in a DataError, never in reading or writing outside the buffers.
 * The states follow lzo1x_d.ch: a literal run, then matches, each followed by
 * 0-3 literals (low bits of its offset) or a new literal run.
 */
export function lzo1xDecompress (src: Uint8Array, out: Uint8Array): void {
  const end = src.length
  const outEnd = out.length
  let ip = 0
  let op = 0
  let t = 0
  let m = 0
  let len = 0
  const LITERAL = 0
  const FIRST_LITERAL = 1
  const MATCH = 2
  const MATCH_NEXT = 3
  let state = LITERAL
  if (end > 0 && src[0] > 17) {
    t = src[ip++] - 17
    state = t < 4 ? MATCH_NEXT : FIRST_LITERAL
    if (t >= 4) {
      if (ip + t > end || t > outEnd) fail('overruns its block', ip)
      out.set(src.subarray(ip, ip + t), op)
      ip += t
      op += t
    }
  }
  while (true) {
    if (state === LITERAL || state === MATCH_NEXT) {
      if (state === LITERAL) {
        if (ip >= end) fail('ends early', ip)
        t = src[ip++]
        if (t >= 16) { state = MATCH; continue }
        if (t === 0) { t = longLength(src, ip, 15, outEnd); ip = lengthEnd }
        t += 3
      }
      if (ip + t > end || op + t > outEnd) fail('overruns its block', ip)
      if (t < 16) {
        for (let i = 0; i < t; i++) out[op++] = src[ip++]
      } else {
        out.set(src.subarray(ip, ip + t), op)
        ip += t
        op += t
      }
      if (ip >= end) fail('ends early', ip)
      if (state === MATCH_NEXT) { t = src[ip++]; state = MATCH; continue }
      state = FIRST_LITERAL
      continue
    }
    if (ip + 2 > end) fail('ends early', ip)
    if (state === FIRST_LITERAL) {
      t = src[ip++]
      if (t >= 16) { state = MATCH; continue }
      m = op - (1 + M2_MAX_OFFSET) - (t >> 2) - (src[ip++] << 2)
      len = 3
    } else if (t >= 64) {
      m = op - 1 - ((t >> 2) & 7) - (src[ip++] << 3)
      len = (t >> 5) + 1
    } else if (t >= 32) {
      t &= 31
      if (t === 0) { t = longLength(src, ip, 31, outEnd); ip = lengthEnd }
      if (ip + 2 > end) fail('ends early', ip)
      m = op - 1 - ((src[ip] | (src[ip + 1] << 8)) >> 2)
      ip += 2
      len = t + 2
    } else if (t >= 16) {
      const far = (t & 8) << 11
      t &= 7
      if (t === 0) { t = longLength(src, ip, 7, outEnd); ip = lengthEnd }
      if (ip + 2 > end) fail('ends early', ip)
      const distance = far + ((src[ip] | (src[ip + 1] << 8)) >> 2)
      ip += 2
      if (distance === 0) {
        if (op !== outEnd) fail(`ends after ${op} of ${outEnd} bytes`, ip)
        if (ip !== end) fail('goes on after its end marker', ip)
        return
      }
      m = op - distance - 0x4000
      len = t + 2
    } else {
      m = op - 1 - (t >> 2) - (src[ip++] << 2)
      len = 2
    }
    if (m < 0) fail('refers before the start of its block', ip)
    if (op + len > outEnd) fail('overruns its block', ip)
    if (len < 32 || op - m < len) {
      for (let i = 0; i < len; i++) out[op++] = out[m++]
    } else {
      out.copyWithin(op, m, m + len)
      op += len
    }
    t = src[ip - 2] & 3
    state = t === 0 ? LITERAL : MATCH_NEXT
  }
}

const HASH_BITS = 14
const MIN_MATCH = 4

/**
 * Compresses one block into LZO1X: greedy matches of 4 bytes or more, up to
 * 48 KiB back (LZO1X's reach), found through a hash of the next 4 bytes,
 * skipping faster through data that does not match. `dict` (2^14 entries) is
 * scratch space too.
 * Returns the compressed bytes (a view of `scratch`, which must hold
 * `lzo1xBound(src.length)`).
 */
export function lzo1xCompress (src: Uint8Array, scratch: Uint8Array, dict: Int32Array): Uint8Array {
  dict.fill(-1)
  const n = src.length
  const limit = n - MIN_MATCH
  let op = 0
  let ip = 0
  let lit = 0
  let misses = 0
  // Four bytes a load (TurboFan makes each one unaligned load), where byte by byte took four.
  const words = new DataView(src.buffer, src.byteOffset, n)
  // Everything inline, no closures over op/ip: V8 keeps them in registers that way.
  while (true) {
    let len = 0
    let off = 0
    while (ip <= limit) {
      const v = words.getInt32(ip, true)
      const h = Math.imul(v, 0x1e35a7bd) >>> (32 - HASH_BITS)
      const cand = dict[h]
      dict[h] = ip
      off = ip - cand
      if (cand >= 0 && off <= M4_MAX_OFFSET && words.getInt32(cand, true) === v) {
        len = MIN_MATCH
        while (ip + len <= limit && words.getInt32(cand + len, true) === words.getInt32(ip + len, true)) len += 4
        while (ip + len < n && src[cand + len] === src[ip + len]) len++
        break
      }
      ip += 1 + (misses++ >> 5)
    }
    const litEnd = len === 0 ? n : ip
    const count = litEnd - lit
    if (count > 0) {
      if (op === 0 && count <= 238) scratch[op++] = 17 + count
      else if (count <= 3) scratch[op - 2] |= count
      else if (count <= 18) scratch[op++] = count - 3
      else {
        scratch[op++] = 0
        let rest = count - 18
        while (rest > 255) { rest -= 255; scratch[op++] = 0 }
        scratch[op++] = rest
      }
      // A short run byte by byte: a subarray per run would be garbage at the rate of the matches (a scavenge every few MiB).
      if (count < 64) {
        for (let i = lit; i < litEnd; i++) scratch[op++] = src[i]
      } else {
        scratch.set(src.subarray(lit, litEnd), op)
        op += count
      }
    }
    if (len === 0) break
    misses = 0
    if (len <= 8 && off <= M2_MAX_OFFSET) {
      const o = off - 1
      scratch[op++] = ((len - 1) << 5) | ((o & 7) << 2)
      scratch[op++] = o >> 3
    } else {
      let o: number
      let rest: number
      if (off <= M3_MAX_OFFSET) {
        o = off - 1
        rest = len <= 33 ? -1 : len - 33
        scratch[op++] = rest < 0 ? 32 | (len - 2) : 32
      } else {
        o = off - 0x4000
        rest = len <= 9 ? -1 : len - 9
        scratch[op++] = 16 | ((o >> 11) & 8) | (rest < 0 ? len - 2 : 0)
      }
      if (rest >= 0) {
        while (rest > 255) { rest -= 255; scratch[op++] = 0 }
        scratch[op++] = rest
      }
      scratch[op++] = (o << 2) & 0xff
      scratch[op++] = (o >> 6) & 0xff
    }
    ip += len
    lit = ip
  }
  scratch[op++] = 16 | 1
  scratch[op++] = 0
  scratch[op++] = 0
  return scratch.subarray(0, op)
}

/** The most a block of `n` bytes can grow to (lzo1x's own bound). */
export function lzo1xBound (n: number): number {
  return n + (n >> 4) + 64 + 3
}

/**
 * Adler-32, 16 bytes a step: b gains 16a and each byte weighted by how many
 * of the step's sums it enters, a the bytes; half the time of a byte at a
 * time, which was most of lzop reading's CPU. The sums stay exact (far below
 * 2^53) for the 5536 bytes (zlib's 5552, a multiple of 16) between modulos.
 */
export function adler32 (data: Uint8Array, start = 1): number {
  let a = start & 0xffff
  let b = start >>> 16
  for (let i = 0; i < data.length;) {
    const stop = Math.min(i + 5536, data.length)
    for (const steps = stop - ((stop - i) & 15); i < steps; i += 16) {
      const d0 = data[i]; const d1 = data[i + 1]; const d2 = data[i + 2]; const d3 = data[i + 3]
      const d4 = data[i + 4]; const d5 = data[i + 5]; const d6 = data[i + 6]; const d7 = data[i + 7]
      const d8 = data[i + 8]; const d9 = data[i + 9]; const d10 = data[i + 10]; const d11 = data[i + 11]
      const d12 = data[i + 12]; const d13 = data[i + 13]; const d14 = data[i + 14]; const d15 = data[i + 15]
      b += 16 * (a + d0) + 15 * d1 + 14 * d2 + 13 * d3 + 12 * d4 + 11 * d5 + 10 * d6 + 9 * d7 +
        8 * d8 + 7 * d9 + 6 * d10 + 5 * d11 + 4 * d12 + 3 * d13 + 2 * d14 + d15
      a += d0 + d1 + d2 + d3 + d4 + d5 + d6 + d7 + d8 + d9 + d10 + d11 + d12 + d13 + d14 + d15
    }
    for (; i < stop; i++) { a += data[i]; b += a }
    a %= 65521
    b %= 65521
  }
  return ((b << 16) | a) >>> 0
}

const LZOP_MAGIC = Buffer.from([0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a])
const F_ADLER32_D = 0x1
const F_ADLER32_C = 0x2
const F_H_EXTRA_FIELD = 0x40
const F_CRC32_D = 0x100
const F_CRC32_C = 0x200
const F_MULTIPART = 0x400
const F_H_FILTER = 0x800
const F_H_CRC32 = 0x1000
const F_STDIN = 0x4
const F_STDOUT = 0x8
const F_OS_UNIX = 0x03000000
/** lzop refuses blocks larger than this; so do we, which bounds memory. */
const LZOP_MAX_BLOCK = 64 << 20
/** lzop's own block size. */
export const LZOP_BLOCK = 256 << 10

/** Where LzopDecoder puts a block: `space(n)` is room for at least n bytes, `emit(n)` hands on the first n of them, checked. */
export interface BlockOut {
  space: (n: number) => Buffer
  emit: (n: number) => void
}

/** The carry buffer's first size: a whole block of lzop's own size with its sizes and checksums; larger units grow it. */
const CARRY = LZOP_BLOCK + 24

/**
 * Reads an lzop stream fed in chunks of any size: `push` a chunk, then call
 * `next` until it returns false, each block decoded straight into the space
 * `out` gives. A block that lies in one chunk is decoded from there; only a
 * unit cut by a chunk's end is copied, into a carry buffer that is reused.
 * Memory is bounded by one block of at most 64 MiB (and its compressed form),
 * whatever sizes the stream claims.
 */
export class LzopDecoder {
  /** The chunk being read, and how much of it has been. */
  private chunk: Buffer = Buffer.alloc(0)
  private at = 0
  /** The start of a unit (header or block) cut by the end of a chunk, put together until it is whole. */
  private carry: Buffer = Buffer.alloc(0)
  private carried = 0
  /** Bytes the unit being read needs before it can be read further. */
  private need = 0
  /** Compressed bytes before the unit being read. */
  private consumed = 0
  private flags = -1
  private finished = false

  /** The next chunk of compressed input, read by next(). */
  push (chunk: Buffer): void {
    this.chunk = chunk
    this.at = 0
  }

  /**
   * Reads what it can of the next unit: the header, a block (decoded into
   * `out` and emitted) or the end. False once the chunk is all read; what of
   * it an unfinished unit needs is copied, so the chunk may then be reused.
   */
  next (out: BlockOut): boolean {
    const rest = this.chunk.length - this.at
    let b: Buffer
    if (this.carried > 0) {
      // No more than the unit's next check needs: what is carried never reaches past the unit.
      this.carryIn(Math.min(rest, this.need - this.carried))
      if (this.carried < this.need) return false
      b = this.carry.subarray(0, this.carried)
    } else {
      if (rest === 0) return false
      b = this.chunk.subarray(this.at)
    }
    if (this.finished) this.fail(0, 'there are bytes after the end of the lzop stream')
    const used = this.flags < 0 ? this.header(b) : this.block(b, out)
    if (used < 0) {
      if (this.carried === 0) this.carryIn(rest)
      return this.at < this.chunk.length
    }
    // A unit read from the carry is all of it (see above).
    this.consumed += used
    if (this.carried > 0) this.carried = 0
    else this.at += used
    return true
  }

  /** Says whether the stream ended where it should (once next() has returned false). */
  end (): void {
    if (!this.finished) this.fail(this.carried, this.flags < 0 ? 'the lzop header is cut off' : 'the lzop stream is cut off')
  }

  private fail (at: number, message: string): never {
    throw new DataError(message, this.consumed + at)
  }

  /** The unit is incomplete until it has `n` bytes (more than it has). */
  private needs (n: number): number {
    this.need = n
    return -1
  }

  /** Moves `n` bytes of the chunk to the carry, which grows to what the unit needs (bounded by the checks that set `need`). */
  private carryIn (n: number): void {
    if (this.carry.length < this.need) {
      const grown = Buffer.allocUnsafeSlow(Math.max(this.need, CARRY))
      this.carry.copy(grown, 0, 0, this.carried)
      this.carry = grown
    }
    this.chunk.copy(this.carry, this.carried, this.at, this.at + n)
    this.carried += n
    this.at += n
  }

  /** Reads the block at the start of `b`: the bytes it took, or -1 (needs()) while it is incomplete. */
  private block (b: Buffer, out: BlockOut): number {
    if (b.length < 4) return this.needs(4)
    const dstLen = b.readUInt32BE(0)
    if (dstLen === 0) {
      this.finished = true
      return 4
    }
    if (dstLen > LZOP_MAX_BLOCK) this.fail(0, `an lzop block claims ${dstLen} bytes, more than lzop's limit of ${LZOP_MAX_BLOCK}`)
    if (b.length < 8) return this.needs(8)
    const srcLen = b.readUInt32BE(4)
    if (srcLen === 0 || srcLen > dstLen) this.fail(4, `an lzop block claims ${srcLen} compressed bytes for ${dstLen}`)
    const compressed = srcLen < dstLen
    const f = this.flags
    const dSums = (f & F_ADLER32_D ? 4 : 0) + (f & F_CRC32_D ? 4 : 0)
    const cSums = compressed ? (f & F_ADLER32_C ? 4 : 0) + (f & F_CRC32_C ? 4 : 0) : 0
    const start = 8 + dSums + cSums
    if (b.length < start + srcLen) return this.needs(start + srcLen)
    let at = 8
    const dAdler = f & F_ADLER32_D ? b.readUInt32BE((at += 4) - 4) : undefined
    const dCrc = f & F_CRC32_D ? b.readUInt32BE((at += 4) - 4) : undefined
    const cAdler = compressed && f & F_ADLER32_C ? b.readUInt32BE((at += 4) - 4) : undefined
    const cCrc = compressed && f & F_CRC32_C ? b.readUInt32BE((at += 4) - 4) : undefined
    const data = b.subarray(start, start + srcLen)
    if (cAdler !== undefined && adler32(data) !== cAdler) this.fail(start, 'an lzop block fails its Adler-32 check (compressed)')
    if (cCrc !== undefined && crc32(data) !== cCrc) this.fail(start, 'an lzop block fails its CRC-32 check (compressed)')
    const block = out.space(dstLen).subarray(0, dstLen)
    if (compressed) {
      try {
        lzo1xDecompress(data, block)
      } catch (err) {
        if (err instanceof DataError) this.fail(start + err.at, err.message)
        throw err
      }
    } else {
      block.set(data)
    }
    if (dAdler !== undefined && adler32(block) !== dAdler) this.fail(start, 'an lzop block fails its Adler-32 check')
    if (dCrc !== undefined && crc32(block) !== dCrc) this.fail(start, 'an lzop block fails its CRC-32 check')
    out.emit(dstLen)
    return start + srcLen
  }

  /** Reads the header at the start of `b`: the bytes it took, or -1 (needs()) while it is incomplete. */
  private header (b: Buffer): number {
    // Fixed part up to the name's length, then name, checksum and maybe an extra field.
    if (b.length < LZOP_MAGIC.length + 2) return this.needs(LZOP_MAGIC.length + 2)
    if (!b.subarray(0, LZOP_MAGIC.length).equals(LZOP_MAGIC)) this.fail(0, 'not an lzop stream')
    const version = b.readUInt16BE(9)
    const modern = version >= 0x0940
    let at = 9 + 2 + 2 + (modern ? 2 : 0) + 1 + (modern ? 1 : 0)
    if (b.length < at + 4) return this.needs(at + 4)
    const flags = b.readUInt32BE(at)
    at += 4
    if (flags & F_H_FILTER) this.fail(at - 4, 'lzop streams with a filter (lzop --filter) are not supported')
    if (flags & F_MULTIPART) this.fail(at - 4, 'multi-part lzop streams are not supported')
    at += 4 + 4 + (modern ? 4 : 0) // mode, mtime low, mtime high
    if (b.length < at + 1) return this.needs(at + 1)
    at += 1 + b[at] // name
    if (b.length < at + 4) return this.needs(at + 4)
    const sum = flags & F_H_CRC32 ? crc32(b.subarray(9, at)) : adler32(b.subarray(9, at))
    if (sum !== b.readUInt32BE(at)) this.fail(at, 'the lzop header fails its checksum')
    at += 4
    if (flags & F_H_EXTRA_FIELD) {
      if (b.length < at + 4) return this.needs(at + 4)
      const len = b.readUInt32BE(at)
      if (len > 1 << 16) this.fail(at, `the lzop header's extra field claims ${len} bytes`)
      at += 4 + len + 4
      if (b.length < at) return this.needs(at)
    }
    const method = b[9 + 2 + 2 + (modern ? 2 : 0)]
    if (method < 1 || method > 3) this.fail(15, `lzop method ${method} is not LZO1X`)
    this.flags = flags
    return at
  }
}

/** The header lzop 1.04 writes when compressing standard input (method LZO1X-1, Adler-32 of the data). */
export function lzopHeader (mtime = Math.floor(Date.now() / 1000)): Buffer {
  const h = Buffer.alloc(LZOP_MAGIC.length + 25 + 4)
  LZOP_MAGIC.copy(h)
  let at = LZOP_MAGIC.length
  at = h.writeUInt16BE(0x1040, at)
  at = h.writeUInt16BE(0x20a0, at)
  at = h.writeUInt16BE(0x0940, at)
  at = h.writeUInt8(1, at) // M_LZO1X_1
  at = h.writeUInt8(5, at) // the level lzop records for it
  at = h.writeUInt32BE(F_OS_UNIX | F_STDIN | F_STDOUT | F_ADLER32_D, at)
  at = h.writeUInt32BE(0o100644, at)
  at = h.writeUInt32BE(mtime >>> 0, at)
  at = h.writeUInt32BE(0, at)
  at = h.writeUInt8(0, at) // no name
  h.writeUInt32BE(adler32(h.subarray(LZOP_MAGIC.length, at)), at)
  return h
}

/** The bytes before each lzop block's data: its sizes and the checksum of its data. */
export const LZOP_BLOCK_HEAD = 12

/**
 * One lzop block of `data` (at most LZOP_BLOCK bytes): its head written into
 * `head` (LZOP_BLOCK_HEAD bytes), its data returned, in `scratch`, or `data`
 * itself where LZO1X would not shrink it (stored as is, as lzop does).
 */
export function lzopBlockParts (data: Uint8Array, scratch: Uint8Array, dict: Int32Array, head: Buffer): Uint8Array {
  const packed = lzo1xCompress(data, scratch, dict)
  const body = packed.length >= data.length ? data : packed
  head.writeUInt32BE(data.length, 0)
  head.writeUInt32BE(body.length, 4)
  head.writeUInt32BE(adler32(data), 8)
  return body
}

/** One lzop block of `data` in a buffer of its own. */
export function lzopBlock (data: Uint8Array, scratch: Uint8Array, dict: Int32Array): Buffer {
  const head = Buffer.allocUnsafe(LZOP_BLOCK_HEAD)
  return Buffer.concat([head, lzopBlockParts(data, scratch, dict, head)])
}

/** The end of an lzop stream: a block of size zero. */
export const LZOP_END = Buffer.alloc(4)
