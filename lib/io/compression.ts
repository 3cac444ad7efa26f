/**
 * Compression as Proxmox applies it around VMA: zstd, gzip or lzop over the
 * whole archive. Recognised by magic bytes only. Nothing outside npm is
 * needed: zstd is decoded and compressed in this thread by zstd-napi (libzstd
 * built from its bundled sources) straight into slabs, else by node:zlib
 * where this Node has zstd (22.15+); lzop is our own LZO1X code (lzo.ts),
 * decoded and compressed in this thread into slabs as well; gzip is
 * node:zlib's deflate, driven in this thread the same way.
 * VMAPIPE_EXTERNAL_COMPRESSION=1 runs the `zstd` and `lzop` programs
 * instead, as before.
 */
import { spawn } from 'node:child_process'
import { createRequire } from 'node:module'
import { Duplex, Readable, Writable } from 'node:stream'
import * as zlib from 'node:zlib'
import { type ErrorCode, VmapipeError, ioError } from '../errors.js'
import { type BlockOut, DataError, LZOP_BLOCK, LZOP_BLOCK_HEAD, LZOP_END, LzopDecoder, lzo1xBound, lzopBlockParts, lzopHeader } from './lzo.js'
import { SLAB_SIZE, SMALL_SLAB_SIZE, giveBack, inSlab, lend, slabSource } from './slabs.js'

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
const EMPTY: Buffer = Buffer.alloc(0)
/** zstd's default limit (and the `zstd` program's): frames asking for a larger window are refused, not allocated. */
const ZSTD_WINDOW_LOG_MAX = 27

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

/** Whether to run the `zstd` and `lzop` programs rather than our own engines (an option: `lzop` compresses faster than our LZO1X). */
function externalPrograms (): boolean {
  return process.env.VMAPIPE_EXTERNAL_COMPRESSION === '1'
}

/** Runs `command` as a filter; with `outputFd` its output goes straight there instead of to us. */
function childFilter (command: string, args: string[], failure: ErrorCode, outputFd?: number): Filter {
  // A process group of its own: the terminal's ^C reaches only us, and we stop the child as part of cleaning up,
  // instead of it dying first and its death reading as corrupt data.
  const child = spawn(command, args, { stdio: ['pipe', outputFd ?? 'pipe', 'pipe'], detached: true })
  // stdin and stderr are always pipes; stdout is one unless the child writes to outputFd.
  const input = child.stdin as Writable
  let stderr = ''
  let stopped = false
  ;(child.stderr as Readable).setEncoding('utf8').on('data', (s: string) => { if (stderr.length < 4096) stderr += s })
  // A child that dies early makes our writes fail with EPIPE; its exit status tells the real story.
  input.on('error', () => {})
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err: NodeJS.ErrnoException) => {
      reject(err.code === 'ENOENT'
        ? new VmapipeError('E_TOOL_MISSING', `${command} is not installed (VMAPIPE_EXTERNAL_COMPRESSION=1 asks for it); install the Debian package ${command}`)
        : ioError(err, `cannot run ${command}`))
    })
    child.on('close', (code, signal) => {
      if (code === 0) resolve()
      else if (stopped || signal === 'SIGINT' || signal === 'SIGTERM') reject(new VmapipeError('E_INTERRUPTED', `${command} was stopped`))
      else reject(new VmapipeError(failure, `${command} ${args.join(' ')} failed (${signal ?? `exit ${code}`}): ${stderr.trim() || 'no message'}`))
    })
  })
  return { input, output: child.stdout as Readable, done, stop: () => { stopped = true; child.kill('SIGKILL') } }
}

/** Larger inputs are fed to zlib in pieces of this size, so one piece of a compression bomb cannot inflate past ~64 MiB (deflate shrinks 1032:1 at most). */
const ZLIB_PIECE = 1 << 16

function zlibFilter (stream: Duplex, what: string, failure: ErrorCode): Filter {
  const done = new Promise<void>((resolve, reject) => {
    stream.on('end', resolve)
    stream.on('error', err => reject(new VmapipeError(failure, `${what}: ${err.message}`)))
  })
  // zlib inflates a whole written chunk before it looks at backpressure; small pieces keep that bounded.
  const input = new Writable({
    highWaterMark: CHUNK,
    write (chunk: Buffer, _enc, callback) {
      const feed = (at: number): void => {
        while (at < chunk.length) {
          const piece = chunk.subarray(at, at + ZLIB_PIECE)
          at += piece.length
          // zlib calls back once it has taken the piece in: after the last, the chunk goes back to its slab (io/slabs.ts).
          const taken = at === chunk.length ? () => giveBack(chunk) : undefined
          if (!stream.write(piece, taken)) { stream.once('drain', () => feed(at)); return }
        }
        callback()
      }
      feed(0)
    },
    final (callback) { stream.end(); callback() },
  })
  return { input, output: stream, done, stop: () => stream.destroy() }
}

/** node:zlib's native handle as Node 20 to 24 have it (`_handle`, `_writeState`): internal, so looked for before use. */
interface ZlibHandle {
  /** Runs zlib on in[inOff, +inLen] into out[outOff, +outLen]; leaves [output room, input] left in the write state; bad data calls onerror. */
  writeSync: (flush: number, input: Buffer, inOff: number, inLen: number, out: Buffer, outOff: number, outLen: number) => void
  onerror: (message: string) => void
}

/** The handle behind a node:zlib stream and its write state, or undefined where this Node's zlib differs from what we drive. */
export function zlibHandle (engine: object): { handle: ZlibHandle, state: Uint32Array } | undefined {
  const { _handle: handle, _writeState: state } = engine as { _handle?: Partial<ZlibHandle>, _writeState?: unknown }
  if (typeof handle?.writeSync !== 'function' || typeof handle.onerror !== 'function' || !(state instanceof Uint32Array) || state.length !== 2) {
    return undefined
  }
  return { handle: handle as ZlibHandle, state }
}

/**
 * gzip run in this thread straight into slabs (slabCoder), through
 * node:zlib's own handle behind `engine` (a Gunzip or a Gzip, closed once
 * done): node:zlib's stream makes a new buffer per output chunk, garbage that
 * V8 frees only after some 32 MiB of it (README, Performance). Undefined
 * where this Node has not the handle we know; then the stream is used.
 * Memory stays bounded against a bomb: each step fills at most the free end
 * of one slab, and the coder waits while its reader is behind.
 */
function zlibInline (engine: zlib.Gzip | zlib.Gunzip, failure: ErrorCode): Filter | undefined {
  const native = zlibHandle(engine)
  if (native === undefined) {
    engine.close()
    return undefined
  }
  const { handle, state } = native
  let error: string | undefined
  handle.onerror = (message: string) => { error = message }
  let ended = false
  let chunk: Buffer = Buffer.alloc(0)
  let src = chunk
  /** Input bytes consumed before the chunk being coded. */
  let consumedBefore = 0
  /** Codes a piece of `src`: false once it is all taken and zlib holds back no output that more room would bring out. */
  const step = (out: BlockOut, last: boolean): boolean => {
    if (ended) { src = src.subarray(src.length); return false }
    const dst = out.space(MIN_OUT)
    // A piece at a time: deflate (level 9 above all) then holds the thread for a piece, not a whole chunk.
    const take = Math.min(src.length, ZLIB_PIECE)
    const flush = last && take === src.length ? zlib.constants.Z_FINISH : zlib.constants.Z_NO_FLUSH
    handle.writeSync(flush, src, 0, take, dst, 0, dst.length)
    if (error !== undefined) {
      const at = consumedBefore + chunk.length - src.length
      throw failure === 'E_COMPRESSED_DATA' ? new DataError(error, at) : new VmapipeError(failure, `gzip: ${error}`)
    }
    const outLeft = state[0] as number
    const inLeft = state[1] as number
    // Room and input both left (only ever inflating): the last member has ended and zeros follow (zlib tries any other
    // byte as a member), which gzip ignores too.
    ended = inLeft > 0 && outLeft > 0
    if (outLeft < dst.length) out.emit(dst.length - outLeft)
    src = src.subarray(ended ? src.length : take - inLeft)
    return !(src.length === 0 && outLeft > 0)
  }
  // Inflating is decoding (the failure a decoder reports).
  return slabCoder('gzip', {
    push (c) {
      consumedBefore += chunk.length
      chunk = src = c
    },
    next: out => step(out, false),
    flush: out => step(out, true),
    end () {},
    close: () => engine.close(),
  }, failure === 'E_COMPRESSED_DATA' ? DECODED : ENCODED)
}

/** node:zlib's zstd (Node 22.15 and later), which @types/node 20 does not describe. */
interface ZlibZstd {
  createZstdDecompress?: (options: object) => Duplex
  createZstdCompress?: (options: object) => Duplex
  constants: Record<string, number>
}
const zlibZstd = zlib as unknown as ZlibZstd

let zstdNapi: boolean | undefined
/** Whether zstd-napi, an optional dependency, was built at install and loads. */
function zstdNapiLoads (): boolean {
  if (zstdNapi === undefined) {
    try {
      createRequire(import.meta.url)('zstd-napi/binding.js')
      zstdNapi = true
    } catch {
      zstdNapi = false
    }
  }
  return zstdNapi
}

/** Where zstd-napi could not be built (no C compiler) and Node has no zstd of its own: what to do, rather than fail later. */
function noZstd (): VmapipeError {
  return new VmapipeError('E_TOOL_MISSING', 'zstd needs Node 22.15 or later, or the zstd-napi package built at install (npm ci with a C compiler), ' +
    'or the zstd program with VMAPIPE_EXTERNAL_COMPRESSION=1')
}

/** Output space below this starts a new slab rather than fill the end of one. */
const MIN_OUT = 1 << 16
/** A coder's largest step, and the output it lets wait (slabCoder). */
const PACED_STEP = 1 << 17
/** What a coder puts out into: slabs of `size`, of which it may make `made` new (slabSource), beyond them fresh buffers. */
interface Output { size: number, made: number }
/**
 * A decoder's: whole MiB slabs, up to 4 of them, about what the stages after
 * it hold while they flow. Half-MiB slabs took 1-2 MiB off the extract
 * writers' share but cost 15% more CPU on a barely compressible .vma.zst
 * (6 interleaved pairs: records cut by a slab's end are copied, io/slabs.ts
 * scratch, and each slab is a turn of the event loop).
 */
const DECODED: Output = { size: SLAB_SIZE, made: 4 }
/**
 * An encoder's: small slabs, as many as the file writer holds (its 1 MiB
 * buffered and a write of as much in flight) and the slab being filled; the
 * bytes go no further, and little of a large slab would be in use.
 */
const ENCODED: Output = { size: SMALL_SLAB_SIZE, made: 12 }
/** Bytes a coder's stages let wait in front of it: none beyond the chunk it works on (it runs in this thread, and keeps up). */
const INPUT_WAITING = 0

/** The part of zstd-napi's binding used in this thread, declared locally: the package is optional, and the build must not need it. */
interface ZstdBinding {
  DCtx: new () => ZstdDCtx
  DParameter: { windowLogMax: number }
}
export interface ZstdDCtx {
  /** Decodes from src into dst: [0 once a frame is complete, bytes produced, bytes consumed]; throws on bad data. */
  decompressStream: (dst: Uint8Array, src: Uint8Array) => [number, number, number]
  setParameter: (p: number, v: number) => void
}

/** A zstd-napi decompression context that refuses frames asking for more than zstd's default window. Throws where zstd-napi is not built. */
export function zstdDecoder (): ZstdDCtx {
  const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as ZstdBinding
  const dctx = new zstd.DCtx()
  dctx.setParameter(zstd.DParameter.windowLogMax, ZSTD_WINDOW_LOG_MAX)
  return dctx
}

/** A codec run in this thread by slabCoder(); bad data is a DataError (lzo.ts), at a byte of the compressed stream. */
interface InlineCoder {
  /** The next input chunk, for next() to work through. */
  push: (chunk: Buffer) => void
  /** One step, its output put in `out`: false once the chunk is all taken and no longer needed. */
  next: (out: BlockOut) => boolean
  /** After the last chunk, one step of output still held back (an encoder's last frame): false once there is none. */
  flush?: (out: BlockOut) => boolean
  /** Throws unless the stream ended where it may. */
  end: () => void
  /** Frees what the coder holds, once done or stopped. */
  close?: () => void
}

/**
 * A coder run in this thread, a step at a time, straight into slabs
 * (io/slabs.ts; `slabs` says which): each step fills the free end of the current slab, and what
 * it produced is lent on, so consecutive outputs lie next to each other (the
 * reader's byte queue joins them, no record is copied) and the slabs go round
 * once the reader and the writers give their loans back. Measured against a
 * worker thread (README, Performance), this costs less CPU and half the
 * memory for zstd and lzop: no output is handed to another thread as a fresh
 * buffer (garbage), and there is no worker's isolate (some 13 MiB).
 *
 * The event loop gets a turn whenever a slab is full, and output goes out
 * in steps of at most PACED_STEP, little of it waiting. The output runs
 * down the line synchronously, and a writer that gives its loans back from
 * a stream's callback (called on the next tick even where the bytes went
 * out at once) could not do so before the whole burst was coded: every
 * chunk queued before a decoder, some 14 MiB of output, was out at once, in
 * fresh buffers once its slabs were made. Output waiting in a stage buys
 * nothing here (every stage after the coder runs in this thread, and the
 * file writer has a buffer of its own), but holds its slab: vma create
 * --compress lzo of 1 GiB held 11 MiB of slabs with its encoder unpaced,
 * 7 MiB paced into small slabs.
 */
function slabCoder (name: string, coder: InlineCoder, slabs: Output): Filter {
  const nextSlab = slabSource(slabs.made, slabs.size)
  let slab: Buffer | undefined
  let into = EMPTY
  let used = 0
  let room = true
  let stopped = false
  /** Work that waits for the reader to take what is out already. */
  let blocked: (() => void) | undefined
  let settle!: { resolve: () => void, reject: (err: Error) => void }
  const done = new Promise<void>((resolve, reject) => { settle = { resolve, reject } })
  const stop = (): void => {
    if (stopped) return
    stopped = true
    blocked = undefined
    coder.close?.()
  }
  const fail = (err: unknown): void => {
    stop()
    settle.reject(err instanceof DataError ? new VmapipeError('E_COMPRESSED_DATA', `${name}: ${err.message} (compressed byte ${err.at})`) : err as Error)
  }
  const output = new Readable({
    highWaterMark: PACED_STEP,
    read () {
      const resume = blocked
      blocked = undefined
      resume?.()
    },
  })
  const out: BlockOut = {
    space (n) {
      if (into.length - used < n) {
        if (slab !== undefined) giveBack(slab)
        // More than a slab (an lzop block of up to 64 MiB, as the decoder bounds it): a buffer of its own.
        slab = n <= slabs.size ? nextSlab() : undefined
        into = slab ?? Buffer.allocUnsafeSlow(Math.max(n, slabs.size))
        used = 0
      }
      return into.subarray(used, used + Math.max(n, PACED_STEP))
    },
    emit (n) {
      // Lent while this coder still holds its own loan of the slab.
      room = output.push(lend(into.subarray(used, used + n)))
      used += n
    },
  }
  /** Takes steps until one says it is done, then calls `then`; pauses while the reader has enough. */
  const run = (step: () => boolean, then: () => void): void => {
    while (!stopped) {
      if (slab !== undefined && into.length - used < MIN_OUT) {
        // The slab is full: our loan goes back now, so that once the writers have given theirs back it is the next one taken.
        giveBack(slab)
        slab = undefined
        into = EMPTY
        setImmediate(() => run(step, then))
        return
      }
      room = true
      let more: boolean
      try {
        more = step()
      } catch (err) {
        fail(err)
        return
      }
      // Done with this input, but the reader has enough: the next input (the caller's callback) only once it reads on.
      if (!more) {
        if (room) then()
        else blocked = then
        return
      }
      if (!room) { blocked = () => run(step, then); return }
    }
  }
  const input = new Writable({
    highWaterMark: INPUT_WAITING,
    write (chunk: Buffer, _enc, callback) {
      coder.push(chunk)
      run(() => coder.next(out), () => { giveBack(chunk); callback() })
    },
    final (callback) {
      run(() => {
        if (coder.flush?.(out) === true) return true
        coder.end()
        return false
      }, () => {
        if (slab !== undefined) giveBack(slab)
        stop()
        output.push(null)
        settle.resolve()
        callback()
      })
    },
  })
  return { input, output, done, stop }
}

/** zstd-napi's decoding steps for slabCoder(). */
function zstdSteps (): InlineCoder {
  const dctx = zstdDecoder()
  let chunk: Buffer = Buffer.alloc(0)
  let src = chunk
  /** Compressed bytes consumed before the chunk being decoded. */
  let consumedBefore = 0
  let inFrame = false
  return {
    push (c) { chunk = src = c },
    next (out) {
      const dst = out.space(MIN_OUT)
      let result: [number, number, number]
      try {
        result = dctx.decompressStream(dst, src)
      } catch (err) {
        throw new DataError((err as Error).message, consumedBefore + chunk.length - src.length)
      }
      const [ret, produced, consumed] = result
      src = src.subarray(consumed)
      if (produced > 0) out.emit(produced)
      // Done with this chunk once it is all taken and zstd has no more output waiting.
      if (src.length === 0 && (produced < dst.length || ret === 0)) {
        inFrame = ret !== 0
        consumedBefore += chunk.length
        return false
      }
      return true
    },
    end () {
      if (inFrame) throw new DataError('the stream is cut off inside a frame', consumedBefore)
    },
  }
}

function zstdDecompressor (): Filter {
  if (externalPrograms()) return childFilter('zstd', ['-d', '-c', '-q'], 'E_COMPRESSED_DATA')
  if (zstdNapiLoads()) return slabCoder('zstd', zstdSteps(), DECODED)
  if (zlibZstd.createZstdDecompress !== undefined) {
    const params = { [zlibZstd.constants.ZSTD_d_windowLogMax]: ZSTD_WINDOW_LOG_MAX }
    return zlibFilter(zlibZstd.createZstdDecompress({ chunkSize: CHUNK, params }), 'zstd', 'E_COMPRESSED_DATA')
  }
  throw noZstd()
}

function decompressor (kind: Compression): Filter | null {
  switch (kind) {
    case 'none': return null
    case 'zstd': return zstdDecompressor()
    case 'lzo': return externalPrograms() ? childFilter('lzop', ['-d', '-c'], 'E_COMPRESSED_DATA') : slabCoder('lzop', new LzopDecoder(), DECODED)
    // Its own output buffer is never used: the smallest there is.
    case 'gzip': return zlibInline(zlib.createGunzip({ chunkSize: zlib.constants.Z_MIN_CHUNK }), 'E_COMPRESSED_DATA') ??
      zlibFilter(zlib.createGunzip({ chunkSize: CHUNK }), 'gzip', 'E_COMPRESSED_DATA')
  }
}

const COMPRESS_COMMANDS = {
  zstd: ['zstd', '-c', '-q', '-T0'],
  lzo: ['lzop', '-c'],
} as const
/** zstd's level when none is given, as for the `zstd` program. */
const ZSTD_LEVEL = 3

/** The part of zstd-napi's binding that compresses, declared locally as ZstdBinding is. */
interface ZstdCBinding {
  CCtx: new () => {
    setParameter: (p: number, v: number) => void
    /** Encodes from src into dst: [bytes still to flush (0 once all is out at the end), bytes produced, bytes consumed]. */
    compressStream2: (dst: Uint8Array, src: Uint8Array, end: number) => [number, number, number]
  }
  CParameter: { compressionLevel: number }
  EndDirective: { continue: number, end: number }
}

/**
 * zstd compressed with zstd-napi in this thread, by slabCoder() into slabs
 * that the file writer gives back once written. Single-threaded (no
 * nbWorkers): two libzstd workers with 1 MiB jobs held 8 MiB more (jobs'
 * input and output, a context each), and the window each job re-reads
 * cost 25-30% more CPU. They shortened the job only on an idle machine
 * (busiest thread 0.6 s against this thread's 1.3 s for 512 MiB); with
 * the cores shared, as where this was measured, not at all.
 */
function zstdEncodeSteps (level: number): InlineCoder {
  const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as ZstdCBinding
  const cctx = new zstd.CCtx()
  cctx.setParameter(zstd.CParameter.compressionLevel, level)
  let src: Buffer = Buffer.alloc(0)
  /** Feeds what is left of `src` with `directive`: false once it is all in (and, at the end, all out); libzstd has copied it by then. */
  const step = (out: BlockOut, directive: number): boolean => {
    const dst = out.space(MIN_OUT)
    let result: [number, number, number]
    try {
      result = cctx.compressStream2(dst, src, directive)
    } catch (err) {
      throw new VmapipeError('E_IO', `zstd: ${(err as Error).message}`)
    }
    const [left, produced, consumed] = result
    src = src.subarray(consumed)
    if (produced > 0) out.emit(produced)
    return !(src.length === 0 && (directive === zstd.EndDirective.continue || left === 0))
  }
  return {
    push (chunk) { src = chunk },
    next: out => step(out, zstd.EndDirective.continue),
    flush: out => step(out, zstd.EndDirective.end),
    end () {},
  }
}

/** Copies `bytes` to `out`, across as many slabs as it takes. */
function put (out: BlockOut, bytes: Uint8Array): void {
  for (let at = 0; at < bytes.length;) {
    const into = out.space(1)
    const n = Math.min(into.length, bytes.length - at)
    into.set(bytes.subarray(at, at + n))
    out.emit(n)
    at += n
  }
}

/**
 * lzop compression for slabCoder(), in this thread: each step packs one
 * block of LZOP_BLOCK bytes and copies it into the slabs (it is packed into a
 * scratch buffer first, as stored blocks of data that does not shrink are
 * as is). A block that lies whole in the chunk is packed from there; the
 * rest is gathered in a buffer of its own. A worker thread did this before:
 * its isolate and the buffers going to and fro cost 20 MiB more and 20% more
 * CPU, and its thread (1.6 s for 512 MiB) took about as long as this whole
 * thread does now (1.7 s).
 */
function lzopEncodeSteps (): InlineCoder {
  const pending = Buffer.allocUnsafeSlow(LZOP_BLOCK)
  let filled = 0
  const scratch = new Uint8Array(lzo1xBound(LZOP_BLOCK))
  const dict = new Int32Array(1 << 14)
  const head = Buffer.allocUnsafe(LZOP_BLOCK_HEAD)
  let header: Buffer | undefined = lzopHeader()
  let src: Buffer = Buffer.alloc(0)
  /** The stream's header goes first. */
  const started = (out: BlockOut): void => {
    if (header !== undefined) put(out, header)
    header = undefined
  }
  const block = (out: BlockOut, data: Buffer): void => {
    started(out)
    const body = lzopBlockParts(data, scratch, dict, head)
    put(out, head)
    put(out, body)
  }
  return {
    push (chunk) { src = chunk },
    next (out) {
      if (filled === 0 && src.length >= LZOP_BLOCK) {
        block(out, src.subarray(0, LZOP_BLOCK))
        src = src.subarray(LZOP_BLOCK)
      } else {
        const n = src.copy(pending, filled)
        filled += n
        src = src.subarray(n)
        if (filled === LZOP_BLOCK) {
          block(out, pending)
          filled = 0
        }
      }
      return src.length > 0
    },
    flush (out) {
      if (filled > 0) {
        block(out, pending.subarray(0, filled))
        filled = 0
        return true
      }
      started(out)
      put(out, LZOP_END)
      return false
    },
    end () {},
  }
}

function zstdCompressor (level = ZSTD_LEVEL): Filter {
  if (zstdNapiLoads()) return slabCoder('zstd', zstdEncodeSteps(level), ENCODED)
  if (zlibZstd.createZstdCompress !== undefined) {
    const params = { [zlibZstd.constants.ZSTD_c_compressionLevel]: level }
    return zlibFilter(zlibZstd.createZstdCompress({ chunkSize: CHUNK, params }), 'zstd', 'E_IO')
  }
  throw noZstd()
}

function compressor (kind: Compression, level?: number, outputFd?: number): Filter | null {
  if (kind !== 'none' && kind !== 'gzip' && (externalPrograms() || outputFd !== undefined)) {
    const [command, ...args] = COMPRESS_COMMANDS[kind]
    return childFilter(command, [...args, ...(level === undefined ? [] : [`-${level}`])], 'E_IO', outputFd)
  }
  switch (kind) {
    case 'none': return null
    case 'gzip': {
      const options = level === undefined ? {} : { level }
      return zlibInline(zlib.createGzip({ chunkSize: zlib.constants.Z_MIN_CHUNK, ...options }), 'E_IO') ??
        zlibFilter(zlib.createGzip({ chunkSize: CHUNK, ...options }), 'gzip', 'E_IO')
    }
    case 'zstd': return zstdCompressor(level)
    case 'lzo': return slabCoder('lzop', lzopEncodeSteps(), ENCODED)
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

  constructor (private readonly choose: (head: Buffer) => Filter | null, private readonly headBytes: number, readableHighWaterMark = CHUNK,
    writableHighWaterMark = CHUNK) {
    super({ readableHighWaterMark, writableHighWaterMark })
  }

  /** Which filter was chosen, once data has arrived. */
  chosen?: Compression

  override _write (chunk: Buffer, _enc: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.inner === undefined) {
      this.head.push(chunk)
      this.headLength += chunk.length
      if (this.headLength < this.headBytes) { callback(); return }
      try {
        chunk = this.start()
      } catch (err) {
        callback(err as Error)
        return
      }
    }
    this.forward(chunk, callback)
  }

  override _final (callback: (err?: Error | null) => void): void {
    let rest: Buffer | null
    try {
      rest = this.inner === undefined ? this.start() : null
    } catch (err) {
      callback(err as Error)
      return
    }
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
    // One chunk lent from a slab (io/slabs.ts; a file's first read) goes on as it is, for the filter to give back. Else a copy,
    // and lent chunks go back now.
    const single = this.head.length === 1 && inSlab(this.head[0] as Buffer)
    const head = single ? this.head[0] as Buffer : Buffer.concat(this.head)
    if (!single) for (const chunk of this.head) giveBack(chunk)
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
  // Little decoded output waits here: what reads it (VmaReader) runs in this thread and keeps up (slabCoder).
  const stream: FilterStream = new FilterStream(head => {
    stream.chosen = detectCompression(head)
    return decompressor(stream.chosen)
  }, DETECT_BYTES, PACED_STEP, INPUT_WAITING)
  return stream
}

/** Bytes in, compressed bytes out. */
export function createCompressor (kind: Compression, level?: number): Duplex {
  const stream = new FilterStream(() => compressor(kind, level), 0, PACED_STEP, INPUT_WAITING)
  stream.chosen = kind
  return stream
}

/** Whether a compression runs as a program that can write to a file descriptor itself (only with VMAPIPE_EXTERNAL_COMPRESSION=1). */
export function compressesToFd (kind: Compression): boolean {
  return externalPrograms() && kind in COMPRESS_COMMANDS
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
