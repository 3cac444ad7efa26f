/**
 * vma serve against real clients: qemu-img, nbdcopy and nbdinfo read what it
 * serves from archives and images, over a Unix socket and TCP.
 */
import t from 'tap'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, run, sh, q, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { startServe } from './helpers/nbd.js'
import { Rng, makeDisk } from './helpers/random.js'

interface MapEntry { offset: number, length: number, type: number }

/** The source's 4 KiB blocks as nbdinfo --map reports them: 0 data, 3 hole and zero; adjacent ones merged. */
function expectedMap (bytes: Buffer, data: number, hole: number): MapEntry[] {
  const zero = Buffer.alloc(4096)
  const out: MapEntry[] = []
  for (let at = 0; at < bytes.length; at += 4096) {
    const block = bytes.subarray(at, at + 4096)
    const type = block.equals(zero.subarray(0, block.length)) ? hole : data
    const last = out[out.length - 1]
    if (last !== undefined && last.type === type) last.length += block.length
    else out.push({ offset: at, length: block.length, type })
  }
  return out
}

function merged (entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = []
  for (const e of entries) {
    const last = out[out.length - 1]
    if (last !== undefined && last.type === e.type) last.length += e.length
    else out.push({ offset: e.offset, length: e.length, type: e.type })
  }
  return out
}

async function nbdinfoMap (uri: string, context?: string): Promise<MapEntry[]> {
  const r = await run('nbdinfo', [context === undefined ? '--map' : `--map=${context}`, '--json', uri])
  if (r.code !== 0) throw new Error(`nbdinfo --map failed: ${r.stderr}`)
  return merged(JSON.parse(r.stdout.toString()) as MapEntry[])
}

t.test('a multi-disk archive: qemu-img convert and nbdcopy give the disks, nbdinfo --list lists them, many clients at once', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(61))
  const server = await startServe(t, [fx.archive, '--socket', join(dir, 'sock')])
  const disks = fx.spec.devices.filter(d => d.name !== 'vmstate')

  const list = await run('nbdinfo', ['--list', '--json', server.uri()])
  exits(t, list, 0)
  const listed = (JSON.parse(list.stdout.toString()) as { exports: Array<{ 'export-name': string, 'export-size': number, contexts: string[], is_read_only: boolean, can_multi_conn: boolean }> }).exports
  t.same(listed.map(e => e['export-name']).sort(), disks.map(d => d.name).sort(), 'one export per disk, named by device, no vmstate')
  for (const e of listed) {
    t.equal(e['export-size'], disks.find(d => d.name === e['export-name'])?.size, `${e['export-name']}: size`)
    t.ok(e.is_read_only && e.can_multi_conn, `${e['export-name']}: read-only, multi-conn`)
    t.same(e.contexts, ['base:allocation', 'qemu:allocation-depth'], `${e['export-name']}: metadata contexts`)
  }

  for (const d of disks) {
    const out = join(dir, `${d.name}.qemu-img`)
    exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri(d.name), out]), 0, `qemu-img convert ${d.name}`)
    t.ok(cmp(out, fx.sources.get(d.name) as string), `qemu-img convert: ${d.name} equals its source`)
  }
  // nbdcopy opens several connections itself (multi-conn); all disks at once on top.
  const copies = await Promise.all(disks.map(async d => {
    const out = join(dir, `${d.name}.nbdcopy`)
    return { d, out, r: await run('nbdcopy', [server.uri(d.name), out]) }
  }))
  for (const { d, out, r } of copies) {
    exits(t, r, 0, `nbdcopy ${d.name}`)
    t.ok(cmp(out, fx.sources.get(d.name) as string), `nbdcopy: ${d.name} equals its source`)
  }
  const opened = server.logs().filter(l => l.msg === 'client connected').length
  // A client may exit before the server has seen its socket close: give the last close lines a moment.
  for (let i = 0; i < 50 && server.logs().filter(l => l.msg === 'client disconnected').length < opened; i++) await new Promise(resolve => setTimeout(resolve, 100))
  const closed = server.logs().filter(l => l.msg === 'client disconnected')
  t.ok(opened >= disks.length * 3, `a log line per connection (${opened})`)
  t.equal(closed.length, opened, 'and one when each closed')
  t.ok(closed.some(l => typeof l.export === 'string' && Number(l.bytesSent) > 0 && Number(l.requests) > 0), 'with the export, requests and bytes')
})

t.test('nbdinfo --map reports holes exactly where the archive stores zero blocks; qemu-img map (REQ_ONE) agrees', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(62))
  const server = await startServe(t, [fx.archive, '--socket', join(dir, 'sock')])
  for (const d of fx.spec.devices.filter(d => d.name !== 'vmstate')) {
    const source = readFileSync(fx.sources.get(d.name) as string)
    t.same(await nbdinfoMap(server.uri(d.name)), expectedMap(source, 0, 3), `${d.name}: base:allocation`)
    t.same(await nbdinfoMap(server.uri(d.name), 'qemu:allocation-depth'), expectedMap(source, 1, 0), `${d.name}: qemu:allocation-depth, 1 for data, 0 for holes`)
    const r = await run('qemu-img', ['map', '--output=json', '-f', 'raw', server.uri(d.name)])
    exits(t, r, 0)
    const qemu = merged((JSON.parse(r.stdout.toString()) as Array<{ start: number, length: number, data: boolean }>)
      .map(e => ({ offset: e.start, length: e.length, type: e.data ? 0 : 3 })))
    t.same(qemu, expectedMap(source, 0, 3), `${d.name}: qemu-img map`)
  }
})

t.test('images over TCP: --name, file names, the empty export name is the first', async t => {
  const dir = tempDir(t)
  const a = join(dir, 'a.raw')
  const b = join(dir, 'plain.img')
  writeFileSync(a, makeDisk(new Rng(63), 1048576 + 4096))
  writeFileSync(b, makeDisk(new Rng(64), 327680))
  const server = await startServe(t, [a, b, '--name', 'root', '--listen', '127.0.0.1:0'])
  t.ok((server.port ?? 0) > 0, `port 0 chose a port (${server.port})`)
  const list = JSON.parse((await run('nbdinfo', ['--list', '--json', server.uri()])).stdout.toString()) as { exports: Array<{ 'export-name': string }> }
  t.same(list.exports.map(e => e['export-name']), ['root', 'plain.img'], '--name for the first image, the file name for the next')
  exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri(), join(dir, 'first')]), 0)
  t.ok(cmp(join(dir, 'first'), a), 'the empty name reads the first export')
  exits(t, await run('nbdcopy', [server.uri('plain.img'), join(dir, 'second')]), 0)
  t.ok(cmp(join(dir, 'second'), b), 'by file name')
  const unknown = await run('nbdinfo', [server.uri('nope')])
  t.not(unknown.code, 0, 'an unknown export is refused')
  t.match(unknown.stderr, /No such file or directory for export: nope/, 'as NBD_REP_ERR_UNKNOWN')
})

t.test('SIGTERM closes the server: exit 0, socket removed', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(65))
  const socket = join(dir, 'sock')
  const server = await startServe(t, [fx.archive, '--socket', socket])
  exits(t, await run('nbdinfo', ['--size', server.uri('drive-scsi0')]), 0)
  t.equal(await server.stop(), 0, 'exit 0')
  t.notOk(existsSync(socket), 'the socket is gone')
  t.ok(server.logs().some(l => l.msg === 'server stopped'), 'a last log line')
})

t.test('what cannot be served is refused with a clear message', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(66))
  const sock = join(dir, 'sock')
  // Compressed archives and pipes are served (serve-live.test.ts); one that ends inside its header is refused at start.
  exits(t, await sh(`head -c 5000 ${q(fx.archive)} | zstd -q -c > ${q(join(dir, 'a.vma.zst'))}`), 0)
  const zst = await vma(['serve', join(dir, 'a.vma.zst'), '--socket', sock])
  exits(t, zst, 1, 'a compressed archive cut inside its header: invalid input')
  t.match(zst.stderr, /E_VMA_TRUNCATED/)
  exits(t, await vma(['serve', '/dev/null', '--socket', sock]), 2, 'a character device: usage error')
  exits(t, await vma(['serve', join(dir, 'missing.vma'), '--socket', sock]), 3, 'a missing source: system error')
  writeFileSync(sock, '')
  const taken = await vma(['serve', fx.archive, '--socket', sock])
  exits(t, taken, 3, 'an existing socket path')
  t.equal(failure(taken).code, 'E_TARGET_EXISTS')
  exits(t, await vma(['serve', fx.archive]), 2, 'neither --socket nor --listen')
  exits(t, await vma(['serve', fx.archive, '--socket', sock, '--listen', '127.0.0.1:1']), 2, 'both')
  exits(t, await vma(['serve', fx.archive, '--listen', 'localhost']), 2, 'no port')
  exits(t, await vma(['serve', fx.archive, fx.archive, '--listen', '127.0.0.1:0']), 2, 'two exports of one name')
  exits(t, await vma(['serve', fx.archive, '--name', 'x', '--listen', '127.0.0.1:0']), 2, 'a --name no image takes')
  const broken = join(dir, 'cut.vma')
  writeFileSync(broken, readFileSync(fx.archive).subarray(0, 100000))
  const cut = await vma(['serve', broken, '--socket', join(dir, 'other')])
  exits(t, cut, 1, 'a damaged archive: invalid input')
  t.equal(failure(cut).code, 'E_VMA_TRUNCATED')
})
