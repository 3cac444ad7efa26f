import type { ArchiveInfo } from '../contracts.js'
import type { Compression } from '../io/compression.js'
import { headerOfFile } from '../jobs/archive-header.js'
import type { S3Access } from '../jobs/s3.js'
import { isS3Url } from '../s3/url.js'
import { formatBytes } from '../io/progress.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'

export const list: Command = {
  name: 'list',
  help: `Usage: vma list ARCHIVE [--json]

Reads only the archive header and prints what the archive holds. ARCHIVE is a
path or - for stdin; .vma, .vma.zst, .vma.gz and .vma.lzo are all accepted
(the compression is told by its magic bytes).

Options:
  --json   print one JSON object instead of text

${S3_HELP}

Examples:
  vma list vzdump-qemu-100-2024_01_31-02_00_01.vma.zst
  vma list s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst`,
  options: { json: { type: 'boolean' }, ...S3_OPTIONS },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'ARCHIVE')
    const name = positionals[0]
    const { info, compression } = (isS3Url(name) ? undefined : headerOfFile(name)) ?? await readByStream(name, s3Access(values, ctx))
    if (values.json === true) {
      await writeOut(JSON.stringify({
        uuid: info.uuid,
        ctime: info.ctime,
        created: new Date(info.ctime * 1000).toISOString(),
        compression,
        devices: info.devices,
        configs: info.configs.map(c => ({ name: c.name, size: c.data.length })),
      }, null, 2) + '\n')
      return EXIT.OK
    }
    const width = Math.max(4, ...info.devices.map(d => d.name.length), ...info.configs.map(c => c.name.length))
    const lines = [
      `archive  ${name} (${compression === 'none' ? 'uncompressed' : compression})`,
      `uuid     ${info.uuid}`,
      `ctime    ${new Date(info.ctime * 1000).toISOString()} (${info.ctime})`,
      'devices',
      ...info.devices.map(d => `  ${String(d.id).padStart(3)}  ${d.name.padEnd(width)}  ${d.size} bytes (${formatBytes(d.size)})`),
      'configs',
      ...info.configs.map(c => `       ${c.name.padEnd(width)}  ${c.data.length} bytes`),
    ]
    await writeOut(lines.join('\n') + '\n')
    return EXIT.OK
  },
}

async function readByStream (path: string, access: S3Access): Promise<{ info: ArchiveInfo, compression: Compression }> {
  const [{ openArchiveInput }, { readArchiveInfo }] = await Promise.all([import('../jobs/s3.js'), import('../jobs/archive.js')])
  const input = await openArchiveInput(path, access)
  return await readArchiveInfo(input.stream)
}
