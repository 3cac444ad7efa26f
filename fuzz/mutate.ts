/**
 * Mutations of a seed: bit flips, interesting values, field-aware edits at
 * offsets the format names, truncation, duplication and splicing. Each case
 * applies a few, chosen by its own seeded generator.
 */
import type { Rng } from './rng.js'

/** A number in the input that a parser reads: where, how wide, which byte order. */
export interface Field { at: number, width: 1 | 2 | 4 | 8, le: boolean, name: string }

/** A seed with what its format knows about it. */
export interface Seed {
  name: string
  bytes: Buffer
  /** Numbers worth aiming at (header fields, table entries). */
  fields: Field[]
  /** Byte ranges holding metadata; random edits aim here most of the time. */
  regions: Array<[number, number]>
  /** Offsets where structures begin (good places to cut). */
  cuts: number[]
  /** What a target needs beside the bytes (an NBD recording's segment boundaries). */
  meta?: { starts: number[], afters: number[] }
}

const INTERESTING: Record<Field['width'], bigint[]> = {
  1: [0n, 1n, 0x7fn, 0x80n, 0xffn],
  2: [0n, 1n, 0xffn, 0x100n, 0x7fffn, 0x8000n, 0xffffn],
  4: [0n, 1n, 2n, 0x200n, 0x1000n, 0x10000n, 0x7fffffffn, 0x80000000n, 0xfffffffen, 0xffffffffn],
  8: [
    0n, 1n, 0x200n, 0x10000n, 0x7fffffffn, 0xffffffffn, 0x100000000n, 1n << 40n, 1n << 50n, 1n << 53n, (1n << 53n) + 1n,
    0x4000000000000000n, 0x7fffffffffffffffn, 0x8000000000000000n, 0xc000000000000000n, 0xffffffffffffffffn,
  ],
}

function writeField (buf: Buffer, f: Field, value: bigint): void {
  if (f.at + f.width > buf.length) return
  const v = BigInt.asUintN(f.width * 8, value)
  if (f.width === 8) { if (f.le) buf.writeBigUInt64LE(v, f.at); else buf.writeBigUInt64BE(v, f.at); return }
  const n = Number(v)
  if (f.width === 1) buf[f.at] = n
  else if (f.width === 2) { if (f.le) buf.writeUInt16LE(n, f.at); else buf.writeUInt16BE(n, f.at) } else if (f.le) buf.writeUInt32LE(n, f.at)
  else buf.writeUInt32BE(n, f.at)
}

function readField (buf: Buffer, f: Field): bigint {
  if (f.at + f.width > buf.length) return 0n
  if (f.width === 8) return f.le ? buf.readBigUInt64LE(f.at) : buf.readBigUInt64BE(f.at)
  if (f.width === 1) return BigInt(buf[f.at])
  if (f.width === 2) return BigInt(f.le ? buf.readUInt16LE(f.at) : buf.readUInt16BE(f.at))
  return BigInt(f.le ? buf.readUInt32LE(f.at) : buf.readUInt32BE(f.at))
}

const kindOf = (f: Field): string => f.name.replace(/\[\d+\]/g, '').replace(/@\d+/g, '')

/** An offset to edit: inside a metadata region most of the time. */
function target (rng: Rng, seed: Seed, length: number): number {
  if (length === 0) return 0
  if (seed.regions.length > 0 && rng.chance(0.85)) {
    const [from, to] = rng.pick(seed.regions)
    if (from < length) return from + rng.below(Math.min(to, length) - from)
  }
  return rng.below(length)
}

type Op = (rng: Rng, buf: Buffer, seed: Seed, others: Seed[]) => { buf: Buffer, what: string }

const ops: Array<[number, Op]> = [
  [3, (rng, buf, seed) => {
    const n = 1 + rng.below(4)
    const at: number[] = []
    for (let i = 0; i < n && buf.length > 0; i++) { const o = target(rng, seed, buf.length); buf[o] ^= 1 << rng.below(8); at.push(o) }
    return { buf, what: `flip bits at ${at.join(',')}` }
  }],
  [2, (rng, buf, seed) => {
    const o = target(rng, seed, buf.length)
    const width = rng.pick([1, 2, 4, 8] as const)
    const value = rng.pick(INTERESTING[width])
    writeField(buf, { at: o, width, le: rng.chance(0.5), name: '' }, value)
    return { buf, what: `set ${width} bytes at ${o} to 0x${value.toString(16)}` }
  }],
  [6, (rng, buf, seed) => {
    if (seed.fields.length === 0) return { buf, what: 'no fields' }
    const f = rng.pick(seed.fields)
    const old = readField(buf, f)
    const r = rng.below(12)
    let value: bigint
    if (r >= 10) {
      // Another field of the same kind's value: two table entries naming one cluster, two chunks one offset.
      const kind = kindOf(f)
      const like = seed.fields.filter(o => o.width === f.width && o !== f && kindOf(o) === kind)
      value = like.length > 0 ? readField(buf, rng.pick(like)) : old
    } else if (r < 6) value = rng.pick(INTERESTING[f.width])
    else if (r < 8) value = old + BigInt(rng.below(17)) - 8n
    else if (r < 9) value = old ^ (1n << BigInt(rng.below(f.width * 8)))
    else value = BigInt(rng.u32()) * (f.width === 8 ? BigInt(rng.u32()) : 1n)
    writeField(buf, f, value)
    return { buf, what: `field ${f.name}@${f.at} 0x${old.toString(16)} -> 0x${BigInt.asUintN(f.width * 8, value).toString(16)}` }
  }],
  [1, (rng, buf, seed) => {
    const cuts = seed.cuts.filter(c => c < buf.length)
    const at = cuts.length > 0 && rng.chance(0.5) ? rng.pick(cuts) + rng.below(3) - 1 : rng.below(buf.length + 1)
    const end = Math.max(0, Math.min(buf.length, at))
    return { buf: buf.subarray(0, end), what: `truncate to ${end}` }
  }],
  [1, (rng, buf, seed) => {
    // Copy a block (a table, a header) over another place, or insert it there.
    if (buf.length < 2) return { buf, what: 'too short to duplicate' }
    const from = target(rng, seed, buf.length)
    const len = Math.min(buf.length - from, 1 + rng.below(rng.chance(0.5) ? 64 : 4096))
    const to = target(rng, seed, buf.length)
    const block = Buffer.from(buf.subarray(from, from + len))
    if (rng.chance(0.5)) {
      block.copy(buf, to)
      return { buf, what: `copy ${len} bytes from ${from} over ${to}` }
    }
    return { buf: Buffer.concat([buf.subarray(0, to), block, buf.subarray(to)]), what: `insert ${len} bytes from ${from} at ${to}` }
  }],
  [1, (rng, buf, seed) => {
    const from = target(rng, seed, buf.length)
    const len = Math.min(buf.length - from, 1 + rng.below(rng.chance(0.5) ? 16 : 4096))
    return { buf: Buffer.concat([buf.subarray(0, from), buf.subarray(from + len)]), what: `delete ${len} bytes at ${from}` }
  }],
  [1, (rng, buf, _seed, others) => {
    // Splice: this input's front with another seed's back.
    const other = rng.pick(others)
    if (other === undefined || other.bytes.length === 0) return { buf, what: 'no seed to splice' }
    const at = Math.min(buf.length, rng.below(buf.length + 1))
    const from = rng.below(other.bytes.length)
    return { buf: Buffer.concat([buf.subarray(0, at), other.bytes.subarray(from)]), what: `splice ${other.name}@${from} at ${at}` }
  }],
]
const TOTAL = ops.reduce((s, [w]) => s + w, 0)

/** A mutated copy of `seed`, and what was done to it. */
export function mutate (rng: Rng, seed: Seed, others: Seed[]): { bytes: Buffer, steps: string[] } {
  let buf: Buffer = Buffer.from(seed.bytes)
  const steps: string[] = []
  const n = 1 + (rng.chance(0.5) ? 0 : rng.below(4))
  for (let i = 0; i < n; i++) {
    let pick = rng.below(TOTAL)
    const op = ops.find(([w]) => (pick -= w) < 0) as [number, Op]
    const r = op[1](rng, buf, seed, others)
    buf = r.buf
    steps.push(r.what)
  }
  return { bytes: buf, steps }
}

/** Fields of `count` entries of `width` bytes from `at`, clipped to `limit`. */
export function table (name: string, at: number, count: number, width: Field['width'], le: boolean, limit: number): Field[] {
  const out: Field[] = []
  for (let i = 0; i < count && at + (i + 1) * width <= limit; i++) out.push({ at: at + i * width, width, le, name: `${name}[${i}]` })
  return out
}
