/**
 * A worker thread that compresses with lzop (our LZO1X in JS), so the codec and the
 * rest of the job use a core each. Talks to lib/io/compression.ts through
 * messages with credits both ways, so neither side buffers more than a few
 * chunks, and the buffers go back and forth rather than being made anew:
 *   in:  {t:'data', b, n} (n bytes in the ArrayBuffer b, transferred), {t:'end'},
 *        {t:'credit', b?} (one output chunk taken; b, its buffer, back to fill again)
 *   out: {t:'ack', b} (one input chunk consumed; b, its buffer, back),
 *        {t:'data', b, n, back} (back: b is one of our OUT-byte buffers, wanted back), {t:'end'}, {t:'error', message}
 */
import { parentPort } from 'node:worker_threads'
import { OUTPUT_CREDITS } from './codec-protocol.js'
import { LZOP_BLOCK, LZOP_BLOCK_MAX, LZOP_END, lzo1xBound, lzopBlockInto, lzopHeader } from './lzo.js'

const OUT = 1 << 20

/** Sends output; `owned`: a buffer of our own (not Buffer's shared pool) that may be handed over to the reader. */
type Emit = (data: Buffer, owned?: boolean) => Promise<void>
interface Engine {
  /** Takes one input chunk. */
  write: (chunk: Buffer, emit: Emit) => Promise<void>
  end: (emit: Emit) => Promise<void>
}

/**
 * lzop blocks written straight into output buffers of OUT bytes, each sent
 * once it has no room for another block; `take` gives a buffer the reader
 * sent back, or a new one.
 */
function lzopEncoder (take: () => Buffer): Engine {
  const pending = Buffer.allocUnsafe(LZOP_BLOCK)
  let filled = 0
  const scratch = new Uint8Array(lzo1xBound(LZOP_BLOCK))
  const dict = new Int32Array(1 << 14)
  let out = take()
  let used = lzopHeader().copy(out)
  const block = async (data: Buffer, emit: Emit): Promise<void> => {
    // Room for the end marker too.
    if (out.length - used < LZOP_BLOCK_MAX + LZOP_END.length) {
      await emit(out.subarray(0, used), true)
      out = take()
      used = 0
    }
    used = lzopBlockInto(data, scratch, dict, out, used)
  }
  return {
    async write (chunk, emit) {
      for (let at = 0; at < chunk.length;) {
        const n = Math.min(chunk.length - at, LZOP_BLOCK - filled)
        chunk.copy(pending, filled, at, at + n)
        filled += n
        at += n
        if (filled === LZOP_BLOCK) {
          await block(pending, emit)
          filled = 0
        }
      }
    },
    async end (emit) {
      if (filled > 0) await block(pending.subarray(0, filled), emit)
      used += LZOP_END.copy(out, used)
      await emit(out.subarray(0, used), true)
    },
  }
}

if (parentPort !== null) {
  const port = parentPort
  const inputs: Array<Buffer | null> = []
  let wakeInput: (() => void) | undefined
  let credits = OUTPUT_CREDITS
  let wakeOutput: (() => void) | undefined
  /** Output buffers the reader sent back. */
  const spare: ArrayBuffer[] = []
  port.on('message', (m: { t: 'data', b: ArrayBuffer, n: number } | { t: 'end' } | { t: 'credit', b?: ArrayBuffer }) => {
    if (m.t === 'credit') {
      credits++
      if (m.b !== undefined && spare.length < OUTPUT_CREDITS) spare.push(m.b)
      wakeOutput?.()
      return
    }
    inputs.push(m.t === 'data' ? Buffer.from(m.b, 0, m.n) : null)
    wakeInput?.()
  })
  const emit: Emit = async (data, owned = false) => {
    while (credits === 0) await new Promise<void>(resolve => { wakeOutput = resolve })
    credits--
    // Our own buffers, mostly full, are handed over as they are; anything else is copied first.
    const whole = owned && data.byteOffset === 0 && data.length >= data.buffer.byteLength / 2
    const b = whole ? data.buffer : new Uint8Array(data).buffer
    port.postMessage({ t: 'data', b, n: data.length, back: b.byteLength === OUT }, [b as ArrayBuffer])
  }
  const next = async (): Promise<Buffer | null> => {
    while (inputs.length === 0) await new Promise<void>(resolve => { wakeInput = resolve })
    return inputs.shift() as Buffer | null
  }
  try {
    const engine = lzopEncoder(() => Buffer.from(spare.pop() ?? new ArrayBuffer(OUT)))
    for (let chunk = await next(); chunk !== null; chunk = await next()) {
      await engine.write(chunk, emit)
      port.postMessage({ t: 'ack', b: chunk.buffer }, [chunk.buffer as ArrayBuffer])
    }
    await engine.end(emit)
    port.postMessage({ t: 'end' })
  } catch (err) {
    port.postMessage({ t: 'error', message: (err as Error).message })
  }
}
