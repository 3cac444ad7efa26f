/**
 * A FIFO of incoming chunks from which fixed-size pieces are taken. A piece
 * that lies inside one chunk is a subarray of it (no copy); only a piece that
 * straddles chunks is copied into a buffer of its own.
 */
const EMPTY: Buffer = Buffer.alloc(0)

interface ByteQueueOptions {
  /**
   * Called once for each pushed chunk when the queue is done with it (all of
   * it taken or skipped), to give it back to its owner. The queue then also
   * joins a chunk that continues the previous one in the same memory, so a
   * piece that spans them needs no copy.
   */
  done?: (chunk: Buffer) => void
}

export class ByteQueue {
  private readonly chunks: Buffer[] = []
  /** With `done`: the pushed chunks each queued chunk is made of. */
  private readonly parts: Buffer[][] = []
  private readonly done?: (chunk: Buffer) => void
  private first = 0
  /** Bytes queued and not yet taken. */
  length = 0
  /** Bytes taken since the start. */
  consumed = 0

  constructor (options: ByteQueueOptions = {}) {
    this.done = options.done
  }

  push (chunk: Buffer): void {
    if (chunk.length === 0) {
      this.done?.(chunk)
      return
    }
    this.length += chunk.length
    if (this.done === undefined) {
      this.chunks.push(chunk)
      return
    }
    const last = this.chunks.length - 1
    const prev = this.chunks[last]
    if (prev !== undefined && prev.buffer === chunk.buffer && prev.byteOffset + prev.length === chunk.byteOffset) {
      this.chunks[last] = Buffer.from(prev.buffer, prev.byteOffset, prev.length + chunk.length)
      this.parts[last].push(chunk)
      return
    }
    this.chunks.push(chunk)
    this.parts.push([chunk])
  }

  /** The next `n` bytes without taking them (a copy into `room(n)` if they straddle), or null if fewer are queued. */
  peek (n: number, room: (n: number) => Buffer = Buffer.allocUnsafe): Buffer | null {
    if (this.length < n) return null
    if (n === 0) return EMPTY
    const head = this.chunks[0]
    if (head.length - this.first >= n) return head.subarray(this.first, this.first + n)
    const out = room(n)
    let filled = 0
    let pos = this.first
    for (let i = 0; filled < n; i++, pos = 0) {
      filled += this.chunks[i].copy(out, filled, pos, Math.min(this.chunks[i].length, pos + n - filled))
    }
    return out
  }

  /** Takes the next `n` bytes, or returns null (taking nothing) if fewer are queued. */
  take (n: number): Buffer | null {
    const out = this.peek(n)
    if (out === null) return null
    this.skip(n)
    return out
  }

  /** Drops the next `n` bytes (at most `length`) without looking at them. */
  skip (n: number): void {
    this.length -= n
    this.consumed += n
    while (n > 0) {
      const head = this.chunks[0]
      const left = head.length - this.first
      if (left > n) {
        this.first += n
        return
      }
      n -= left
      this.chunks.shift()
      if (this.done !== undefined) for (const part of this.parts.shift() as Buffer[]) this.done(part)
      this.first = 0
    }
  }
}
