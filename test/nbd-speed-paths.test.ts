/**
 * The NBD fast paths keep every byte: the client's reads straight into the
 * caller's buffer (large reads, many in flight, replies split anywhere by the
 * socket), its map asked for in windows, and a served raw file's holes
 * reported through base:allocation from its map cache.
 */
import t from 'tap'
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { run, tempDir } from './helpers/run.js'
import { startQemuNbd, startServe } from './helpers/nbd.js'
import { Rng } from './helpers/random.js'
import { diskRecords } from '../lib/io/disk-records.js'
import { openNbdDisk } from '../lib/nbd/client.js'
import { holesAddon } from '../lib/raw/holes.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { expandCluster } from '../lib/record.js'

const MiB = 1048576

/** A 160 MiB sparse file: random data in 1 MiB runs every 3 MiB, unaligned bits of data between them; the rest holes. */
function sparseDisk (path: string): Buffer {
  const size = 160 * MiB
  const image = Buffer.alloc(size)
  const rng = new Rng(7)
  const fd = openSync(path, 'w')
  const put = (at: number, length: number): void => {
    const bytes = rng.fill(Buffer.alloc(length))
    bytes.copy(image, at)
    writeSync(fd, bytes, 0, length, at)
  }
  for (let at = 0; at < size; at += 3 * MiB) put(at, MiB)
  for (let at = 2 * MiB + 1234; at < size; at += 7 * MiB) put(at, 5000)
  // The file's last byte, so that the file is the disk's size: zero, over whatever was put there.
  image[size - 1] = 0
  writeSync(fd, Buffer.alloc(1), 0, 1, size - 1)
  closeSync(fd)
  return image
}

t.test('a sparse file through qemu-nbd: records read by openNbdDisk match the file, the map asked for a few times', async t => {
  const dir = tempDir(t)
  const path = join(dir, 'disk.raw')
  const image = sparseDisk(path)
  const socket = join(dir, 'q.sock')
  await startQemuNbd(t, { socket }, ['-r', '-f', 'raw', path])
  const disk = await openNbdDisk(`nbd+unix:///?socket=${socket}`)
  const records: ClusterRecord[] = []
  await pipeline(diskRecords(disk, 0, { readAhead: 8 }), new Writable({ objectMode: true, write (r: ClusterRecord, _e, cb) { records.push(r); cb() } }))
  const got = Buffer.alloc(image.length)
  for (const r of records) expandCluster(r, image.length).copy(got, r.cluster * 65536)
  let first = -1
  for (let i = 0; i < image.length && first < 0; i += 4096) if (!got.subarray(i, i + 4096).equals(image.subarray(i, i + 4096))) first = i
  t.equal(first, -1, 'every byte as in the file')
  t.ok(disk.client.stats.statusQueries <= 8, `block status asked ${disk.client.stats.statusQueries} times for 160 MiB read a MiB at a time`)
  // diskRecords closed that disk at its end.
  const again = await openNbdDisk(`nbd+unix:///?socket=${socket}`)
  t.teardown(async () => { await again.close() })
  // Reads larger than a request, and unaligned: split into several requests in flight, answered straight into the buffer.
  const big = Buffer.alloc(37 * MiB + 4096)
  await again.read(big, 3 * MiB - 4096)
  t.ok(big.equals(image.subarray(3 * MiB - 4096, 3 * MiB - 4096 + big.length)), 'a 37 MiB read across data and holes')
  const small = await Promise.all(Array.from({ length: 50 }, async (_, i) => {
    const buf = Buffer.alloc(1000 + i * 7919)
    await again.read(buf, i * 3 * MiB + 999)
    return buf.equals(image.subarray(i * 3 * MiB + 999, i * 3 * MiB + 999 + buf.length))
  }))
  t.ok(small.every(Boolean), '50 small reads at once, each its own bytes')
})

const noAddon = holesAddon() === null ? 'vmapipe-holes not built' : false
t.test('vma serve of a sparse raw file reports its holes, and nbdcopy gets every byte', { skip: noAddon }, async t => {
  const dir = tempDir(t)
  const path = join(dir, 'disk.raw')
  sparseDisk(path)
  const served = await startServe(t, [path, '--name', 'd', '--socket', join(dir, 's.sock')])
  const uri = served.uri('d')
  const map = await run('nbdinfo', ['--map', '--json', uri])
  t.equal(map.code, 0, 'nbdinfo --map')
  const extents = JSON.parse(map.stdout.toString()) as Array<{ offset: number, length: number, type: number }>
  const holes = extents.filter(e => (e.type & 1) !== 0).reduce((n, e) => n + e.length, 0)
  t.ok(holes > 90 * MiB, `${holes} bytes reported as holes`)
  t.notOk(extents.some(e => (e.type & 1) !== 0 && e.offset < 3 * MiB * 53 && e.offset % (3 * MiB) < MiB), 'no hole where the data runs are')
  const copy = join(dir, 'copy.raw')
  const r = await run('nbdcopy', [uri, copy])
  t.equal(r.code, 0, 'nbdcopy')
  t.ok(readFileSync(copy).equals(readFileSync(path)), 'the copy is the file')
})
