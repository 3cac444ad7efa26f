/** Seeded randomness, so every fixture is the same on every run. */
export class Rng {
  private state: number
  constructor (seed: number) { this.state = seed >>> 0 || 1 }

  /** xorshift32 */
  next (): number {
    let x = this.state
    x ^= x << 13; x >>>= 0
    x ^= x >>> 17
    x ^= x << 5; x >>>= 0
    this.state = x
    return x
  }

  /** 0 <= n < max */
  int (max: number): number { return this.next() % max }

  chance (p: number): boolean { return this.next() / 0x100000000 < p }

  fill (buf: Buffer): Buffer {
    for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(this.next(), i)
    for (let i = buf.length & ~3; i < buf.length; i++) buf[i] = this.next() & 0xff
    return buf
  }

  shuffle<T> (items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1)
      ;[items[i], items[j]] = [items[j], items[i]]
    }
    return items
  }
}

/**
 * A disk image of `size` bytes: whole zero clusters, partly zero clusters and
 * full ones, with random data that never makes a 4 KiB block all zero by chance.
 */
export function makeDisk (rng: Rng, size: number): Buffer {
  const disk = Buffer.alloc(size)
  for (let c = 0; c * 65536 < size; c++) {
    const kind = rng.int(4) // 0: zero cluster, 1: partly zero, 2-3: full
    if (kind === 0) continue
    for (let b = 0; b < 16; b++) {
      const start = c * 65536 + b * 4096
      if (start >= size) break
      if (kind === 1 && rng.chance(0.5)) continue
      const block = disk.subarray(start, Math.min(size, start + 4096))
      rng.fill(block)
      block[0] = 1 + rng.int(255)
    }
  }
  return disk
}
