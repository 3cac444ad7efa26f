/** Joining streams where the far end must hear about a failure anywhere upstream. */
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

export interface Stage {
  stream: Readable | Duplex | Writable
  /** What this stage does, for messages about system errors in it ("reading backup.vma"). */
  what: string
}

/**
 * Runs stages joined with pump and settles when the last has finished. Rejects
 * with the first error anywhere (pump alone would report a later "premature
 * close"), system errors named after their stage; aborting `signal` stops the
 * line with E_INTERRUPTED.
 */
export async function runStages (stages: Stage[], signal?: AbortSignal): Promise<void> {
  let first: Error | undefined
  for (const s of stages) s.stream.on('error', (err: Error) => { first ??= ioError(err, s.what) })
  const stop = (): void => { stages[0].stream.destroy(new VmapipeError('E_INTERRUPTED', 'interrupted')) }
  signal?.addEventListener('abort', stop, { once: true })
  try {
    await new Promise<void>((resolve, reject) => {
      pump(stages.map(s => s.stream), (err?: Error) => {
        const failure = first ?? err
        if (failure) reject(failure); else resolve()
      })
    })
  } finally {
    signal?.removeEventListener('abort', stop)
  }
}
