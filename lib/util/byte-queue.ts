/**
 * A FIFO of incoming chunks from which fixed-size pieces are taken. A piece
 * that lies inside one chunk is a subarray of it (no copy); only a piece that
 * straddles chunks is copied into a buffer of its own.
 */
const EMPTY: Buffer = Buffer.alloc(0)

export class ByteQueue {
  private readonly chunks: Buffer[] = []
  private first = 0
  /** Bytes queued and not yet taken. */
  length = 0
  /** Bytes taken since the start. */
  consumed = 0

  push (chunk: Buffer): void {
    if (chunk.length === 0) return
    this.chunks.push(chunk)
    this.length += chunk.length
  }

  /** The next `n` bytes without taking them (a copy if they straddle), or null if fewer are queued. */
  peek (n: number): Buffer | null {
    if (this.length < n) return null
    if (n === 0) return EMPTY
    const head = this.chunks[0]
    if (head.length - this.first >= n) return head.subarray(this.first, this.first + n)
    const out = Buffer.allocUnsafe(n)
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
      this.first = 0
    }
  }
}
