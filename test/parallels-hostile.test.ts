import t, { type Test } from 'tap'
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { createHash } from 'node:crypto'
import { join } from 'node:path'
import { type RunResult, PACK_VMA, exits, run, tempDir, vma } from './helpers/run.js'
import { qemuSamples, randomDisk, toParallels } from './helpers/parallels.js'
import { ParallelsWriter } from '../lib/parallels/writer.js'
import { clusterFromBytes } from '../lib/record.js'
import { encodeHeader, geometry, parseHeader } from '../lib/parallels/format.js'

/** The error vmapipe logged: its code and message. */
function failure (r: RunResult): { code?: string, msg?: string } {
  const lines = r.stderr.trim().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as { level: number, code?: string, msg?: string })
  return lines.find(l => l.level >= 50) ?? {}
}

async function refused (t: Test, args: string[], code: string, mention: RegExp, options: Parameters<typeof run>[2] = {}): Promise<void> {
  const r = await run(process.execPath, args, options)
  exits(t, r, 1, `exit 1 for ${code}`)
  const f = failure(r)
  t.equal(f.code, code)
  t.match(f.msg, mention, `the message says what and where: ${f.msg}`)
  t.notMatch(r.stderr, /at .*\.js:\d+/, 'no stack trace')
}

const VMA_JS = join(process.cwd(), 'dist/bin/vma.js')
const info = (path: string): string[] => [VMA_JS, 'info', path]
const pack = (path: string): string[] => [PACK_VMA, path, '-o', '/dev/null', '--force']
const packStdin = [PACK_VMA, '-', '-o', '/dev/null', '--force']

t.test('hostile .hds images are refused with a clear error, from a path and from stdin', async t => {
  const dir = tempDir(t)
  const good = join(dir, 'good.hds')
  await toParallels(t, randomDisk(dir, 'src.raw', 91, 1048576).path, good, '64K')
  const base = readFileSync(good)
  const [[v1]] = await qemuSamples(dir)
  const old = readFileSync(v1)
  const edit = (bytes: Buffer, change: (b: Buffer) => void): Buffer => { const b = Buffer.from(bytes); change(b); return b }
  const cases: Array<{ name: string, code: string, mention: RegExp, bytes: Buffer, stdin?: boolean }> = [
    { name: 'a BAT entry past the end of the file', code: 'E_PARALLELS_BAT', mention: /BAT entry 3 points to byte 65536000, past the end of the file.*byte offset 76/, bytes: edit(base, b => b.writeUInt32LE(1000, 64 + 12)), stdin: true },
    { name: 'a duplicated BAT entry', code: 'E_PARALLELS_BAT', mention: /BAT entry 5 .* entry 4 uses already/, bytes: edit(base, b => b.writeUInt32LE(b.readUInt32LE(64 + 16), 64 + 20)), stdin: true },
    { name: 'an unaligned BAT entry (sector offsets)', code: 'E_PARALLELS_BAT', mention: /BAT entry 0 .*not on a cluster boundary/, bytes: edit(old, b => b.writeUInt32LE(b.readUInt32LE(64) + 1, 64)), stdin: true },
    { name: 'a BAT entry inside the header', code: 'E_PARALLELS_BAT', mention: /BAT entry 0 points to byte 512, before the data area/, bytes: edit(old, b => b.writeUInt32LE(1, 64)) },
    { name: 'data_off inside the BAT', code: 'E_PARALLELS_HEADER', mention: /data_off points to byte 512, inside the BAT/, bytes: edit(old, b => { b.writeUInt32LE(200, 32); b.writeUInt32LE(1, 48) }), stdin: true },
    { name: 'data_off of 0 with the new magic', code: 'E_PARALLELS_HEADER', mention: /data_off is 0/, bytes: edit(base, b => b.writeUInt32LE(0, 48)) },
    { name: 'an image left in use', code: 'E_PARALLELS_HEADER', mention: /marked in use/, bytes: edit(base, b => b.writeUInt32LE(0x746f6e59, 44)), stdin: true },
    { name: 'an unknown in_use value', code: 'E_PARALLELS_HEADER', mention: /in_use is 0x12345678/, bytes: edit(base, b => b.writeUInt32LE(0x12345678, 44)) },
    { name: 'four billion BAT entries', code: 'E_PARALLELS_HEADER', mention: /bat_entries 4294967295/, bytes: edit(base, b => b.writeUInt32LE(0xffffffff, 32)), stdin: true },
    { name: 'a zero cluster size', code: 'E_PARALLELS_HEADER', mention: /cluster size \(tracks\) is 0/, bytes: edit(base, b => b.writeUInt32LE(0, 28)) },
    { name: 'version 3', code: 'E_PARALLELS_HEADER', mention: /version 3/, bytes: edit(base, b => b.writeUInt32LE(3, 16)) },
    { name: 'high nb_sectors bits with the old magic', code: 'E_PARALLELS_HEADER', mention: /high 32 bits/, bytes: edit(old, b => b.writeUInt32LE(1, 40)) },
    { name: 'ext_off past the end', code: 'E_PARALLELS_EXTENSION', mention: /ext_off points to byte .* past the end of the file/, bytes: edit(base, b => b.writeBigUInt64LE(128000n, 56)) },
    { name: 'ext_off on a data cluster', code: 'E_PARALLELS_EXTENSION', mention: /ext_off points to byte 131072, a cluster used already/, bytes: edit(base, b => b.writeBigUInt64LE(256n, 56)) },
    { name: 'an image cut inside its BAT', code: 'E_PARALLELS_HEADER', mention: /BAT .*ends at byte 128, past the end of the file \(100 bytes\)/, bytes: base.subarray(0, 100) },
    { name: 'an image cut short of its last cluster', code: 'E_PARALLELS_BAT', mention: /past the end of the (file|input)/, bytes: base.subarray(0, base.length - 4096), stdin: true },
  ]
  for (const c of cases) {
    await t.test(c.name, async t => {
      const path = join(dir, `${c.name.replace(/\W+/g, '-')}.hds`)
      writeFileSync(path, c.bytes)
      await refused(t, info(path), c.code, c.mention)
      await refused(t, pack(path), c.code, /./)
      if (c.stdin === true) await refused(t, packStdin, c.code, /stdin/, { stdin: { file: path } })
    })
  }
})

t.test('a Format Extension with a wrong MD5 or an unknown NECESSARY feature is refused; an unknown optional one ignored', async t => {
  const dir = tempDir(t)
  const size = 1048576
  const { data } = randomDisk(dir, 'src.raw', 92, size)
  const path = join(dir, 'bitmap.hds')
  const writer = await ParallelsWriter.create(path, size, { clusterSize: 65536, bitmaps: [{ id: '01234567-89ab-4def-8123-456789abcdef', granularity: 65536, bits: Buffer.from([0x5a, 0x0f]) }] })
  for (let c = 0; c < 16; c++) await writer.write(clusterFromBytes(1, c, data.subarray(c * 65536, (c + 1) * 65536)))
  await writer.finish()
  const good = readFileSync(path)
  const extAt = Number(good.readBigUInt64LE(56)) * 512
  t.ok(extAt > 0, 'the image has a Format Extension')
  const withFeature = (magic: bigint, flags: bigint): Buffer => {
    const b = Buffer.from(good)
    const ext = b.subarray(extAt, extAt + 65536)
    ext.fill(0, 24)
    ext.writeBigUInt64LE(magic, 24)
    ext.writeBigUInt64LE(flags, 32)
    ext.writeUInt32LE(8, 40)
    createHash('md5').update(ext.subarray(24)).digest().copy(ext, 8)
    return b
  }
  const cases: Array<[string, Buffer, RegExp]> = [
    ['wrong MD5', (() => { const b = Buffer.from(good); b[extAt + 100] ^= 1; return b })(), /checksum \(MD5 from byte 24\) does not match.*byte offset 65544/],
    ['wrong magic', (() => { const b = Buffer.from(good); b[extAt] ^= 1; return b })(), /Format Extension magic is 0x/],
    ['unknown NECESSARY feature', withFeature(0x1122334455667788n, 1n), /unknown Format Extension feature 0x1122334455667788 is marked NECESSARY/],
    ['a bitmap L1 entry on a data cluster', (() => {
      const b = Buffer.from(good)
      const ext = b.subarray(extAt, extAt + 65536)
      ext.writeUInt32LE(1, 24 + 8) // NECESSARY, so the bad bitmap refuses the image rather than being dropped
      ext.writeBigUInt64LE(BigInt(b.readUInt32LE(64) * 65536 / 512), 24 + 24 + 32)
      createHash('md5').update(ext.subarray(24)).digest().copy(ext, 8)
      return b
    })(), /L1 entry 0 of dirty bitmap 01234567-89ab-4def-8123-456789abcdef points to byte \d+, a cluster used already/],
  ]
  for (const [name, bytes, mention] of cases) {
    const bad = join(dir, `${name.replace(/\W+/g, '-')}.hds`)
    writeFileSync(bad, bytes)
    await refused(t, info(bad), 'E_PARALLELS_EXTENSION', mention)
  }
  const optional = join(dir, 'optional.hds')
  writeFileSync(optional, withFeature(0x1122334455667788n, 2n))
  const r = await vma(['info', optional, '--json'])
  exits(t, r, 0, 'an unknown TRANSIT feature does not stop reading')
  const described = JSON.parse(r.stdout.toString())
  t.same(described.bitmaps, [])
  t.match(described.details['feature 0x1122334455667788'], /unknown, kept/)
  exits(t, await run(process.execPath, pack(optional)), 0)
})

t.test('hostile DiskDescriptor.xml files are refused with a clear error', async t => {
  const dir = tempDir(t)
  const outside = join(dir, 'outside.hds')
  await toParallels(t, randomDisk(dir, 'src.raw', 93, 1048576).path, outside, '64K')
  const A = '{aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa}'
  const B = '{bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb}'
  const C = '{cccccccc-cccc-4ccc-8ccc-cccccccccccc}'
  const Z = '{00000000-0000-0000-0000-000000000000}'
  const image = (guid: string, file = 'root.hds', type = 'Compressed'): string => `<Image><GUID>${guid}</GUID><Type>${type}</Type><File>${file}</File></Image>`
  const shot = (guid: string, parent: string): string => `<Shot><GUID>${guid}</GUID><ParentGUID>${parent}</ParentGUID></Shot>`
  const storage = (images: string): string => `<Storage><Start>0</Start><End>2048</End><Blocksize>128</Blocksize>${images}</Storage>`
  const descriptor = (o: { prolog?: string, padding?: number, storages?: string, snapshots?: string, version?: string, name?: string } = {}): string =>
    `<?xml version="1.0"?>${o.prolog ?? ''}<Parallels_disk_image Version="${o.version ?? '1.0'}"><Disk_Parameters><Disk_size>2048</Disk_size><Cylinders>4</Cylinders><Heads>16</Heads><Sectors>32</Sectors><Padding>${o.padding ?? 0}</Padding>${o.name ?? ''}</Disk_Parameters>` +
    `<StorageData>${o.storages ?? storage(image(A))}</StorageData><Snapshots>${o.snapshots ?? `<TopGUID>${A}</TopGUID>${shot(A, Z)}`}</Snapshots></Parallels_disk_image>`
  const cases: Array<[string, string, RegExp]> = [
    ['a DOCTYPE', descriptor({ prolog: '<!DOCTYPE Parallels_disk_image [<!ENTITY big "aaaaaaaaaa">]>' }), /DOCTYPE is not allowed/],
    ['an entity declaration', descriptor({ prolog: '<!ENTITY big "x">' }), /entity declarations are not allowed/],
    ['an entity reference', descriptor({ name: '<Name>&big;</Name>' }), /entity reference &big; is not allowed/],
    ['malformed XML', descriptor().replace('</Snapshots>', ''), /not well-formed XML at line 1/],
    ['Version 2.0', descriptor({ version: '2.0' }), /Version is "2.0"/],
    ['a File that climbs out', descriptor({ storages: storage(image(A, '../outside.hds')) }), /File \.\.\/outside\.hds climbs out of the bundle/],
    ['a File that leaves through a symbolic link', descriptor({ storages: storage(image(A, 'link.hds')) }), /File link\.hds leads out of the bundle through a symbolic link/],
    ['a snapshot loop', descriptor({ storages: storage(image(A) + image(B, 'b.hds') + image(C, 'c.hds')), snapshots: `<TopGUID>${A}</TopGUID>${shot(A, B)}${shot(B, A)}${shot(C, Z)}` }), /snapshots loop back to \{aaaaaaaa/],
    ['two roots', descriptor({ storages: storage(image(A) + image(B, 'b.hds')), snapshots: `<TopGUID>${A}</TopGUID>${shot(A, Z)}${shot(B, Z)}` }), /2 root snapshots/],
    ['a missing parent', descriptor({ snapshots: `<TopGUID>${A}</TopGUID>${shot(A, B)}${shot(C, Z)}`, storages: storage(image(A) + image(C, 'c.hds')) }), /names parent \{bbbbbbbb.*which has no Shot/],
    ['no top snapshot', descriptor({ snapshots: shot(A, Z) }), /no top snapshot/],
    ['a snapshot without an image', descriptor({ storages: storage(image(B)) }), /snapshot \{aaaaaaaa.* has no Image/],
    ['a Plain overlay', descriptor({ storages: storage(image(A, 'root.hds', 'Plain') + image(B)), snapshots: `<TopGUID>${A}</TopGUID>${shot(A, B)}${shot(B, Z)}` }), /overlays must be expandable/],
    ['Padding 1', descriptor({ padding: 1 }), /Padding is 1/],
    ['split storages', descriptor({ storages: storage(image(A)) + storage(image(B)) }), /2 storages: split images are not supported/],
    ['a Blocksize that is not the image cluster size', descriptor({ storages: storage(image(A)).replace('<Blocksize>128', '<Blocksize>2048') }), /clusters of 128 sectors, the Storage's Blocksize is 2048/],
    ['a Disk_size that is not the image size', descriptor().replace(/2048<\/(Disk_size|End)>/g, '4096</$1>'), /holds 1048576 bytes, the disk is 2097152/],
  ]
  for (const [i, [name, xml, mention]] of cases.entries()) {
    await t.test(name, async t => {
      const bundle = join(dir, `case-${i}.hdd`)
      mkdirSync(bundle)
      writeFileSync(join(bundle, 'root.hds'), readFileSync(outside))
      symlinkSync(outside, join(bundle, 'link.hds'))
      writeFileSync(join(bundle, 'DiskDescriptor.xml'), xml)
      await refused(t, info(bundle), 'E_PARALLELS_XML', new RegExp(`DiskDescriptor\\.xml: .*${mention.source}`))
      await refused(t, pack(join(bundle, 'DiskDescriptor.xml')), 'E_PARALLELS_XML', mention)
    })
  }
})

t.test('format.ts: the header round-trips; geometry multiplies out to the size', async t => {
  const h = { magic: 'WithouFreSpacExt' as const, heads: 16, cylinders: 5, tracks: 2048, batEntries: 3, sectors: 5000, inUse: 0x312e3276, dataOff: 2048, flags: 0, extOff: 0 }
  t.same(parseHeader(Buffer.concat([encodeHeader(h), Buffer.alloc(1 << 20)]), 'x'), h)
  for (const sectors of [1, 7, 2048, 9766, 12416, 20971520, 2 ** 31 - 1]) {
    const g = geometry(sectors)
    t.equal(g.cylinders * g.heads * g.sectorsPerTrack, sectors, `${sectors} sectors: ${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`)
  }
})
