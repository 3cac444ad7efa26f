import { readArchiveInfo } from '../jobs/archive.js'
import { openInput } from '../io/input.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'

export const config: Command = {
  name: 'config',
  help: `Usage: vma config ARCHIVE [-c NAME]

Writes the bytes of one config blob to stdout, exactly as stored.

Options:
  -c, --config NAME   the blob to print (default qemu-server.conf)

Example:
  vma config backup.vma.zst > 100.conf
  vma config backup.vma.zst -c qemu-server.fw`,
  options: { config: { type: 'string', short: 'c' } },
  async run (positionals, values) {
    expectPositionals(positionals, 1, 1, 'ARCHIVE')
    const name = (values.config as string | undefined) ?? 'qemu-server.conf'
    const { info } = await readArchiveInfo(openInput(positionals[0]).stream)
    const blob = info.configs.find(c => c.name === name)
    if (blob === undefined) {
      throw new VmapipeError('E_NOT_FOUND', `the archive has no config blob ${name} (it has ${info.configs.map(c => c.name).join(', ') || 'none'})`)
    }
    await writeOut(blob.data)
    return EXIT.OK
  },
}
