/**
 * Where a file's data lies, without reading it: lseek(SEEK_DATA/SEEK_HOLE)
 * through the small native addon in native/holes (Node's fs has neither).
 * Where the addon was not built, cannot load, or the file system cannot tell
 * (tmpfs of old kernels, some network file systems, pipes), every byte is
 * reported as data and the caller's zero detection finds the zeros by reading.
 * VMAPIPE_NO_HOLES=1 forces that fallback (tests, or a file system that lies).
 */
import { createRequire } from 'node:module'
import { ioError } from '../errors.js'
import type { Extent } from '../contracts.js'

interface HolesAddon {
  /** [start, end, start, end, ...] of data inside the range; null where the file system cannot tell. */
  extents: (fd: number, offset: number, length: number) => number[] | null
}

let addon: HolesAddon | null | undefined

/** The addon, loaded on first use; null where it is unavailable or turned off. */
export function holesAddon (): HolesAddon | null {
  if (addon === undefined) {
    try {
      addon = process.env.VMAPIPE_NO_HOLES === '1' ? null : createRequire(import.meta.url)('vmapipe-holes') as HolesAddon
    } catch {
      addon = null
    }
  }
  return addon
}

/**
 * The ranges of [offset, offset + length) of open file `fd`, in order and
 * covering it: data: false where the file has a hole (reads as zeros),
 * data: true elsewhere, and everywhere when holes cannot be found. A range
 * past the end of the file is a hole. Async so that a caller never depends on
 * it being cheap; the lookups themselves read metadata only.
 */
export async function dataExtents (fd: number, offset: number, length: number): Promise<Extent[]> {
  if (length <= 0) return []
  const whole = [{ offset, length, data: true }]
  const found = holesAddon()
  if (found === null) return whole
  let pairs: number[] | null
  try {
    pairs = found.extents(fd, offset, length)
  } catch (err) {
    throw ioError(err, `looking for holes at byte ${offset}`)
  }
  if (pairs === null) return whole
  const out: Extent[] = []
  let at = offset
  for (let i = 0; i < pairs.length; i += 2) {
    if (pairs[i] > at) out.push({ offset: at, length: pairs[i] - at, data: false })
    out.push({ offset: pairs[i], length: pairs[i + 1] - pairs[i], data: true })
    at = pairs[i + 1]
  }
  if (at < offset + length) out.push({ offset: at, length: offset + length - at, data: false })
  return out
}
