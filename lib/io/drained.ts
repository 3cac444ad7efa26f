/** Waiting for a stream that said "enough" (write returned false) to take more. */
import type { Writable } from 'node:stream'
import { ioError } from '../errors.js'

/** Resolves once `out` has drained (at once if it need not), rejects if it fails first. */
export async function drained (out: Writable, what = 'writing the output stream'): Promise<void> {
  if (!out.writableNeedDrain) return
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      out.off('drain', done)
      out.off('error', done)
      if (err !== undefined) reject(ioError(err, what)); else resolve()
    }
    out.on('drain', done)
    out.on('error', done)
  })
}
