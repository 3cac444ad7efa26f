import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { join } from 'node:path'
import { SLAB_SIZE, giveBack, inSlab, lend, slabSource, takeSlab } from '../lib/io/slabs.js'
import { VmaReader } from '../lib/vma/stream.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { ByteQueue } from '../lib/util/byte-queue.js'
import { WriteQueue } from '../lib/io/write-queue.js'
import { readFile, open, writeFile } from 'node:fs/promises'
import { VMA, tempDir } from './helpers/run.js'
import { Rng } from './helpers/random.js'
import { type Slot, buildArchive } from './helpers/vma-builder.js'

/** Takes every free slab (kept, so that a slab given back lands in an empty free list); give them back with release(). */
function drainFree (): { slabs: Buffer[], release: () => void } {
  const slabs: Buffer[] = []
  for (let s = takeSlab(true); s !== undefined; s = takeSlab(true)) slabs.push(s)
  return { slabs, release: () => { for (const s of slabs) giveBack(s) } }
}

t.test('a slab is reused only once every loan of it is back, and pieces or strangers given back change nothing', async t => {
  const before = drainFree()
  const slab = takeSlab() as Buffer
  t.equal(slab.length, SLAB_SIZE)
  const loan = lend(slab.subarray(100, 200))
  t.equal(loan.buffer, slab.buffer, 'a loan is a view of the slab')
  giveBack(slab)
  giveBack(loan.subarray(0, 10))
  giveBack(Buffer.alloc(10))
  const early = drainFree()
  t.same(early.slabs, [], 'not free while the loan is out')
  giveBack(loan)
  giveBack(loan)
  const late = drainFree()
  t.same(late.slabs.map(s => s.buffer), [slab.buffer], 'free once the loan is back, and once only')
  late.release()
  before.release()
  t.equal(lend(Buffer.from('x')).toString(), 'x', 'a buffer of no slab is lent as it is')
})

t.test('slabSource makes at most maxNew slabs and then says undefined while none is free', async t => {
  const before = drainFree()
  const source = slabSource(2)
  const a = source() as Buffer
  const b = source() as Buffer
  t.ok(a !== undefined && b !== undefined)
  t.equal(source(), undefined, 'no third new slab')
  giveBack(a)
  t.equal((source() as Buffer).buffer, a.buffer, 'a free slab is still taken')
  giveBack(b)
  before.release()
})

t.test('a ByteQueue with done joins adjacent chunks of one slab and gives each back once consumed', async t => {
  const slab = takeSlab() as Buffer
  slab.fill(7, 0, 300)
  const back: Buffer[] = []
  const q = new ByteQueue({ done: c => back.push(c) })
  const c1 = slab.subarray(0, 100)
  const c2 = slab.subarray(100, 300)
  q.push(c1)
  q.push(c2)
  const piece = q.peek(150) as Buffer
  t.equal(piece.buffer, slab.buffer, 'the piece across both chunks is not a copy')
  q.skip(150)
  t.same(back, [], 'nothing given back while bytes are left')
  q.skip(150)
  t.same(back, [c1, c2], 'both pushed chunks given back, once each')
  giveBack(slab)
})

t.test('a record that straddles two slabs is put together in scratch slab memory, not a buffer of its own, with the same bytes', async t => {
  const size = 4 << 20
  const data = new Rng(5).fill(Buffer.alloc(size))
  const order = Array.from({ length: size / 65536 }, (_, i) => i)
  const extents: Slot[][] = []
  for (let i = 0; i < order.length; i += 59) extents.push(order.slice(i, i + 59).map(cluster => ({ dev: 1, cluster })))
  const archive = buildArchive({ configs: [], devices: [{ id: 1, name: 'drive-scsi0', size, data }], extents })
  const reader = new VmaReader()
  const records: ClusterRecord[] = []
  reader.on('data', (item: { kind: string }) => { if (item.kind === 'cluster') records.push(item as ClusterRecord) })
  // Each slab-sized piece of the archive in a slab of its own, as a pipe's reads are: records cross every boundary.
  for (let at = 0; at < archive.length; at += SLAB_SIZE) {
    const slab = takeSlab() as Buffer
    const n = archive.copy(slab, 0, at, at + SLAB_SIZE)
    reader.write(lend(slab.subarray(0, n)))
    giveBack(slab)
  }
  reader.end()
  await new Promise(resolve => reader.on('end', resolve))
  t.equal(records.length, order.length)
  t.ok(records.every(r => inSlab(r.data)), 'the data of every record lies in a slab')
  t.ok(records.every(r => r.data.equals(data.subarray(r.cluster * 65536, (r.cluster + 1) * 65536))), 'bytes as written')
  for (const r of records) giveBack(r.data)
})

t.test('the write queue keeps its own loan until the write is done', async t => {
  const dir = tempDir(t)
  const path = join(dir, 'out')
  const file = await open(path, 'w')
  const slab = takeSlab() as Buffer
  new Rng(3).fill(slab)
  const expected = Buffer.from(slab.subarray(0, 65536))
  const queue = new WriteQueue()
  const rec = lend(slab.subarray(0, 65536))
  await queue.write(file.fd, rec, 0, 'test')
  giveBack(rec)
  giveBack(slab)
  const before = drainFree()
  t.same(before.slabs.filter(s => s.buffer === slab.buffer), [], 'not free while queued')
  await queue.drain()
  const after = drainFree()
  t.same(after.slabs.map(s => s.buffer), [slab.buffer], 'free once written')
  after.release()
  before.release()
  await file.close()
  t.ok((await readFile(path)).equals(expected), 'the bytes written are the bytes lent')
})

t.test('an archive through a pipe extracts byte for byte with reused slabs (a directory, stdout, verify, qcow2, Parallels)', async t => {
  const dir = tempDir(t)
  const rng = new Rng(11)
  const size = 24 << 20
  const data = rng.fill(Buffer.alloc(size))
  data.fill(0, 3 << 20, 5 << 20)
  // The second half first: early clusters wait in the reorder buffer (in memory, then spilled) for stdout.
  const order = [...Array.from({ length: 192 }, (_, i) => 192 + i), ...Array.from({ length: 192 }, (_, i) => i)]
  const extents: Slot[][] = []
  for (let i = 0; i < order.length; i += 59) extents.push(order.slice(i, i + 59).map(cluster => ({ dev: 1, cluster })))
  const archive = buildArchive({ configs: [], devices: [{ id: 1, name: 'drive-scsi0', size, data }], extents })
  const run = async (args: string[]): Promise<{ code: number | null, out: Buffer }> => await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [VMA, ...args], { stdio: ['pipe', 'pipe', 'inherit'] })
    const out: Buffer[] = []
    child.stdout.on('data', (b: Buffer) => out.push(b))
    child.on('error', reject)
    child.on('close', code => resolve({ code, out: Buffer.concat(out) }))
    // Small writes: many reads per slab, clusters across slabs.
    let at = 0
    const feed = (): void => {
      while (at < archive.length) {
        const piece = archive.subarray(at, at + 50000)
        at += piece.length
        if (!child.stdin.write(piece)) { child.stdin.once('drain', feed); return }
      }
      child.stdin.end()
    }
    feed()
  })
  const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')
  const target = join(dir, 'x')
  t.equal((await run(['extract', '-q', '-', target])).code, 0)
  t.equal(sha(await readFile(join(target, 'disk-drive-scsi0.raw'))), sha(data), 'directory')
  const streamed = await run(['extract', '-q', '-'])
  t.equal(streamed.code, 0)
  t.equal(sha(streamed.out), sha(data), 'stdout')
  t.equal((await run(['verify', '-q', '-'])).code, 0, 'verify')
  const raw = join(dir, 'disk.raw')
  await writeFile(raw, data)
  for (const [format, file] of [['qcow2', 'disk-drive-scsi0.qcow2'], ['parallels', 'disk-drive-scsi0.hds']]) {
    const out = join(dir, format)
    t.equal((await run(['extract', '-q', '--format', format, '-', out])).code, 0)
    t.equal(spawnSync('qemu-img', ['compare', '-q', '-f', format, '-F', 'raw', join(out, file), raw]).status, 0, `${format}: qemu-img compare`)
  }
})
