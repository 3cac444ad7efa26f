/**
 * The paths whose memory was capped: images read from a pipe (their chunks
 * given back as slabs), clusters put together in scratch slabs, and a disk
 * whose clusters come in reverse order written to stdout through the spill
 * file. Each must give the same bytes as before.
 */
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, have, q, sh, sha256, tempDir, vmaCmd } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'
import { type Slot, buildArchive } from './helpers/vma-builder.js'
import { CLUSTER_SIZE, clusterFromBytes, clusterRecord, expandCluster } from '../lib/record.js'
import { ReorderBuffer, expandLent } from '../lib/io/reorder.js'
import { giveBack } from '../lib/io/slabs.js'

const packCmd = `${q(process.execPath)} ${q(PACK_VMA)}`
/** Odd-sized writes into the pipe: chunks end anywhere, clusters straddle slabs. */
const feed = (path: string): string => `dd if=${q(path)} bs=50000 status=none`

t.test('expandCluster fills the holes with zeros in a dirty buffer, and expandLent gives the same bytes', async t => {
  const rng = new Rng(5)
  const size = 3 * CLUSTER_SIZE + 5000
  const disk = makeDisk(rng, size)
  disk.fill(0, 0, 4096)
  rng.fill(disk.subarray(4096, 8192))
  for (let c = 0; c * CLUSTER_SIZE < size; c++) {
    const rec = clusterFromBytes(1, c, disk.subarray(c * CLUSTER_SIZE, Math.min(size, (c + 1) * CLUSTER_SIZE)))
    const want = disk.subarray(c * CLUSTER_SIZE, Math.min(size, (c + 1) * CLUSTER_SIZE))
    t.ok(expandCluster(rec, size, Buffer.alloc(CLUSTER_SIZE, 0xee)).equals(want), `cluster ${c} in a dirty buffer`)
    t.ok(expandCluster(rec, size).equals(want), `cluster ${c} in a new one`)
    const lent = expandLent(rec, size)
    t.ok(lent.equals(want), `cluster ${c} lent`)
    giveBack(lent)
  }
})

t.test('ReorderBuffer: clusters put back to front, zeros and holes included, come back in order from memory and the spill file', async t => {
  const rng = new Rng(6)
  const size = 70 * CLUSTER_SIZE + 12288
  const disk = makeDisk(rng, size)
  const buf = new ReorderBuffer(size, { memoryLimit: 3 * CLUSTER_SIZE, tmpDir: tempDir(t) })
  const count = Math.ceil(size / CLUSTER_SIZE)
  for (let c = count - 1; c > 0; c--) {
    buf.put(clusterFromBytes(1, c, Buffer.from(disk.subarray(c * CLUSTER_SIZE, Math.min(size, (c + 1) * CLUSTER_SIZE)))))
  }
  t.ok(buf.spilledBytes > 0, 'some clusters went to the spill file')
  const out: Buffer[] = [disk.subarray(0, CLUSTER_SIZE)]
  for (let next = 1; next < count;) {
    t.ok(buf.has(next))
    const { bytes, clusters, release } = await buf.take(next)
    t.ok(clusters >= 1 && clusters <= 16)
    out.push(Buffer.from(bytes))
    release()
    next += clusters
  }
  t.notOk(buf.has(count - 1), 'nothing left')
  buf.close()
  t.equal(sha256(Buffer.concat(out)), sha256(disk))
  // A lone zero cluster (never written) reads back as zeros.
  const zeros = new ReorderBuffer(4 * CLUSTER_SIZE, { memoryLimit: 0, tmpDir: tempDir(t) })
  zeros.put(clusterRecord(1, 2, 0, Buffer.alloc(0)))
  zeros.put(clusterRecord(1, 1, 0xffff, Buffer.alloc(CLUSTER_SIZE, 3)))
  const back = await zeros.take(1)
  t.equal(back.clusters, 2)
  t.ok(back.bytes.equals(Buffer.concat([Buffer.alloc(CLUSTER_SIZE, 3), Buffer.alloc(CLUSTER_SIZE)])))
  back.release()
  zeros.close()
})

t.test('an archive through a pipe, clusters back to front, comes out in order on stdout (a file, a pipe, little memory)', async t => {
  const dir = tempDir(t)
  const rng = new Rng(7)
  const size = (20 << 20) + 12288
  const data = makeDisk(rng, size)
  const count = Math.ceil(size / CLUSTER_SIZE)
  // Mostly reversed, with a stretch in order in the middle (as a live backup mixes them).
  const order = Array.from({ length: count }, (_, i) => count - 1 - i)
  order.splice(100, 40, ...order.slice(100, 140).reverse())
  const extents: Slot[][] = []
  for (let i = 0; i < order.length; i += 59) extents.push(order.slice(i, i + 59).map(cluster => ({ dev: 1, cluster })))
  const archive = join(dir, 'rev.vma')
  writeFileSync(archive, buildArchive({ configs: [], devices: [{ id: 1, name: 'drive-scsi0', size, data }], extents }))
  const want = sha256(data)
  const out = join(dir, 'out.raw')
  for (const [what, script] of [
    ['to a file', `${feed(archive)} | ${vmaCmd} extract -q - - > ${q(out)}`],
    ['to a pipe', `${feed(archive)} | ${vmaCmd} extract -q - - | cat > ${q(out)}`],
    ['--memory 128K, spill in --tmpdir', `${feed(archive)} | ${vmaCmd} extract -q --memory 128K --tmpdir ${q(dir)} - - > ${q(out)}`],
  ]) {
    const r = await sh(script)
    t.equal(r.code, 0, `${what}: exits 0 ${r.stderr}`)
    t.equal(sha256(out), want, `${what}: the disk`)
  }
})

t.test('qcow2 and Parallels images through a pipe pack byte for byte', { skip: have('qemu-img') ? false : 'qemu-img not found' }, async t => {
  const dir = tempDir(t)
  const size = 12 << 20
  const disk = makeDisk(new Rng(8), size)
  const raw = join(dir, 'disk.raw')
  writeFileSync(raw, disk)
  const images: Array<[string, string]> = []
  const convert = (name: string, args: string[]): void => {
    const path = join(dir, name)
    t.equal(spawnSync('qemu-img', ['convert', '-f', 'raw', ...args, raw, path]).status, 0, `qemu-img makes ${name}`)
    images.push([name, path])
  }
  convert('default.qcow2', ['-O', 'qcow2'])
  // Clusters larger than a slab: every one is put together from several chunks.
  convert('2m.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=2M'])
  // Clusters smaller than a record: all of them wait in the spill file, each a loan of the write queue until written.
  convert('4k.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=4096'])
  convert('disk.hds', ['-O', 'parallels'])
  // vmapipe's own images: a qcow2 with its tables last (its data spilled while streaming), a Parallels image.
  const archive = join(dir, 'a.vma')
  t.equal((await sh(`${packCmd} -q ${q(raw)} > ${q(archive)}`)).code, 0)
  for (const format of ['qcow2', 'parallels']) {
    const target = join(dir, `own-${format}`)
    t.equal((await sh(`${vmaCmd} extract -q --format ${format} ${q(archive)} ${q(target)}`)).code, 0)
    const name = `disk-drive-scsi0.${format === 'qcow2' ? 'qcow2' : 'hds'}`
    images.push([`own ${name}`, join(target, name)])
  }
  const packed = join(dir, 'packed.vma')
  for (const [name, path] of images) {
    const r = await sh(`${feed(path)} | ${packCmd} -q - > ${q(packed)}`)
    t.equal(r.code, 0, `${name}: pack-vma - exits 0 ${r.stderr}`)
    const x = await sh(`${vmaCmd} extract -q ${q(packed)} -`)
    t.equal(x.code, 0, `${name}: extract exits 0`)
    t.equal(sha256(x.stdout), sha256(disk), `${name}: the disk`)
  }
})
