import { mkdir } from 'node:fs/promises'
import { runBackupJob } from 'vmapipe/backup'

// Backs up disk.raw as VM 100 into ./dump: a vzdump-named .vma.zst, read back and checked before it gets its name;
// then only the two newest archives of VM 100 are kept.
await mkdir('dump', { recursive: true })
const result = await runBackupJob({
  vmid: 100,
  disks: [{ name: 'drive-scsi0', path: 'disk.raw' }],
  target: 'dump',
  compression: 'zstd',
  verify: true,
  retention: { 'keep-last': 2 },
})
console.log(`${result.archive}: ${result.bytes} bytes; pruned [${result.pruned.join(', ')}]`)
