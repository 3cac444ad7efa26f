/**
 * What an image is, for `vma info`: format, size, allocation and bitmaps.
 * An image reader tells it through describe(); for one without, its map is
 * summed up.
 */
import type { DiskDescription } from '../contracts.js'
import { describeBitmaps, mappedBytes } from '../io/disk-records.js'
import { openImageFile } from './sources.js'

export interface DescribeOptions {
  /** Aborting stops with E_INTERRUPTED within about a second, however large the image. */
  signal?: AbortSignal
}

export async function describeImage (path: string, format?: string, options: DescribeOptions = {}): Promise<DiskDescription> {
  const { format: chosen, disk } = await openImageFile(path, format)
  try {
    if (disk.describe !== undefined) return await disk.describe(options.signal)
    const allocated = await mappedBytes(disk.map, disk.size, e => e.data, options.signal)
    return { format: chosen, size: disk.size, allocated, ...(disk.bitmaps !== undefined ? { bitmaps: await describeBitmaps(disk.bitmaps) } : {}) }
  } finally {
    await disk.close()
  }
}
