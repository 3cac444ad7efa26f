/**
 * Names that no file can carry: vma create refuses device and config names
 * longer than Proxmox's own extract restores (saying the limit), and vma
 * extract refuses an archive with such names (made by a tool that allows
 * them) before it writes anything, pointing to stdout.
 */
import t from 'tap'
import { existsSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PVE_VMA, cmp, exits, needsPveVma, run, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { Rng, buildArchive, scatter } from './helpers/vma-builder.js'
import { makeDisk } from './helpers/random.js'

const name = (bytes: number, c = 'd'): string => c.repeat(bytes)

t.test('vma create: a device name over 242 bytes or a config name over 248 is refused, saying the limit; one at the limit restores', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, makeDisk(new Rng(121), 131072))
  const conf = (bytes: number): string => { const path = join(dir, name(bytes, 'c')); writeFileSync(path, 'cores: 1\n'); return path }
  const cases: Array<[string, string[], RegExp]> = [
    ['a 300-byte device name', ['-d', `${name(300)}=${disk}`], /device name "d{40}\.\.\." is 300 bytes; at most 242 can be restored/],
    ['a 243-byte device name', ['-d', `${name(243)}=${disk}`], /is 243 bytes; at most 242 .*tmp-disk-NAME\.raw/],
    ['a 249-byte config name', ['-c', conf(249), '-d', `drive-scsi0=${disk}`], /config name "c{40}\.\.\." is 249 bytes; at most 248/],
  ]
  for (const [what, args, mention] of cases) {
    const out = join(dir, 'refused.vma')
    const r = await vma(['create', out, ...args])
    exits(t, r, 2, `${what}: exit 2`)
    t.equal(failure(r).code, 'E_LIMIT')
    t.match(failure(r).msg, mention)
    t.notOk(existsSync(out), 'no archive')
    t.same(readdirSync(dir).filter(f => f.startsWith('.')), [], 'no temporary file left')
  }
  const longest = join(dir, 'longest.vma')
  exits(t, await vma(['create', longest, '-c', conf(248), '-d', `${name(242)}=${disk}`]), 0, 'names at the limits are written')
  exits(t, await vma(['extract', longest, join(dir, 'ours')]), 0)
  t.ok(cmp(join(dir, 'ours', `disk-${name(242)}.raw`), disk), 'vmapipe restores them')
  await t.test('and Proxmox restores them', needsPveVma, async t => {
    exits(t, await run(PVE_VMA as string, ['extract', longest, join(dir, 'pve')]), 0)
    t.ok(cmp(join(dir, 'pve', `disk-${name(242)}.raw`), disk))
    t.ok(existsSync(join(dir, 'pve', name(248, 'c'))))
  })
})

t.test('vma extract: names that no file can carry are refused before anything is written; the disk still goes to stdout', async t => {
  const dir = tempDir(t)
  const rng = new Rng(122)
  const data = makeDisk(rng, 131072)
  const archive = (file: string, device: string, config: string): string => {
    const devices = [{ id: 1, name: device, size: data.length, data }]
    writeFileSync(join(dir, file), buildArchive({ configs: [{ name: config, data: Buffer.from('cores: 1\n') }], devices, extents: scatter(rng, devices) }))
    return join(dir, file)
  }
  const longDevice = archive('device.vma', name(300), 'qemu-server.conf')
  const r = await vma(['extract', longDevice, join(dir, 'a')])
  exits(t, r, 2)
  t.equal(failure(r).code, 'E_LIMIT')
  t.match(failure(r).msg, /device d+ would be written as a file name of 309 bytes, more than a file name holds \(255\); write it to stdout with -d d+/)
  t.notOk(existsSync(join(dir, 'a')), 'the target is not left behind')
  const out = await vma(['extract', longDevice, '-', '-d', name(300)])
  exits(t, out, 0, 'to stdout')
  t.ok(out.stdout.equals(data), 'the disk, whole')
  const qcow2 = await vma(['extract', archive('qcow2.vma', name(245), 'qemu-server.conf'), join(dir, 'b'), '--format', 'qcow2'])
  exits(t, qcow2, 2, 'a name that fits as .raw but not as .qcow2')
  t.match(failure(qcow2).msg, /file name of 256 bytes/)
  const longConfig = await vma(['extract', archive('config.vma', 'drive-scsi0', name(256, 'c')), join(dir, 'c')])
  exits(t, longConfig, 2)
  t.match(failure(longConfig).msg, /config blob c+ has a name of 256 bytes, more than a file name holds \(255\); read it with vma config/)
  t.notOk(existsSync(join(dir, 'c')))
})
