import { describeImage } from '../jobs/info.js'
import { INPUT_FORMATS } from '../jobs/registry.js'
import { formatBytes } from '../io/progress.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'

export const info: Command = {
  name: 'info',
  help: `Usage: vma info IMAGE [--format FORMAT] [--json]

Opens a disk image that vma create and pack-vma read and prints its format,
virtual size, the bytes (and clusters) it stores data for, and its dirty
bitmaps (id, granularity, bytes marked dirty). IMAGE is a path: a raw file or
block device, a Parallels image (.hds), or a Parallels bundle (a .hdd
directory or its DiskDescriptor.xml), whose snapshot layers are merged. Raw
keeps no map, so its allocation is unknown. Everything an image's format
checks is checked: a damaged image exits 1.

Options:
  --format FORMAT   skip detection: ${INPUT_FORMATS.join(', ')}
  --json            print one JSON object instead of text

Examples:
  vma info disk-drive-scsi0.hds
  vma info restored/disk-drive-scsi0.hdd --json`,
  options: { format: { type: 'string' }, json: { type: 'boolean' } },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'IMAGE')
    const d = await describeImage(positionals[0], values.format as string | undefined, { signal: ctx.signal })
    if (values.json === true) {
      await writeOut(JSON.stringify({ image: positionals[0], ...d }, null, 2) + '\n')
      return EXIT.OK
    }
    const bytes = (n: number): string => `${n} bytes (${formatBytes(n)})`
    const clusters = d.allocatedClusters !== undefined && d.clusterSize !== undefined
      ? `, ${d.allocatedClusters} of ${Math.ceil(d.size / d.clusterSize)} clusters of ${formatBytes(d.clusterSize)}`
      : ''
    const lines = [
      `image      ${positionals[0]}`,
      `format     ${d.format}`,
      `size       ${bytes(d.size)}`,
      `allocated  ${d.allocated === undefined ? 'unknown' : bytes(d.allocated) + clusters}`,
      ...(d.layers !== undefined ? [`layers     ${d.layers}`] : []),
      ...Object.entries(d.details ?? {}).map(([k, v]) => `  ${k}: ${v}`),
      ...(d.bitmaps === undefined ? [] : [`bitmaps    ${d.bitmaps.length === 0 ? 'none' : ''}`.trimEnd()]),
      ...(d.bitmaps ?? []).map(b => `  ${b.id}  granularity ${b.granularity}  dirty ${bytes(b.dirtyBytes)}`),
    ]
    await writeOut(lines.join('\n') + '\n')
    return EXIT.OK
  },
}
