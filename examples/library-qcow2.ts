import { rm } from 'node:fs/promises'
import { openDisk } from 'vmapipe'
import { Qcow2FileWriter } from 'vmapipe/qcow2'

// Converts disk.raw (or any image openDisk recognises) to disk.qcow2, record by record.
const source = await openDisk({ name: 'drive-scsi0', path: 'disk.raw' })
const writer = await Qcow2FileWriter.create('disk.qcow2', source.size)
try {
  // A DiskWriter's write() returns a promise when it wants the caller to wait.
  for await (const record of await source.records(1)) await writer.write(record)
  await writer.finish()
} catch (err) {
  // abort() closes what is open; what it had written is the caller's to remove.
  await writer.abort()
  await rm('disk.qcow2', { force: true })
  throw err
}
