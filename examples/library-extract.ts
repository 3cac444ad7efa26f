import { createReadStream } from 'node:fs'
import { DeviceRouter, VmaReader, VmapipeError, createDecompressor, runStages } from 'vmapipe'
import { RawFileWriter } from 'vmapipe/raw'

// Restores drive-scsi0 of backup.vma.zst to the sparse raw file scsi0.raw.
const reader = new VmaReader({ select: devices => devices.filter(d => d.name === 'drive-scsi0') })
const router = new DeviceRouter(async (_info, add) => {
  const disk = reader.selected[0]
  if (disk === undefined) throw new VmapipeError('E_NOT_FOUND', 'the archive has no drive-scsi0')
  add(disk.id, await RawFileWriter.create('scsi0.raw', disk.size))
})
await runStages([createReadStream('backup.vma.zst'), createDecompressor(), reader, router])
