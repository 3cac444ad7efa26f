/**
 * Compression as Proxmox applies it around VMA: zstd, gzip or lzop over the
 * whole archive. Recognised by magic bytes only; zstd and lzop run as child
 * processes (the Debian tools), gzip in-process with zlib.
 */
import { spawn } from 'node:child_process'
import { Duplex, type Readable, Writable } from 'node:stream'
import { createGunzip, createGzip } from 'node:zlib'
import { type ErrorCode, VmapipeError, ioError } from '../errors.js'

export const COMPRESSIONS = ['zstd', 'gzip', 'lzo', 'none'] as const
export type Compression = typeof COMPRESSIONS[number]

const MAGICS: Array<[Exclude<Compression, 'none'>, Buffer]> = [
  ['zstd', Buffer.from([0x28, 0xb5, 0x2f, 0xfd])],
  ['gzip', Buffer.from([0x1f, 0x8b])],
  ['lzo', Buffer.from([0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a])],
]
/** Enough bytes to tell every magic apart. */
export const DETECT_BYTES = 9
const CHUNK = 1 << 20

export function detectCompression (head: Buffer): Compression {
  for (const [kind, magic] of MAGICS) {
    if (head.length >= magic.length && head.subarray(0, magic.length).equals(magic)) return kind
  }
  return 'none'
}

/** The compression a file name asks for (`.zst`, `.gz`, `.lzo`), or 'none'. */
export function compressionForName (name: string): Compression {
  if (name.endsWith('.zst')) return 'zstd'
  if (name.endsWith('.gz')) return 'gzip'
  if (name.endsWith('.lzo')) return 'lzo'
  return 'none'
}

/** A running filter: bytes go into `input`, come out of `output`; `done` settles when it has exited. */
interface Filter {
  input: Writable
  output: Readable
  done: Promise<void>
  stop: () => void
}

/** Runs `command` as a filter; with `outputFd` its output goes straight there instead of to us. */
function childFilter (command: string, args: string[], failure: ErrorCode, outputFd?: number): Filter {
  const child = spawn(command, args, { stdio: ['pipe', outputFd ?? 'pipe', 'pipe'] })
  // stdin and stderr are always pipes; stdout is one unless the child writes to outputFd.
  const input = child.stdin as Writable
  let stderr = ''
  ;(child.stderr as Readable).setEncoding('utf8').on('data', (s: string) => { if (stderr.length < 4096) stderr += s })
  // A child that dies early makes our writes fail with EPIPE; its exit status tells the real story.
  input.on('error', () => {})
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err: NodeJS.ErrnoException) => {
      reject(err.code === 'ENOENT'
        ? new VmapipeError('E_TOOL_MISSING', `${command} is not installed; install the Debian package ${command === 'lzop' ? 'lzop' : 'zstd'}`)
        : ioError(err, `cannot run ${command}`))
    })
    child.on('close', (code, signal) => {
      if (code === 0) resolve()
      else reject(new VmapipeError(failure, `${command} ${args.join(' ')} failed (${signal ?? `exit ${code}`}): ${stderr.trim() || 'no message'}`))
    })
  })
  return { input, output: child.stdout as Readable, done, stop: () => child.kill('SIGKILL') }
}

function zlibFilter (stream: ReturnType<typeof createGzip>, failure: ErrorCode): Filter {
  const done = new Promise<void>((resolve, reject) => {
    stream.on('end', resolve)
    stream.on('error', err => reject(new VmapipeError(failure, `gzip: ${err.message}`)))
  })
  return { input: stream, output: stream, done, stop: () => stream.destroy() }
}

function decompressor (kind: Compression): Filter | null {
  switch (kind) {
    case 'none': return null
    case 'zstd': return childFilter('zstd', ['-d', '-c', '-q'], 'E_COMPRESSED_DATA')
    case 'lzo': return childFilter('lzop', ['-d', '-c'], 'E_COMPRESSED_DATA')
    case 'gzip': return zlibFilter(createGunzip({ chunkSize: CHUNK }), 'E_COMPRESSED_DATA')
  }
}

const COMPRESS_COMMANDS = {
  zstd: ['zstd', '-c', '-q', '-T0'],
  lzo: ['lzop', '-c'],
} as const

function compressor (kind: Compression, level?: number, outputFd?: number): Filter | null {
  switch (kind) {
    case 'none': return null
    case 'gzip': return zlibFilter(createGzip({ chunkSize: CHUNK, ...(level === undefined ? {} : { level }) }), 'E_IO')
    default: {
      const [command, ...args] = COMPRESS_COMMANDS[kind]
      return childFilter(command, [...args, ...(level === undefined ? [] : [`-${level}`])], 'E_IO', outputFd)
    }
  }
}

/**
 * A Duplex that chooses its filter from the first bytes (or up front), then
 * streams through it with backpressure both ways. It ends only after the
 * filter has exited cleanly, so a corrupt or cut-off stream is an error, not
 * a short read.
 */
class FilterStream extends Duplex {
  private head: Buffer[] = []
  private headLength = 0
  private inner?: Filter | null
  private waitingWrite?: () => void

  constructor (private readonly choose: (head: Buffer) => Filter | null, private readonly headBytes: number) {
    super({ readableHighWaterMark: CHUNK, writableHighWaterMark: CHUNK })
  }

  /** Which filter was chosen, once data has arrived. */
  chosen?: Compression

  override _write (chunk: Buffer, _enc: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.inner === undefined) {
      this.head.push(chunk)
      this.headLength += chunk.length
      if (this.headLength < this.headBytes) { callback(); return }
      chunk = this.start()
    }
    this.forward(chunk, callback)
  }

  override _final (callback: (err?: Error | null) => void): void {
    const rest = this.inner === undefined ? this.start() : null
    const finish = (): void => {
      const filter = this.inner
      if (filter === null || filter === undefined) { this.push(null); callback(); return }
      filter.input.end()
      callback()
    }
    if (rest !== null && rest.length > 0) this.forward(rest, err => { if (err) callback(err); else finish() })
    else finish()
  }

  override _read (): void {
    const resume = this.waitingWrite
    this.waitingWrite = undefined
    resume?.()
    if (this.inner) this.inner.output.resume()
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    if (this.inner) this.inner.stop()
    callback(err)
  }

  private start (): Buffer {
    const head = Buffer.concat(this.head)
    this.head = []
    const filter = this.choose(head)
    this.inner = filter
    if (filter !== null) {
      filter.output.on('data', (data: Buffer) => { if (!this.push(data)) filter.output.pause() })
      let ended = false
      filter.output.on('end', () => { ended = true })
      filter.done.then(() => {
        if (ended) this.push(null)
        else filter.output.once('end', () => this.push(null))
      }, err => this.destroy(err))
    }
    return head
  }

  private forward (chunk: Buffer, callback: (err?: Error | null) => void): void {
    const filter = this.inner
    if (filter === null || filter === undefined) {
      if (this.push(chunk)) callback()
      else this.waitingWrite = () => callback()
      return
    }
    if (filter.input.write(chunk)) callback()
    else filter.input.once('drain', () => callback())
  }
}

/** Bytes in, decompressed bytes out: zstd, gzip, lzop or plain, told apart by magic. */
export function createDecompressor (): Duplex & { chosen?: Compression } {
  const stream: FilterStream = new FilterStream(head => {
    stream.chosen = detectCompression(head)
    return decompressor(stream.chosen)
  }, DETECT_BYTES)
  return stream
}

/** Bytes in, compressed bytes out. */
export function createCompressor (kind: Compression, level?: number): Duplex {
  const stream = new FilterStream(() => compressor(kind, level), 0)
  stream.chosen = kind
  return stream
}

/** Whether a compression runs as a program that can write to a file descriptor itself. */
export function compressesToFd (kind: Compression): boolean {
  return kind in COMPRESS_COMMANDS
}

/**
 * A sink that compresses into `fd` with zstd or lzop writing there directly,
 * so the compressed bytes never pass through this process. Finishes once the
 * program has exited cleanly.
 */
export function createCompressingSink (kind: Compression, fd: number, level?: number): Writable {
  const filter = compressor(kind, level, fd)
  if (filter === null || !compressesToFd(kind)) throw new Error(`${kind} cannot write to a file descriptor`)
  const sink: Writable = new Writable({
    highWaterMark: CHUNK,
    write (chunk: Buffer, _enc, callback) {
      if (filter.input.write(chunk)) callback()
      else filter.input.once('drain', () => callback())
    },
    final (callback) {
      filter.input.end()
      filter.done.then(() => callback(), callback)
    },
    destroy (err, callback) {
      filter.stop()
      callback(err)
    },
  })
  filter.done.catch((err: Error) => sink.destroy(err))
  return sink
}
