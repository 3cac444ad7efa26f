/**
 * The server's metadata contexts from disks that have layers and dirty
 * bitmaps (the RandomAccessDisk members image readers fill in), here
 * synthetic disks served in-process; read by nbdinfo, qemu-img and our own
 * client.
 */
import t, { type Test } from 'tap'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { exits, run, tempDir } from './helpers/run.js'
import { NBD, RawPeer, chunkError, handshake, metaData, open, option, readOptionReply, readReply, request } from './helpers/nbd.js'
import { NbdServer } from '../lib/nbd/server.js'
import { openNbdDisk } from '../lib/nbd/client.js'
import type { ClusterRecord, DirtyBitmap, Extent, RandomAccessDisk } from '../lib/contracts.js'
import { dirtyRecords } from '../lib/io/disk-records.js'

const KiB = 1024
const MiB = 1024 * KiB
const SIZE = 8 * MiB

interface Range { offset: number, length: number }
interface DepthExtent extends Range { depth: number }
const DATA: Range[] = [{ offset: 0, length: MiB }, { offset: 3 * MiB, length: 64 * KiB }, { offset: 6 * MiB, length: 2 * MiB }]
const DEPTHS: DepthExtent[] = [
  { offset: 0, length: MiB, depth: 1 },
  { offset: MiB, length: 2 * MiB, depth: 0 },
  { offset: 3 * MiB, length: 64 * KiB, depth: 2 },
  { offset: 3 * MiB + 64 * KiB, length: 3 * MiB - 64 * KiB, depth: 0 },
  { offset: 6 * MiB, length: MiB, depth: 3 },
  { offset: 7 * MiB, length: MiB, depth: 1 },
]
const BM0: Range[] = [{ offset: 64 * KiB, length: 64 * KiB }, { offset: 3 * MiB, length: 64 * KiB }, { offset: 7 * MiB + 4 * KiB, length: 4 * KiB }]

/** Ranges as extents covering [offset, offset + length): inside a range is data (or dirty). */
function extentsOf (ranges: Range[], offset: number, length: number): Extent[] {
  const out: Extent[] = []
  const end = offset + length
  for (let at = offset; at < end;) {
    const inside = ranges.find(r => r.offset <= at && at < r.offset + r.length)
    const next = inside !== undefined ? inside.offset + inside.length : Math.min(...ranges.map(r => r.offset).filter(o => o > at), end)
    const to = Math.min(next, end)
    out.push({ offset: at, length: to - at, data: inside !== undefined })
    at = to
  }
  return out
}

function clip<T extends Range> (items: T[], offset: number, length: number): T[] {
  return items.filter(e => e.offset + e.length > offset && e.offset < offset + length)
    .map(e => ({ ...e, offset: Math.max(e.offset, offset), length: Math.min(e.offset + e.length, offset + length) - Math.max(e.offset, offset) }))
}

/** Byte i of the disk: i mod 251 + 1 inside the data ranges, 0 elsewhere. */
function byteAt (i: number): number {
  return DATA.some(r => r.offset <= i && i < r.offset + r.length) ? i % 251 + 1 : 0
}

/** A synthetic bitmap: dirty inside `ranges`. */
function bitmapOf (id: string, ranges: Range[]): DirtyBitmap {
  const map = async (offset: number, length: number): Promise<Array<Range & { dirty: boolean }>> =>
    extentsOf(ranges, offset, length).map(e => ({ offset: e.offset, length: e.length, dirty: e.data }))
  return { id, granularity: 4 * KiB, map, dirtyBytes: async () => ranges.reduce((n, r) => n + r.length, 0) }
}

function layeredDisk (): RandomAccessDisk {
  return {
    size: SIZE,
    // The layers' map: data wherever some layer holds it, and which one.
    map: async (offset, length) => clip(DEPTHS, offset, length).map(d => ({ offset: d.offset, length: d.length, data: d.depth > 0, depth: d.depth })),
    read: async (buf, offset) => { for (let i = 0; i < buf.length; i++) buf[i] = byteAt(offset + i) },
    close: async () => {},
    bitmaps: [bitmapOf('bm0', BM0), bitmapOf('backup-2', [{ offset: 0, length: SIZE }])],
  }
}

async function serveInProcess (
  t: Test, disks: Record<string, RandomAccessDisk>, options: ConstructorParameters<typeof NbdServer>[1] = {}
): Promise<{ socket: string, uri: (name: string) => string, warnings: string[] }> {
  const socket = join(tempDir(t), 'sock')
  const warnings: string[] = []
  const server = new NbdServer(Object.entries(disks).map(([name, disk]) => ({ name, disk })),
    { log: { info: () => {}, warn: (_f, m) => { warnings.push(m) } }, ...options })
  await server.listen({ socket })
  t.teardown(async () => { await server.close() })
  return { socket, uri: name => `nbd+unix:///${name}?socket=${socket}`, warnings }
}

async function nbdinfoMap (t: Test, uri: string, context: string): Promise<Array<{ offset: number, length: number, type: number }>> {
  const r = await run('nbdinfo', [`--map=${context}`, '--json', uri])
  exits(t, r, 0, `nbdinfo --map=${context}`)
  return (JSON.parse(r.stdout.toString()) as Array<{ offset: number, length: number, type: number }>)
    .map(({ offset, length, type }) => ({ offset, length, type }))
}

t.test('qemu:dirty-bitmap:<name> and qemu:allocation-depth come from the disk, as nbdinfo and qemu-img see them', async t => {
  const { uri } = await serveInProcess(t, { layers: layeredDisk() })
  t.same(await nbdinfoMap(t, uri('layers'), 'qemu:dirty-bitmap:bm0'), extentsOf(BM0, 0, SIZE).map(e => ({ offset: e.offset, length: e.length, type: e.data ? 1 : 0 })), 'the dirty extents of bm0')
  t.same(await nbdinfoMap(t, uri('layers'), 'qemu:dirty-bitmap:backup-2'), [{ offset: 0, length: SIZE, type: 1 }], 'another bitmap')
  t.same(await nbdinfoMap(t, uri('layers'), 'qemu:allocation-depth'), DEPTHS.map(d => ({ offset: d.offset, length: d.length, type: d.depth })), 'the layer depths')
  t.same(await nbdinfoMap(t, uri('layers'), 'base:allocation'), extentsOf(DATA, 0, SIZE).map(e => ({ offset: e.offset, length: e.length, type: e.data ? 0 : 3 })), 'allocation')

  const list = await run('nbdinfo', ['--list', '--json', uri('')])
  const contexts = (JSON.parse(list.stdout.toString()) as { exports: Array<{ contexts: string[] }> }).exports[0].contexts
  t.same(contexts, ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:backup-2'], 'nbdinfo --list shows every context')

  // qemu's x-dirty-bitmap reads a bitmap through block status with REQ_ONE, and reports dirty as "not data".
  const r = await run('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${uri('').split('socket=')[1]},export=layers,x-dirty-bitmap=qemu:dirty-bitmap:bm0`])
  exits(t, r, 0, 'qemu-img map with x-dirty-bitmap')
  const qemu = (JSON.parse(r.stdout.toString()) as Array<{ start: number, length: number, data: boolean }>)
    .filter(e => !e.data).map(e => ({ offset: e.start, length: e.length }))
  t.same(qemu, BM0, 'qemu-img sees the same dirty extents')
})

t.test('NBD_OPT_LIST_META_CONTEXT: no query lists all; qemu:, qemu:dirty-bitmap: and base: list their namespaces', async t => {
  const { socket } = await serveInProcess(t, { layers: layeredDisk() })
  const p = await RawPeer.connect({ socket })
  await handshake(p)
  const list = async (queries: string[]): Promise<string[]> => {
    p.write(option(NBD.OPT.LIST_META_CONTEXT, metaData('layers', queries)))
    const names: string[] = []
    for (let r = await readOptionReply(p); r?.type === NBD.REP.META_CONTEXT; r = await readOptionReply(p)) {
      t.equal(r.data.readUInt32BE(0), 0, 'listed contexts carry id 0')
      names.push(r.data.subarray(4).toString())
    }
    return names
  }
  t.same(await list([]), ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:backup-2'], 'no query')
  t.same(await list(['qemu:']), ['qemu:allocation-depth', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:backup-2'], 'qemu:')
  t.same(await list(['qemu:dirty-bitmap:']), ['qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:backup-2'], 'qemu:dirty-bitmap:')
  t.same(await list(['base:']), ['base:allocation'], 'base:')
  t.same(await list(['qemu:dirty-bitmap:backup-2', 'nope:x', 'qemu:dirty-bitmap:missing']), ['qemu:dirty-bitmap:backup-2'], 'exact names; unknown namespaces and names ignored')
  p.write(option(NBD.OPT.STRUCTURED_REPLY))
  await readOptionReply(p)
  p.write(option(NBD.OPT.SET_META_CONTEXT, metaData('layers', ['qemu:', 'qemu:dirty-bitmap:'])))
  t.equal((await readOptionReply(p))?.type, NBD.REP.ACK, 'wildcards select nothing')
  p.destroy()
})

t.test('our client reads contexts, data and dirty records from the server', async t => {
  const { uri } = await serveInProcess(t, { layers: layeredDisk() })
  const disk = await openNbdDisk(uri('layers'), { dirtyBitmaps: ['bm0'] })
  t.same(await disk.map(0, SIZE), extentsOf(DATA, 0, SIZE), 'map by base:allocation')
  t.same(await disk.bitmaps[0].map(MiB / 2, SIZE - MiB), await bitmapOf('bm0', BM0).map(MiB / 2, SIZE - MiB), 'dirty extents of a range')
  const buf = Buffer.alloc(5 * MiB)
  await disk.read(buf, 2 * MiB + 1)
  t.ok(buf.every((b, i) => b === byteAt(2 * MiB + 1 + i)), 'a read of 5 MiB across holes and data at an odd offset')
  const before = disk.client.stats.readBytes
  const records: ClusterRecord[] = []
  await pipeline(dirtyRecords(disk, 'bm0', 1, { readAhead: 4 }), new Writable({ objectMode: true, write (r: ClusterRecord, _e, cb) { records.push(r); cb() } }))
  t.same(records.map(r => [r.cluster, r.mask]), [[1, 0xffff], [48, 0xffff], [112, 0xffff]], 'records for the dirty clusters only')
  t.equal(disk.client.stats.readBytes - before, 3 * 64 * KiB, 'and only they were read')
  t.throws(() => dirtyRecords(disk, 'bm9', 1), { code: 'E_NOT_FOUND' }, 'a bitmap not selected')
})

t.test('a disk that breaks its contract costs its request an error, not the server', async t => {
  const gappy: RandomAccessDisk = { ...layeredDisk(), map: async offset => [{ offset: offset + 4096, length: 4096, data: true }] }
  const failing: RandomAccessDisk = { ...layeredDisk(), read: async () => { throw new Error('the medium is gone') } }
  const { socket, warnings } = await serveInProcess(t, { gappy, failing })
  for (const name of ['gappy', 'failing']) {
    const p = await RawPeer.connect({ socket })
    await open(p, name)
    p.write(request(NBD.CMD.READ, 0, 8192))
    t.equal(chunkError((await readReply(p)).at(-1) as NonNullable<Parameters<typeof chunkError>[0]>), 5, `${name}: EIO`)
    p.write(request(NBD.CMD.READ, 3 * MiB, 4096))
    t.equal((await readReply(p)).length > 0, true, `${name}: the connection goes on`)
    p.destroy()
  }
  t.match(warnings.join('\n'), /leave a gap at byte 0[\s\S]*the medium is gone/, 'each failure is logged')
})

t.test('a client that never finishes the handshake is hung up on', async t => {
  const { socket } = await serveInProcess(t, { layers: layeredDisk() }, { handshakeTimeout: 200 })
  const p = await RawPeer.connect({ socket })
  await p.read(18)
  await p.closed
  t.pass('closed after the handshake timeout')
})
