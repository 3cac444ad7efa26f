/** A small seeded generator (xorshift128+ on 32-bit halves): the same seed gives the same cases on every machine. */
export class Rng {
  private a: number
  private b: number
  private c: number
  private d: number

  constructor (seed: number) {
    // splitmix32 spreads a small seed over the state.
    let s = seed >>> 0
    const next = (): number => {
      s = (s + 0x9e3779b9) >>> 0
      let z = s
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0
      return (z ^ (z >>> 16)) >>> 0
    }
    this.a = next(); this.b = next(); this.c = next(); this.d = next() | 1
  }

  /** A uniform 32-bit unsigned integer. */
  u32 (): number {
    // xoshiro128**
    const r = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0
    const t = this.b << 9
    this.c ^= this.a; this.d ^= this.b; this.b ^= this.c; this.a ^= this.d
    this.c ^= t
    this.d = rotl(this.d, 11)
    return r
  }

  /** An integer in [0, n). */
  below (n: number): number {
    if (n <= 0) return 0
    return n <= 0x100000000 ? Math.floor(this.u32() / 0x100000000 * n) : Math.floor((this.u32() * 0x100000000 + this.u32()) / 2 ** 64 * n)
  }

  chance (p: number): boolean { return this.u32() / 0x100000000 < p }
  pick<T> (items: readonly T[]): T { return items[this.below(items.length)] }
}

function rotl (x: number, k: number): number { return ((x << k) | (x >>> (32 - k))) >>> 0 }

/** The seed of case `index` of `parser`: each case can be made again on its own. */
export function caseSeed (seed: number, parser: string, index: number): number {
  let h = (seed ^ 0x811c9dc5) >>> 0
  for (const ch of `${parser}:${index}`) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193) >>> 0
  return h
}
