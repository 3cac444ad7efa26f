/**
 * Library use: restore one disk of an archive to a sparse raw file, with the
 * record pipeline spelled out (bytes -> decompress -> VmaReader -> DeviceRouter).
 *
 *   node dist/examples/library-extract.js examples/demo.vma.zst drive-scsi0 /tmp/scsi0.raw
 */
import { createReadStream } from 'node:fs'
import pump from 'pump'
import { DeviceRouter, RawFileWriter, VmaReader, VmapipeError, createDecompressor } from '../lib/index.js'

const [archive, deviceName, target] = process.argv.slice(2)
if (target === undefined) {
  process.stderr.write('usage: library-extract ARCHIVE DEVICE TARGET.raw\n')
  process.exit(2)
}

const reader = new VmaReader({ select: devices => devices.filter(d => d.name === deviceName) })
const router = new DeviceRouter(async (_info, add) => {
  const device = reader.selected[0]
  if (device === undefined) throw new VmapipeError('E_NOT_FOUND', `no device ${deviceName}`)
  add(device.id, await RawFileWriter.create(target, device.size))
})

pump(createReadStream(archive, { highWaterMark: 1 << 20 }), createDecompressor(), reader, router, (err?: Error) => {
  if (err) {
    process.stderr.write(`${err.message}\n`)
    process.exit(err instanceof VmapipeError ? err.exitCode : 1)
  }
  process.stderr.write(`${deviceName} restored to ${target}\n`)
})
