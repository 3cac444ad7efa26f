import { basename } from 'node:path'
import { formatBytes } from '../io/progress.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals, listOption, parseSeconds, parseSize } from './command.js'
import { OUTPUT_FORMATS, formatNamed } from '../jobs/registry.js'
import { JOB_BUILTINS, capYoungGeneration, refuseTerminal } from './context.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'
import { isS3Url } from '../s3/url.js'

export const extract: Command = {
  name: 'extract',
  help: `Usage: vma extract ARCHIVE TARGETDIR [-v] [-d DRIVE[,DRIVE...]] [--format FORMAT] [--force]
       vma extract ARCHIVE [-] [-d DRIVE] [--tmpdir DIR]     (stdout not a terminal)
       vma extract ARCHIVE --to NBD-URI [-d DRIVE]

With TARGETDIR: writes each config blob under its own name, each disk as
disk-<device>.raw (a sparse file of the exact size, holes where the archive
has zero blocks) and the vmstate device as vmstate.bin. TARGETDIR must not
exist yet. Files are written under temporary names and get their final names
only when all are complete; after a failure no file has a final name.

--format parallels writes disk-<device>.hds, a Parallels expandable image
(clusters of 1 MiB, only clusters with data stored); --format
parallels-bundle writes the directory disk-<device>.hdd holding that image
and its DiskDescriptor.xml, as Parallels Desktop wants it.

Without TARGETDIR (or with -): writes one disk (the only one, or the one -d
names) to stdout as raw bytes in order, zeros included; stdout must be a
file or a pipe, not a terminal. Clusters that arrive early wait in memory
(1 MiB) and then in a temporary file, so memory stays flat whatever the
order. With --format qcow2 the image is built in --tmpdir
and copied to stdout when complete (its tables come first).

With --to: restores one disk (the only one, or the one -d names) into a
writable NBD export of at least its size (qemu-nbd, nbdkit), by WRITE and
WRITE_ZEROES; an export that zeroes fast is zeroed first and only data is
sent. URIs: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH.

Options as Proxmox's vma takes them come before or after ARCHIVE and
TARGETDIR. -r FIFO (qmrestore's restore map) is not supported: write a disk
to stdout (> PATH) or into an NBD export (--to) instead.

Options:
  -d, --drive DRIVE   only these devices (repeat or separate with commas);
                      scsi0 is short for drive-scsi0
  -v, --verbose       name each file written
  --format FORMAT     image format of the disks: ${OUTPUT_FORMATS.join(', ')} (default raw)
  --data-file         with qcow2: disk-<device>.raw (sparse, usable on its own)
                      holds the data, disk-<device>.qcow2 only the metadata
  --cluster-size SIZE Parallels cluster size, a multiple of 64K up to 1G
                      (default 1M)
  --force             allow an existing empty TARGETDIR
  --tmpdir DIR        where early clusters wait when writing to stdout
                      (default $TMPDIR or /tmp)
  --memory SIZE       memory for early clusters before they go to --tmpdir
                      (default 1M)
  --to NBD-URI        write the disk into this NBD export
  --nbd-timeout SECS  with --to: seconds the NBD server has to answer each
                      request (default 60; 0: wait for ever)

${S3_HELP}

ARCHIVE may be an s3://BUCKET/KEY: one streamed GET, resumed from the byte
reached after a dropped connection (qcow2 to stdout from an uncompressed
archive reads it by ranged GETs, tables first).

Examples:
  vma extract vzdump-qemu-100-2024_01_31-02_00_01.vma.zst restored/
  vma extract backup.vma.zst -d scsi1 restored/
  vma extract backup.vma.zst restored/ --format parallels-bundle
  vma extract backup.vma.zst - -d drive-scsi0 | dd of=/dev/sdX bs=1M
  vma extract backup.vma.zst -d scsi0 --to 'nbd+unix:///?socket=/run/restore.sock'
  zstd -dc backup.vma.zst | vma extract - restored/
  vma extract s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst restored/`,
  options: {
    drive: { type: 'string', short: 'd', multiple: true },
    format: { type: 'string' },
    'data-file': { type: 'boolean' },
    'cluster-size': { type: 'string' },
    force: { type: 'boolean' },
    tmpdir: { type: 'string' },
    memory: { type: 'string' },
    to: { type: 'string' },
    verbose: { type: 'boolean', short: 'v' },
    readmap: { type: 'string', short: 'r' },
    'nbd-timeout': { type: 'string' },
    ...S3_OPTIONS,
  },
  capsYoungGeneration: true,
  async run (positionals, values, ctx) {
    await capYoungGeneration(JOB_BUILTINS)
    // Loaded only now, after the cap (their loading alone doubled the young generation), and not for --help.
    const [{ extractToDirectory, extractToNbd, extractToStream }, { openArchiveInput, openS3Reader }, { checkClusterSize }, { isNbdUri }] = await Promise.all([
      import('../jobs/extract.js'), import('../jobs/s3.js'), import('../parallels/writer.js'), import('../nbd/client.js'),
    ])
    const to = values.to as string | undefined
    if (values.readmap !== undefined) {
      throw new VmapipeError('E_USAGE', `-r ${String(values.readmap)}: a restore map (qmrestore's FIFO) is not supported; write a disk where it belongs with ` +
        'vma extract ARCHIVE - -d DRIVE > PATH, or into an NBD export with --to NBD-URI, or extract to a TARGETDIR')
    }
    expectPositionals(positionals, 1, to === undefined ? 2 : 1, 'ARCHIVE')
    const [archive, target = '-'] = positionals
    const devices = listOption(values.drive)
    const format = (values.format as string | undefined) ?? 'raw'
    if (!(OUTPUT_FORMATS as readonly string[]).includes(format)) {
      throw new VmapipeError('E_USAGE', `--format ${format}: choose one of ${OUTPUT_FORMATS.join(', ')}`)
    }
    const clusterSize = parseSize(values['cluster-size'], '--cluster-size')
    if (clusterSize !== undefined) {
      if (formatNamed(format, OUTPUT_FORMATS).outputOptions?.includes('clusterSize') !== true) {
        const takers = OUTPUT_FORMATS.filter(f => formatNamed(f, OUTPUT_FORMATS).outputOptions?.includes('clusterSize') === true)
        throw new VmapipeError('E_USAGE', `--cluster-size applies to --format ${takers.join(' and ')}`)
      }
      checkClusterSize(clusterSize)
    }
    if (to !== undefined) {
      const unused = ['format', 'force', 'tmpdir', 'memory', 'data-file', 'cluster-size'].filter(o => values[o] !== undefined)
      if (unused.length > 0) throw new VmapipeError('E_USAGE', `--${unused[0]} does not apply with --to`)
      if (!isNbdUri(to)) throw new VmapipeError('E_USAGE', `--to ${to}: expected an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`)
    } else if (values['nbd-timeout'] !== undefined) throw new VmapipeError('E_USAGE', '--nbd-timeout applies with --to')
    if (to === undefined && target === '-') refuseTerminal('disk image', 'give a TARGETDIR, or redirect stdout (> disk.raw, | dd of=PATH)')
    const access = s3Access(values, ctx, ctx.signal)
    const input = await openArchiveInput(archive, access)
    const progress = ctx.progress('extract', input.size)
    const common = { ...(devices ? { devices } : {}), ...(progress ? { progress } : {}), signal: ctx.signal }
    if (to !== undefined) {
      const nbdTimeout = parseSeconds(values['nbd-timeout'], '--nbd-timeout')
      const result = await extractToNbd(input.stream, to, { ...common, ...(nbdTimeout !== undefined ? { nbdTimeout } : {}) })
      ctx.done({
        archive: input.name, device: result.device.name, bytes: result.device.size, to,
        dataBytes: result.written.dataBytes, prezeroed: result.written.prezeroed, archiveBytes: result.archiveBytes,
      }, 'disk written to the NBD export',
        `${result.device.name} (${formatBytes(result.device.size)}) written to ${to}`)
      return EXIT.OK
    }
    if (target === '-') {
      if (values.force === true) throw new VmapipeError('E_USAGE', '--force needs a TARGETDIR')
      if (values['data-file'] === true) throw new VmapipeError('E_USAGE', '--data-file makes two files and needs a TARGETDIR')
      if (formatNamed(format, OUTPUT_FORMATS).directory === true) throw new VmapipeError('E_USAGE', `a ${format} disk is a directory and needs a TARGETDIR`)
      const memoryLimit = parseSize(values.memory, '--memory')
      const result = await extractToStream(input.stream, process.stdout, {
        ...common,
        format,
        ...(archive !== '-' ? { archivePath: isS3Url(archive) ? async () => await openS3Reader(archive, access) : archive } : {}),
        ...(clusterSize !== undefined ? { clusterSize } : {}),
        ...(values.tmpdir !== undefined ? { tmpDir: values.tmpdir as string } : {}),
        ...(memoryLimit !== undefined ? { memoryLimit } : {}),
      })
      ctx.done({
        archive: input.name, device: result.device.name, bytes: result.device.size, archiveBytes: result.archiveBytes, spilledBytes: result.spilledBytes,
      }, 'disk written to stdout',
        `${result.device.name} (${formatBytes(result.device.size)}) written to stdout`)
      return EXIT.OK
    }
    if (values.tmpdir !== undefined || values.memory !== undefined) throw new VmapipeError('E_USAGE', '--tmpdir and --memory only apply when writing to stdout')
    const result = await extractToDirectory(input.stream, target, {
      ...common,
      force: values.force === true,
      format,
      dataFile: values['data-file'] === true,
      ...(clusterSize !== undefined ? { clusterSize } : {}),
    })
    for (const name of result.removedStale) ctx.log.warn({ removed: name }, `removed ${name} from ${target}, left by an extract that is gone`)
    if (values.verbose === true) for (const file of result.files) ctx.log.info(`wrote ${file}`)
    ctx.done({ archive: input.name, target, files: result.files, archiveBytes: result.archiveBytes }, 'archive extracted',
      `${input.name} extracted into ${target}: ${result.files.map(f => basename(f)).join(', ')}`)
    return EXIT.OK
  },
}
