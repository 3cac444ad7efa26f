import { basename } from 'node:path'
import type { Compression } from '../io/compression.js'
import type { DiskSpec } from '../jobs/sources.js'
import { INPUT_FORMATS } from '../jobs/registry.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals, parseSeconds, parseSize } from './command.js'
import { type CliContext, JOB_BUILTINS, capYoungGeneration, refuseTerminal } from './context.js'
import { formatBytes } from '../io/progress.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'

const PACK_OPTIONS = {
  config: { type: 'string', short: 'c', multiple: true },
  compress: { type: 'string' },
  uuid: { type: 'string' },
  ctime: { type: 'string' },
  force: { type: 'boolean' },
  interleave: { type: 'boolean' },
  'follow-backing': { type: 'boolean' },
  tmpdir: { type: 'string' },
  'nbd-timeout': { type: 'string' },
  ...S3_OPTIONS,
} as const

const PACK_HELP = `  -c, --config FILE   store FILE as a config blob under its base name
                      (repeatable); NAME=FILE stores it as NAME. A lone
                      Proxmox VM config <vmid>.conf is stored as
                      qemu-server.conf and <vmid>.fw as qemu-server.fw,
                      the names vzdump gives them
  --compress KIND     zstd, gzip, lzo or none; default from the name of
                      the output (.zst, .gz, .lzo), else none
  --uuid UUID         archive uuid (default random)
  --ctime TIME        creation time, seconds since the epoch or an ISO date
                      (default now)
  --force             replace an existing output file
  --interleave        read all disks at once, mixing their clusters
  --follow-backing    read qcow2 backing chains (each file must lie in its
                      image's directory) instead of refusing them
  --tmpdir DIR        where an image read from stdin is copied first
                      (default $TMPDIR or /tmp)
  --nbd-timeout SECS  seconds an NBD server has to answer each request
                      (default 60; 0: wait for ever)

${S3_HELP}

OUT may be an s3://BUCKET/KEY: a multipart upload (parts from 8 MiB, growing,
4 in flight) that becomes the object only after the last byte; after a
failure or Ctrl-C it is aborted and nothing is left under the key. An object
already there is replaced only with --force.`

export const create: Command = {
  name: 'create',
  help: `Usage: vma create OUT [-c [NAME=]FILE]... -d [OPTS:]NAME=PATH [-d ...]
       vma create OUT [-c [NAME=]FILE]... NAME=PATH...     (deprecated, as in Proxmox)

Writes a VMA archive that Proxmox restores: one device per -d, in the order
given (dev_ids from 1), each disk read front to back after the one before
(--interleave reads them together and mixes their clusters in extents, as a
live backup does). Zero 4 KiB blocks are left out. OUT may be - (stdout, a
file or a pipe but not a terminal); a file is written under a temporary name
and renamed only when complete. At most one PATH may be - (stdin). Disks
given without -d (Proxmox's deprecated form; a bare PATH is named disk0,
disk1...) are taken with Proxmox's warning, and not together with -d.

PATH may be raw, a Parallels image (.hds) or a Parallels bundle (a .hdd
directory, or its DiskDescriptor.xml: its snapshots are merged); the format
is told by magic bytes, raw being the fallback.

-d takes NAME=PATH, optionally prefixed by options and a colon:
  format=FMT          skip format detection: ${INPUT_FORMATS.join(', ')}
                      (told by magic bytes otherwise; raw is the fallback)
  size=BYTES          the disk's size, required for raw input from stdin or
                      a pipe (suffixes K, M, G, T)
  backing=PATH        a qcow2's backing file, wherever it lies (the chain
                      below it is followed)
  dirty-bitmap=NAME   refused: what a dirty bitmap marks is an overlay on
                      the previous backup, not an archive (vma incremental)
A device named vmstate holds saved RAM and is written in order. PATH may be
an NBD URI: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (only
allocated extents are read).

Options:
${PACK_HELP}

Examples:
  vma create backup.vma.zst -c 100.conf -d drive-scsi0=disk0.raw -d drive-efidisk0=efi.raw
  cat disk.raw | vma create - -d size=10G:drive-scsi0=- | ssh host 'cat > backup.vma'
  vma create backup.vma -d 'drive-scsi0=nbd+unix:///drive-scsi0?socket=/run/qemu-nbd.sock'
  vma create s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst -c 100.conf -d drive-scsi0=disk0.raw`,
  options: { ...PACK_OPTIONS, drive: { type: 'string', short: 'd', multiple: true } },
  capsYoungGeneration: true,
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, Infinity, 'OUT')
    const [out, ...bare] = positionals
    // Not split at commas: they separate a -d's own options.
    const drives = (values.drive as string[] | undefined) ?? []
    if (drives.length > 0 && bare.length > 0) throw new VmapipeError('E_USAGE', `unexpected argument ${bare[0]}: give every disk with -d`)
    const specs = drives.map(parseDiskSpec)
    for (const [i, text] of bare.entries()) {
      ctx.log.warn(`Specifying a device without a format is deprecated - use '-d format=<format>:${text}'`)
      specs.push(parseDiskSpec(text.includes('=') ? text : `disk${i}=${text}`))
    }
    if (specs.length === 0) throw new VmapipeError('E_USAGE', 'no disks: give at least one -d NAME=PATH')
    return await runPack(ctx, out, specs, values)
  },
}

export const pack: Command = {
  name: 'pack-vma',
  help: `Usage: pack-vma [INPUT|-] [--name NAME] [--size BYTES] [--format FORMAT] [-c [NAME=]FILE]... [-o OUT]

Packs one disk from a file, stdin or an NBD export into a VMA archive on
stdout (a file or a pipe, not a terminal) or -o OUT. The input's format is
told by its magic bytes: raw (the fallback), qcow2, a Parallels image (.hds)
or bundle (.hdd directory). Raw from stdin needs --size, since the archive
header comes first. qcow2 and .hds from stdin are read as they stream in
(what cannot be placed yet waits in --tmpdir); an image from stdin may not
refer to other files. INPUT may be an NBD URI (nbd://HOST[:PORT]/EXPORT,
nbd+unix:///EXPORT?socket=PATH): only allocated extents are read.

Options:
  --name NAME         device name (default drive-scsi0)
  --size BYTES        size of a raw input that cannot be seen (suffixes K, M, G)
  --format FORMAT     skip format detection: ${INPUT_FORMATS.join(', ')} (raw packs
                      the bytes of a file in another tool's format as they are)
  -o, --output OUT    write OUT instead of stdout
  --dirty-bitmap NAME refused: an incremental backup is an overlay on the
                      previous backup, not an archive (vma incremental)
${PACK_HELP}

Examples:
  pack-vma disk.raw -c 100.conf > backup.vma
  cat disk.raw | pack-vma --size 10G --compress zstd > backup.vma.zst
  pack-vma /dev/vg0/vm-100-disk-0 -o vzdump-qemu-100-2024_01_31-02_00_01.vma.zst
  pack-vma 'nbd+unix:///?socket=/run/qemu-nbd.sock' -o backup.vma.zst
  pack-vma disk.raw -o s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma.zst --s3-endpoint http://minio:9000`,
  options: {
    ...PACK_OPTIONS,
    name: { type: 'string' },
    size: { type: 'string' },
    format: { type: 'string' },
    output: { type: 'string', short: 'o' },
    'dirty-bitmap': { type: 'string' },
  },
  capsYoungGeneration: true,
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 0, 1, 'INPUT')
    const size = parseSize(values.size, '--size')
    const bitmap = values['dirty-bitmap'] as string | undefined
    const format = values.format as string | undefined
    const spec: DiskSpec = {
      name: (values.name as string | undefined) ?? 'drive-scsi0',
      path: positionals[0] ?? '-',
      ...(size !== undefined ? { size } : {}),
      ...(format !== undefined ? { format } : {}),
      ...(bitmap !== undefined ? { dirtyBitmap: bitmap } : {}),
    }
    return await runPack(ctx, (values.output as string | undefined) ?? '-', [spec], values)
  },
}

const SPEC_KEYS = 'format|size|backing|dirty-bitmap'

/** `[format=raw,size=10G,backing=PATH:]drive-scsi0=/path` -> DiskSpec */
export function parseDiskSpec (text: string): DiskSpec {
  const m = new RegExp(`^((?:${SPEC_KEYS})=[^:,]*(?:,(?:${SPEC_KEYS})=[^:,]*)*):(.*)$`).exec(text)
  const rest = m === null ? text : m[2]
  const eq = rest.indexOf('=')
  if (eq <= 0 || eq === rest.length - 1) {
    throw new VmapipeError('E_USAGE', `-d ${text}: expected [format=FMT,size=BYTES,backing=PATH,dirty-bitmap=NAME:]NAME=PATH`)
  }
  const spec: DiskSpec = { name: rest.slice(0, eq), path: rest.slice(eq + 1) }
  for (const option of m === null ? [] : m[1].split(',')) {
    const [key, value] = option.split('=')
    if (key === 'size') spec.size = parseSize(value, `-d ${text}`)
    else if (key === 'backing') spec.backing = value
    else if (key === 'dirty-bitmap') spec.dirtyBitmap = value
    else if ((INPUT_FORMATS as readonly string[]).includes(value)) spec.format = value
    else throw new VmapipeError('E_USAGE', `-d ${text}: unknown format ${value} (known: ${INPUT_FORMATS.join(', ')})`)
  }
  return spec
}

/**
 * -c values: `NAME=PATH`, or a PATH stored under its base name. A lone Proxmox
 * VM config (/etc/pve/qemu-server/<vmid>.conf) is stored as qemu-server.conf,
 * a lone firewall file <vmid>.fw as qemu-server.fw: vzdump's names, which
 * qmrestore and vma config look for.
 */
function configSpecs (value: unknown, ctx: CliContext): Array<{ name: string, path: string }> {
  const specs = ((value as string[] | undefined) ?? []).map(text => {
    const eq = text.indexOf('=')
    if (eq <= 0 || text.slice(0, eq).includes('/')) return { name: basename(text), path: text, named: false }
    if (eq === text.length - 1) throw new VmapipeError('E_USAGE', `-c ${text}: expected NAME=FILE`)
    return { name: text.slice(0, eq), path: text.slice(eq + 1), named: true }
  })
  for (const [pattern, vzdumpName] of [[/^\d+\.conf$/, 'qemu-server.conf'], [/^\d+\.fw$/, 'qemu-server.fw']] as const) {
    const matching = specs.filter(s => !s.named && pattern.test(s.name))
    if (matching.length !== 1 || specs.some(s => s.name === vzdumpName)) continue
    ctx.log.info(`storing config ${matching[0].name} as ${vzdumpName}`)
    matching[0].name = vzdumpName
  }
  return specs.map(({ name, path }) => ({ name, path }))
}

function parseCtime (value: unknown): number | undefined {
  if (value === undefined) return undefined
  const text = String(value)
  const seconds = /^\d+$/.test(text) ? Number(text) : Date.parse(text) / 1000
  if (!Number.isFinite(seconds) || seconds < 0) throw new VmapipeError('E_USAGE', `--ctime ${text} is neither seconds since the epoch nor a date`)
  return Math.floor(seconds)
}

async function runPack (ctx: CliContext, out: string, given: DiskSpec[], values: Record<string, unknown>): Promise<number> {
  const signal = ctx.signal // from here a signal removes what was written
  // Capped before the jobs load, which alone doubled it (pack-vma of 1 GiB: 1.5-2 MiB less at the peak, no more CPU).
  await capYoungGeneration(JOB_BUILTINS)
  // Loaded only now, so that --help and usage errors do not load the jobs and every format.
  const [{ COMPRESSIONS, compressionForName }, { openArchiveOutput }, { packArchive, readConfigFiles }, { closeDisks, openDisks }] = await Promise.all([
    import('../io/compression.js'), import('../jobs/s3.js'), import('../jobs/pack.js'), import('../jobs/sources.js'),
  ])
  const nbdTimeout = parseSeconds(values['nbd-timeout'], '--nbd-timeout')
  const specs = given.map(spec => ({
    ...spec,
    ...(nbdTimeout !== undefined ? { nbdTimeout } : {}),
    ...(values['follow-backing'] === true ? { followBacking: true } : {}),
    ...(values.tmpdir !== undefined ? { tmpDir: values.tmpdir as string } : {}),
  }))
  if (specs.filter(s => s.path === '-').length > 1) throw new VmapipeError('E_USAGE', 'only one disk can come from stdin')
  const incremental = specs.find(s => s.dirtyBitmap !== undefined)
  if (incremental !== undefined) {
    throw new VmapipeError('E_USAGE',
      `${incremental.name}: dirty bitmap ${incremental.dirtyBitmap} gives only the changed clusters, an overlay on the previous backup, while a VMA archive ` +
      `holds whole disks; write the overlay with vma incremental URI --dirty-bitmap ${incremental.dirtyBitmap} --overlay-of PREVIOUS`)
  }
  const compress = values.compress as string | undefined
  if (compress !== undefined && !(COMPRESSIONS as readonly string[]).includes(compress)) {
    throw new VmapipeError('E_USAGE', `--compress ${compress}: choose one of ${COMPRESSIONS.join(', ')}`)
  }
  const compression = (compress ?? compressionForName(out)) as Compression
  if (out === '-') refuseTerminal('archive', `redirect stdout (> backup.vma, | ssh ...) or ${ctx.program === 'pack-vma' ? 'give -o FILE' : 'name an OUT file'}`)
  const configs = await readConfigFiles(configSpecs(values.config, ctx))
  const ctime = parseCtime(values.ctime)
  const disks = await openDisks(specs)
  const output = await openArchiveOutput(out, { ...s3Access(values, ctx, signal), force: values.force === true }).catch(err => {
    closeDisks(disks)
    throw err
  })
  for (const name of output.removedStale) ctx.log.warn({ removed: name }, `removed ${name}, left by a run that is gone`)
  const diskBytes = disks.reduce((n, d) => n + d.size, 0)
  const progress = ctx.progress('pack', diskBytes)
  try {
    const result = await packArchive(disks, output, {
      configs,
      compression,
      interleave: values.interleave === true,
      signal,
      ...(values.uuid !== undefined ? { uuid: values.uuid as string } : {}),
      ...(ctime !== undefined ? { ctime } : {}),
      ...(progress ? { progress } : {}),
    })
    await output.commit()
    ctx.done({
      archive: output.name,
      uuid: result.info.uuid,
      compression,
      devices: result.info.devices.map(d => `${d.name}=${d.size}`),
      diskBytes,
      archiveBytes: result.stats.bytes,
      dataBlocks: result.stats.dataBlocks,
      extents: result.stats.extents,
    }, 'archive written',
      `${output.name} written: ${disks.length} disk${disks.length === 1 ? '' : 's'} (${formatBytes(diskBytes)}), ${formatBytes(result.stats.bytes)} archive`)
    return EXIT.OK
  } catch (err) {
    await output.abort()
    throw err
  }
}
