import { open } from 'node:fs/promises'
import { NbdServer, openNbdDisk } from 'vmapipe/nbd'
import { RawImage } from 'vmapipe/raw'

// Serves disk.raw as the export "disk" on the Unix socket nbd.sock, and reads it back over NBD into copy.raw.
const image = await RawImage.open('disk.raw')
const server = new NbdServer([{ name: 'disk', disk: image }])
await server.listen({ socket: 'nbd.sock' })
try {
  const disk = await openNbdDisk('nbd+unix:///disk?socket=nbd.sock')
  const out = await open('copy.raw', 'w')
  const buf = Buffer.alloc(1024 * 1024)
  for (let offset = 0; offset < disk.size; offset += buf.length) {
    const piece = buf.subarray(0, Math.min(buf.length, disk.size - offset))
    await disk.read(piece, offset)
    await out.write(piece, 0, piece.length, offset)
  }
  await out.close()
  await disk.close()
} finally {
  await server.close()
  await image.close()
}
