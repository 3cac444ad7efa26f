/**
 * Opening an input named on the command line: a path, or `-` for stdin.
 */
import {
  ReadStream, close as fsClose, closeSync, createReadStream, createWriteStream, fstatSync, open as fsOpen, openSync, read as fsRead, readFileSync, readSync,
  statSync, type Stats,
} from 'node:fs'
import { open, unlink } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Socket } from 'node:net'
import { isatty } from 'node:tty'
import { Readable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import { runStages } from './chain.js'
import { type Compression, DETECT_BYTES, detectCompression } from './compression.js'
import { SLAB_SIZE, giveBack, lend, slabSource } from './slabs.js'

export interface Input {
  stream: Readable
  /** Name for messages. */
  name: string
  /** Byte size when known (regular files, block devices), for progress and raw disks. */
  size?: number
}

const CHUNK = 1 << 20

export function openInput (path: string): Input {
  if (path === '-') return openStdin()
  let size: number | undefined
  try {
    const st = statSync(path)
    if (st.isDirectory()) throw new VmapipeError('E_IO', `${path} is a directory`)
    size = sizeOf(st)
  } catch (err) {
    throw ioError(err, `cannot open ${path}`)
  }
  const stream = createReadStream(path, { highWaterMark: CHUNK })
  return { stream, name: path, ...(size !== undefined ? { size } : {}) }
}

function openStdin (): Input {
  const st = fstatSync(0)
  // isatty, not process.stdin.isTTY: that getter opens a stream of its own on the descriptor.
  if (isatty(0)) throw new VmapipeError('E_TERMINAL', 'refusing to read binary input from a terminal; pipe it in or give a path')
  const size = sizeOf(st)
  // Pipes and sockets are read by a socket (which copes with non-blocking descriptors) straight into reused slabs.
  if (st.isFIFO() || st.isSocket()) return { stream: readIntoSlabs(0), name: 'stdin' }
  if (!st.isFile()) return { stream: process.stdin, name: 'stdin', ...(size !== undefined ? { size } : {}) }
  // Read into slabs too: a file stream reads into a fresh buffer each time (pack-vma < disk.raw: 92 MiB peak, against 62 from a pipe).
  return { stream: fileIntoSlabs(0), name: 'stdin', size: st.size }
}

/** A read smaller than this starts a new slab rather than fill the end of one. */
const MIN_READ = 1 << 16
/**
 * New slabs one input may make (slabSource): as many as the stages after it
 * hold when the output is slower than the input. pack-vma - to a slow pipe
 * held 12 (an extent of 58 clusters gathered and one pushed out, a MiB per
 * stage between); with 8 it read the rest into fresh buffers, garbage that
 * made peak RSS grow with the disk's size (82 MiB at 1 GiB, 107 at 4).
 */
const NEW_SLABS = 16

/**
 * Slabs (slabs.ts) of `size` filled one after another, each from its start, so that
 * consecutive chunks are adjacent and a byte queue joins them. Each chunk is a
 * loan that its consumer gives back once it no longer reads it.
 */
function slabFiller (size = SLAB_SIZE): { space: () => Buffer, filled: (n: number) => Buffer, release: () => void } {
  const nextSlab = slabSource(NEW_SLABS, size)
  let slab: Buffer | undefined
  let into: Buffer = Buffer.alloc(0)
  let used = 0
  const release = (): void => {
    if (slab !== undefined) giveBack(slab)
    slab = undefined
  }
  return {
    /** Where the next read goes: the rest of this slab, or a new one. */
    space: () => {
      if (slab === undefined || size - used < MIN_READ) {
        release()
        slab = nextSlab()
        used = 0
        into = slab ?? Buffer.allocUnsafe(MIN_READ)
      }
      return into.subarray(used)
    },
    /** The `n` bytes just read into space(), lent. */
    filled: n => {
      const chunk = lend(into.subarray(used, used + n))
      used += n
      return chunk
    },
    release,
  }
}

/** A pipe or socket read into slabs. */
function readIntoSlabs (fd: number): Readable {
  const slabs = slabFiller()
  // onread is taken by the constructor too, though the typings list it only for connect().
  const socket: Socket = new Socket({
    fd,
    readable: true,
    writable: false,
    onread: {
      buffer: slabs.space,
      callback: (n: number) => out.push(slabs.filled(n)),
    },
  } as ConstructorParameters<typeof Socket>[0])
  const out: Readable = new Readable({
    highWaterMark: CHUNK,
    read () { socket.resume() },
    destroy (err, callback) {
      socket.destroy()
      callback(err)
    },
  })
  socket.on('end', () => out.push(null))
  socket.on('error', err => out.destroy(err))
  return out
}

/**
 * `input` itself, or, where it is a stream of a regular file not read from
 * yet (untouchedFilePath), the same file read into slabs instead, `input`
 * destroyed: a file stream reads into a fresh buffer each time, garbage at
 * the speed of the data, which V8 frees only some 32 MiB later. (Not a named
 * pipe: between two readers its writer could find none.)
 * A zstd file is read into half-MiB slabs: its bytes go no further than the
 * decompressor, which takes a chunk at a time, and a MiB of them is 3-4 MiB
 * of output, so whole MiB slabs held 2 MiB read ahead. A quarter MiB saved
 * 1 MiB more but cost 15-35% more CPU on a barely compressible archive
 * (6 interleaved pairs); lzop's and gzip's shrink less and go through
 * faster, and reads of a quarter MiB cost verify .gz 5-10% more CPU.
 */
export function inSlabs (input: Readable): Readable {
  const path = untouchedFilePath(input)
  if (path === undefined || !isFile(path)) return input
  input.destroy()
  return fileIntoSlabs(path, compressionOf(path) === 'zstd' ? SLAB_SIZE / 2 : SLAB_SIZE)
}

/** A regular file read into slabs of `size` from where its offset stands: a path opened (and closed) here, or a descriptor left open. */
function fileIntoSlabs (file: string | number, size = SLAB_SIZE): Readable {
  const slabs = slabFiller(size)
  let fd = typeof file === 'number' ? file : -1
  /** Set while a read is out: the descriptor is closed only after it, never under it. */
  let reading = false
  let closeAfterRead: (() => void) | undefined
  const out: Readable = new Readable({
    highWaterMark: size,
    construct (callback) {
      if (typeof file === 'number') callback()
      else fsOpen(file, 'r', (err, opened) => { fd = opened; callback(err) })
    },
    read () {
      const into = slabs.space()
      reading = true
      fsRead(fd, into, 0, into.length, null, (err, n) => {
        reading = false
        if (closeAfterRead !== undefined) closeAfterRead()
        else if (err !== null) out.destroy(err)
        else if (n === 0) out.push(null)
        else out.push(slabs.filled(n))
      })
    },
    destroy (err, callback) {
      const close = (): void => {
        slabs.release()
        if (fd < 0 || typeof file === 'number') callback(err)
        else fsClose(fd, () => callback(err))
      }
      if (reading) closeAfterRead = close
      else close()
    },
  })
  return out
}

/** The compression the file starts with; 'none' where it cannot be read (the read that follows says why). */
function compressionOf (path: string): Compression {
  try {
    const fd = openSync(path, 'r')
    try {
      const head = Buffer.alloc(DETECT_BYTES)
      return detectCompression(head.subarray(0, readSync(fd, head, 0, head.length, 0)))
    } finally {
      closeSync(fd)
    }
  } catch {
    return 'none'
  }
}

function isFile (path: string): boolean {
  try {
    return statSync(path).isFile()
  } catch {
    return false
  }
}

/**
 * The path behind a stream that reads a whole file from its start and has
 * not been read from yet (openInput's, createReadStream(path)): a job may then
 * read the file by position instead, and destroy the stream.
 */
export function untouchedFilePath (stream: Readable): string | undefined {
  if (!(stream instanceof ReadStream) || typeof stream.path !== 'string' || stream.path === '') return undefined
  const range = stream as ReadStream & { start?: number, end?: number }
  if (stream.bytesRead > 0 || stream.readableLength > 0 || (range.start ?? 0) !== 0 || (range.end ?? Infinity) !== Infinity) return undefined
  return stream.path
}

/** A regular file's size, or a block device's (stat says 0 for those; sysfs knows). */
export function sizeOf (st: Stats): number | undefined {
  if (st.isFile()) return st.size
  if (!st.isBlockDevice()) return undefined
  const major = Math.floor(st.rdev / 256) & 0xfff
  const minor = (st.rdev & 0xff) | ((Math.floor(st.rdev / 4096) & 0xfff00))
  try {
    return Number(readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim()) * 512
  } catch {
    return undefined
  }
}

/** The first `n` bytes of a file or device (fewer if it is shorter), or those at `position`, to tell its format. */
export async function readHead (path: string, n: number, position = 0): Promise<Buffer> {
  try {
    const handle = await open(path, 'r')
    try {
      const { buffer, bytesRead } = await handle.read(Buffer.alloc(n), 0, n, position)
      return buffer.subarray(0, bytesRead)
    } finally {
      await handle.close()
    }
  } catch (err) {
    throw ioError(err, `cannot read ${path}`)
  }
}

/**
 * The first `n` bytes of a stream (fewer if it is shorter), left in the stream
 * to be read again. While it waits for more, peek takes bytes out but always
 * leaves one in: a stream whose buffer empties at its end fires 'end' by itself
 * (sockets and pipes do), and after that nothing can be put back.
 */
export async function peek (stream: Readable, n: number): Promise<Buffer> {
  const chunks: Buffer[] = []
  let length = 0
  // Listening all along: a 'readable' listener added while bytes are buffered fires at once, so one per wait would spin.
  let signalled = false
  let failure: Error | undefined
  let wake: (() => void) | undefined
  const signal = (err?: Error): void => {
    if (err instanceof Error) failure = err
    signalled = true
    wake?.()
  }
  // In object mode (Readable.from) readableLength counts chunks and read() gives one; otherwise both are in bytes.
  const objects = stream.readableObjectMode
  /** Takes up to `count` of what is buffered (bytes, or chunks in object mode), no more than the head needs. */
  const take = (count: number): void => {
    if (objects) {
      for (; count > 0 && length < n; count--) {
        const chunk = stream.read() as Buffer
        chunks.push(chunk)
        length += chunk.length
      }
    } else if (Math.min(count, n - length) > 0) {
      const chunk = stream.read(Math.min(count, n - length)) as Buffer
      chunks.push(chunk)
      length += chunk.length
    }
  }
  const events = ['readable', 'end', 'close', 'error']
  for (const event of events) stream.on(event, signal)
  try {
    for (;;) {
      if (failure !== undefined) throw failure
      // One byte (or chunk) stays in, as a socket that saw its end reads itself and so emits 'end' once empty; but not
      // where the high-water mark is 1 (Readable.from): there a full buffer of one asks for nothing more, and read(0)
      // only emits 'readable' again.
      const keep = stream.readableHighWaterMark > 1 ? 1 : 0
      take(stream.readableLength - keep)
      // Checked before read(0), which on an ended, empty stream would schedule 'end' before the bytes go back.
      if (length >= n || (!objects && length + stream.readableLength >= n) || ended(stream) || stream.destroyed) break
      // A read may have pulled more in at once, without a 'readable' to come for it: take that first.
      if (stream.readableLength > keep) continue
      // Asks for more, and for 'readable' when it comes (also at the end).
      stream.read(0)
      if (stream.readableLength > keep) continue
      if (!signalled) await new Promise<void>(resolve => { wake = resolve })
      signalled = false
    }
  } finally {
    for (const event of events) stream.off(event, signal)
  }
  take(stream.readableLength)
  const head = Buffer.concat(chunks, length)
  // The head is a copy: whole chunks lent from slabs (io/slabs.ts) that read() gave out as they are go back now.
  for (const chunk of chunks) giveBack(chunk)
  // Put back in the same tick: an 'end' already scheduled is skipped while bytes are buffered.
  if (length > 0) stream.unshift(head)
  return head.subarray(0, n)
}

/**
 * The stream has delivered its last chunk to its buffer. Node has no public
 * flag for this ('readableEnded' is only set once 'end' has fired, too late to
 * give bytes back); `_readableState.ended` is what stream libraries read.
 */
function ended (stream: Readable): boolean {
  const state = (stream as Readable & { _readableState?: { ended?: boolean } })._readableState
  return stream.readableEnded || state?.ended === true
}

/**
 * Copies a stream into a new file in `dir` (default the temporary directory).
 * Open what you need, then call remove(): the open descriptors keep it alive.
 */
export async function spillToFile (stream: Readable, dir = tmpdir()): Promise<{ path: string, remove: () => Promise<void> }> {
  const path = join(dir, `vmapipe-input-${process.pid}-${randomBytes(6).toString('hex')}`)
  const remove = async (): Promise<void> => { await unlink(path).catch(() => {}) }
  try {
    await runStages([
      { stream, what: 'reading the input' },
      { stream: createWriteStream(path, { flags: 'wx', mode: 0o600, highWaterMark: 1 << 20 }), what: `copying the input to ${dir}` },
    ])
  } catch (err) {
    await remove()
    throw err
  }
  return { path, remove }
}
