/**
 * The NBD client against real servers: packing from qemu-nbd (raw, qcow2,
 * TCP), incremental reads through a dirty bitmap, restores into qemu-nbd and
 * nbdkit, and servers that fail or break the protocol.
 */
import t, { type Test } from 'tap'
import { copyFileSync, existsSync, openSync, closeSync, readFileSync, writeFileSync, writeSync } from 'node:fs'
import { createServer, type AddressInfo, type Socket } from 'node:net'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { PACK_VMA, cmp, exits, q, run, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { startNbdkit, startQemuNbd, startServe } from './helpers/nbd.js'
import { Rng } from './helpers/random.js'
import { openDisk } from '../lib/jobs/sources.js'
import { diskRecords } from '../lib/io/disk-records.js'
import { NbdClient, openNbdDisk } from '../lib/nbd/client.js'
import { packArchive } from '../lib/jobs/pack.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { expandCluster } from '../lib/record.js'
import { VmapipeError } from '../lib/errors.js'

const MiB = 1048576

async function tool (t: Test, command: string, args: string[]): Promise<void> {
  exits(t, await run(command, args), 0, `${command} ${args.join(' ')}`)
}

/** An 8 MiB qcow2 with data in places, some of it unaligned, and a zeroed range. */
async function qcow2Image (t: Test, dir: string): Promise<string> {
  const img = join(dir, 'disk.qcow2')
  await tool(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M'])
  await tool(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x11 0 1M', '-c', 'write -q -P 0x22 1500k 20k', '-c', 'write -q -P 0x33 5M 64k', '-c', 'write -q -z 256k 128k', '-c', 'write -q -P 0x44 8380416 8k', img])
  return img
}

/** The clusters nbdinfo --map says hold something (not zero), in 64 KiB units. */
async function clustersWith (t: Test, uri: string, context: string, wanted: (type: number) => boolean): Promise<Set<number>> {
  const r = await run('nbdinfo', [`--map=${context}`, '--json', uri])
  exits(t, r, 0, `nbdinfo --map=${context}`)
  const clusters = new Set<number>()
  for (const e of JSON.parse(r.stdout.toString()) as Array<{ offset: number, length: number, type: number }>) {
    if (!wanted(e.type)) continue
    for (let c = Math.floor(e.offset / 65536); c * 65536 < e.offset + e.length; c++) clusters.add(c)
  }
  return clusters
}

async function collect (stream: NodeJS.ReadableStream): Promise<ClusterRecord[]> {
  const records: ClusterRecord[] = []
  await pipeline(stream, new Writable({ objectMode: true, write (r: ClusterRecord, _e, cb) { records.push(r); cb() } }))
  return records
}

async function freePort (): Promise<number> {
  const s = createServer()
  await new Promise<void>(resolve => s.listen(0, '127.0.0.1', resolve))
  const port = (s.address() as AddressInfo).port
  await new Promise<void>(resolve => s.close(() => resolve()))
  return port
}

t.test('pack-vma from qemu-nbd -r (qcow2 and raw) round-trips and reads only allocated clusters', async t => {
  const dir = tempDir(t)
  const img = await qcow2Image(t, dir)
  const raw = join(dir, 'disk.raw')
  await tool(t, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw])
  for (const [format, file] of [['qcow2', img], ['raw', raw]]) {
    const socket = join(dir, `${format}.sock`)
    await startQemuNbd(t, { socket }, ['-r', '-e', '4', '-f', format, file])
    const uri = `nbd+unix:///?socket=${socket}`
    const archive = join(dir, `${format}.vma`)
    exits(t, await run(process.execPath, [PACK_VMA, uri, '-o', archive]), 0, `pack-vma from qemu-nbd -f ${format}`)
    exits(t, await vma(['extract', archive, join(dir, `${format}-out`)]), 0)
    await tool(t, 'qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', join(dir, `${format}-out`, 'disk-drive-scsi0.raw'), img])

    const allocated = await clustersWith(t, uri, 'base:allocation', type => (type & 2) === 0)
    const disk = await openNbdDisk(uri)
    const records = await collect(diskRecords(disk, 1, { readAhead: 4 }))
    t.equal(records.length, 128, `${format}: a record for every cluster`)
    t.equal(disk.client.stats.readBytes, allocated.size * 65536, `${format}: read ${allocated.size} allocated clusters and nothing else`)
    t.ok(allocated.size < 40, `${format}: few of the 128 clusters are allocated (${allocated.size})`)
  }
})

t.test('vma create takes NBD URIs over TCP beside files', async t => {
  const dir = tempDir(t)
  const img = await qcow2Image(t, dir)
  const fx = writeFixture(dir, multiDeviceSpec(71))
  const port = await freePort()
  await startQemuNbd(t, { port }, ['-r', '-f', 'qcow2', '-x', 'disk0', img])
  const archive = join(dir, 'two.vma')
  exits(t, await vma(['create', archive, '-d', `drive-scsi0=nbd://127.0.0.1:${port}/disk0`, '-d', `drive-efidisk0=${fx.sources.get('drive-efidisk0') as string}`]), 0)
  exits(t, await vma(['extract', archive, join(dir, 'out')]), 0)
  await tool(t, 'qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', join(dir, 'out/disk-drive-scsi0.raw'), img])
  t.ok(cmp(join(dir, 'out/disk-drive-efidisk0.raw'), fx.sources.get('drive-efidisk0') as string))
})

t.test('--dirty-bitmap: only dirty clusters are read; over the previous image they equal the source', async t => {
  const dir = tempDir(t)
  const img = await qcow2Image(t, dir)
  const previous = join(dir, 'previous.raw')
  await tool(t, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, previous])
  await tool(t, 'qemu-img', ['bitmap', '--add', img, 'bm0'])
  // After the backup: new data, overwrites across a cluster boundary, a zeroed cluster, a write at the end.
  await tool(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x55 100k 8k', '-c', 'write -q -P 0x66 2044k 8k', '-c', 'write -q -z 5M 64k', '-c', 'write -q -P 0x77 7M 4k', '-c', 'write -q -P 0x88 8384512 4k', img])
  const socket = join(dir, 'sock')
  await startQemuNbd(t, { socket }, ['-r', '-e', '4', '-f', 'qcow2', '-B', 'bm0', img])
  const uri = `nbd+unix:///?socket=${socket}`
  const dirty = await clustersWith(t, uri, 'qemu:dirty-bitmap:bm0', type => (type & 1) === 1)
  t.same([...dirty].sort((a, b) => a - b), [1, 31, 32, 80, 112, 127], 'the bitmap marks what was written (per nbdinfo)')

  const source = await openDisk({ name: 'drive-scsi0', path: uri, dirtyBitmap: 'bm0' })
  t.equal(source.incremental, true)
  t.equal(source.size, 8 * MiB)
  const records = await collect(await source.records(1))
  t.same(records.map(r => r.cluster), [...dirty].sort((a, b) => a - b), 'a record for each dirty cluster and no other')
  t.equal(records.find(r => r.cluster === 80)?.mask, 0, 'the zeroed cluster comes as mask 0 (zeros to store over the old data)')

  // Count what went over the wire with a second reader of the same export.
  const disk = await openNbdDisk(uri, { dirtyBitmaps: ['bm0'] })
  const { dirtyRecords } = await import('../lib/io/disk-records.js')
  await collect(dirtyRecords(disk, 'bm0', 1))
  t.equal(disk.client.stats.readBytes, dirty.size * 65536, `read ${dirty.size * 64} KiB: the dirty clusters and nothing else`)

  const overlaid = join(dir, 'overlaid.raw')
  copyFileSync(previous, overlaid)
  const fd = openSync(overlaid, 'r+')
  for (const r of records) writeSync(fd, expandCluster(r, source.size), 0, undefined, r.cluster * 65536)
  closeSync(fd)
  await tool(t, 'qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', overlaid, img])
  t.notOk(cmp(previous, overlaid), 'the previous image alone differs')

  const missing = await openDisk({ name: 'd', path: uri, dirtyBitmap: 'nope' }).catch((err: VmapipeError) => err)
  t.equal((missing as VmapipeError).code, 'E_NOT_FOUND', 'a bitmap the export does not offer')
  const onFile = await openDisk({ name: 'd', path: previous, dirtyBitmap: 'bm0' }).catch((err: VmapipeError) => err)
  t.equal((onFile as VmapipeError).code, 'E_OPTION', 'a dirty bitmap needs an NBD source')
  const incremental = await openDisk({ name: 'drive-scsi0', path: uri, dirtyBitmap: 'bm0' })
  const refused = await packArchive([incremental], { stream: new Writable({ write: (_c, _e, cb) => cb() }) }).catch((err: VmapipeError) => err)
  incremental.close()
  t.equal((refused as VmapipeError).code, 'E_OPTION', 'packArchive refuses an incremental source')
  const cli = await vma(['create', join(dir, 'x.vma'), '-d', `dirty-bitmap=bm0:drive-scsi0=${uri}`])
  exits(t, cli, 2, 'vma create refuses it before reading')
  t.match(cli.stderr, /--overlay-of/)
  exits(t, await run(process.execPath, [PACK_VMA, '--dirty-bitmap', 'bm0', uri, '-o', join(dir, 'y.vma')]), 2, 'pack-vma too')
})

t.test('vma incremental: the dirty clusters as a qcow2 over the previous image, or a snapshot in a .hdd bundle', async t => {
  const dir = tempDir(t)
  const img = await qcow2Image(t, dir)
  // The previous backup three ways: a raw image, a qcow2, and a Parallels bundle made from an archive.
  await tool(t, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'full.raw')])
  await tool(t, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', img, join(dir, 'full.qcow2')])
  exits(t, await run(process.execPath, [PACK_VMA, img, '-o', join(dir, 'full.vma')]), 0)
  exits(t, await vma(['extract', join(dir, 'full.vma'), join(dir, 'bundle'), '--format', 'parallels-bundle']), 0)
  const bundle = join(dir, 'bundle', 'disk-drive-scsi0.hdd')
  await tool(t, 'qemu-img', ['bitmap', '--add', img, 'bm0'])
  await tool(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x55 100k 8k', '-c', 'write -q -z 5M 64k', '-c', 'write -q -P 0x77 7M 4k', '-c', 'write -q -P 0x99 1100k 1M', img])
  const now = join(dir, 'now.raw')
  await tool(t, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, now])
  const socket = join(dir, 'sock')
  await startQemuNbd(t, { socket }, ['-r', '-e', '4', '-f', 'qcow2', '-B', 'bm0', img])
  const uri = `nbd+unix:///?socket=${socket}`
  const dirty = await clustersWith(t, uri, 'qemu:dirty-bitmap:bm0', type => (type & 1) === 1)

  for (const previous of ['full.raw', 'full.qcow2']) {
    const overlay = join(dir, `over-${previous}.qcow2`)
    const r = await vma(['incremental', uri, '--dirty-bitmap', 'bm0', '--overlay-of', join(dir, previous), '-o', overlay])
    exits(t, r, 0, `over ${previous}`)
    const done = JSON.parse(r.stderr.trim().split('\n').pop() as string) as { clusters: number }
    t.equal(done.clusters, dirty.size, `${previous}: the dirty clusters were written, nothing else`)
    await tool(t, 'qemu-img', ['check', '-q', overlay])
    t.match((await run('qemu-img', ['info', overlay])).stdout.toString(), `backing file: ${previous}`, 'the backing file is named relative to the overlay')
    await tool(t, 'qemu-img', ['compare', '-q', '-U', '-f', 'raw', '-F', 'qcow2', now, overlay])
  }

  const r = await vma(['incremental', uri, '--dirty-bitmap', 'bm0', '--overlay-of', bundle])
  exits(t, r, 0, 'a snapshot into the bundle')
  const xml = readFileSync(join(bundle, 'DiskDescriptor.xml'), 'utf8')
  t.equal((xml.match(/<Image>/g) ?? []).length, 2, 'the descriptor names two images')
  const merged = join(dir, 'merged.raw')
  exits(t, await sh(`${q(process.execPath)} ${q(PACK_VMA)} ${q(bundle)} | ${vmaCmd} extract - - > ${q(merged)}`), 0)
  t.ok(cmp(merged, now), 'the bundle with its new top snapshot reads as the disk does now')
  const info = JSON.parse((await vma(['info', bundle, '--json'])).stdout.toString()) as { layers: number }
  t.equal(info.layers, 2)

  const wrongSize = join(dir, 'small.raw')
  writeFileSync(wrongSize, Buffer.alloc(65536))
  const refused = await vma(['incremental', uri, '--dirty-bitmap', 'bm0', '--overlay-of', wrongSize, '-o', join(dir, 'x.qcow2')])
  exits(t, refused, 1, 'a previous backup of another size')
  t.notOk(existsSync(join(dir, 'x.qcow2')))
})

t.test('restore into qemu-nbd of a blank qcow2 equals the source', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(72))
  for (const name of ['drive-scsi0', 'drive-efidisk0']) {
    const size = fx.spec.devices.find(d => d.name === name)?.size as number
    const target = join(dir, `${name}.qcow2`)
    await tool(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', target, String(size)])
    const socket = join(dir, `${name}.sock`)
    const peer = await startQemuNbd(t, { socket }, ['-f', 'qcow2', target])
    const r = await vma(['extract', fx.archive, '-d', name, '--to', `nbd+unix:///?socket=${socket}`])
    exits(t, r, 0, `extract -d ${name} --to qemu-nbd`)
    t.match(r.stderr, /"prezeroed":true/, 'qemu-nbd zeroes fast, so only data is sent')
    await peer.stop()
    await tool(t, 'qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', target, fx.sources.get(name) as string])
    await tool(t, 'qemu-img', ['check', '-q', target])
  }
  const small = join(dir, 'small.qcow2')
  await tool(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', small, '64K'])
  await startQemuNbd(t, { socket: join(dir, 'small.sock') }, ['-f', 'qcow2', small])
  const tooSmall = await vma(['extract', fx.archive, '-d', 'scsi0', '--to', `nbd+unix:///?socket=${join(dir, 'small.sock')}`])
  exits(t, tooSmall, 2, 'an export smaller than the disk is refused')
  t.match(tooSmall.stderr, /is 65536 bytes; drive-scsi0 needs 3158016/)
  exits(t, await vma(['extract', fx.archive, '--to', `nbd+unix:///?socket=${join(dir, 'small.sock')}`]), 2, 'several disks and no -d')
})

t.test('restore over old data into nbdkit, with fast zero, with WRITE_ZEROES only, and with neither', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(73))
  const source = fx.sources.get('drive-scsi0') as string
  const size = readFileSync(source).length
  const junk = join(dir, 'junk')
  writeFileSync(junk, new Rng(74).fill(Buffer.alloc(size)))
  const variants: Array<[string, string[], RegExp]> = [
    ['memory', [], /"prezeroed":true/],
    ['nozero fastzeromode=none', ['--filter=nozero', 'memory', `size=${size}`, 'fastzeromode=none'], /"prezeroed":false/],
    ['nozero zeromode=none', ['--filter=nozero', 'memory', `size=${size}`, 'zeromode=none'], /"prezeroed":false/],
  ]
  for (const [i, [what, args, prezeroed]] of variants.entries()) {
    const socket = join(dir, `k${i}.sock`)
    await startNbdkit(t, socket, args.length > 0 ? args : ['memory', `size=${size}`])
    const uri = `nbd+unix:///?socket=${socket}`
    exits(t, await run('nbdcopy', [junk, uri]), 0, `${what}: old data first`)
    const r = await vma(['extract', fx.archive, '-d', 'scsi0', '--to', uri])
    exits(t, r, 0, `${what}: restore`)
    t.match(r.stderr, prezeroed)
    const back = join(dir, `back${i}`)
    exits(t, await run('nbdcopy', [uri, back]), 0)
    t.ok(cmp(back, source), `${what}: the export now holds the disk, zeros included`)
  }
  await startNbdkit(t, join(dir, 'ro.sock'), ['-r', 'memory', `size=${size}`])
  const ro = await vma(['extract', fx.archive, '-d', 'scsi0', '--to', `nbd+unix:///?socket=${join(dir, 'ro.sock')}`])
  exits(t, ro, 2, 'a read-only export is refused')
  t.match(ro.stderr, /is read-only/)
})

/** A server that does the handshake right and then answers every request with `answer`. */
async function fakeServer (t: Test, socket: string, handshake: 'good' | 'garbage' | 'hangup' | 'silent', answer?: (s: Socket, request: Buffer) => void): Promise<void> {
  const sockets: Socket[] = []
  const server = createServer(s => {
    sockets.push(s)
    s.on('error', () => {})
    if (handshake === 'silent') return
    if (handshake === 'garbage') { s.end('HTTP/1.1 400 Bad Request\r\n\r\n'); return }
    const greeting = Buffer.from('NBDMAGICIHAVEOPT\0\x03', 'latin1')
    s.write(greeting)
    if (handshake === 'hangup') { s.destroy(); return }
    let buffered = Buffer.alloc(0)
    let phase: 'flags' | 'options' | 'requests' = 'flags'
    const reply = (option: number, type: number, data = Buffer.alloc(0)): void => {
      const h = Buffer.alloc(20)
      h.writeBigUInt64BE(0x3e889045565a9n, 0)
      h.writeUInt32BE(option, 8)
      h.writeUInt32BE(type, 12)
      h.writeUInt32BE(data.length, 16)
      s.write(Buffer.concat([h, data]))
    }
    s.on('data', (b: Buffer) => {
      buffered = Buffer.concat([buffered, b])
      for (;;) {
        if (phase === 'flags') {
          if (buffered.length < 4) return
          buffered = buffered.subarray(4)
          phase = 'options'
        } else if (phase === 'options') {
          if (buffered.length < 16 || buffered.length < 16 + buffered.readUInt32BE(12)) return
          const option = buffered.readUInt32BE(8)
          buffered = buffered.subarray(16 + buffered.readUInt32BE(12))
          if (option === 10) reply(option, 4, Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('base:allocation')]))
          if (option === 7) {
            const info = Buffer.alloc(12)
            info.writeBigUInt64BE(1048576n, 2)
            info.writeUInt16BE(3, 10)
            reply(option, 3, info)
            phase = 'requests'
          }
          reply(option, 1)
        } else {
          if (buffered.length < 28) return
          answer?.(s, buffered.subarray(0, 28))
          buffered = buffered.subarray(28)
        }
      }
    })
  })
  await new Promise<void>(resolve => server.listen(socket, resolve))
  t.teardown(() => { server.close(); for (const s of sockets) s.destroy() })
}

function chunk (cookie: Buffer, type: number, payload: Buffer, flags = 1): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x668e33ef, 0)
  h.writeUInt16BE(flags, 4)
  h.writeUInt16BE(type, 6)
  cookie.copy(h, 8)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}

t.test('servers that fail or break the protocol: clear errors and exit codes', async t => {
  const dir = tempDir(t)
  const pack = async (uri: string): Promise<Awaited<ReturnType<typeof run>>> => await run(process.execPath, [PACK_VMA, uri, '-o', join(dir, 'out.vma'), '--force'])

  const none = await pack(`nbd+unix:///?socket=${join(dir, 'nobody')}`)
  exits(t, none, 3, 'nothing listening: system error')
  t.equal(failure(none).code, 'E_NBD_CONNECT')

  await fakeServer(t, join(dir, 'http'), 'garbage')
  const http = await pack(`nbd+unix:///?socket=${join(dir, 'http')}`)
  exits(t, http, 1, 'not an NBD server: invalid input')
  t.equal(failure(http).code, 'E_NBD_PROTOCOL')

  await fakeServer(t, join(dir, 'hangup'), 'hangup')
  const hangup = await pack(`nbd+unix:///?socket=${join(dir, 'hangup')}`)
  exits(t, hangup, 3, 'a server that hangs up in the handshake: system error')
  t.equal(failure(hangup).code, 'E_NBD_CONNECT')

  await fakeServer(t, join(dir, 'silent'), 'silent')
  const silent = await NbdClient.connect(`nbd+unix:///?socket=${join(dir, 'silent')}`, { handshakeTimeout: 200 }).catch((err: VmapipeError) => err)
  t.match(silent, { code: 'E_NBD_CONNECT' }, 'a server that never greets: the client gives up')

  // Block status says data everywhere; the READ reply lands outside the request.
  await fakeServer(t, join(dir, 'stray'), 'good', (s, req) => {
    const cookie = req.subarray(8, 16)
    const length = req.readUInt32BE(24)
    if (req.readUInt16BE(6) === 7) {
      const status = Buffer.alloc(12)
      status.writeUInt32BE(1, 0)
      status.writeUInt32BE(length, 4)
      s.write(chunk(cookie, 5, status))
      return
    }
    const data = Buffer.alloc(8 + 4096, 1)
    data.writeBigUInt64BE(req.readBigUInt64BE(16) + BigInt(length), 0)
    s.write(chunk(cookie, 1, data))
  })
  const stray = await pack(`nbd+unix:///?socket=${join(dir, 'stray')}`)
  exits(t, stray, 1, 'a data chunk outside its request: invalid input')
  t.equal(failure(stray).code, 'E_NBD_PROTOCOL')

  // Data first (reads of an unwritten memory disk would never be made: it is all hole), then every read fails.
  const eioUri = `nbd+unix:///?socket=${join(dir, 'eio.sock')}`
  await startNbdkit(t, join(dir, 'eio.sock'), ['--filter=error', 'memory', 'size=1M', 'error-pread=EIO', 'error-pread-rate=100%'])
  writeFileSync(join(dir, 'ones'), Buffer.alloc(1048576, 1))
  exits(t, await run('nbdcopy', [join(dir, 'ones'), eioUri]), 0)
  const eio = await pack(eioUri)
  exits(t, eio, 3, 'a server that answers EIO: system error')
  t.equal(failure(eio).code, 'E_NBD_SERVER_ERROR')

  const fx = writeFixture(dir, multiDeviceSpec(75))
  const served = await startServe(t, [fx.archive, '--socket', join(dir, 'serve.sock')])
  const unknown = await pack(served.uri('drive-nope'))
  exits(t, unknown, 2, 'an export that does not exist: E_NOT_FOUND')
  t.equal(failure(unknown).code, 'E_NOT_FOUND')
  t.match(failure(unknown).msg, 'drive-nope', 'naming the export')
  exits(t, await pack('nbds://host/x'), 2, 'TLS URIs are refused')
})
