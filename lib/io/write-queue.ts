/**
 * Positional writes with a few in flight and adjacent pieces merged into one
 * writev (pieces that follow the run, or come just before it). One queue may serve several files: a run is only extended by a write
 * to the same file right after it, so interleaved devices never pin more than
 * one pending run plus what is in flight.
 */
import { writev, writevSync } from 'node:fs'
import type { FileHandle } from 'node:fs/promises'
import { ioError } from '../errors.js'
import type { FileWrites } from '../contracts.js'
import { giveBack, lend } from './slabs.js'

interface WriteQueueOptions {
  /** Writes submitted at once (default 8). */
  maxInFlight?: number
  /** Largest merged write in bytes (default 1 MiB). */
  maxRun?: number
  /**
   * Write each merged run synchronously (pwritev on this thread) instead of
   * on the thread pool: where the thread would only wait anyway (records
   * from a decompressing worker), it saves a round trip per run.
   */
  sync?: boolean
}

export class WriteQueue implements FileWrites {
  private readonly maxInFlight: number
  private readonly maxRun: number
  private readonly sync: boolean
  private run: Buffer[] = []
  private runFd = -1
  private runPosition = 0
  private runLength = 0
  private runWhat = ''
  private inFlight = 0
  private failure?: Error
  private waiters: Array<() => void> = []

  constructor (options: WriteQueueOptions = {}) {
    this.maxInFlight = options.maxInFlight ?? 8
    this.maxRun = options.maxRun ?? 1 << 20
    this.sync = options.sync ?? false
  }

  /**
   * Queues `bytes` for `fd` at `position`. The buffer must stay unchanged until
   * drain(). Returns a promise when the caller should wait before queuing more.
   */
  write (fd: number, bytes: Buffer, position: number, what: string): Promise<void> | undefined {
    if (this.failure !== undefined) throw this.failure
    if (bytes.length === 0) return undefined
    // Bytes of a slab (io/slabs.ts) are a loan of the queue's own until written, so the writer may give its own back.
    bytes = lend(bytes)
    if (fd === this.runFd && this.runLength + bytes.length <= this.maxRun) {
      if (position === this.runPosition + this.runLength) {
        this.run.push(bytes)
        this.runLength += bytes.length
        return undefined
      }
      // Pieces that come back to front (a reversed disk's clusters, spilled) make one write as well.
      if (position + bytes.length === this.runPosition) {
        this.run.unshift(bytes)
        this.runPosition = position
        this.runLength += bytes.length
        return undefined
      }
    }
    const wait = this.submit()
    this.run = [bytes]
    this.runWhat = what
    this.runFd = fd
    this.runPosition = position
    this.runLength = bytes.length
    return wait
  }

  /** Writes out everything queued and waits for it; throws the first write error. */
  async drain (): Promise<void> {
    void this.submit()
    await this.until(0)
    if (this.failure !== undefined) throw this.failure
  }

  /** Resolves once at most `inFlight` writes are under way. */
  private async until (inFlight: number): Promise<void> {
    while (this.inFlight > inFlight) await new Promise<void>(resolve => this.waiters.push(resolve))
  }

  /** Starts the pending run; returns a promise when the queue is full. */
  private submit (): Promise<void> | undefined {
    if (this.runLength === 0) return undefined
    const what = this.runWhat
    const buffers = this.run
    const fd = this.runFd
    const position = this.runPosition
    this.run = []
    this.runLength = 0
    this.runFd = -1
    if (this.sync) {
      try {
        writeAllSync(fd, buffers, position)
      } catch (err) {
        this.failure ??= ioError(err, what)
        throw this.failure
      }
      for (const b of buffers) giveBack(b)
      return undefined
    }
    this.inFlight++
    writeAll(fd, buffers, position, err => {
      this.inFlight--
      // Also after a failure: the kernel is done with them either way.
      for (const b of buffers) giveBack(b)
      if (err !== null && this.failure === undefined) this.failure = ioError(err, what)
      const waiters = this.waiters
      this.waiters = []
      for (const wake of waiters) wake()
    })
    return this.inFlight < this.maxInFlight ? undefined : this.until(this.maxInFlight - 1)
  }
}

/** writevSync until every byte is written; at `position`, or null: where the descriptor's offset stands (which moves on). */
export function writeAllSync (fd: number, buffers: Buffer[], position: number | null): void {
  let rest = buffers
  while (rest.length > 0) {
    const written = position === null ? writevSync(fd, rest) : writevSync(fd, rest, position)
    if (written === 0) throw new Error('the write made no progress')
    if (position !== null) position += written
    let left = written
    let i = 0
    while (i < rest.length && left >= rest[i].length) left -= rest[i++].length
    rest = rest.slice(i)
    if (rest.length > 0) rest[0] = rest[0].subarray(left)
  }
}

/**
 * A regular file written front to back on this thread, from where its
 * descriptor's offset stands (`start`): appended pieces gathered into writes
 * of up to `maxRun` bytes, and bytes written back into room appended before.
 * Synchronous, as each write is a copy into the page cache: no slab waits in
 * a write in flight (vma create of 1 GiB: the same CPU and wall time as the
 * file stream's writes on the thread pool).
 */
export class FileAppender {
  private run: Buffer[] = []
  private runLength = 0

  constructor (private readonly fd: number, private readonly start: number, private readonly what: string, private readonly maxRun = 1 << 20) {}

  /** Queues `bytes` after those before; a piece of a slab is a loan of the appender's own until written (io/slabs.ts). */
  append (bytes: Buffer): void {
    if (bytes.length === 0) return
    this.run.push(lend(bytes))
    this.runLength += bytes.length
    if (this.runLength >= this.maxRun) this.flush()
  }

  /** Writes `bytes` at `offset` from `start`, after what was appended. */
  rewrite (bytes: Buffer, offset: number): void {
    this.flush()
    this.attempt(() => { writeAllSync(this.fd, [bytes], this.start + offset) })
  }

  /** Writes what was appended. */
  flush (): void {
    if (this.runLength === 0) return
    const run = this.run
    this.run = []
    this.runLength = 0
    try {
      this.attempt(() => { writeAllSync(this.fd, run, null) })
    } finally {
      for (const b of run) giveBack(b)
    }
  }

  private attempt (write: () => void): void {
    try {
      write()
    } catch (err) {
      throw ioError(err, this.what)
    }
  }
}

/** writev until every byte is written (regular files may take less than asked). */
export function writeAll (fd: number, buffers: Buffer[], position: number, done: (err: Error | null) => void): void {
  writev(fd, buffers, position, (err, written) => {
    if (err !== null) { done(err); return }
    let rest = written
    let i = 0
    while (i < buffers.length && rest >= buffers[i].length) rest -= buffers[i++].length
    if (i === buffers.length) { done(null); return }
    if (written === 0) { done(new Error('the write made no progress')); return }
    const remaining = buffers.slice(i)
    remaining[0] = remaining[0].subarray(rest)
    writeAll(fd, remaining, position + written, done)
  })
}

/** A file written through `queue` is complete: drain, set its size, fsync, close. */
export async function completeFile (queue: FileWrites, file: FileHandle, size: number, path: string): Promise<void> {
  await queue.drain()
  try {
    await file.truncate(size)
    await file.sync()
    await file.close()
  } catch (err) {
    throw ioError(err, `finishing ${path}`)
  }
}

/** Gives a file written through `queue` up: lets writes in flight end and closes it; removing it is the caller's business. */
export async function abandonFile (queue: FileWrites, file: FileHandle): Promise<void> {
  await queue.drain().catch(() => {})
  await file.close().catch(() => {})
}
