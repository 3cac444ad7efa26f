import t from 'tap'
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { PACK_VMA, cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { dataExtents, holesAddon } from '../lib/raw/holes.js'
import { RawImage } from '../lib/raw/index.js'
import { startServe } from './helpers/nbd.js'

const MIB = 1 << 20

/** A 64 MiB file with 1 MiB of random data at 8 MiB and 12 KiB at 40 MiB + 4 KiB; the rest holes. */
function sparseFile (dir: string): string {
  const path = join(dir, 'sparse.raw')
  const fd = openSync(path, 'w')
  ftruncateSync(fd, 64 * MIB)
  writeSync(fd, randomBytes(MIB), 0, MIB, 8 * MIB)
  writeSync(fd, randomBytes(12288), 0, 12288, 40 * MIB + 4096)
  closeSync(fd)
  return path
}

t.test('the addon was built by npm ci and finds the holes of a sparse file without reading them', async t => {
  t.ok(holesAddon(), 'vmapipe-holes loads (npm ci builds native/holes with node-gyp)')
  const path = sparseFile(tempDir(t))
  const fd = openSync(path, 'r')
  t.teardown(() => closeSync(fd))
  const all = await dataExtents(fd, 0, 64 * MIB)
  t.equal(all.reduce((n, e) => n + e.length, 0), 64 * MIB, 'the extents cover the range')
  for (let i = 1; i < all.length; i++) t.equal(all[i].offset, all[i - 1].offset + all[i - 1].length, `extent ${i} follows the one before`)
  const data = all.filter(e => e.data)
  // ext4 and xfs report data in whole file-system blocks; the data lies inside what is reported, and the holes are found.
  t.ok(data.some(e => e.offset <= 8 * MIB && e.offset + e.length >= 9 * MIB), '1 MiB at 8 MiB is data')
  t.ok(data.some(e => e.offset <= 40 * MIB + 4096 && e.offset + e.length >= 40 * MIB + 16384), '12 KiB at 40 MiB is data')
  t.ok(data.reduce((n, e) => n + e.length, 0) <= 4 * MIB, 'the holes are not called data')
  t.same(await dataExtents(fd, 16 * MIB, MIB), [{ offset: 16 * MIB, length: MIB, data: false }], 'a range inside a hole')
  t.same(await dataExtents(fd, 64 * MIB, MIB), [{ offset: 64 * MIB, length: MIB, data: false }], 'past the end of the file reads as a hole')
  t.same(await dataExtents(fd, 8 * MIB + 4096, 4096), [{ offset: 8 * MIB + 4096, length: 4096, data: true }], 'a range inside data')
  const image = await RawImage.open(path)
  t.teardown(async () => await image.close())
  t.same((await image.map(60 * MIB, 8 * MIB)).at(-1), { offset: 60 * MIB, length: 4 * MIB, data: false }, 'RawImage.map is clipped to the file')
})

t.test('a bad descriptor is an E_IO error, not a crash', async t => {
  await t.rejects(dataExtents(1 << 30, 0, 4096), { code: 'E_IO' })
})

t.test('pack-vma of a sparse file makes the same archive with and without the addon, and it extracts to the same bytes', async t => {
  const dir = tempDir(t)
  const path = sparseFile(dir)
  const fixed = ['--uuid', '8d2b1c1e-6a4f-4c3e-9d55-1f0f7c2a9e11', '--ctime', '1700000000', '-q']
  const withHoles = join(dir, 'holes.vma')
  const readAll = join(dir, 'read.vma')
  exits(t, await run(process.execPath, [PACK_VMA, path, '-o', withHoles, ...fixed]), 0, 'packed with the addon')
  exits(t, await run(process.execPath, [PACK_VMA, path, '-o', readAll, ...fixed], { env: { ...process.env, VMAPIPE_NO_HOLES: '1' } }), 0,
    'packed by reading every byte (the fallback)')
  t.ok(readFileSync(withHoles).equals(readFileSync(readAll)), 'the two archives are byte for byte the same')
  exits(t, await vma(['extract', withHoles, join(dir, 'out')]), 0)
  t.ok(cmp(join(dir, 'out', 'disk-drive-scsi0.raw'), path), 'the extracted disk is the sparse file')
})

t.test('with VMAPIPE_NO_HOLES=1 every byte is data (the fallback where the addon cannot load)', async t => {
  const path = sparseFile(tempDir(t))
  const script = `import { openSync } from 'node:fs'
import { dataExtents, holesAddon } from ${JSON.stringify(new URL('../lib/raw/holes.js', import.meta.url).href)}
const fd = openSync(${JSON.stringify(path)}, 'r')
console.log(JSON.stringify({ addon: holesAddon() !== null, extents: await dataExtents(fd, 0, ${64 * MIB}) }))`
  const r = await run(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, VMAPIPE_NO_HOLES: '1' } })
  exits(t, r, 0)
  t.same(JSON.parse(r.stdout.toString()), { addon: false, extents: [{ offset: 0, length: 64 * MIB, data: true }] })
})

t.test('a file of more ranges than one lookup returns (4096) is still mapped exactly', async t => {
  const path = join(tempDir(t), 'fragmented.raw')
  const fd = openSync(path, 'w')
  const ranges = 5000
  ftruncateSync(fd, 2 * ranges * 4096)
  const block = Buffer.alloc(4096, 7)
  for (let i = 0; i < ranges; i++) writeSync(fd, block, 0, 4096, 2 * i * 4096)
  closeSync(fd)
  const image = await RawImage.open(path)
  t.teardown(async () => await image.close())
  const extents = await image.map(0, image.size)
  const data = extents.filter(e => e.data)
  t.equal(data.length, ranges, 'every data block is its own range')
  t.ok(data.every((e, i) => e.offset === 2 * i * 4096 && e.length === 4096), 'each where it was written')
  t.equal(extents.length, 2 * ranges, 'with a hole after each')
  t.same(await image.map(4096 * 9999, 8192), [{ offset: 4096 * 9999, length: 4096, data: false }], 'a range at the end is clipped to the file')
})

t.test('vma serve of a sparse raw file reports its holes to an NBD client (base:allocation), and serves the same bytes', async t => {
  const dir = tempDir(t)
  const path = sparseFile(dir)
  const server = await startServe(t, [path, '--socket', join(dir, 'sock')])
  const r = await run('nbdinfo', ['--map', '--json', server.uri('sparse.raw')])
  exits(t, r, 0, 'nbdinfo --map')
  const map = JSON.parse(r.stdout.toString()) as Array<{ offset: number, length: number, type: number }>
  const holes = map.filter(e => (e.type & 1) === 1)
  t.ok(holes.some(e => e.offset <= 16 * MIB && e.offset + e.length >= 32 * MIB), 'the hole from 16 to 32 MiB is reported as one')
  t.ok(map.filter(e => (e.type & 1) === 0).reduce((n, e) => n + e.length, 0) <= 4 * MIB, 'no more than the data is called data')
  const copy = join(dir, 'copy.raw')
  exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri('sparse.raw'), copy]), 0, 'qemu-img convert from the export')
  t.ok(cmp(copy, path), 'the same bytes')
})
