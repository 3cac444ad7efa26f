/**
 * Issue 11: a Proxmox admin's habits. What Proxmox's own vma accepts works
 * here too (or is refused naming the alternative); unknown options get our
 * words and the command's usage; -c NAME=PATH; pack-vma speaks of its own
 * options. pve-vma, where present, is the oracle for what the archives hold.
 */
import t from 'tap'
import { readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, needsPveVma, run, tempDir, vma, PACK_VMA, PVE_VMA } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'

const packVma = async (args: string[], stdin?: Buffer): ReturnType<typeof run> => await run(process.execPath, [PACK_VMA, ...args], stdin ? { stdin } : {})
const configNames = async (archive: string): Promise<string[]> =>
  (JSON.parse((await vma(['list', '--json', archive])).stdout.toString()) as { configs: Array<{ name: string }> }).configs.map(c => c.name)
const VM_CONFIG = 'boot: order=scsi0\ncores: 2\nmemory: 2048\nscsi0: local-lvm:vm-100-disk-0,size=1M\n'

t.test('vma extract -v ARCHIVE DIR and options after the positionals, as Proxmox takes them', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(121))
  for (const [what, args] of [
    ['-v first', ['extract', '-v', fx.archive, join(dir, 'a')]],
    ['options last', ['extract', fx.archive, join(dir, 'b'), '-v', '-d', 'drive-efidisk0']],
    ['-d before ARCHIVE', ['extract', '-d', 'drive-efidisk0', fx.archive, join(dir, 'c')]],
  ] as const) {
    const r = await vma([...args])
    exits(t, r, 0, `${what}: exit 0`)
    const target = args.find(a => a.startsWith(dir) && a !== fx.archive) as string
    t.ok(cmp(join(target, 'disk-drive-efidisk0.raw'), fx.sources.get('drive-efidisk0') as string), `${what}: the disk is right`)
    if (args.includes('-v')) t.match(r.stderr, /wrote .*disk-drive-efidisk0\.raw/, `${what}: -v names each file`)
  }
  t.same(readdirSync(join(dir, 'b')).sort(), ['disk-drive-efidisk0.raw', 'qemu-server.conf', 'qemu-server.fw'], '-d after TARGETDIR still selects')
})

t.test('vma verify -v, before or after ARCHIVE', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(122))
  for (const args of [['verify', '-v', fx.archive], ['verify', fx.archive, '-v']]) {
    const r = await vma(args)
    exits(t, r, 0, args.join(' '))
    t.match(r.stdout.toString(), /device +7 drive-scsi1: 2098688 bytes/, 'a line per device')
  }
})

t.test('-r FIFO (a restore map) is refused, naming the alternatives', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(123))
  const r = await vma(['extract', fx.archive, '-r', join(dir, 'map.fifo'), join(dir, 'out')])
  exits(t, r, 2)
  t.match(r.stderr, /-r .*map\.fifo.*not supported/, 'names the option')
  t.match(r.stderr, /--to NBD-URI/, 'and what to use instead')
  t.match(r.stderr, /vma extract ARCHIVE - -d DRIVE/)
})

t.test('positional vma create OUT drive-scsi0=disk.raw: Proxmox\'s deprecated form, with its warning', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(124))
  const disk = fx.sources.get('drive-efidisk0') as string
  const out = join(dir, 'positional.vma')
  const r = await vma(['create', '--log-format', 'text', out, `drive-efidisk0=${disk}`])
  exits(t, r, 0)
  const warning = `vma: warning: Specifying a device without a format is deprecated - use '-d format=<format>:drive-efidisk0=${disk}'\n`
  t.ok(r.stderr.startsWith(warning), 'the warning Proxmox prints', { stderr: r.stderr })
  const json = await vma(['create', join(dir, 'json.vma'), `drive-efidisk0=${disk}`])
  exits(t, json, 0)
  t.match(json.stderr, /"level":40,.*"msg":"Specifying a device without a format is deprecated/, 'a warn line in JSON')
  const back = await vma(['extract', out, '-', '-d', 'efidisk0'])
  exits(t, back, 0)
  t.ok(back.stdout.equals(readFileSync(disk)), 'the disk is in the archive')
  const mixed = await vma(['create', join(dir, 'mixed.vma'), `drive-a=${disk}`, '-d', `drive-b=${disk}`])
  exits(t, mixed, 2, 'positional disks and -d together: refused, as Proxmox does')
  t.match(mixed.stderr, /drive-a=.*give every disk with -d/)
})

t.test('the same warning as Proxmox\'s vma, word for word', needsPveVma, async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'd.raw')
  writeFileSync(disk, Buffer.alloc(65536, 7))
  const theirs = await run(PVE_VMA as string, ['create', join(dir, 'theirs.vma'), `drive-scsi0=${disk}`])
  exits(t, theirs, 0)
  const ours = await vma(['create', '--log-format', 'text', join(dir, 'ours.vma'), `drive-scsi0=${disk}`])
  exits(t, ours, 0)
  const warning = (s: string): string | undefined => /warning: .*/.exec(s)?.[0]
  t.equal(warning(ours.stderr), warning(theirs.stderr))
  exits(t, await run(PVE_VMA as string, ['verify', join(dir, 'ours.vma')]), 0, 'pve-vma verifies ours')
})

t.test('unknown options and missing values: our words and the command\'s usage, exit 2', async t => {
  for (const [args, message, usage] of [
    [['extract', '--bogus', 'a.vma', 'out'], /^vma: unknown option --bogus$/m, /^Usage: vma extract ARCHIVE TARGETDIR/m],
    [['verify', '-x', 'a.vma'], /^vma: unknown option -x$/m, /^Usage: vma verify ARCHIVE/m],
    [['extract', 'a.vma', 'out', '-d'], /^vma: option -d, --drive needs a value$/m, /^Usage: vma extract/m],
    [['list', '--json=yes', 'a.vma'], /^vma: option --json takes no value$/m, /^Usage: vma list/m],
  ] as const) {
    const r = await vma([...args])
    exits(t, r, 2, args.join(' '))
    t.match(r.stderr, message, `${args.join(' ')}: names the option`)
    t.match(r.stderr, usage, `${args.join(' ')}: shows the usage`)
    t.notMatch(r.stderr, /positional argument|To specify|parseArgs/, 'not Node\'s parser text')
  }
  const pack = await packVma(['--nme', 'x'])
  exits(t, pack, 2)
  t.match(pack.stderr, /^pack-vma: unknown option --nme$/m)
  t.match(pack.stderr, /^Usage: pack-vma /m)
})

t.test('-c NAME=PATH stores a config under another name; a lone <vmid>.conf becomes qemu-server.conf', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, Buffer.alloc(1 << 20, 3))
  const conf = join(dir, '100.conf')
  writeFileSync(conf, VM_CONFIG)
  writeFileSync(join(dir, '100.fw'), '[OPTIONS]\nenable: 1\n')

  // The README's example, exactly: pack-vma disk.raw -c 100.conf > backup.vma
  const readme = await run('sh', ['-c', `cd '${dir}' && '${process.execPath}' '${PACK_VMA}' disk.raw -c 100.conf > backup.vma`])
  exits(t, readme, 0)
  const config = await vma(['config', join(dir, 'backup.vma')])
  exits(t, config, 0, 'vma config reads it without -c')
  t.equal(config.stdout.toString(), VM_CONFIG)
  if (PVE_VMA !== undefined) {
    const theirs = await run(PVE_VMA, ['config', join(dir, 'backup.vma')])
    exits(t, theirs, 0, 'so does Proxmox\'s vma config')
    t.equal(theirs.stdout.toString(), VM_CONFIG)
  }

  const named = join(dir, 'named.vma')
  exits(t, await vma(['create', named, '-c', `qemu-server.conf=${conf}`, '-c', `notes.txt=${join(dir, '100.fw')}`, '-d', `drive-scsi0=${disk}`]), 0)
  t.equal((await vma(['config', named])).stdout.toString(), VM_CONFIG, 'NAME=PATH: stored as NAME')
  t.equal((await vma(['config', named, '-c', 'notes.txt'])).stdout.toString(), '[OPTIONS]\nenable: 1\n')

  const both = join(dir, 'both.vma')
  exits(t, await vma(['create', both, '-c', conf, '-c', join(dir, '100.fw'), '-d', `drive-scsi0=${disk}`]), 0)
  t.same(await configNames(both), ['qemu-server.conf', 'qemu-server.fw'], 'vzdump\'s names')

  writeFileSync(join(dir, '101.conf'), VM_CONFIG)
  const two = join(dir, 'two.vma')
  exits(t, await vma(['create', two, '-c', conf, '-c', join(dir, '101.conf'), '-d', `drive-scsi0=${disk}`]), 0)
  t.same(await configNames(two), ['100.conf', '101.conf'], 'two VM configs keep their own names')

  const empty = await vma(['create', join(dir, 'e.vma'), '-c', 'name=', '-d', `drive-scsi0=${disk}`])
  exits(t, empty, 2)
  t.match(empty.stderr, /-c name=: expected NAME=FILE/)
})

t.test('pack-vma --version, and messages in pack-vma\'s own options', async t => {
  const version = await packVma(['--version'])
  exits(t, version, 0)
  t.match(version.stdout.toString(), /^vmapipe \d+\.\d+\.\d+\n$/)
  const sizeless = await packVma(['-o', '/dev/null'], Buffer.alloc(65536))
  exits(t, sizeless, 2)
  t.match(sizeless.stderr, /--size BYTES/, 'names --size')
  t.notMatch(sizeless.stderr, /-d\b|size=BYTES:/, 'not vma create\'s -d')
  const badSize = await packVma(['--size', 'big', '-o', '/dev/null'], Buffer.alloc(0))
  exits(t, badSize, 2)
  t.match(badSize.stderr, /--size: big is not a size/)
  const noName = await packVma(['--name'])
  exits(t, noName, 2)
  t.match(noName.stderr, /option --name needs a value/)
})
