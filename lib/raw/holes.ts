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
  /**
   * [start, end, start, end, ...] of data inside the range; null where the file system cannot tell.
   * An odd length: the answer stopped at its last number (a bound on one call); ask again from there.
   */
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
  const end = offset + length
  const out: Extent[] = []
  // `at`: where the extents so far end; `asked`: where the next call starts (past `at` after a cut-off answer).
  for (let at = offset, asked = offset; ;) {
    let pairs: number[] | null
    try {
      pairs = found.extents(fd, asked, end - asked)
    } catch (err) {
      throw ioError(err, `looking for holes at byte ${asked}`)
    }
    if (pairs === null) return whole
    const ranges = pairs.length & ~1
    for (let i = 0; i < ranges; i += 2) {
      if (pairs[i] > at) out.push({ offset: at, length: pairs[i] - at, data: false })
      out.push({ offset: pairs[i], length: pairs[i + 1] - pairs[i], data: true })
      at = pairs[i + 1]
    }
    if (ranges === pairs.length) {
      if (at < end) out.push({ offset: at, length: end - at, data: false })
      return out
    }
    asked = pairs[ranges]
  }
}
