import t from 'tap'
import { existsSync, readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { allocated, cmp, exits, q, sh, sha256, tempDir, vma, vmaCmd } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'

t.test('extract to a directory: every file equals its source, holes are real', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(1))
  const out = join(dir, 'out')
  const r = await vma(['extract', fx.archive, out])
  exits(t, r, 0)
  t.same(readdirSync(out).sort(), [
    'disk-drive-efidisk0.raw', 'disk-drive-scsi0.raw', 'disk-drive-scsi1.raw', 'disk-drive-virtio1.raw',
    'qemu-server.conf', 'qemu-server.fw', 'vmstate.bin',
  ])
  for (const d of fx.spec.devices) {
    const file = join(out, d.name === 'vmstate' ? 'vmstate.bin' : `disk-${d.name}.raw`)
    t.ok(cmp(file, fx.sources.get(d.name) as string), `${d.name} equals its source`)
  }
  for (const c of fx.spec.configs) t.same(readFileSync(join(out, c.name)), c.data, `${c.name} equals`)
  const zeroDisk = join(out, 'disk-drive-virtio1.raw')
  t.equal(allocated(zeroDisk), 0, 'an all-zero disk allocates nothing')
  const scsi0 = join(out, 'disk-drive-scsi0.raw')
  const nonZero = countNonZeroBlocks(readFileSync(scsi0))
  t.ok(allocated(scsi0) <= (nonZero + 16) * 4096, `scsi0 allocates ${allocated(scsi0)} bytes for ${nonZero} data blocks`)
  t.ok(allocated(scsi0) < readFileSync(scsi0).length * 0.8, 'holes are real')
  const log = r.stderr.trim().split('\n').map(l => JSON.parse(l) as { msg: string })
  t.ok(log.some(l => l.msg === 'archive extracted'), 'a JSON log line reports the result')
})

t.test('extract -d writes only the named drives (short names too) plus the configs', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(2))
  const out = join(dir, 'out')
  const r = await vma(['extract', fx.archive, out, '-d', 'scsi1,drive-efidisk0'])
  exits(t, r, 0)
  t.same(readdirSync(out).sort(), ['disk-drive-efidisk0.raw', 'disk-drive-scsi1.raw', 'qemu-server.conf', 'qemu-server.fw'])
  t.ok(cmp(join(out, 'disk-drive-scsi1.raw'), fx.sources.get('drive-scsi1') as string))
  const bad = await vma(['extract', fx.archive, join(dir, 'out2'), '-d', 'sata9'])
  t.equal(bad.code, 2, 'an unknown drive is a usage error')
  t.equal(failure(bad).code, 'E_NOT_FOUND')
  t.match(failure(bad).msg, /sata9.*drive-scsi0/, 'naming the drive and those the archive has')
  t.notOk(existsSync(join(dir, 'out2')), 'nothing is left behind')
})

t.test('extract to stdout: one disk in order, zeros included, whatever the archive order', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(3))
  for (const name of ['drive-scsi0', 'drive-efidisk0', 'drive-scsi1', 'vmstate']) {
    const r = await vma(['extract', fx.archive, '-', '-d', name])
    exits(t, r, 0)
    t.equal(sha256(r.stdout), sha256(fx.sources.get(name) as string), `${name} to stdout`)
  }
  const several = await vma(['extract', fx.archive])
  t.equal(several.code, 2, 'several disks need -d')
  t.match(several.stderr, /holds 4 disks/)
})

t.test('extract to stdout spills early clusters to a temporary file when memory is full', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(4))
  // A pipe into the consumer, and stdin from a pipe: the whole path as users run it.
  const target = join(dir, 'scsi0.raw')
  const r = await sh(`cat ${q(fx.archive)} | ${vmaCmd} extract - - -d scsi0 --tmpdir ${q(dir)} --memory 128K > ${q(target)}`)
  exits(t, r, 0)
  t.ok(cmp(target, fx.sources.get('drive-scsi0') as string), 'the disk equals its source')
  const done = JSON.parse(r.stderr.trim().split('\n').pop() as string) as { spilledBytes: number }
  t.ok(done.spilledBytes > 1048576, `clusters went through the spill file (${done.spilledBytes} bytes)`)
  t.same(readdirSync(dir).filter(f => f.startsWith('vmapipe-spill')), [], 'the spill file is gone')
})

t.test('the target directory must not exist; --force takes an empty one', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(5))
  const r = await vma(['extract', fx.archive, dir])
  t.equal(r.code, 3)
  t.equal(failure(r).code, 'E_TARGET_EXISTS')
  const empty = join(dir, 'empty')
  await sh(`mkdir ${q(empty)}`)
  const forced = await vma(['extract', fx.archive, empty, '--force', '-d', 'efidisk0'])
  exits(t, forced, 0)
  t.ok(cmp(join(empty, 'disk-drive-efidisk0.raw'), fx.sources.get('drive-efidisk0') as string))
  const again = await vma(['extract', fx.archive, empty, '--force'])
  t.equal(again.code, 3, 'a non-empty directory is refused even with --force')
})

function countNonZeroBlocks (buf: Buffer): number {
  let n = 0
  const zero = Buffer.alloc(4096)
  for (let i = 0; i < buf.length; i += 4096) if (!buf.subarray(i, i + 4096).equals(zero.subarray(0, Math.min(4096, buf.length - i)))) n++
  return n
}
