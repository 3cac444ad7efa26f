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
/**
 * The size of small slabs, for bytes that only pass through one stage
 * (compressed bytes read or written, copies of records cut by a chunk's end):
 * what waits between stages is held a quarter MiB at a time, not a MiB.
 */
export const SMALL_SLAB_SIZE = 1 << 18
/** Free slabs kept, of each size; more in flight are simply not kept. */
const KEEP = 16

interface Slab { buffer: Buffer, loans: number, free: boolean }

const slabs = new WeakMap<ArrayBufferLike, Slab>()
const loans = new WeakMap<Buffer, Slab>()
/** Free slabs by size. */
const free = new Map<number, Slab[]>()

/** The free slabs of `size`: a power of two from SMALL_SLAB_SIZE to SLAB_SIZE, so that there are few lists. */
function freeOf (size: number): Slab[] {
  let list = free.get(size)
  if (list === undefined) {
    if (size < SMALL_SLAB_SIZE || size > SLAB_SIZE || (size & (size - 1)) !== 0) throw new Error(`no slabs of ${size} bytes`)
    list = []
    free.set(size, list)
  }
  return list
}

/**
 * A whole slab of `size` bytes (a power of two from SMALL_SLAB_SIZE to SLAB_SIZE), lent to the
 * caller (give it back with giveBack(returned buffer) when done filling it):
 * a free one, else a new one unless `reuseOnly`.
 */
export function takeSlab (reuseOnly = false, size = SLAB_SIZE): Buffer | undefined {
  let slab = freeOf(size).pop()
  if (slab === undefined) {
    if (reuseOnly) return undefined
    slab = { buffer: Buffer.allocUnsafeSlow(size), loans: 0, free: false }
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
  const list = freeOf(slab.buffer.length)
  if (list.length < KEEP) list.push(slab)
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
 * buffer each time, which would be garbage. Small slabs where `n` fits: a
 * slab is held until its last piece is given back, and a few pieces (a record
 * cut by the end of each chunk) held all of a large one.
 */
export function scratch (n: number): Buffer {
  if (shared === undefined || shared.length - sharedUsed < n) {
    if (shared !== undefined) giveBack(shared)
    shared = takeSlab(false, n <= SMALL_SLAB_SIZE ? SMALL_SLAB_SIZE : SLAB_SIZE) as Buffer
    sharedUsed = 0
  }
  const piece = lend(shared.subarray(sharedUsed, sharedUsed + n))
  sharedUsed += n
  return piece
}

/**
 * Slabs of `size` for one reader: a free one when there is one, else a new one while
 * it has made fewer than `maxNew`, else undefined (read into a buffer of your
 * own). Where the consumer gives loans back, a few slabs go round; where it
 * does not (a decompressor, an image writer), every slab would be garbage
 * that lives long enough to wait for a full collection, which costs more than
 * a fresh short-lived buffer per read.
 */
export function slabSource (maxNew: number, size = SLAB_SIZE): () => Buffer | undefined {
  let made = 0
  return () => {
    const slab = takeSlab(true, size)
    if (slab !== undefined || made >= maxNew) return slab
    made++
    return takeSlab(false, size)
  }
}
