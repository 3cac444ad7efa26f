/**
 * A worker thread that runs one compression job (zstd or lzop compression)
 * so the codec and the rest of the job use a core each. Talks to lib/io/compression.ts
 * through messages with credits both ways, so neither side buffers more than
 * a few chunks:
 *   in:  {t:'data', b} (an ArrayBuffer, transferred), {t:'end'}, {t:'credit'} (one output chunk taken)
 *   out: {t:'ack'} (one input chunk consumed), {t:'data', b, n}, {t:'end'}, {t:'error', message}
 */
import { createRequire } from 'node:module'
import { parentPort, workerData } from 'node:worker_threads'
import { OUTPUT_CREDITS, type WorkerOptions } from './codec-protocol.js'
import { LZOP_BLOCK, LZOP_END, lzo1xBound, lzopBlock, lzopHeader } from './lzo.js'

const OUT = 1 << 20

/** The part of zstd-napi's binding used here, declared locally: the package is optional, and the build must not need it. */
interface Binding {
  CCtx: new () => { setParameter: (p: number, v: number) => void, compressStream2: (dst: Uint8Array, src: Uint8Array, end: number) => [number, number, number] }
  CParameter: { compressionLevel: number, nbWorkers: number }
  EndDirective: { continue: number, end: number }
}
/** Sends output; `owned`: a buffer of our own (not Buffer's shared pool) that may be handed over to the reader. */
type Emit = (data: Buffer, owned?: boolean) => Promise<void>
interface Engine {
  /** Takes one input chunk; the error offset counts compressed bytes. */
  write: (chunk: Buffer, emit: Emit) => Promise<void>
  end: (emit: Emit) => Promise<void>
}

function zstdEncoder (zstd: Binding, level: number, threads: number): Engine {
  const cctx = new zstd.CCtx()
  cctx.setParameter(zstd.CParameter.compressionLevel, level)
  if (threads > 1) cctx.setParameter(zstd.CParameter.nbWorkers, threads)
  const run = async (src: Buffer, directive: number, emit: Emit): Promise<void> => {
    while (true) {
      const dst = Buffer.allocUnsafeSlow(OUT)
      const [ret, produced, consumed] = cctx.compressStream2(dst, src, directive)
      src = src.subarray(consumed)
      if (produced > 0) await emit(dst.subarray(0, produced), true)
      if (src.length === 0 && (directive === zstd.EndDirective.continue || ret === 0)) return
    }
  }
  return {
    write: async (chunk, emit) => { await run(chunk, zstd.EndDirective.continue, emit) },
    end: async emit => { await run(Buffer.alloc(0), zstd.EndDirective.end, emit) },
  }
}

function lzopEncoder (): Engine {
  const pending = Buffer.allocUnsafe(LZOP_BLOCK)
  let filled = 0
  let started = false
  const scratch = new Uint8Array(lzo1xBound(LZOP_BLOCK))
  const dict = new Int32Array(1 << 14)
  const header = async (emit: Emit): Promise<void> => {
    if (!started) { started = true; await emit(lzopHeader()) }
  }
  return {
    async write (chunk, emit) {
      await header(emit)
      for (let at = 0; at < chunk.length;) {
        const n = Math.min(chunk.length - at, LZOP_BLOCK - filled)
        chunk.copy(pending, filled, at, at + n)
        filled += n
        at += n
        if (filled === LZOP_BLOCK) {
          await emit(lzopBlock(pending, scratch, dict), true)
          filled = 0
        }
      }
    },
    async end (emit) {
      await header(emit)
      if (filled > 0) await emit(lzopBlock(pending.subarray(0, filled), scratch, dict), true)
      await emit(LZOP_END)
    },
  }
}

function engineFor (options: WorkerOptions): Engine {
  if (options.job === 'lzo-c') return lzopEncoder()
  const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as Binding
  return zstdEncoder(zstd, options.level ?? 3, options.threads ?? 1)
}

if (parentPort !== null) {
  const port = parentPort
  const inputs: Array<Buffer | null> = []
  let wakeInput: (() => void) | undefined
  let credits = OUTPUT_CREDITS
  let wakeOutput: (() => void) | undefined
  port.on('message', (m: { t: 'data', b: ArrayBuffer } | { t: 'end' } | { t: 'credit' }) => {
    if (m.t === 'credit') {
      credits++
      wakeOutput?.()
      return
    }
    inputs.push(m.t === 'data' ? Buffer.from(m.b) : null)
    wakeInput?.()
  })
  const emit: Emit = async (data, owned = false) => {
    while (credits === 0) await new Promise<void>(resolve => { wakeOutput = resolve })
    credits--
    // Our own buffers, mostly full, are handed over as they are; anything else is copied first.
    const whole = owned && data.byteOffset === 0 && data.length >= data.buffer.byteLength / 2
    const b = whole ? data.buffer : new Uint8Array(data).buffer
    port.postMessage({ t: 'data', b, n: data.length }, [b as ArrayBuffer])
  }
  const next = async (): Promise<Buffer | null> => {
    while (inputs.length === 0) await new Promise<void>(resolve => { wakeInput = resolve })
    return inputs.shift() as Buffer | null
  }
  try {
    const engine = engineFor(workerData as WorkerOptions)
    for (let chunk = await next(); chunk !== null; chunk = await next()) {
      await engine.write(chunk, emit)
      port.postMessage({ t: 'ack' })
    }
    await engine.end(emit)
    port.postMessage({ t: 'end' })
  } catch (err) {
    port.postMessage({ t: 'error', message: (err as Error).message })
  }
}
