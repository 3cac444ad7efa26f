import { closeSync, fstatSync, openSync, readSync } from 'node:fs'
import type { ArchiveInfo } from '../contracts.js'
import { type Compression, detectCompression, zstdDecoder } from '../io/compression.js'
import { HEADER_PREFIX_SIZE, MAX_HEADER_SIZE, archiveInfo, parseHeader, readHeaderSize } from '../vma/format.js'

/** Bytes of the file read at a time, and at most in all, for its header. */
const READ = 64 * 1024
const MAX_READ = 4 * 1024 * 1024

/**
 * The header of an uncompressed or zstd archive file, read and decoded in
 * this thread: the streaming line (input, decompressor and reader as
 * streams) costs more to start than a header costs to read. Undefined for anything else, and
 * wherever this path meets a problem: the streaming path then reads the
 * header, and says what is wrong as it always has.
 */
export function headerOfFile (path: string): { info: ArchiveInfo, compression: Compression } | undefined {
  if (path === '-') return undefined
  let fd: number | undefined
  try {
    fd = openSync(path, 'r')
    if (!fstatSync(fd).isFile()) return undefined
    const file = fd
    let position = 0
    const readMore = (): Buffer => {
      const buf = Buffer.allocUnsafe(READ)
      const n = position < MAX_READ ? readSync(file, buf, 0, READ, position) : 0
      position += n
      return buf.subarray(0, n)
    }
    const first = readMore()
    const compression = detectCompression(first)
    if (compression !== 'none' && compression !== 'zstd') return undefined
    const decoded = Buffer.allocUnsafe(MAX_HEADER_SIZE)
    let filled = 0
    let feed: (src: Buffer) => void
    if (compression === 'none') {
      feed = src => { filled += src.copy(decoded, filled) }
    } else {
      const dctx = zstdDecoder()
      feed = src => {
        while (src.length > 0 && filled < decoded.length) {
          const [, produced, consumed] = dctx.decompressStream(decoded.subarray(filled), src)
          filled += produced
          src = src.subarray(consumed)
          if (produced === 0 && consumed === 0) return
        }
      }
    }
    let unfed: Buffer | undefined = first
    /** Decoded bytes up to `n`, or undefined where the file ends (or MAX_READ is read) first. */
    const upTo = (n: number): Buffer | undefined => {
      while (filled < n) {
        const chunk = unfed ?? readMore()
        unfed = undefined
        if (chunk.length === 0) return undefined
        feed(chunk)
      }
      return decoded.subarray(0, n)
    }
    const prefix = upTo(HEADER_PREFIX_SIZE)
    if (prefix === undefined) return undefined
    const head = upTo(readHeaderSize(prefix))
    if (head === undefined) return undefined
    return { info: archiveInfo(parseHeader(Buffer.from(head))), compression }
  } catch {
    return undefined
  } finally {
    if (fd !== undefined) closeSync(fd)
  }
}
