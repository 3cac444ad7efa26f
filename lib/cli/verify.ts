import { type VerifyReport, verifyArchive } from '../jobs/archive.js'
import { openArchiveInput } from '../jobs/s3.js'
import { formatBytes } from '../io/progress.js'
import { BLOCKS_PER_CLUSTER, BLOCK_SIZE } from '../record.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'

export const verify: Command = {
  name: 'verify',
  help: `Usage: vma verify ARCHIVE [-v] [--json]

Reads the whole archive and checks what Proxmox's own reader checks (magic,
version, header and extent checksums, uuids, block counts, device ids,
duplicate and out-of-range clusters, vmstate order) and more: every cluster of
every device must be present exactly once. Exits 0 only for a complete,
consistent archive; otherwise prints the first problem with its byte offset in
the decompressed archive and exits 1.

Options:
  -v, --verbose   one line per device
  --json          print the report as one JSON object

${S3_HELP}

Examples:
  vma verify backup.vma.lzo && echo good
  vma verify s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst`,
  options: { verbose: { type: 'boolean', short: 'v' }, json: { type: 'boolean' }, ...S3_OPTIONS },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'ARCHIVE')
    const input = await openArchiveInput(positionals[0], s3Access(values, ctx, ctx.signal))
    const progress = ctx.progress('verify', input.size)
    const report = await verifyArchive(input.stream, { ...(progress ? { progress } : {}), signal: ctx.signal })
    ctx.stopProgress()
    const totals = countTotals(report)
    if (report.ok) {
      ctx.done({ archive: input.name, ...totals }, 'archive verified',
        `${input.name} verified: ${report.devices.length} devices, ${totals.clusters} clusters`)
    } else {
      const { code, offset, device, cluster } = report.error ?? {}
      ctx.log.error({ archive: input.name, code, offset, device, cluster }, `verify failed: ${report.error?.message}`)
    }
    if (values.json === true) {
      await writeOut(JSON.stringify({
        archive: input.name,
        ok: report.ok,
        ...(report.error && {
          error: {
            code: report.error.code, message: report.error.message, offset: report.error.offset, device: report.error.device, cluster: report.error.cluster,
          },
        }),
        uuid: report.info?.uuid,
        ctime: report.info?.ctime,
        compression: report.compression,
        ...totals,
        devices: report.devices.map(d => ({
          id: d.device.id, name: d.device.name, size: d.device.size, clusters: d.clusters, expected: d.expected,
          zeroClusters: d.zeroClusters, dataBlocks: d.dataBlocks, firstMissing: d.firstMissing,
        })),
      }, null, 2) + '\n')
    } else {
      await writeOut(textReport(input.name, report, totals, values.verbose === true))
    }
    return report.ok ? EXIT.OK : EXIT.INVALID
  },
}

interface Totals {
  extents: number
  clusters: number
  zeroClusters: number
  missingClusters: number
  dataBlocks: number
  zeroBlocks: number
  dataBytes: number
  archiveBytes: number
}

function countTotals (report: VerifyReport): Totals {
  let clusters = 0
  let zeroClusters = 0
  let missingClusters = 0
  let dataBlocks = 0
  for (const d of report.devices) {
    clusters += d.clusters
    zeroClusters += d.zeroClusters
    missingClusters += d.expected - d.clusters
    dataBlocks += d.dataBlocks
  }
  return {
    extents: report.extents,
    clusters,
    zeroClusters,
    missingClusters,
    dataBlocks,
    zeroBlocks: clusters * BLOCKS_PER_CLUSTER - dataBlocks,
    dataBytes: dataBlocks * BLOCK_SIZE,
    archiveBytes: report.archiveBytes,
  }
}

function textReport (name: string, report: VerifyReport, t: Totals, verbose: boolean): string {
  const lines = [`archive   ${name}${report.compression ? ` (${report.compression === 'none' ? 'uncompressed' : report.compression})` : ''}`]
  if (report.info) lines.push(`uuid      ${report.info.uuid}`, `ctime     ${new Date(report.info.ctime * 1000).toISOString()}`)
  lines.push(
    `extents   ${t.extents}`,
    `clusters  ${t.clusters} present (${t.zeroClusters} all zero), ${t.missingClusters} missing`,
    `blocks    ${t.dataBlocks} with data (${formatBytes(t.dataBytes)}), ${t.zeroBlocks} zero`,
    `bytes     ${t.archiveBytes} archive bytes read`
  )
  if (verbose) {
    for (const d of report.devices) {
      lines.push(`device    ${d.device.id} ${d.device.name}: ${d.device.size} bytes, ${d.clusters}/${d.expected} clusters, ` +
        `${d.zeroClusters} zero, ${d.dataBlocks} data blocks${d.firstMissing >= 0 ? `, first missing cluster ${d.firstMissing}` : ''}`)
    }
  }
  lines.push(report.ok ? 'result    OK' : `result    FAILED: ${report.error?.code}: ${report.error?.message}`)
  return lines.join('\n') + '\n'
}
