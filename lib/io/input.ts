/**
 * Opening an input named on the command line: a path, or `-` for stdin.
 */
import { createReadStream, fstatSync, statSync } from 'node:fs'
import type { Readable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'

export interface Input {
  stream: Readable
  /** Name for messages. */
  name: string
  /** Byte size when known (regular files), for progress and ETA. */
  size?: number
}

const CHUNK = 1 << 20

export function openInput (path: string): Input {
  if (path === '-') return openStdin()
  let size: number
  try {
    const st = statSync(path)
    if (st.isDirectory()) throw new VmapipeError('E_IO', `${path} is a directory`)
    size = st.isFile() ? st.size : 0
  } catch (err) {
    throw ioError(err, `cannot open ${path}`)
  }
  const stream = createReadStream(path, { highWaterMark: CHUNK })
  return { stream, name: path, ...(size > 0 ? { size } : {}) }
}

function openStdin (): Input {
  const st = fstatSync(0)
  if (process.stdin.isTTY) throw new VmapipeError('E_USAGE', 'refusing to read binary input from a terminal; pipe it in or give a path')
  // Pipes and sockets go through process.stdin, which copes with non-blocking descriptors.
  if (!st.isFile()) return { stream: process.stdin, name: 'stdin' }
  return { stream: createReadStream('', { fd: 0, highWaterMark: CHUNK, autoClose: false }), name: 'stdin', size: st.size }
}
