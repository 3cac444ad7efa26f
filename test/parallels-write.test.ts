import t from 'tap'
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { XMLParser } from 'fast-xml-parser'
import { cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { qemuCheck, qemuCompare, randomDisk, readImage } from './helpers/parallels.js'
import { ParallelsWriter } from '../lib/parallels/writer.js'
import { RawImage } from '../lib/raw/image.js'
import { clusterFromBytes, clusterRecord } from '../lib/record.js'

const disks = (names: string[]): string[] => names.filter(n => n !== 'vmstate')

t.test('extract --format parallels: every disk passes qemu-img check and equals its source, at 1 MiB and 64 KiB clusters', async t => {
  const dir = tempDir(t)
  // Sizes that are multiples of neither 64 KiB nor 1 MiB, an all-zero disk, clusters shuffled across devices.
  const fx = writeFixture(dir, multiDeviceSpec(61))
  for (const [option, clusterBytes] of [[[], 1 << 20], [['--cluster-size', '64K'], 65536]] as Array<[string[], number]>) {
    const out = join(dir, `out-${clusterBytes}`)
    exits(t, await vma(['extract', fx.archive, out, '--format', 'parallels', ...option]), 0)
    const names = disks(fx.spec.devices.map(d => d.name))
    t.same(readdirSync(out).sort(), [...names.map(n => `disk-${n}.hds`), 'qemu-server.conf', 'qemu-server.fw', 'vmstate.bin'].sort())
    t.ok(cmp(join(out, 'vmstate.bin'), fx.sources.get('vmstate') as string), 'vmstate stays raw')
    for (const name of names) {
      const image = join(out, `disk-${name}.hds`)
      await qemuCheck(t, image)
      await qemuCompare(t, image, fx.sources.get(name) as string)
      const h = readImage(image)
      t.equal(h.magic, 'WithouFreSpacExt', `${name}: magic`)
      t.equal(h.tracks * 512, clusterBytes, `${name}: cluster size`)
      t.equal(h.inUse, 0x312e3276, `${name}: in_use says closed`)
      t.equal((h.dataOff * 512) % clusterBytes, 0, `${name}: data_off on a cluster boundary`)
      const zero = Buffer.alloc(clusterBytes)
      const allocatedZero = h.bat.filter(e => e !== 0 && h.bytes.subarray(e * clusterBytes, (e + 1) * clusterBytes)
        .equals(zero.subarray(0, Math.min(clusterBytes, h.bytes.length - e * clusterBytes))))
      t.same(allocatedZero, [], `${name}: no all-zero cluster allocated`)
      t.equal(statSync(image).size, h.dataOff * 512 + h.bat.filter(e => e !== 0).length * clusterBytes, `${name}: the file ends after its last cluster`)
    }
    t.same(readImage(join(out, 'disk-drive-virtio1.hds')).bat.filter(e => e !== 0), [], 'the all-zero disk allocates no cluster')
  }
})

t.test('extract --format parallels-bundle: a .hdd directory with a DiskDescriptor.xml Parallels and vmapipe read', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(62))
  const out = join(dir, 'out')
  exits(t, await vma(['extract', fx.archive, out, '--format', 'parallels-bundle', '-d', 'scsi0,scsi1']), 0)
  t.same(readdirSync(out).sort(), ['disk-drive-scsi0.hdd', 'disk-drive-scsi1.hdd', 'qemu-server.conf', 'qemu-server.fw'])
  for (const name of ['drive-scsi0', 'drive-scsi1']) {
    const bundle = join(out, `disk-${name}.hdd`)
    const xml = readFileSync(join(bundle, 'DiskDescriptor.xml'), 'utf8')
    const doc = new XMLParser({ parseTagValue: false, ignoreAttributes: false }).parse(xml).Parallels_disk_image
    const size = statSync(fx.sources.get(name) as string).size
    const p = doc.Disk_Parameters
    t.equal(doc['@_Version'], '1.0')
    t.equal(Number(p.Disk_size), Math.ceil(size / 512), `${name}: Disk_size in sectors`)
    t.equal(Number(p.Cylinders) * Number(p.Heads) * Number(p.Sectors), Number(p.Disk_size), `${name}: the geometry's product is Disk_size`)
    t.equal(p.Padding, '0')
    const storage = doc.StorageData.Storage
    t.notOk(Array.isArray(storage), 'one Storage')
    t.same([storage.Start, storage.End, storage.Blocksize], ['0', p.Disk_size, '2048'])
    t.match(storage.Image.GUID, /^\{[0-9a-f-]{36}\}$/, 'the image has a GUID in braces')
    t.equal(storage.Image.Type, 'Compressed')
    t.notMatch(storage.Image.File, /\//, 'File is relative, inside the bundle')
    t.same(doc.Snapshots.Shot, { GUID: storage.Image.GUID, ParentGUID: '{00000000-0000-0000-0000-000000000000}' }, 'the root Shot')
    t.equal(doc.Snapshots.TopGUID, storage.Image.GUID, 'TopGUID names it')
    t.same(readdirSync(bundle).sort(), ['DiskDescriptor.xml', storage.Image.File].sort())
    await qemuCheck(t, join(bundle, storage.Image.File))
    await qemuCompare(t, join(bundle, storage.Image.File), fx.sources.get(name) as string)
    // And back: the bundle packs to the same disk.
    const back = join(dir, `back-${name}.vma`)
    exits(t, await vma(['create', back, '-d', `${name}=${bundle}`]), 0)
    exits(t, await vma(['extract', back, join(dir, `back-${name}`)]), 0)
    t.ok(cmp(join(dir, `back-${name}`, `disk-${name}.raw`), fx.sources.get(name) as string), `${name} round-trips through the bundle`)
  }
  const two = await vma(['extract', fx.archive, join(dir, 'guids'), '--format', 'parallels-bundle', '-d', 'scsi0'])
  exits(t, two, 0)
  const guid = (d: string): string => /<GUID>([^<]+)<\/GUID>/.exec(readFileSync(join(d, 'disk-drive-scsi0.hdd/DiskDescriptor.xml'), 'utf8'))?.[1] ?? ''
  t.not(guid(join(dir, 'guids')), guid(out), 'every bundle gets a fresh GUID')
})

t.test('--cluster-size: odd sizes round-trip, bad ones are refused before anything is written', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(63))
  const out = join(dir, 'three')
  exits(t, await vma(['extract', fx.archive, out, '--format', 'parallels', '--cluster-size', '192K', '-d', 'scsi0']), 0)
  await qemuCheck(t, join(out, 'disk-drive-scsi0.hds'))
  await qemuCompare(t, join(out, 'disk-drive-scsi0.hds'), fx.sources.get('drive-scsi0') as string)
  for (const args of [['--format', 'parallels', '--cluster-size', '4K'], ['--format', 'parallels', '--cluster-size', '2G'], ['--cluster-size', '1M']]) {
    const r = await vma(['extract', fx.archive, join(dir, 'bad'), ...args])
    exits(t, r, 2, args.join(' '))
    t.throws(() => statSync(join(dir, 'bad')), 'no target directory left')
  }
})

t.test('ParallelsWriter: in_use while writing, records in any order, a size that is not whole sectors', async t => {
  const dir = tempDir(t)
  const size = 3 * 65536 + 1000
  const { data } = randomDisk(dir, 'src.raw', 64, size)
  const image = join(dir, 'w.hds')
  const writer = await ParallelsWriter.create(image, size, { clusterSize: 131072 })
  for (const c of [3, 1, 0, 2]) await writer.write(clusterFromBytes(1, c, data.subarray(c * 65536, Math.min(size, (c + 1) * 65536))))
  t.equal(readFileSync(image).readUInt32LE(44), 0x746f6e59, 'in_use is set while the image is written')
  await writer.finish()
  t.equal(readImage(image).inUse, 0x312e3276, 'and cleared once closed')
  await qemuCheck(t, image)
  // The image holds whole sectors (as qemu-img rounds up); the extra bytes read as zeros.
  const converted = join(dir, 'out.raw')
  exits(t, await run('qemu-img', ['convert', '-f', 'parallels', '-O', 'raw', image, converted]), 0)
  const got = readFileSync(converted)
  t.equal(got.length, Math.ceil(size / 512) * 512)
  t.ok(got.subarray(0, size).equals(data) && got.subarray(size).every(b => b === 0), 'contents equal')
  await t.rejects(ParallelsWriter.create(image, size), { code: 'E_IO' }, 'an existing file is never overwritten')
})

t.test('ParallelsWriter: a cluster past the device end is refused before it takes file space, over a base or not', async t => {
  const dir = tempDir(t)
  const size = 3 << 19 // 1.5 MiB: cluster 24 is past the end but inside the second 1 MiB image cluster
  const base = await RawImage.open(randomDisk(dir, 'base.raw', 65, size).path)
  t.teardown(async () => await base.close())
  for (const [name, options] of [['snapshot', { base }], ['plain', {}]] as const) {
    const image = join(dir, `${name}.hds`)
    const writer = await ParallelsWriter.create(image, size, options)
    t.throws(() => writer.write(clusterRecord(1, 24, 0, Buffer.alloc(0))), { code: 'E_RECORD' }, `${name}: an empty record past the end`)
    await writer.finish()
    t.equal(statSync(image).size, readImage(image).dataOff * 512, `${name}: no data cluster was allocated`)
    await qemuCheck(t, image)
  }
})
