/**
 * Read buffers taken back once nothing reads them any more. A stream that
 * hands on a fresh buffer per chunk makes garbage at the speed of the data,
 * and V8 frees buffers only at a collection, which it starts after about
 * 32 MiB of them: that, not the data in flight, set the memory floor.
 *
 * A slab is lent out as exact Buffer objects (a chunk, a record's data, a
 * write in flight), each of which is given back at most once, by whoever ends
 * up owning it. Only when every loan is back is the slab reused. A holder that
 * knows nothing of slabs never gives back, and the slab then goes to the
 * garbage collector like any other buffer: a consumer can make reuse not
 * happen, never happen too early. A piece cut from a lent buffer is not itself
 * a loan, so giving it back does nothing.
 */
export const SLAB_SIZE = 1 << 20
/** Free slabs kept; more in flight are simply not kept. */
const KEEP = 16

interface Slab { buffer: Buffer, loans: number, free: boolean }

const slabs = new WeakMap<ArrayBufferLike, Slab>()
const loans = new WeakMap<Buffer, Slab>()
const free: Slab[] = []

/**
 * A whole slab, lent to the caller (give it back with giveBack(returned
 * buffer) when done filling it): a free one, else a new one unless `reuseOnly`.
 */
export function takeSlab (reuseOnly = false): Buffer | undefined {
  let slab = free.pop()
  if (slab === undefined) {
    if (reuseOnly) return undefined
    slab = { buffer: Buffer.allocUnsafeSlow(SLAB_SIZE), loans: 0, free: false }
    slabs.set(slab.buffer.buffer, slab)
  }
  slab.free = false
  return lendFrom(slab, slab.buffer)
}

/**
 * When `piece` lies in a slab, a new view of its bytes lent as a loan of its
 * own; any other buffer as it is. The caller must hold a loan of that slab
 * while it lends (it cut `piece` from a buffer it holds).
 */
export function lend (piece: Buffer): Buffer {
  const slab = slabs.get(piece.buffer)
  return slab === undefined ? piece : lendFrom(slab, Buffer.from(piece.buffer, piece.byteOffset, piece.length))
}

/** Whether `buf` lies in a slab: such memory is never handed to another thread, which would take it away. */
export function inSlab (buf: Uint8Array): boolean {
  return slabs.has(buf.buffer)
}

/** Ends the loan `buf`; the slab is reused once no loan of it is left. Anything else: nothing happens. */
export function giveBack (buf: Buffer): void {
  const slab = loans.get(buf)
  if (slab === undefined) return
  loans.delete(buf)
  if (--slab.loans > 0) return
  // Not kept, it is still marked: a loan of its memory after this is a bug, caught below.
  slab.free = true
  if (free.length < KEEP) free.push(slab)
}

function lendFrom (slab: Slab, piece: Buffer): Buffer {
  if (slab.free) throw new Error('a slab lent while nothing held it')
  slab.loans++
  loans.set(piece, slab)
  return piece
}

let shared: Buffer | undefined
let sharedUsed = 0

/**
 * Room for `n` bytes (at most SLAB_SIZE) that are needed for a while, e.g. a
 * cluster put together until it is written: a loan cut from a slab shared by
 * all such uses, given back by whoever is done with it. In place of a new
 * buffer each time, which would be garbage.
 */
export function scratch (n: number): Buffer {
  if (shared === undefined || SLAB_SIZE - sharedUsed < n) {
    if (shared !== undefined) giveBack(shared)
    shared = takeSlab() as Buffer
    sharedUsed = 0
  }
  const piece = lend(shared.subarray(sharedUsed, sharedUsed + n))
  sharedUsed += n
  return piece
}

/**
 * Slabs for one reader: a free one when there is one, else a new one while
 * it has made fewer than `maxNew`, else undefined (read into a buffer of your
 * own). Where the consumer gives loans back, a few slabs go round; where it
 * does not (a decompressor, an image writer), every slab would be garbage
 * that lives long enough to wait for a full collection, which costs more than
 * a fresh short-lived buffer per read.
 */
export function slabSource (maxNew: number): () => Buffer | undefined {
  let made = 0
  return () => {
    const slab = takeSlab(true)
    if (slab !== undefined || made >= maxNew) return slab
    made++
    return takeSlab()
  }
}
