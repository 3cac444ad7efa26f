/**
 * Files in formats other tools read, made by those tools, are refused as disks
 * (E_INPUT_FORMAT, exit 1) by openDisk and describeImage, so by vma create,
 * pack-vma (path and stdin) and vma info; format raw takes their bytes as they
 * are. Every sample goes through the library in-process; the commands are run
 * on a few.
 */
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, exits, have, q, run, sh, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { sameDisk } from './helpers/disk.js'
import { describeImage, openDisk } from '../lib/index.js'

const pack = async (args: string[], options: Parameters<typeof run>[2] = {}): ReturnType<typeof run> =>
  await run(process.execPath, [PACK_VMA, ...args], options)
/** [file, shell command that makes it from base.raw, tool it needs] */
const SAMPLES: Array<[string, string, string]> = [
  ['disk.vmdk', 'qemu-img convert -O vmdk base.raw disk.vmdk', 'qemu-img'],
  ['stream.vmdk', 'qemu-img convert -O vmdk -o subformat=streamOptimized base.raw stream.vmdk', 'qemu-img'],
  ['flat.vmdk', 'qemu-img convert -O vmdk -o subformat=monolithicFlat base.raw flat.vmdk', 'qemu-img'],
  ['dynamic.vhd', 'qemu-img convert -O vpc base.raw dynamic.vhd', 'qemu-img'],
  ['fixed.vhd', 'qemu-img convert -O vpc -o subformat=fixed base.raw fixed.vhd', 'qemu-img'],
  ['disk.vhdx', 'qemu-img convert -O vhdx base.raw disk.vhdx', 'qemu-img'],
  ['disk.vdi', 'qemu-img convert -O vdi base.raw disk.vdi', 'qemu-img'],
  ['disk.qed', 'qemu-img convert -O qed base.raw disk.qed', 'qemu-img'],
  ['base.raw.zst', 'zstd -q base.raw -o base.raw.zst', 'zstd'],
  ['base.raw.gz', 'gzip -k base.raw', 'gzip'],
  ['base.raw.xz', 'xz -k base.raw', 'xz'],
  ['base.raw.lzo', 'lzop base.raw -o base.raw.lzo', 'lzop'],
  ['base.raw.bz2', 'bzip2 -k base.raw', 'bzip2'],
  ['backup.vma', `${q(process.execPath)} ${q(PACK_VMA)} base.raw -o backup.vma`, 'node'],
  ['backup.vma.zst', `${q(process.execPath)} ${q(PACK_VMA)} base.raw -o backup.vma.zst --compress zstd`, 'zstd'],
]

const dir = tempDir(t)
// Half data, half zeros, so that images and compressed files are small but not empty.
writeFileSync(join(dir, 'base.raw'), Buffer.concat([randomBytes(512 << 10), Buffer.alloc(512 << 10)]))
const samples = SAMPLES.filter(([, , tool]) => have(tool))
for (const [name, , tool] of SAMPLES) if (!samples.some(s => s[0] === name)) t.comment(`no ${name}: ${tool} not found`)
const path = (name: string): string => join(dir, name)

t.before(async () => {
  const made = await sh(`cd ${q(dir)} && ${samples.map(s => s[1]).join(' && ')}`)
  if (made.code !== 0) throw new Error(`making the samples failed: ${made.stderr}`)
})

t.test('openDisk and describeImage refuse each, and open it as raw when told', async t => {
  for (const [name] of samples) {
    await t.rejects(openDisk({ name: 'drive-scsi0', path: path(name) }), { code: 'E_INPUT_FORMAT' }, `${name} refused for packing`)
    await t.rejects(describeImage(path(name)), { code: 'E_INPUT_FORMAT' }, `${name} refused by info`)
    const raw = await openDisk({ name: 'drive-scsi0', path: path(name), format: 'raw' })
    t.equal(raw.size, readFileSync(path(name)).length, `${name} opens as raw`)
    raw.close()
  }
})

t.test('the commands exit 1 with E_INPUT_FORMAT', async t => {
  const runs: Array<[string, Promise<Awaited<ReturnType<typeof run>>>]> = [
    ['vma create, a VMDK', vma(['create', path('o.vma'), '-d', `drive-scsi0=${path('disk.vmdk')}`])],
    ['vma create, a compressed archive', vma(['create', path('o.vma'), '-d', `drive-scsi0=${path('backup.vma.zst')}`])],
    ['pack-vma, a fixed VHD', pack([path('fixed.vhd'), '-o', path('o.vma')])],
    ['pack-vma, bzip2 on stdin', pack(['-', '--size', '1M', '-o', path('o.vma')], { stdin: { file: path('base.raw.bz2') } })],
    ['pack-vma, VHDX on stdin', pack(['-', '--size', '1M', '-o', path('o.vma')], { stdin: { file: path('disk.vhdx') } })],
    ['vma info, a VDI', vma(['info', path('disk.vdi')])],
  ]
  for (const [what, result] of runs) {
    const r = await result
    exits(t, r, 1, what)
    t.equal(failure(r).code, 'E_INPUT_FORMAT', what)
  }
})

t.test('format raw packs their bytes anyway', async t => {
  for (const name of ['fixed.vhd', 'base.raw.gz']) {
    const archive = path(`${name}.vma`)
    exits(t, await vma(['create', archive, '-d', `format=raw:drive-scsi0=${path(name)}`]), 0, `${name} packed as raw`)
    const restored = await vma(['extract', archive, '-'])
    exits(t, restored, 0)
    sameDisk(t, restored.stdout, readFileSync(path(name)), name)
  }
  exits(t, await vma(['info', '--format', 'raw', path('disk.vmdk')]), 0, 'vma info --format raw describes a VMDK as raw')
})
