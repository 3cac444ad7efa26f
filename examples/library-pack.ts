import { randomUUID } from 'node:crypto'
import { createReadStream, createWriteStream, statSync } from 'node:fs'
import { type ArchiveInfo, RecordMerger, VmaWriter, createCompressor, runStages } from 'vmapipe'
import { RawReader } from 'vmapipe/raw'

// Packs disk.raw as drive-scsi0 into disk.vma.zst.
const disk = { id: 1, name: 'drive-scsi0', size: statSync('disk.raw').size }
const info: ArchiveInfo = { kind: 'archive', uuid: randomUUID(), ctime: Math.floor(Date.now() / 1000), configs: [], devices: [disk] }
const records = new RawReader(disk)
await Promise.all([
  runStages([createReadStream('disk.raw'), records]),
  runStages([new RecordMerger(info, [records]), new VmaWriter(), createCompressor('zstd'), createWriteStream('disk.vma.zst')]),
])
