import { readArchiveInfo } from '../jobs/archive.js'
import { openArchiveInput } from '../jobs/s3.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'

export const config: Command = {
  name: 'config',
  help: `Usage: vma config ARCHIVE [-c NAME]

Writes the bytes of one config blob to stdout, exactly as stored.

Options:
  -c, --config NAME   the blob to print (default qemu-server.conf)

${S3_HELP}

Example:
  vma config backup.vma.zst > 100.conf
  vma config backup.vma.zst -c qemu-server.fw
  vma config s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst > 100.conf`,
  options: { config: { type: 'string', short: 'c' }, ...S3_OPTIONS },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'ARCHIVE')
    const name = (values.config as string | undefined) ?? 'qemu-server.conf'
    const { info } = await readArchiveInfo((await openArchiveInput(positionals[0], s3Access(values, ctx))).stream)
    const blob = info.configs.find(c => c.name === name)
    if (blob === undefined) {
      throw new VmapipeError('E_NOT_FOUND', `the archive has no config blob ${name} (it has ${info.configs.map(c => c.name).join(', ') || 'none'})`)
    }
    await writeOut(blob.data)
    return EXIT.OK
  },
}
