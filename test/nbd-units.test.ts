/**
 * The pieces under the NBD work, one at a time: the protocol codec, NBD
 * URIs, the VMA index against the sources it was built from, raw disks,
 * diskRecords with read-ahead and overlays, argument parsing.
 */
import t, { type Test } from 'tap'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzipSync } from 'node:zlib'
import { tempDir } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { buildArchive, buildExtent, buildHeader } from './helpers/vma-builder.js'
import { Rng } from './helpers/random.js'
import {
  CHUNK, COMMAND, OPTION, REPLY, decodeBlockStatus, decodeChunkHeader, decodeErrorChunk, decodeExportRequest, decodeGreeting,
  decodeInfo, decodeMetaRequest, decodeOptionHeader, decodeRequest, encodeBlockStatus, encodeErrorChunk, encodeExportRequest,
  encodeGreeting, encodeInfoBlockSize, encodeInfoExport, encodeMetaRequest, encodeOption, encodeRequest, nameOf,
} from '../lib/nbd/protocol.js'
import { describeAddress, parseNbdUri } from '../lib/nbd/client.js'
import { openArchiveIndex } from '../lib/vma/archive-index.js'
import { RawImage } from '../lib/raw/image.js'
import type { ClusterRecord, RandomAccessDisk } from '../lib/contracts.js'
import { diskRecords } from '../lib/io/disk-records.js'
import { listenAddress } from '../lib/cli/serve.js'
import { parseDiskSpec } from '../lib/cli/create.js'
import type { VmapipeError } from '../lib/errors.js'

async function rejects (t: Test, promise: Promise<unknown>, code: string, message: string): Promise<VmapipeError | undefined> {
  const err = await promise.then(() => undefined, (e: VmapipeError) => e)
  t.equal(err?.code, code, message)
  return err
}

t.test('protocol: what is encoded decodes back', async t => {
  t.same(decodeExportRequest(encodeExportRequest({ name: 'drive-scsi0', infos: [0, 3] })), { name: 'drive-scsi0', infos: [0, 3] })
  t.same(decodeMetaRequest(encodeMetaRequest({ name: 'é', queries: ['base:allocation', 'qemu:'] })), { name: 'é', queries: ['base:allocation', 'qemu:'] })
  t.same(decodeOptionHeader(encodeOption(OPTION.GO, Buffer.alloc(5))), { option: OPTION.GO, length: 5 })
  const req = { flags: 8, type: COMMAND.BLOCK_STATUS, cookie: 2n ** 64n - 1n, offset: 2 ** 40, length: 0xffffffff }
  t.same(decodeRequest(encodeRequest(req)), req)
  t.equal(decodeRequest(encodeRequest({ ...req, offset: 0 })).offset, 0)
  t.equal(decodeGreeting(encodeGreeting(3)).flags, 3)
  const status = encodeBlockStatus(1, 9n, 4, [{ length: 4096, flags: 3 }, { length: 65536, flags: 0 }])
  t.same(decodeChunkHeader(status), { flags: 1, type: CHUNK.BLOCK_STATUS, cookie: 9n, length: 20 })
  t.same(decodeBlockStatus(status.subarray(20)), { contextId: 4, descriptors: [{ length: 4096, flags: 3 }, { length: 65536, flags: 0 }] })
  t.same(decodeErrorChunk(CHUNK.ERROR, encodeErrorChunk(1, 1n, 22, 'no such thing').subarray(20)), { error: 22, message: 'no such thing' })
  t.same(decodeInfo(encodeInfoExport(2 ** 40, 0x10f)), { type: 0, size: 2 ** 40, flags: 0x10f })
  t.same(decodeInfo(encodeInfoBlockSize(1, 4096, 1 << 25)), { type: 3, minimum: 1, preferred: 4096, maximum: 1 << 25 })
  t.equal(nameOf('REPLY', REPLY.ERR_UNKNOWN), 'NBD_REP_ERR_UNKNOWN')
  t.equal(nameOf('OPTION', 77), 'NBD_OPT_77')
})

t.test('protocol: decoders refuse what does not add up', async t => {
  const name = encodeExportRequest({ name: 'abc', infos: [] })
  t.throws(() => decodeExportRequest(name.subarray(0, 5)), { code: 'E_NBD_PROTOCOL' }, 'a name past the end')
  t.throws(() => decodeExportRequest(Buffer.concat([name, Buffer.alloc(1)])), { code: 'E_NBD_PROTOCOL' }, 'a byte too many')
  const bad = Buffer.from([0, 0, 0, 2, 0xc3, 0x28, 0, 0])
  t.throws(() => decodeExportRequest(bad), /not valid UTF-8/, 'invalid UTF-8')
  const long = Buffer.alloc(4 + 5000 + 2)
  long.writeUInt32BE(5000)
  t.throws(() => decodeExportRequest(long), /strings are at most 4096/, 'a name over 4096 bytes')
  const lying = Buffer.concat([encodeMetaRequest({ name: 'a', queries: [] }).subarray(0, 5), Buffer.from([0, 1, 0, 0])])
  t.throws(() => decodeMetaRequest(lying), /claims 65536 queries/, 'a query count the data cannot hold')
  t.throws(() => decodeBlockStatus(Buffer.alloc(10)), /not 4 \+ 8n/)
  t.throws(() => decodeBlockStatus(Buffer.alloc(12)), /length 0/)
  const oldstyle = Buffer.alloc(18)
  oldstyle.write('NBDMAGIC')
  oldstyle.writeBigUInt64BE(0x00420281861253n, 8)
  t.throws(() => decodeGreeting(oldstyle), /oldstyle/)
  t.throws(() => decodeRequest(Buffer.alloc(28)), /request magic/)
  t.throws(() => encodeExportRequest({ name: 'a\0b', infos: [] }), { code: 'E_LIMIT' }, 'our own strings are checked too')
})

t.test('NBD URIs', async t => {
  t.same(parseNbdUri('nbd://host/exp'), { host: 'host', port: 10809, export: 'exp' })
  t.same(parseNbdUri('nbd://10.0.0.1:1234/a%20b'), { host: '10.0.0.1', port: 1234, export: 'a b' })
  t.same(parseNbdUri('nbd://[::1]:10809/x'), { host: '::1', port: 10809, export: 'x' })
  t.same(parseNbdUri('nbd://host'), { host: 'host', port: 10809, export: '' })
  t.same(parseNbdUri('nbd+unix:///drive-scsi0?socket=/run/a.sock'), { socket: '/run/a.sock', export: 'drive-scsi0' })
  t.same(parseNbdUri('nbd+unix:///?socket=/s'), { socket: '/s', export: '' })
  t.equal(describeAddress(parseNbdUri('nbd://[::1]:99/x')), 'nbd://[::1]:99/x')
  t.equal(describeAddress(parseNbdUri('nbd+unix:///a%2Fb?socket=/s')), 'nbd+unix:///a%2Fb?socket=/s')
  for (const bad of ['nbds://host/x', 'nbd+vsock:///1', 'nbd+unix:///x', 'nbd+unix://host/x?socket=/s', 'nbd:///x', 'nbd://h/%zz']) {
    t.throws(() => parseNbdUri(bad), { code: 'E_OPTION' }, bad)
  }
})

t.test('--listen and -d dirty-bitmap= parse', async t => {
  t.same(listenAddress(undefined, '127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 })
  t.same(listenAddress(undefined, '[::1]:0'), { host: '::1', port: 0 })
  t.same(listenAddress(undefined, ':10809'), { host: '0.0.0.0', port: 10809 })
  t.same(listenAddress('/run/s', undefined), { socket: '/run/s' })
  for (const bad of ['host', 'host:port', '1.2.3.4:70000']) t.throws(() => listenAddress(undefined, bad), { code: 'E_USAGE' }, bad)
  t.same(parseDiskSpec('dirty-bitmap=bm0:drive-scsi0=nbd+unix:///?socket=/s'), { name: 'drive-scsi0', path: 'nbd+unix:///?socket=/s', dirtyBitmap: 'bm0' })
  t.same(parseDiskSpec('drive-scsi0=nbd://10.0.0.1:10809/x'), { name: 'drive-scsi0', path: 'nbd://10.0.0.1:10809/x' })
})

async function readAll (disk: RandomAccessDisk, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee)
  await disk.read(buf, offset)
  return buf
}

t.test('the VMA index gives each disk as its source: map from the masks, reads at any offset', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(91))
  const index = await openArchiveIndex(fx.archive)
  t.equal(index.extents, fx.spec.extents.length, 'every extent header read')
  const rng = new Rng(92)
  for (const device of index.info.devices) {
    const source = readFileSync(fx.sources.get(device.name) as string)
    const disk = index.disk(device)
    t.equal(disk.size, source.length, `${device.name}: size`)
    t.same(await readAll(disk, 0, source.length), source, `${device.name}: all of it`)
    for (let i = 0; i < 20; i++) {
      const offset = rng.int(source.length)
      const length = 1 + rng.int(Math.min(300000, source.length - offset))
      if (!(await readAll(disk, offset, length)).equals(source.subarray(offset, offset + length))) t.fail(`${device.name}: ${length} bytes at ${offset}`)
    }
    const extents = await disk.map(0, source.length)
    const zero = Buffer.alloc(4096)
    let wrong = 0
    for (const e of extents) {
      for (let at = e.offset; at < e.offset + e.length; at += 4096) {
        const block = source.subarray(at, Math.min(at + 4096, e.offset + e.length))
        if (block.equals(zero.subarray(0, block.length)) === e.data) wrong++
      }
    }
    t.equal(wrong, 0, `${device.name}: data exactly where the source has non-zero blocks`)
    const last = (await disk.map(source.length - 10, 20)).at(-1)
    t.ok(last !== undefined && !last.data && last.offset + last.length === source.length + 10 && last.offset <= source.length, `${device.name}: past the end is a hole`)
    await disk.close()
  }
  await index.close()
})

t.test('the VMA index refuses what the streaming reader refuses, and what it cannot seek in', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(93))
  const bytes = readFileSync(fx.archive)
  const write = (name: string, data: Buffer): string => { writeFileSync(join(dir, name), data); return join(dir, name) }
  await rejects(t, openArchiveIndex(write('a.vma.gz', gzipSync(bytes))), 'E_NOT_SEEKABLE', 'compressed')
  const headerSize = bytes.readUInt32BE(56)
  await rejects(t, openArchiveIndex(write('empty.vma', Buffer.alloc(0))), 'E_VMA_TRUNCATED', 'empty')
  await rejects(t, openArchiveIndex(write('h.vma', bytes.subarray(0, headerSize - 1))), 'E_VMA_TRUNCATED', 'cut in the header')
  await rejects(t, openArchiveIndex(write('e.vma', bytes.subarray(0, headerSize + 300))), 'E_VMA_TRUNCATED', 'cut in an extent header')
  await rejects(t, openArchiveIndex(write('d.vma', bytes.subarray(0, bytes.length - 1))), 'E_VMA_TRUNCATED', 'cut in the data')
  await rejects(t, openArchiveIndex(write('x.vma', Buffer.concat([bytes, Buffer.alloc(512, 1)]))), 'E_VMA_EXTENT_MAGIC', 'garbage after the last extent')
  const spec = fx.spec
  await rejects(t, openArchiveIndex(write('m.vma', buildArchive({ ...spec, extents: spec.extents.map(e => e.filter(s => s.dev !== 1 || s.cluster !== 0)) }))), 'E_VMA_MISSING', 'a missing cluster')
  await rejects(t, openArchiveIndex(write('dup.vma', buildArchive({ ...spec, extents: [...spec.extents, spec.extents[0]] }))), 'E_VMA_DUPLICATE', 'a repeated extent')
  const huge = { configs: [], devices: [{ id: 1, name: 'drive-scsi0', size: 2 ** 47, data: Buffer.alloc(0) }] }
  const bomb = await rejects(t, openArchiveIndex(write('bomb.vma', Buffer.concat([buildHeader(huge), buildExtent(huge, [{ dev: 1, cluster: 0, data: Buffer.alloc(65536, 1) }])]))), 'E_VMA_TRUNCATED', 'a 128 TiB device in a small file')
  t.match(bomb?.message, /cannot hold the 2147483648 clusters/, 'refused before anything is allocated for it')
  mkdirSync(join(dir, 'dir.vma'))
  await rejects(t, openArchiveIndex(join(dir, 'dir.vma')), 'E_NOT_SEEKABLE', 'a directory')
  await rejects(t, openArchiveIndex(join(dir, 'none.vma')), 'E_IO', 'missing')
})

t.test('raw disks: size, reads, refusals', async t => {
  const dir = tempDir(t)
  const bytes = new Rng(94).fill(Buffer.alloc(100000))
  writeFileSync(join(dir, 'd.raw'), bytes)
  const disk = await RawImage.open(join(dir, 'd.raw'))
  t.equal(disk.size, 100000)
  t.same(await disk.map(5, 10), [{ offset: 5, length: 10, data: true }])
  t.same(await readAll(disk, 99000, 1000), bytes.subarray(99000))
  await disk.close()
  await disk.close()
  writeFileSync(join(dir, 'empty'), '')
  await rejects(t, RawImage.open(join(dir, 'empty')), 'E_LIMIT', 'empty')
  await rejects(t, RawImage.open(dir), 'E_NOT_SEEKABLE', 'neither a file nor a block device')
})

/** A disk of `clusters` clusters whose cluster i holds byte i+1 when i % 3 == 0, else nothing; reads counted. */
function patternDisk (clusters: number, reads: Array<[number, number]>): RandomAccessDisk {
  const has = (c: number): boolean => c % 3 === 0
  return {
    size: clusters * 65536,
    map: async (offset, length) => {
      const out: Array<{ offset: number, length: number, data: boolean }> = []
      for (let at = offset; at < offset + length; at += 65536) out.push({ offset: at, length: Math.min(65536, offset + length - at), data: has(at / 65536) })
      return out
    },
    read: async (buf, offset) => {
      reads.push([offset, buf.length])
      await new Promise(resolve => setTimeout(resolve, (offset / 65536) % 7))
      for (let at = 0; at < buf.length; at += 65536) buf.fill(has((offset + at) / 65536) ? ((offset + at) / 65536 + 1) & 0xff : 0, at, at + 65536)
    },
    close: async () => {},
  }
}

async function records (stream: NodeJS.ReadableStream): Promise<ClusterRecord[]> {
  const out: ClusterRecord[] = []
  await pipeline(stream, new Writable({ objectMode: true, highWaterMark: 2, write (r: ClusterRecord, _e, cb) { out.push(r); setImmediate(cb) } }))
  return out
}

t.test('diskRecords: read-ahead keeps the order, reads only runs with data; skipUnread leaves the rest out', async t => {
  const reads: Array<[number, number]> = []
  let progress = 0
  const all = await records(diskRecords(patternDisk(100, reads), 1, { readAhead: 5, progress: { add: n => { progress += n } } }))
  t.same(all.map(r => r.cluster), Array.from({ length: 100 }, (_, i) => i), 'every cluster, in order')
  t.ok(all.every(r => (r.cluster % 3 === 0) === (r.mask === 0xffff) && (r.mask === 0 || r.data[0] === ((r.cluster + 1) & 0xff))), 'the right data in each')
  t.ok(reads.every(([offset, length]) => length === 65536 && (offset / 65536) % 3 === 0), 'only clusters with data were read')
  t.equal(progress, 100 * 65536, 'progress counts every byte passed')
  const some = await records(diskRecords(patternDisk(100, []), 1, { readAhead: 3, skipUnread: true }))
  t.same(some.map(r => r.cluster), Array.from({ length: 34 }, (_, i) => i * 3), 'skipUnread: only the clusters read')
  const failing: RandomAccessDisk = { ...patternDisk(40, []), read: async () => { throw new Error('gone') } }
  await t.rejects(records(diskRecords(failing, 1, { readAhead: 4 })), /gone/, 'a read error ends the stream with it')
})
