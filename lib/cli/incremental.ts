import { writeOverlay } from '../jobs/incremental.js'
import { openDisk } from '../jobs/sources.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { CLUSTER_SIZE } from '../record.js'
import { type Command, expectPositionals, parseSeconds } from './command.js'

export const incremental: Command = {
  name: 'incremental',
  help: `Usage: vma incremental URI --dirty-bitmap NAME --overlay-of PREVIOUS [-o OUT]

An incremental backup of a disk that QEMU (or qemu-nbd -B NAME) exports over
NBD with a dirty bitmap: only the clusters qemu:dirty-bitmap:NAME marks are
read, and they are written as an overlay on the previous backup:

  PREVIOUS a qcow2 or raw image: OUT (default PREVIOUS-YYYYMMDD-HHMMSS.qcow2
    beside it) is a new qcow2 whose backing file is PREVIOUS, named relative to
    OUT; clusters that now read as zeros are stored as zero clusters, so the
    overlay equals the disk as it is now.
  PREVIOUS a .hdd bundle (its directory or DiskDescriptor.xml): a new snapshot
    image with the bundle's cluster size goes into the bundle and becomes the
    top of its DiskDescriptor.xml (every other element kept as it was).

The new image gets its name only when complete; the descriptor changes after.

Options:
  --dirty-bitmap NAME   the bitmap (as in qemu:dirty-bitmap:NAME)
  --overlay-of PATH     the previous backup
  -o, --output OUT      where a qcow2 overlay goes
  --nbd-timeout SECS    seconds the server has to answer each request
                        (default 60; 0: wait for ever)

Examples:
  qemu-nbd -r -f qcow2 -B bm0 -k /run/vm.sock vm.qcow2 &
  vma incremental 'nbd+unix:///?socket=/run/vm.sock' --dirty-bitmap bm0 --overlay-of full.qcow2 -o incr1.qcow2
  vma incremental nbd://host/drive-scsi0 --dirty-bitmap bm0 --overlay-of backups/vm100.hdd`,
  options: {
    'dirty-bitmap': { type: 'string' },
    'overlay-of': { type: 'string' },
    output: { type: 'string', short: 'o' },
    'nbd-timeout': { type: 'string' },
  },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'URI')
    const bitmap = values['dirty-bitmap'] as string | undefined
    const previous = values['overlay-of'] as string | undefined
    if (bitmap === undefined) throw new VmapipeError('E_USAGE', '--dirty-bitmap NAME is required')
    if (previous === undefined) throw new VmapipeError('E_USAGE', '--overlay-of PREVIOUS is required')
    const nbdTimeout = parseSeconds(values['nbd-timeout'], '--nbd-timeout')
    const source = await openDisk({ name: 'incremental', path: positionals[0], dirtyBitmap: bitmap, ...(nbdTimeout !== undefined ? { nbdTimeout } : {}) })
    const progress = ctx.progress('incremental', source.size)
    const result = await writeOverlay(source, previous, {
      ...(values.output !== undefined ? { output: values.output as string } : {}),
      ...(progress ? { progress } : {}),
    }).finally(() => source.close())
    ctx.done({
      source: positionals[0], bitmap, previous, overlay: result.path, format: result.format, clusters: result.clusters, bytes: result.clusters * CLUSTER_SIZE,
    }, 'overlay written', `overlay ${result.path} written: ${result.clusters} changed clusters`)
    return EXIT.OK
  },
}
