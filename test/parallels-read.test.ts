import t, { type Test } from 'tap'
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, cmp, exits, q, run, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { Rng } from './helpers/random.js'
import { qemuCheck, qemuCompare, qemuImg, qemuSamples, randomDisk, toParallels } from './helpers/parallels.js'
import { ParallelsWriter } from '../lib/parallels/writer.js'
import { ParallelsImage } from '../lib/parallels/image.js'
import { clusterFromBytes } from '../lib/record.js'

const packCmd = `${q(process.execPath)} ${q(PACK_VMA)}`

/** Data bytes qemu-img map reports for an image. */
async function mappedBytes (image: string): Promise<number> {
  const r = await run('qemu-img', ['map', '--output=json', '-f', 'parallels', image])
  return (JSON.parse(r.stdout.toString()) as Array<{ length: number, data: boolean }>).filter(e => e.data).reduce((n, e) => n + e.length, 0)
}

/** Packs `image` from its path, from stdin and through vma create, and checks each extracts to `expected`. */
async function packsTo (t: Test, dir: string, image: string, expected: string): Promise<void> {
  const routes: Array<[string, string]> = [
    ['pack-vma PATH', `${packCmd} ${q(image)}`],
    ['cat | pack-vma', `cat ${q(image)} | ${packCmd}`],
    ['vma create -d format=parallels', `${vmaCmd} create - -d format=parallels:drive-scsi0=${q(image)}`],
  ]
  mkdirSync(dir, { recursive: true })
  for (const [i, [name, command]] of routes.entries()) {
    const out = join(dir, `out-${i}`)
    exits(t, await sh(`${command} | ${vmaCmd} extract - ${q(out)}`), 0, name)
    t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), expected), `${name}: the disk equals qemu-img convert -O raw`)
  }
}

t.test('images from qemu-img convert -O parallels and the QEMU samples pack to what qemu-img reads', async t => {
  const dir = tempDir(t)
  const raw = randomDisk(dir, 'src.raw', 71, 5 * 1048576 + 3 * 65536 + 4608).path
  const images: Array<[string, string]> = []
  for (const cluster of ['1M', '64K']) {
    const image = join(dir, `conv-${cluster}.hds`)
    await toParallels(t, raw, image, cluster)
    images.push([image, 'WithouFreSpacExt'])
  }
  images.push(...await qemuSamples(dir))
  for (const [i, [image, magic]] of images.entries()) {
    await t.test(image.slice(dir.length + 1), async t => {
      const expected = join(dir, `expected-${i}.raw`)
      await qemuImg(t, ['convert', '-f', 'parallels', '-O', 'raw', image, expected])
      await packsTo(t, join(dir, `case-${i}`), image, expected)
      const r = await vma(['info', image, '--json'])
      exits(t, r, 0)
      const info = JSON.parse(r.stdout.toString())
      t.equal(info.format, 'parallels')
      t.equal(info.details.magic, magic)
      t.equal(info.allocated, await mappedBytes(image), 'allocated bytes agree with qemu-img map')
      t.same(info.bitmaps, [])
    })
  }
})

t.test('an image whose clusters lie in the file out of guest order streams from stdin in file order', async t => {
  const dir = tempDir(t)
  const image = join(dir, 'scrambled.hds')
  await qemuImg(t, ['create', '-f', 'parallels', '-o', 'cluster_size=128K', image, '4M'])
  const writes = ['write -P 0x11 3M 128K', 'write -P 0x22 0 64K', 'write -P 0x33 1280K 300K', 'write -P 0x44 2M 4K', 'write -P 0 3968K 128K']
  exits(t, await run('qemu-io', ['-f', 'parallels', ...writes.flatMap(w => ['-c', w]), image]), 0, 'qemu-io writes')
  const expected = join(dir, 'expected.raw')
  await qemuImg(t, ['convert', '-f', 'parallels', '-O', 'raw', image, expected])
  await packsTo(t, dir, image, expected)
})

t.test('an image with clusters smaller than 64 KiB is copied from stdin first, and still packs right', async t => {
  const dir = tempDir(t)
  const raw = randomDisk(dir, 'src.raw', 72, 1048576 + 8192).path
  const image = join(dir, 'small.hds')
  await toParallels(t, raw, image, '4K')
  await packsTo(t, dir, image, raw)
})

t.test('dirty bitmaps: written where QEMU reads them, read back the same', async t => {
  const dir = tempDir(t)
  const size = 3 * 1048576 + 65536
  const { path: raw, data } = randomDisk(dir, 'src.raw', 73, size)
  const coarse = Buffer.alloc(7)
  coarse[0] = 0b10110001
  coarse[3] = 0xff
  coarse[6] = 0x01
  const fine = new Rng(74).fill(Buffer.alloc(Math.ceil(size / 4096 / 8)))
  const ids = ['6d3b29a4-5c15-4f0e-9a61-2f3c9d7e1b20', 'a1b2c3d4-0000-4000-8000-000000000001', 'a1b2c3d4-0000-4000-8000-000000000002']
  const bitmaps = [
    { id: ids[0], granularity: 65536, bits: coarse },
    { id: ids[1], granularity: 4096, bits: fine },
    { id: ids[2], granularity: 512, bits: Buffer.alloc(Math.ceil(size / 512 / 8), 0xff) },
  ]
  for (const clusterSize of [65536, 1048576]) {
    const image = join(dir, `bitmaps-${clusterSize}.hds`)
    const writer = await ParallelsWriter.create(image, size, { clusterSize, bitmaps })
    for (let c = 0; c * 65536 < size; c++) await writer.write(clusterFromBytes(1, c, data.subarray(c * 65536, (c + 1) * 65536)))
    await writer.finish()
    await qemuCheck(t, image)
    await qemuCompare(t, image, raw)
    const ours = await ParallelsImage.open(image)
    t.same(ours.bitmaps.map(b => [b.id, b.granularity]), bitmaps.map(b => [b.id, b.granularity]), 'every bitmap read back')
    for (const b of ours.bitmaps) {
      // qemu-nbd loads the bitmap from the image and serves it; nbdinfo reads it back.
      const r = await run('nbdinfo', [`--map=qemu:dirty-bitmap:${b.id}`, '--', '[', 'qemu-nbd', '-r', '-f', 'parallels', '-B', b.id, image, ']'])
      exits(t, r, 0, `qemu-nbd serves ${b.id}`)
      const theirs = r.stdout.toString().trim().split('\n').map(l => l.trim().split(/\s+/)).map(([offset, length, type]) => ({ offset: Number(offset), length: Number(length), dirty: type === '1' }))
      t.same(await b.map(0, size), theirs, `${b.id} at ${clusterSize}: our map equals QEMU's`)
      const expected = theirs.filter(e => e.dirty).reduce((n, e) => n + e.length, 0)
      t.equal(await b.dirtyBytes(), expected, 'dirty bytes')
    }
    t.same(await ours.bitmaps[0].map(65536, 5 * 65536), [
      { offset: 65536, length: 3 * 65536, dirty: false }, { offset: 4 * 65536, length: 2 * 65536, dirty: true },
    ], 'a map of part of the disk starts and ends where asked')
    await ours.close()
    const info = JSON.parse((await vma(['info', image, '--json'])).stdout.toString())
    t.same(info.bitmaps.map((b: { id: string }) => b.id), ids, 'vma info lists the bitmaps')
    t.equal(info.bitmaps[2].dirtyBytes, size, 'an all-set bitmap is all dirty')
  }
})

t.test('vma info on raw: the size, allocation unknown; usage errors', async t => {
  const dir = tempDir(t)
  const raw = join(dir, 'disk.raw')
  writeFileSync(raw, Buffer.alloc(100000, 1))
  const r = await vma(['info', raw, '--json'])
  exits(t, r, 0)
  const info = JSON.parse(r.stdout.toString())
  t.same([info.format, info.size, info.allocated], ['raw', 100000, undefined])
  t.match((await vma(['info', raw])).stdout.toString(), /allocated\s+unknown/)
  exits(t, await vma(['info', raw, '--format', 'qcow9']), 2, 'an unknown format')
  exits(t, await vma(['info']), 2, 'no image')
  exits(t, await vma(['info', join(dir, 'nothing')]), 3, 'a missing file')
})
