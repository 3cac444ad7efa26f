/**
 * The server's fast paths keep every byte: an indexed archive read by
 * synchronous positional reads (one per run of stored blocks, partly zero
 * clusters and clusters out of order included), read buffers in power-of-two
 * sizes reused across READs of any length, and READs longer than a piece sent
 * as several, with structured and with simple replies. A read that fails
 * (the archive truncated under the server) is an error reply, and the server
 * serves on.
 */
import t from 'tap'
import { readFileSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir } from './helpers/run.js'
import { NBD, RawPeer, open, readChunk, readSimple, request, startServe } from './helpers/nbd.js'
import { Rng, makeDisk } from './helpers/random.js'
import { buildArchive, scatter } from './helpers/vma-builder.js'
import { openNbdDisk } from '../lib/nbd/client.js'

const MiB = 1048576
/** NBD_EIO: what a failed read is answered with. */
const EIO = 5
/** Not a whole number of clusters: the last one is short. */
const SIZE = 24 * MiB + 12288

/** An archive of one disk, clusters shuffled across extents, and the disk it holds. */
function archive (dir: string): { path: string, image: Buffer } {
  const rng = new Rng(14)
  const image = makeDisk(rng, SIZE)
  const devices = [{ id: 1, name: 'drive-scsi0', size: SIZE, data: image }]
  const path = join(dir, 'disk.vma')
  writeFileSync(path, buildArchive({ configs: [{ name: 'qemu-server.conf', data: Buffer.from('scsi0: x\n') }], devices, extents: scatter(rng, devices) }))
  return { path, image }
}

/** Reads at odd offsets and of odd lengths, across extent and cluster boundaries, some longer than a piece (1 MiB). */
function oddReads (rng: Rng): Array<[number, number]> {
  const reads: Array<[number, number]> = [[0, SIZE], [SIZE - 5000, 5000], [65536 - 1, 2], [3 * MiB + 5, 2 * MiB + 4099]]
  for (let i = 0; i < 24; i++) {
    const length = 1 + rng.int(3 * MiB)
    reads.push([rng.int(SIZE - length), length])
  }
  return reads
}

t.test('an archive served: nbdcopy at several request sizes and our client at odd ranges get the disk byte for byte', async t => {
  const dir = tempDir(t)
  const { path, image } = archive(dir)
  const server = await startServe(t, [path, '--socket', join(dir, 's.sock')])
  const uri = server.uri('drive-scsi0')
  for (const size of ['65536', '262144', '4194304']) {
    const out = join(dir, `copy-${size}.raw`)
    exits(t, await run('nbdcopy', [`--request-size=${size}`, uri, out]), 0, `nbdcopy --request-size=${size}`)
    t.ok(readFileSync(out).equals(image), `nbdcopy --request-size=${size}: the disk`)
  }
  // Our client's reads as they come (up to 2 MiB each), many in flight at once over one connection.
  const disk = await openNbdDisk(uri)
  t.teardown(async () => { await disk.close() })
  const reads = oddReads(new Rng(3))
  const got = await Promise.all(reads.map(async ([at, length]) => {
    const buf = Buffer.alloc(length, 0xa5)
    await disk.read(buf, at)
    return buf
  }))
  const wrong = reads.filter(([at, length], i) => !got[i].equals(image.subarray(at, at + length)))
  t.same(wrong, [], `${reads.length} reads of 2 B to the whole disk, at odd offsets: every byte as in the disk`)
})

t.test('READs of several pieces, simple and structured, from an archive and from a raw file', async t => {
  const dir = tempDir(t)
  const { path, image } = archive(dir)
  const raw = join(dir, 'disk.raw')
  writeFileSync(raw, image)
  const socket = join(dir, 's.sock')
  await startServe(t, [path, raw, '--name', 'raw', '--socket', socket])
  const at = MiB + 4097
  const length = 5 * MiB + 3
  for (const name of ['drive-scsi0', 'raw']) {
    const simple = await RawPeer.connect({ socket })
    await open(simple, name, { structured: false })
    simple.write(request(NBD.CMD.READ, at, length, { cookie: 1 }))
    t.same(await readSimple(simple), { error: 0, cookie: 1n }, `${name}, simple reply: no error`)
    t.ok((await simple.read(length))?.equals(image.subarray(at, at + length)), `${name}, simple reply: ${length} bytes as in the disk`)
    simple.destroy()

    const structured = await RawPeer.connect({ socket })
    await open(structured, name)
    structured.write(request(NBD.CMD.READ, at, length, { cookie: 2 }))
    const got = Buffer.alloc(length, 0xa5)
    let data = 0
    for (;;) {
      const c = await readChunk(structured)
      if (c === null) throw new Error('the server closed inside a reply')
      const offset = Number(c.payload.readBigUInt64BE(0))
      if (c.type === NBD.CHUNK.OFFSET_DATA) {
        c.payload.copy(got, offset - at, 8)
        data = Math.max(data, c.payload.length - 8)
      } else if (c.type === NBD.CHUNK.OFFSET_HOLE) got.fill(0, offset - at, offset - at + c.payload.readUInt32BE(8))
      else t.fail(`chunk type ${c.type}`)
      if ((c.flags & 1) !== 0) break
    }
    t.ok(got.equals(image.subarray(at, at + length)), `${name}, structured reply: every byte as in the disk`)
    t.ok(data > 0 && data <= MiB, `${name}: data chunks of at most a MiB (the longest ${data})`)
    structured.destroy()
  }
})

t.test('an archive truncated under the server: a READ past its new end is an I/O error, the server serves on', async t => {
  const dir = tempDir(t)
  const { path, image } = archive(dir)
  const socket = join(dir, 's.sock')
  const server = await startServe(t, [path, '--socket', socket])
  const p = await RawPeer.connect({ socket })
  await open(p, 'drive-scsi0', { structured: false })
  p.write(request(NBD.CMD.READ, 0, 4096, { cookie: 1 }))
  t.same(await readSimple(p), { error: 0, cookie: 1n }, 'a READ before')
  t.ok((await p.read(4096))?.equals(image.subarray(0, 4096)), 'with its bytes')
  truncateSync(path, 12288 + 512)
  p.write(request(NBD.CMD.READ, 0, SIZE, { cookie: 2 }))
  t.same(await readSimple(p), { error: EIO, cookie: 2n }, 'the whole disk now: EIO')
  p.write(request(NBD.CMD.FLUSH, 0, 0, { cookie: 3 }))
  t.same(await readSimple(p), { error: 0, cookie: 3n }, 'the same connection answers on')
  p.destroy()
  exits(t, await run('nbdinfo', ['--size', server.uri('drive-scsi0')]), 0, 'and the server takes new clients')
})
