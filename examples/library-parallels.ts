import { ParallelsImage } from 'vmapipe/parallels'

// Opens disk.hds (every check is made on open) and sums the ranges that hold data.
const image = await ParallelsImage.open('disk.hds')
try {
  const extents = await image.map(0, image.size)
  const allocated = extents.filter(e => e.data).reduce((sum, e) => sum + e.length, 0)
  console.log(`${image.size} bytes, ${allocated} allocated, ${image.bitmaps.length} dirty bitmaps`)
} finally {
  await image.close()
}
