import { writeFile } from 'node:fs/promises'
import { VmapipeError } from 'vmapipe'
import { openArchiveIndex } from 'vmapipe/vma'

// Lists the devices of the uncompressed backup.vma, then reads the first 64 KiB of drive-scsi0 by random access into head.bin.
const archive = await openArchiveIndex('backup.vma')
try {
  for (const d of archive.info.devices) console.log(`${d.name} ${d.size}`)
  const device = archive.info.devices.find(d => d.name === 'drive-scsi0')
  if (device === undefined) throw new VmapipeError('E_NOT_FOUND', 'the archive has no drive-scsi0')
  const disk = archive.disk(device)
  const head = Buffer.alloc(64 * 1024)
  await disk.read(head, 0)
  await disk.close()
  await writeFile('head.bin', head)
} finally {
  await archive.close()
}
