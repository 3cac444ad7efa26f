/**
 * Joining streams. Everything here goes through pump: chain() is the
 * synchronous join for a stream that is handed on, runStages() the one to
 * await. Nothing else in lib/ joins streams by hand.
 */
import type { Duplex, Readable, Writable } from 'node:stream'
import pump from 'pump'
import { VmapipeError, ioError } from '../errors.js'

/**
 * Pipes `streams` together with pump and returns the last one. pump tears the
 * whole line down on any error or early close, but destroys the streams
 * without the error; here the last stream is destroyed *with* it first, so
 * whoever reads from it sees why.
 */
export function chain (first: Readable, ...rest: Duplex[]): Readable {
  if (rest.length === 0) return first
  const last = rest[rest.length - 1]
  for (const s of [first, ...rest.slice(0, -1)]) s.on('error', (err: Error) => last.destroy(err))
  pump([first, ...rest], () => {})
  return last
}

type AnyStream = Readable | Duplex | Writable

export interface Stage {
  stream: AnyStream
  /** What this stage does, for messages about system errors in it ("reading backup.vma"). */
  what: string
}

/**
 * Runs streams joined with pump and settles when the last has finished.
 * Rejects with the first error anywhere (not one a stage raises later while
 * it is torn down), system errors named after their stage, and only once
 * every stage has closed, so no file or child is still open when the caller
 * cleans up. Aborting `signal` destroys every stage and rejects with
 * E_INTERRUPTED.
 */
export async function runStages (stages: Array<Stage | AnyStream>, signal?: AbortSignal): Promise<void> {
  const named = stages.map((s, i) => 'what' in s && 'stream' in s ? s : { stream: s, what: `stage ${i + 1} of ${stages.length}` })
  const streams = named.map(s => s.stream)
  let first: Error | undefined
  for (const s of named) s.stream.on('error', (err: Error) => { first ??= ioError(err, s.what) })
  const stop = (): void => {
    first ??= new VmapipeError('E_INTERRUPTED', 'interrupted')
    for (const s of streams) s.destroy(first)
  }
  try {
    await new Promise<void>((resolve, reject) => {
      pump(streams, (err?: Error) => {
        const failure = first ?? err
        if (failure) reject(failure); else resolve()
      })
      if (signal?.aborted === true) stop(); else signal?.addEventListener('abort', stop, { once: true })
    })
  } catch (err) {
    await Promise.all(streams.map(async s => { await closed(s) }))
    throw err
  } finally {
    signal?.removeEventListener('abort', stop)
  }
}

/** Resolves when a destroyed stream has closed ('error' may come first; it is not the news here). */
async function closed (s: AnyStream): Promise<void> {
  if (!s.destroyed || s.closed) return
  await new Promise(resolve => s.once('close', resolve))
}
