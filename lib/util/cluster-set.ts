/**
 * A set of cluster numbers whose memory follows the clusters actually added,
 * never the size an archive or image claims (the way Roaring bitmaps do it).
 * Numbers are split into chunks of 2^16; a chunk holds its members as a sorted
 * array of 16-bit offsets (2 bytes each) until it has 4096 of them, then as a
 * 8 KiB bitmap. So a set costs at most about 2 bytes per member plus one small
 * chunk per 2^16 range touched (65536 chunks at most for 32-bit numbers), and
 * the dense in-order case (verify, extract) appends or sets a bit in the chunk
 * it used last, without a map lookup.
 */
const CHUNK_BITS = 16
const CHUNK = 1 << CHUNK_BITS
/** Members at which a sorted array takes as much room as a bitmap. */
const ARRAY_MAX = CHUNK / 16

class Chunk {
  /** Sorted offsets while the chunk is sparse; null once it is a bitmap. */
  list: Uint16Array | null = new Uint16Array(4)
  bits: Uint32Array | null = null
  n = 0

  has (low: number): boolean {
    if (this.bits !== null) return (this.bits[low >>> 5] & (1 << (low & 31))) !== 0
    return this.find(low) >= 0
  }

  /** Index of `low` in the list, or -(insertion point) - 1. */
  private find (low: number): number {
    const list = this.list as Uint16Array
    let lo = 0
    let hi = this.n - 1
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1
      const v = list[mid]
      if (v < low) lo = mid + 1
      else if (v > low) hi = mid - 1
      else return mid
    }
    return -lo - 1
  }

  add (low: number): boolean {
    const bits = this.bits
    if (bits !== null) {
      const flag = 1 << (low & 31)
      if ((bits[low >>> 5] & flag) !== 0) return false
      bits[low >>> 5] |= flag
      this.n++
      return true
    }
    let list = this.list as Uint16Array
    // In-order adds append; others search for their place.
    let index = this.n
    if (this.n > 0 && list[this.n - 1] >= low) {
      const at = this.find(low)
      if (at >= 0) return false
      index = -at - 1
    }
    if (this.n === ARRAY_MAX) {
      this.toBitmap()
      return this.add(low)
    }
    if (this.n === list.length) {
      const grown = new Uint16Array(Math.min(ARRAY_MAX, list.length * 2))
      grown.set(list)
      this.list = list = grown
    }
    if (index < this.n) list.copyWithin(index + 1, index, this.n)
    list[index] = low
    this.n++
    return true
  }

  delete (low: number): boolean {
    const bits = this.bits
    if (bits !== null) {
      const flag = 1 << (low & 31)
      if ((bits[low >>> 5] & flag) === 0) return false
      bits[low >>> 5] &= ~flag
      this.n--
      return true
    }
    const at = this.find(low)
    if (at < 0) return false
    const list = this.list as Uint16Array
    list.copyWithin(at, at + 1, this.n)
    this.n--
    return true
  }

  /** The smallest offset below `limit` not in the chunk, or -1. */
  firstMissing (limit: number): number {
    if (this.bits !== null) {
      const bits = this.bits
      for (let word = 0; word * 32 < limit; word++) {
        if (bits[word] === 0xffffffff) continue
        for (let bit = 0; bit < 32 && word * 32 + bit < limit; bit++) {
          if ((bits[word] & (1 << bit)) === 0) return word * 32 + bit
        }
      }
      return -1
    }
    // Sorted and distinct: the first place where list[i] !== i is the first gap.
    const list = this.list as Uint16Array
    let lo = 0
    let hi = this.n
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (list[mid] === mid) lo = mid + 1
      else hi = mid
    }
    return lo < limit ? lo : -1
  }

  private toBitmap (): void {
    const bits = new Uint32Array(CHUNK / 32)
    const list = this.list as Uint16Array
    for (let i = 0; i < this.n; i++) bits[list[i] >>> 5] |= 1 << (list[i] & 31)
    this.bits = bits
    this.list = null
  }
}

export class ClusterSet {
  private readonly chunks = new Map<number, Chunk>()
  private count = 0
  private lastKey = -1
  private last: Chunk | undefined

  get size (): number { return this.count }

  private chunk (key: number, create: boolean): Chunk | undefined {
    if (key === this.lastKey) return this.last
    let chunk = this.chunks.get(key)
    if (chunk === undefined) {
      if (!create) return undefined
      chunk = new Chunk()
      this.chunks.set(key, chunk)
    }
    this.lastKey = key
    this.last = chunk
    return chunk
  }

  has (cluster: number): boolean {
    const key = Math.floor(cluster / CHUNK)
    return this.chunk(key, false)?.has(cluster - key * CHUNK) ?? false
  }

  /** Adds the cluster; returns false if it was already there. */
  add (cluster: number): boolean {
    const key = Math.floor(cluster / CHUNK)
    if (!(this.chunk(key, true) as Chunk).add(cluster - key * CHUNK)) return false
    this.count++
    return true
  }

  delete (cluster: number): void {
    const key = Math.floor(cluster / CHUNK)
    if (this.chunk(key, false)?.delete(cluster - key * CHUNK) === true) this.count--
  }

  /** The smallest cluster below `end` that is not in the set, or -1 if all are. */
  firstMissing (end: number): number {
    for (let start = 0; start < end; start += CHUNK) {
      const chunk = this.chunks.get(start / CHUNK)
      if (chunk === undefined) return start
      const gap = chunk.firstMissing(Math.min(CHUNK, end - start))
      if (gap >= 0) return start + gap
    }
    return -1
  }
}
