/**
 * What an image is, for `vma info`: format, size, allocation and bitmaps.
 * An image reader tells it through describe(); for one without, its map is
 * summed up.
 */
import { type DiskDescription, describeBitmaps } from './disk.js'
import { type DiskFormat, openImageFile } from './sources.js'

/** Guest bytes mapped per step when summing up a map. */
const STEP = 1 << 30

export async function describeImage (path: string, format?: DiskFormat): Promise<DiskDescription> {
  const { format: chosen, disk } = await openImageFile(path, format)
  try {
    if (disk.describe !== undefined) return await disk.describe()
    let allocated = 0
    for (let offset = 0; offset < disk.size; offset += STEP) {
      for (const e of await disk.map(offset, Math.min(STEP, disk.size - offset))) if (e.data) allocated += e.length
    }
    return { format: chosen, size: disk.size, allocated, ...(disk.bitmaps !== undefined ? { bitmaps: await describeBitmaps(disk.bitmaps) } : {}) }
  } finally {
    await disk.close()
  }
}
