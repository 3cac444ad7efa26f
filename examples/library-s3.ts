import { createReadStream } from 'node:fs'
import { pipeline } from 'node:stream/promises'
import { verifyArchive } from 'vmapipe'
import { createS3Upload, headObject, openS3Read, s3Client } from 'vmapipe/s3'

// Uploads backup.vma.zst to s3://backups/pve1/backup.vma.zst (the store at $VMAPIPE_S3_ENDPOINT, or AWS; credentials
// from the AWS environment or profile), then verifies it as it streams back.
const client = s3Client()
try {
  const upload = createS3Upload(client, 'backups', 'pve1/backup.vma.zst')
  await pipeline(createReadStream('backup.vma.zst'), upload)
  const { size } = await headObject(client, 'backups', 'pve1/backup.vma.zst')
  const report = await verifyArchive(openS3Read(client, 'backups', 'pve1/backup.vma.zst'))
  console.log(`${size} bytes in ${upload.stats.parts} part(s): ${report.ok ? 'verified' : report.error?.message}`)
} finally {
  client.destroy()
}
