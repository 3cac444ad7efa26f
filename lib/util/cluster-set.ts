/**
 * A set of cluster numbers (0 .. 2^32-1) stored as a bitmap in pages that are
 * allocated on first use, so memory follows the clusters actually seen and not
 * the size an archive claims for its devices.
 */
const PAGE_BITS = 1 << 20 // one page covers 2^20 clusters (64 GiB of disk) in 128 KiB

export class ClusterSet {
  private readonly pages = new Map<number, Uint32Array>()
  private count = 0

  get size (): number { return this.count }

  has (cluster: number): boolean {
    const page = this.pages.get(Math.floor(cluster / PAGE_BITS))
    if (page === undefined) return false
    const bit = cluster % PAGE_BITS
    return (page[bit >>> 5] & (1 << (bit & 31))) !== 0
  }

  /** Adds the cluster; returns false if it was already there. */
  add (cluster: number): boolean {
    const index = Math.floor(cluster / PAGE_BITS)
    let page = this.pages.get(index)
    if (page === undefined) {
      page = new Uint32Array(PAGE_BITS / 32)
      this.pages.set(index, page)
    }
    const bit = cluster % PAGE_BITS
    const word = bit >>> 5
    const flag = 1 << (bit & 31)
    if ((page[word] & flag) !== 0) return false
    page[word] |= flag
    this.count++
    return true
  }

  delete (cluster: number): void {
    const index = Math.floor(cluster / PAGE_BITS)
    const page = this.pages.get(index)
    if (page === undefined) return
    const bit = cluster % PAGE_BITS
    const flag = 1 << (bit & 31)
    if ((page[bit >>> 5] & flag) === 0) return
    page[bit >>> 5] &= ~flag
    this.count--
  }

  /** The smallest cluster below `end` that is not in the set, or -1 if all are. */
  firstMissing (end: number): number {
    for (let start = 0; start < end; start += PAGE_BITS) {
      const page = this.pages.get(start / PAGE_BITS)
      if (page === undefined) return start
      const limit = Math.min(PAGE_BITS, end - start)
      for (let word = 0; word * 32 < limit; word++) {
        if (page[word] === 0xffffffff) continue
        for (let bit = 0; bit < 32 && word * 32 + bit < limit; bit++) {
          if ((page[word] & (1 << bit)) === 0) return start + word * 32 + bit
        }
      }
    }
    return -1
  }
}
