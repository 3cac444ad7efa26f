import t from 'tap'
import fs from 'node:fs'
import { syncBuiltinESMExports } from 'node:module'
import { join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { tempDir } from './helpers/run.js'
import { ByteQueue } from '../lib/util/byte-queue.js'
import { ClusterSet } from '../lib/util/cluster-set.js'
import { WriteQueue } from '../lib/io/write-queue.js'
import { ReorderBuffer } from '../lib/io/reorder.js'
import { RecordMerger } from '../lib/jobs/merge.js'
import { detectCompression } from '../lib/io/compression.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { blocksInside, clusterFromBytes, clusterRecord, expandCluster, popcount16 } from '../lib/record.js'
import { parseDiskSpec } from '../lib/cli/create.js'
import { parseSize } from '../lib/cli/command.js'

t.test('ByteQueue hands out subarrays inside a chunk and copies across chunks', async t => {
  const q = new ByteQueue()
  const a = Buffer.from('abcdef')
  q.push(a)
  q.push(Buffer.from('ghij'))
  const first = q.take(4) as Buffer
  t.equal(first.toString(), 'abcd')
  t.equal(first.buffer, a.buffer, 'no copy inside one chunk')
  t.equal(q.peek(3)?.toString(), 'efg', 'peek across chunks')
  t.equal(q.take(5)?.toString(), 'efghi')
  t.equal(q.take(2), null, 'not enough bytes: nothing taken')
  t.equal(q.length, 1)
  t.equal(q.consumed, 9)
})

t.test('ClusterSet: pages on demand, duplicates, first missing', async t => {
  const s = new ClusterSet()
  t.ok(s.add(0))
  t.notOk(s.add(0), 'a second add says so')
  t.ok(s.add(2 ** 32 - 1), 'the last cluster number')
  t.equal(s.size, 2)
  t.equal(s.firstMissing(1), -1)
  t.equal(s.firstMissing(5), 1)
  for (let i = 1; i < 70; i++) s.add(i)
  t.equal(s.firstMissing(70), -1)
  t.equal(s.firstMissing(71), 70)
  t.equal(s.firstMissing(2 ** 21), 70)
  s.delete(33)
  t.notOk(s.has(33))
  t.equal(s.firstMissing(70), 33)
})

t.test('clusterFromBytes: masks, zero-copy runs, partial last clusters', async t => {
  const full = Buffer.alloc(65536, 7)
  const r1 = clusterFromBytes(1, 0, full)
  t.equal(r1.mask, 0xffff)
  t.equal(r1.data.buffer, full.buffer, 'a full cluster is not copied')
  const holes = Buffer.alloc(65536)
  holes.fill(1, 4096, 8192)
  holes.fill(2, 12288, 16384)
  const r2 = clusterFromBytes(1, 0, holes)
  t.equal(r2.mask, 0b1010)
  t.same(r2.data, Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2)]))
  const run = Buffer.alloc(65536)
  run.fill(3, 8192, 20480)
  const r3 = clusterFromBytes(1, 0, run)
  t.equal(r3.mask, 0b11100)
  t.equal(r3.data.buffer, run.buffer, 'one run of blocks is a subarray')
  const tail = Buffer.alloc(5000, 9)
  const r4 = clusterFromBytes(1, 3, tail)
  t.equal(r4.mask, 0b11)
  t.equal(r4.data.length, 8192, 'a partial block is padded to 4 KiB')
  t.same(expandCluster(r4, 3 * 65536 + 5000), tail, 'and clipped again on the way out')
  t.equal(clusterFromBytes(1, 0, Buffer.alloc(65536)).mask, 0)
  t.equal(blocksInside(540672, 8), 0xf, '540672 bytes: the ninth cluster holds 4 blocks')
  t.equal(popcount16(0xffff), 16)
})

t.test('detectCompression by magic', async t => {
  t.equal(detectCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0])), 'zstd')
  t.equal(detectCompression(Buffer.from([0x1f, 0x8b, 8])), 'gzip')
  t.equal(detectCompression(Buffer.from('\x89LZO\x00\r\n\x1a\n', 'latin1')), 'lzo')
  t.equal(detectCompression(Buffer.from('VMA\0')), 'none')
  t.equal(detectCompression(Buffer.alloc(0)), 'none')
})

t.test('WriteQueue keeps its writes in flight bounded, merges adjacent pieces', async t => {
  const dir = tempDir(t)
  const original = fs.writev
  let inFlight = 0
  let most = 0
  let calls = 0
  const patched = ((fd: number, buffers: Buffer[], position: number, cb: (err: Error | null, n: number) => void) => {
    inFlight++
    calls++
    most = Math.max(most, inFlight)
    original(fd, buffers, position, (err, n) => setTimeout(() => { inFlight--; cb(err, n) }, 1))
  }) as typeof fs.writev
  fs.writev = patched
  syncBuiltinESMExports()
  t.teardown(() => { fs.writev = original; syncBuiltinESMExports() })
  const fd = fs.openSync(join(dir, 'f'), 'w')
  const queue = new WriteQueue({ maxInFlight: 4, maxRun: 8192 })
  for (let record = 0; record < 100; record++) {
    // Like a record with four runs: every other 4 KiB block, so no two merge;
    // the caller waits only after the last one, as the raw writer does.
    let wait: Promise<void> | undefined
    for (let i = record * 4; i < record * 4 + 4; i++) wait = queue.write(fd, Buffer.alloc(4096, i & 0xff), i * 8192, 'f') ?? wait
    await wait
  }
  for (let i = 0; i < 16; i++) await queue.write(fd, Buffer.alloc(4096, 1), 10_000_000 + i * 4096, 'f')
  await queue.drain()
  fs.closeSync(fd)
  t.ok(most <= 4 + 3, `at most 4 writes in flight, plus the rest of one record (saw ${most})`)
  t.equal(calls, 400 + 8, 'adjacent pieces merged up to maxRun')
  t.equal(fs.readFileSync(join(dir, 'f'))[399 * 8192], 399 & 0xff)
})

t.test('ReorderBuffer: memory first, then a sparse spill file read back in runs', async t => {
  const dir = tempDir(t)
  const size = 20 * 65536 + 1000
  const buf = new ReorderBuffer(size, { memoryLimit: 65536, tmpDir: dir })
  const data = (c: number): Buffer => Buffer.alloc(65536, c + 1)
  buf.put(clusterRecord(1, 5, 0xffff, data(5)))
  buf.put(clusterRecord(1, 6, 0xffff, data(6)))
  buf.put(clusterRecord(1, 7, 0, Buffer.alloc(0)))
  buf.put(clusterRecord(1, 20, 0x1, Buffer.alloc(4096, 9)))
  t.same(fs.readdirSync(dir), [], 'the spill file has no name')
  t.ok(buf.spilledBytes > 0)
  const five = await buf.take(5)
  t.equal(five.clusters, 1)
  t.ok(five.bytes.equals(data(5)), 'from memory')
  const six = await buf.take(6)
  t.equal(six.clusters, 2, 'spilled 6 and zero 7 come back together')
  t.ok(six.bytes.subarray(0, 65536).equals(data(6)))
  t.ok(six.bytes.subarray(65536).equals(Buffer.alloc(65536)))
  six.release()
  const last = await buf.take(20)
  t.equal(last.bytes.length, 1000, 'the last cluster is clipped to the device')
  t.ok(last.bytes.equals(Buffer.alloc(1000, 9)))
  t.notOk(buf.has(20))
  buf.close()
})

t.test('RecordMerger interleaves, or with sequential reads one source to its end', async t => {
  const info = { kind: 'archive' as const, uuid: '', ctime: 0, configs: [], devices: [] }
  const source = (device: number): Readable => Readable.from(Array.from({ length: 40 }, (_, c) => clusterRecord(device, c, 0, Buffer.alloc(0))))
  for (const sequential of [false, true]) {
    const got: number[] = []
    await pipeline(new RecordMerger(info, [source(1), source(2)], sequential), new Writable({
      objectMode: true,
      write (item: ClusterRecord, _e, cb) { if (item.kind === 'cluster') got.push(item.device); cb() },
    }))
    t.equal(got.length, 80)
    const switches = got.filter((d, i) => i > 0 && d !== got[i - 1]).length
    if (sequential) t.equal(switches, 1, 'one disk after the other')
    else t.ok(switches > 10, `interleaved (${switches} switches)`)
  }
})

t.test('argument parsing: sizes and -d specs', async t => {
  t.equal(parseSize('540672', 'x'), 540672)
  t.equal(parseSize('64K', 'x'), 65536)
  t.equal(parseSize('10G', 'x'), 10737418240)
  t.equal(parseSize('1.5MiB', 'x'), 1572864)
  t.throws(() => parseSize('ten', 'x'), { code: 'E_USAGE' })
  t.same(parseDiskSpec('drive-scsi0=/a/b'), { name: 'drive-scsi0', path: '/a/b' })
  t.same(parseDiskSpec('size=1M,format=raw:vd=-'), { name: 'vd', path: '-', size: 1048576, format: 'raw' })
  t.same(parseDiskSpec('d=nbd://h:1/e'), { name: 'd', path: 'nbd://h:1/e' })
  t.throws(() => parseDiskSpec('format=vhd:d=x'), { code: 'E_USAGE' })
  t.throws(() => parseDiskSpec('nopath'), { code: 'E_USAGE' })
})
