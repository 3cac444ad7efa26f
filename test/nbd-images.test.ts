/**
 * vma serve of images with layers and dirty bitmaps (acceptance 2 of the NBD
 * issue): a Parallels image's bitmaps as qemu:dirty-bitmap:<id>, the layers
 * of a .hdd bundle and of a qcow2 backing chain as qemu:allocation-depth,
 * checked with nbdinfo and against qemu-nbd serving the same images.
 */
import t, { type Test } from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir, vma } from './helpers/run.js'
import { startQemuNbd, startServe } from './helpers/nbd.js'
import { Rng } from './helpers/random.js'
import { ParallelsWriter } from '../lib/parallels/writer.js'
import { ParallelsBundle } from '../lib/parallels/bundle.js'
import { addSnapshotImage } from '../lib/parallels/disk-descriptor.js'
import { clusterFromBytes } from '../lib/record.js'

const KiB = 1024
const MiB = 1024 * KiB

interface Mapped { offset: number, length: number, type: number }

async function nbdMap (t: Test, uri: string, context: string): Promise<Mapped[]> {
  const r = await run('nbdinfo', [`--map=${context}`, '--json', uri])
  exits(t, r, 0, `nbdinfo --map=${context}`)
  return (JSON.parse(r.stdout.toString()) as Mapped[]).map(({ offset, length, type }) => ({ offset, length, type }))
}

t.test('a Parallels image with dirty bitmaps: qemu:dirty-bitmap:<id> as the image says, as qemu-nbd serves it', async t => {
  const dir = tempDir(t)
  const size = 4 * MiB
  const data = new Rng(81).fill(Buffer.alloc(size))
  const bits = Buffer.alloc(size / 65536 / 8)
  bits[0] = 0b00100110 // clusters 1, 2 and 5
  bits[5] = 0xf0 // clusters 44..47
  const id = '0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0'
  const image = join(dir, 'disk.hds')
  const writer = await ParallelsWriter.create(image, size, { bitmaps: [{ id, granularity: 65536, bits }] })
  for (let c = 0; c * 65536 < size; c++) await writer.write(clusterFromBytes(1, c, data.subarray(c * 65536, (c + 1) * 65536)))
  await writer.finish()
  const served = await startServe(t, ['--socket', join(dir, 'ours'), image])
  const ours = await nbdMap(t, served.uri('disk.hds'), `qemu:dirty-bitmap:${id}`)
  t.same(ours.filter(e => e.type === 1).map(e => [e.offset / 65536, e.length / 65536]), [[1, 2], [5, 1], [44, 4]], 'the dirty clusters, exactly')
  await startQemuNbd(t, { socket: join(dir, 'theirs') }, ['-r', '-f', 'parallels', '-B', id, image])
  t.same(ours, await nbdMap(t, `nbd+unix:///?socket=${join(dir, 'theirs')}`, `qemu:dirty-bitmap:${id}`), 'the same map qemu-nbd gives')
  const list = await run('nbdinfo', ['--list', '--json', served.uri()])
  t.match(list.stdout.toString(), `qemu:dirty-bitmap:${id}`, 'the context is listed')
})

t.test('a .hdd bundle with two overlays: qemu:allocation-depth gives each range its layer', async t => {
  const dir = tempDir(t)
  const size = 8 * MiB
  const rng = new Rng(82)
  const disk = Buffer.alloc(size)
  rng.fill(disk.subarray(0, 3 * MiB)) // the root holds the first 3 MiB
  const src = join(dir, 'root.raw')
  writeFileSync(src, disk)
  exits(t, await vma(['create', join(dir, 'root.vma'), '-d', `drive-scsi0=${src}`]), 0)
  exits(t, await vma(['extract', join(dir, 'root.vma'), join(dir, 'out'), '--format', 'parallels-bundle']), 0)
  const bundle = join(dir, 'out', 'disk-drive-scsi0.hdd')
  // Overlay 1 writes clusters 8..11 (over root data) and 64..67 (over a hole); overlay 2 writes 10..11 and 100.
  for (const [n, clusters] of [[1, [8, 9, 10, 11, 64, 65, 66, 67]], [2, [10, 11, 100]]] as Array<[number, number[]]>) {
    const base = await ParallelsBundle.open(bundle)
    const file = `disk-drive-scsi0.hdd.${n}.hds`
    const writer = await ParallelsWriter.create(join(bundle, file), size, { clusterSize: 65536 * 16, base })
    for (const c of clusters) await writer.write(clusterFromBytes(1, c, Buffer.alloc(65536, 0x10 + n)))
    await writer.finish()
    await base.close()
    const xml = join(bundle, 'DiskDescriptor.xml')
    writeFileSync(xml, addSnapshotImage(readFileSync(xml, 'utf8'), { guid: `{00000000-0000-4000-8000-00000000000${n}}`, type: 'Compressed', file }, xml))
  }
  const served = await startServe(t, ['--socket', join(dir, 'sock'), '--name', 'layers', bundle])
  const depth = await nbdMap(t, served.uri('layers'), 'qemu:allocation-depth')
  const at = (cluster: number): number => (depth.find(e => e.offset <= cluster * 65536 && cluster * 65536 < e.offset + e.length) as Mapped).type
  // Overlays are written per 1 MiB image cluster: overlay 2's cluster 0..15 copy holds 10..11, its 96..111 holds 100.
  t.equal(at(10), 1, 'the top overlay')
  t.equal(at(0), 1, 'the rest of a top-overlay cluster was copied up into it')
  t.equal(at(64), 2, 'the first overlay')
  t.equal(at(40), 3, 'the root')
  t.equal(at(120), 0, 'nothing anywhere')
  t.equal(at(100), 1)
  const allocation = await nbdMap(t, served.uri('layers'), 'base:allocation')
  t.equal(allocation.find(e => e.offset <= 120 * 65536 && 120 * 65536 < e.offset + e.length)?.type, 3, 'holes are holes in base:allocation too')
})

t.test('a qcow2 backing chain: the same depths as qemu-nbd -A gives', async t => {
  const dir = tempDir(t)
  const steps = [
    ['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'],
    ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'],
    ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'],
  ]
  for (const s of steps) exits(t, await run('sh', ['-c', `cd '${dir}' && qemu-img ${s.join(' ')}`]), 0)
  const io = async (image: string, writes: string[]): Promise<void> => {
    exits(t, await run('qemu-io', ['-f', 'qcow2', ...writes.flatMap(w => ['-c', w]), join(dir, image)]), 0, `qemu-io ${image}`)
  }
  await io('base.qcow2', ['write -q -P 1 0 2M'])
  await io('mid.qcow2', ['write -q -P 2 1M 512k', 'write -q -P 2 3M 64k'])
  await io('top.qcow2', ['write -q -P 3 1M 64k', 'write -q -z 1536k 64k'])
  const served = await startServe(t, ['--socket', join(dir, 'ours'), join(dir, 'top.qcow2')])
  await startQemuNbd(t, { socket: join(dir, 'theirs') }, ['-r', '-A', '-f', 'qcow2', join(dir, 'top.qcow2')])
  const ours = await nbdMap(t, served.uri('top.qcow2'), 'qemu:allocation-depth')
  t.same(ours, await nbdMap(t, `nbd+unix:///?socket=${join(dir, 'theirs')}`, 'qemu:allocation-depth'), 'the depth map equals qemu-nbd\'s')
  t.ok(new Set(ours.map(e => e.type)).size === 4, 'depths 0 to 3 all appear')
})
