import t, { type Test } from 'tap'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { XMLParser } from 'fast-xml-parser'
import { cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { qemuImg, randomDisk, toParallels } from './helpers/parallels.js'
import { ROOT_PARENT, TOP_GUID, addSnapshotImage, buildDescriptor, parseDescriptor } from '../lib/parallels/disk-descriptor.js'
import { ParallelsBundle } from '../lib/parallels/bundle.js'

const SIZE = 6 * 1048576 + 65536
const SECTORS = SIZE / 512

/** A descriptor as Parallels Desktop writes one, with elements the spec does not cover. */
const ROOT_XML = `<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>${SECTORS}</Disk_size>
        <Cylinders>${SECTORS / 16 / 8}</Cylinders>
        <Heads>16</Heads>
        <Sectors>8</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{00000000-0000-0000-0000-000000000000}</Engine>
            <Data></Data>
        </Encryption>
        <UID>{a6f8fd9e-b4d2-4e55-8d04-1d2a7c8e0a55}</UID>
        <Name>disk &amp; &lt;more&gt;</Name>
        <Miscellaneous Kind="vendor" Level="2">
            <CompatLevel>level2</CompatLevel>
            <Note><![CDATA[keep <this> & that]]></Note>
        </Miscellaneous>
    </Disk_Parameters>
    <!-- written by hand for the tests -->
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>${SECTORS}</End>
            <Blocksize>2048</Blocksize>
            <Vendor_Storage_Flag/>
            <Image>
                <GUID>${TOP_GUID}</GUID>
                <Type>Compressed</Type>
                <File>root.hds</File>
                <Image_Extra Id="7">x</Image_Extra>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>${TOP_GUID}</GUID>
            <ParentGUID>${ROOT_PARENT}</ParentGUID>
            <Shot_Extra>kept</Shot_Extra>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
`

const chainJson = (files: string[]): string => {
  let node: Record<string, unknown> | undefined
  for (const f of [...files].reverse()) {
    const format = f.endsWith('.raw') ? 'raw' : 'parallels'
    node = { driver: format, file: { driver: 'file', filename: f }, ...(node !== undefined ? { backing: node } : {}) }
  }
  return `json:${JSON.stringify(node)}`
}

/** An overlay on `below` (top first), written by qemu-io through the chain so its clusters hold whole copies. */
async function overlay (t: Test, path: string, below: string[], writes: string[]): Promise<void> {
  await qemuImg(t, ['create', '-f', 'parallels', '-o', 'cluster_size=1M', path, String(SIZE)])
  exits(t, await run('qemu-io', [...writes.flatMap(w => ['-c', w]), chainJson([path, ...below])]), 0, `qemu-io on ${path}`)
}

const loose = new XMLParser({ ignoreAttributes: false, parseTagValue: false, cdataPropName: '#cdata', commentPropName: '#comment' })

t.test('a root and two overlays pack to the merged disk; the descriptor keeps what the spec does not cover', async t => {
  const dir = tempDir(t)
  const bundle = join(dir, 'harddisk.hdd')
  mkdirSync(bundle)
  const root = join(bundle, 'root.hds')
  await toParallels(t, randomDisk(dir, 'base.raw', 81, SIZE).path, root)
  const one = join(bundle, 'one.hds')
  const two = join(bundle, 'two.hds')
  // The second overlay rewrites some of what the first wrote, and writes zeros over data: the top layer wins.
  await overlay(t, one, [root], ['write -P 0x11 100K 8K', 'write -P 0x22 3M 1M', 'write -P 0x33 5M 4K'])
  await overlay(t, two, [one, root], ['write -P 0x44 3M 64K', 'write -P 0 1M 1M', 'write -P 0x55 6M 64K'])
  const expected = join(dir, 'expected.raw')
  await qemuImg(t, ['convert', '-O', 'raw', chainJson([two, one, root]), expected])

  const xml = join(bundle, 'DiskDescriptor.xml')
  let text = addSnapshotImage(ROOT_XML, { guid: '{11111111-1111-4111-8111-111111111111}', type: 'Compressed', file: 'one.hds' }, xml)
  text = addSnapshotImage(text, { guid: '{22222222-2222-4222-8222-222222222222}', type: 'Compressed', file: 'two.hds' }, xml)
  writeFileSync(xml, text)

  // Round trip: everything of the original is there as it was, plus the two images, two shots and TopGUID.
  const before = loose.parse(ROOT_XML).Parallels_disk_image
  const after = loose.parse(text).Parallels_disk_image
  t.same(after.Disk_Parameters, before.Disk_Parameters, 'Disk_Parameters (with Encryption, UID, Name, Miscellaneous) unchanged')
  t.same(after['#comment'], before['#comment'], 'the comment kept')
  t.same(after.StorageData.Storage.Image[0], before.StorageData.Storage.Image, 'the root Image (with its extra element) unchanged')
  t.same(after.StorageData.Storage.Vendor_Storage_Flag, before.StorageData.Storage.Vendor_Storage_Flag, 'an empty unknown element kept')
  t.same(after.Snapshots.Shot[0], before.Snapshots.Shot, 'the root Shot unchanged')
  t.same(after.Snapshots.Shot.slice(1).map((s: { ParentGUID: string }) => s.ParentGUID), [TOP_GUID, '{11111111-1111-4111-8111-111111111111}'], 'each new Shot is a child of the old top')
  t.equal(after.Snapshots.TopGUID, '{22222222-2222-4222-8222-222222222222}')
  const blockOf = (s: string): string => s.slice(s.indexOf('<Disk_Parameters>'), s.indexOf('</Disk_Parameters>'))
  t.equal(blockOf(text), blockOf(ROOT_XML), 'Disk_Parameters byte for byte')
  t.ok(text.startsWith("<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image"), 'the prolog byte for byte')

  for (const path of [bundle, xml]) {
    const out = join(dir, `out-${path === bundle ? 'dir' : 'xml'}`)
    exits(t, await run('sh', ['-c', '"$0" "$1" create - -d drive-scsi0="$2" | "$0" "$1" extract - "$3"', process.execPath, join(process.cwd(), 'dist/bin/vma.js'), path, out]), 0, `pack ${path}`)
    t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), expected), `${path === bundle ? 'the directory' : 'its DiskDescriptor.xml'} packs to the merged disk`)
  }
  const info = JSON.parse((await vma(['info', bundle, '--json'])).stdout.toString())
  t.same([info.format, info.size, info.layers], ['parallels-bundle', SIZE, 3])

  const disk = await ParallelsBundle.open(bundle)
  t.same(disk.layers.map(l => l.file), ['two.hds', 'one.hds', 'root.hds'], 'layers from the top down')
  const map = await disk.map(0, SIZE)
  const depthAt = (offset: number): number | undefined => map.find(e => e.offset <= offset && offset < e.offset + e.length)?.depth
  t.same([depthAt(2 * 1048576), depthAt(100 * 1024), depthAt(1048576), depthAt(3 * 1048576), depthAt(5 * 1048576), depthAt(6 * 1048576)], [3, 2, 1, 1, 2, 1], 'allocation depth: the topmost layer holding each cluster')
  await disk.close()
})

t.test('a Plain root under an overlay named by absolute path; a descriptor built new parses to itself', async t => {
  const dir = tempDir(t)
  const bundle = join(dir, 'plain.hdd')
  mkdirSync(bundle)
  const root = randomDisk(bundle, 'root.raw', 82, SIZE).path
  const top = join(dir, 'elsewhere.hds')
  await overlay(t, top, [root], ['write -P 0x66 2M 640K'])
  const expected = join(dir, 'expected.raw')
  await qemuImg(t, ['convert', '-O', 'raw', chainJson([top, root]), expected])
  const d = {
    diskSize: SECTORS,
    cylinders: SECTORS / 16 / 8,
    heads: 16,
    sectorsPerTrack: 8,
    padding: 0,
    storages: [{ start: 0, end: SECTORS, blockSize: 2048, images: [{ guid: '{33333333-3333-4333-8333-333333333333}', type: 'Plain' as const, file: 'root.raw' }, { guid: '{44444444-4444-4444-8444-444444444444}', type: 'Compressed' as const, file: top }] }],
    topGuid: '{44444444-4444-4444-8444-444444444444}',
    shots: [{ guid: '{33333333-3333-4333-8333-333333333333}', parentGuid: ROOT_PARENT }, { guid: '{44444444-4444-4444-8444-444444444444}', parentGuid: '{33333333-3333-4333-8333-333333333333}' }],
  }
  const text = buildDescriptor(d)
  t.same(parseDescriptor(text, 'built'), d, 'parse(build(d)) is d')
  writeFileSync(join(bundle, 'DiskDescriptor.xml'), text)
  const archive = join(dir, 'a.vma')
  exits(t, await vma(['create', archive, '-d', `format=parallels-bundle:drive-scsi0=${bundle}`]), 0)
  exits(t, await vma(['extract', archive, join(dir, 'out')]), 0)
  t.ok(cmp(join(dir, 'out/disk-drive-scsi0.raw'), expected), 'the merged disk')
  const info = JSON.parse((await vma(['info', bundle, '--json'])).stdout.toString())
  t.equal(info.allocated, SIZE, 'a Plain root holds everything')
  exits(t, await run('sh', ['-c', '"$0" "$1" - < "$2" > /dev/null', process.execPath, join(process.cwd(), 'dist/bin/pack-vma.js'), join(bundle, 'DiskDescriptor.xml')]), 2, 'a descriptor from stdin is refused: its files are named by path')
  t.match(readFileSync(join(bundle, 'DiskDescriptor.xml'), 'utf8'), /<TopGUID>/)
})
