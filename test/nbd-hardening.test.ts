/**
 * The NBD client against servers that try to run away with it (issue 12,
 * defect 6): block sizes out of the spec's range, READ replies that answer
 * bytes twice or not at all, servers that stall, extents of a byte, and
 * handshakes that never end. Each is refused with E_NBD_PROTOCOL or given
 * up on with E_NBD_CONNECT, in bounded time and memory.
 */
import t, { type Test } from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Socket } from 'node:net'
import { PACK_VMA, exits, run, tempDir, vma } from './helpers/run.js'
import { failure as logFailure } from './helpers/logged.js'
import { NBD, type SeenRequest, dataChunk, fakeServer, replyChunk, statusChunk } from './helpers/nbd.js'
import { NbdClient, openNbdDisk } from '../lib/nbd/client.js'
import { NbdDiskWriter } from '../lib/nbd/writer.js'
import type { VmapipeError } from '../lib/errors.js'

const MiB = 1048576

/** The byte at `offset` of the fake servers' disk. */
const byteAt = (offset: number): number => (offset * 7 + (offset >> 12)) & 0xff
function pattern (offset: number, length: number): Buffer {
  const b = Buffer.alloc(length)
  for (let i = 0; i < length; i++) b[i] = byteAt(offset + i)
  return b
}

/** Answers READ with one data chunk, BLOCK_STATUS with all data, everything else with success. */
function honest (s: Socket, req: SeenRequest): void {
  if (req.type === NBD.CMD.READ) s.write(dataChunk(req.cookie, req.offset, pattern(req.offset, req.length)))
  else if (req.type === NBD.CMD.BLOCK_STATUS) s.write(statusChunk(req.cookie, [[req.length, 0]]))
  else s.write(replyChunk(req.cookie, NBD.CHUNK.NONE, Buffer.alloc(0)))
}

async function failure (promise: Promise<unknown>): Promise<VmapipeError | undefined> {
  return await promise.then(() => undefined, (e: VmapipeError) => e)
}

/** Runs `act`, asserting it fails with `code` within `seconds`. */
async function refused (t: Test, act: () => Promise<unknown>, code: string, seconds: number, what: string): Promise<VmapipeError | undefined> {
  const start = performance.now()
  const err = await failure(act())
  const took = (performance.now() - start) / 1000
  t.equal(err?.code, code, `${what}: ${code}`)
  t.ok(took < seconds, `${what}: within ${seconds} s (${took.toFixed(2)} s)`)
  return err
}

t.test('block sizes outside the spec are refused at the handshake, before anything is sized by them', async t => {
  const dir = tempDir(t)
  const cases: Array<[string, [number, number, number]]> = [
    ['maximum payload 0', [1, 4096, 0]],
    ['maximum payload 1', [1, 4096, 1]],
    ['maximum below the preferred size', [512, 4096, 2048]],
    ['minimum 0', [0, 4096, MiB]],
    ['minimum not a power of 2', [3, 4096, MiB]],
    ['minimum over 64 KiB', [131072, 131072, MiB]],
    ['preferred below 512', [1, 256, MiB]],
  ]
  for (const [i, [what, blockSize]] of cases.entries()) {
    const socket = join(dir, `bs${i}`)
    await fakeServer(t, socket, { blockSize, answer: honest })
    await refused(t, async () => await NbdClient.connect(`nbd+unix:///?socket=${socket}`), 'E_NBD_PROTOCOL', 2, what)
  }
  // The defect as a user met it: pack-vma from a server saying 0, exit 1 at once.
  const r = await run(process.execPath, [PACK_VMA, `nbd+unix:///?socket=${join(dir, 'bs0')}`, '-o', join(dir, 'out.vma')])
  exits(t, r, 1, 'pack-vma from a server with maximum payload 0: invalid input')
  t.equal(logFailure(r).code, 'E_NBD_PROTOCOL')

  // In range but odd: a maximum of 3000 with minimum 512 reads in requests of 2560 (whole minimum blocks).
  const odd = join(dir, 'odd')
  const lengths = new Set<number>()
  await fakeServer(t, odd, { blockSize: [512, 512, 3000], answer: (s, req) => { if (req.type === NBD.CMD.READ) lengths.add(req.length); honest(s, req) } })
  const client = await NbdClient.connect(`nbd+unix:///?socket=${odd}`)
  const buf = Buffer.alloc(64 * 1024)
  await client.read(buf, 4096)
  t.ok(buf.equals(pattern(4096, buf.length)), 'the bytes are right')
  t.same([...lengths].sort((a, b) => a - b), [1536, 2560], 'requests of at most 2560 bytes, multiples of 512')
  await client.close()
})

t.test('every byte of a READ is answered exactly once', async t => {
  const dir = tempDir(t)
  const half = 512 * 1024
  // The defect: two chunks for the same first half, so the byte count adds up to the request.
  const cases: Array<[string, (s: Socket, req: SeenRequest) => void]> = [
    ['the first half twice', (s, req) => {
      s.write(dataChunk(req.cookie, req.offset, pattern(req.offset, half), 0))
      s.write(dataChunk(req.cookie, req.offset, pattern(req.offset, half)))
    }],
    ['a data chunk overlapping a hole chunk', (s, req) => {
      const hole = Buffer.alloc(12)
      hole.writeBigUInt64BE(BigInt(req.offset + half - 4096))
      hole.writeUInt32BE(half + 4096, 8)
      s.write(dataChunk(req.cookie, req.offset, pattern(req.offset, half), 0))
      s.write(replyChunk(req.cookie, NBD.CHUNK.OFFSET_HOLE, hole))
    }],
    ['half the bytes, then done', (s, req) => { s.write(dataChunk(req.cookie, req.offset + half, pattern(req.offset + half, half))) }],
    ['a thousand single bytes apart', (s, req) => {
      for (let i = 0; i < 1100; i++) s.write(dataChunk(req.cookie, req.offset + 2 * i, Buffer.alloc(1), 0))
    }],
  ]
  for (const [i, [what, answer]] of cases.entries()) {
    const socket = join(dir, `r${i}`)
    await fakeServer(t, socket, { answer })
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`)
    await refused(t, async () => await client.read(Buffer.alloc(2 * half), 0), 'E_NBD_PROTOCOL', 5, what)
    client.destroy()
  }

  // Out of order, in pieces of every size, holes between: accepted, and each byte where it belongs.
  const socket = join(dir, 'shuffled')
  await fakeServer(t, socket, {
    answer: (s, req) => {
      const cuts = [0, 1, 4096, 5000, 300000, half, req.length]
      const pieces = cuts.slice(0, -1).map((at, k) => [at, cuts[k + 1] - at]).reverse()
      pieces.forEach(([at, n], k) => {
        const done = k === pieces.length - 1 ? 1 : 0
        if (k === 2) {
          const hole = Buffer.alloc(12)
          hole.writeBigUInt64BE(BigInt(req.offset + at))
          hole.writeUInt32BE(n, 8)
          s.write(replyChunk(req.cookie, NBD.CHUNK.OFFSET_HOLE, hole, done))
        } else s.write(dataChunk(req.cookie, req.offset + at, pattern(req.offset + at, n), done))
      })
    },
  })
  const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`)
  const buf = Buffer.alloc(2 * half, 0xee)
  await client.read(buf, 0)
  const expected = pattern(0, 2 * half)
  expected.fill(0, 5000, 300000)
  t.ok(buf.equals(expected), 'chunks in any order, a hole among them: the right bytes')
  await client.close()
})

t.test('a server that stalls: each request times out, the connection is dropped', async t => {
  const dir = tempDir(t)
  const stall = (type: number, answer?: (s: Socket, req: SeenRequest) => void) => (s: Socket, req: SeenRequest): void => {
    if (req.type !== type) return honest(s, req)
    answer?.(s, req)
  }
  const cases: Array<[string, (s: Socket, req: SeenRequest) => void, (c: NbdClient) => Promise<unknown>]> = [
    ['a READ never answered', stall(NBD.CMD.READ), async c => { await c.read(Buffer.alloc(65536), 0) }],
    ['a READ answered in part', stall(NBD.CMD.READ, (s, req) => s.write(dataChunk(req.cookie, req.offset, Buffer.alloc(4096), 0))), async c => { await c.read(Buffer.alloc(65536), 0) }],
    ['an error chunk without DONE', stall(NBD.CMD.READ, (s, req) => {
      const e = Buffer.alloc(6)
      e.writeUInt32BE(5)
      s.write(replyChunk(req.cookie, NBD.CHUNK.ERROR, e, 0))
    }), async c => { await c.read(Buffer.alloc(65536), 0) }],
    ['a BLOCK_STATUS never answered', stall(NBD.CMD.BLOCK_STATUS), async c => await c.blockStatus('base:allocation', 0, MiB)],
    ['a WRITE never answered', stall(NBD.CMD.WRITE), async c => { await c.write(0, [Buffer.alloc(65536)]) }],
  ]
  for (const [i, [what, answer, act]] of cases.entries()) {
    const socket = join(dir, `s${i}`)
    await fakeServer(t, socket, { answer })
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`, { contexts: ['base:allocation'], timeout: 300 })
    const err = await refused(t, async () => await act(client), 'E_NBD_CONNECT', 3, what)
    t.match(err?.message, /no complete reply to NBD_CMD_\w+ .* within 0.3 s/, `${what}: the message names the request`)
  }

  // A slow but steady server is not a stalled one: replies within the timeout, for longer than it in all.
  const steady = join(dir, 'steady')
  // Margins wide enough for a loaded machine: 0.25 s a reply against a timeout of 1 s (0.1 against 0.3 failed at load 11).
  await fakeServer(t, steady, { answer: (s, req) => { setTimeout(() => honest(s, req), 250) } })
  const client = await NbdClient.connect(`nbd+unix:///?socket=${steady}`, { timeout: 1000, maxInFlight: 1 })
  const buf = Buffer.alloc(6 * 2 * MiB)
  await client.read(buf, 0)
  t.ok(buf.equals(pattern(0, buf.length)), 'six reads one after another, 1.5 s in all, none over 1 s: fine')
  await client.close()

  // Through the CLI: --nbd-timeout on pack-vma and on vma extract --to.
  const stalled = `nbd+unix:///?socket=${join(dir, 's0')}`
  const start = performance.now()
  const r = await run(process.execPath, [PACK_VMA, stalled, '-o', join(dir, 'out.vma'), '--nbd-timeout', '0.5'])
  exits(t, r, 3, 'pack-vma --nbd-timeout 0.5 from a stalled server: system error')
  t.equal(logFailure(r).code, 'E_NBD_CONNECT')
  t.ok(performance.now() - start < 10_000, 'and soon')
  const archive = join(dir, 'small.vma')
  const raw = join(dir, 'small.raw')
  const { writeFileSync } = await import('node:fs')
  writeFileSync(raw, pattern(0, 65536))
  exits(t, await run(process.execPath, [PACK_VMA, raw, '-o', archive]), 0)
  const x = await vma(['extract', archive, '--to', `nbd+unix:///?socket=${join(dir, 's4')}`, '--nbd-timeout', '0.5'])
  exits(t, x, 3, 'vma extract --to a server that never acknowledges a WRITE: system error')
  t.equal(logFailure(x).code, 'E_NBD_CONNECT')
})

t.test('extents of a byte: work bounded by the bytes, not by the extent count', async t => {
  const dir = tempDir(t)
  const size = MiB
  let reads = 0
  let queries = 0
  /** Alternating data and zero runs of one byte, as many as fit in one chunk. */
  const tiny = (s: Socket, req: SeenRequest): void => {
    if (req.type === NBD.CMD.BLOCK_STATUS) {
      queries++
      const n = Math.min(req.length, 65536)
      s.write(statusChunk(req.cookie, Array.from({ length: n }, (_, i) => [1, (req.offset + i) % 2 === 0 ? 0 : 3] as [number, number])))
      return
    }
    if (req.type === NBD.CMD.READ) reads++
    honest(s, req)
  }
  await fakeServer(t, join(dir, 'tiny'), { size, answer: tiny })
  let start = performance.now()
  const disk = await openNbdDisk(`nbd+unix:///?socket=${join(dir, 'tiny')}`)
  const map = await disk.map(0, size)
  t.ok(map.length <= 2 * size / 4096, `${map.length} extents for ${queries} replies of up to 65536 descriptors`)
  t.same(map, [{ offset: 0, length: size, data: true }], 'every 4 KiB grain holds data: one extent')
  await disk.close()
  t.ok(performance.now() - start < 5000, `mapped in ${(performance.now() - start).toFixed(0)} ms`)

  // One descriptor of a byte per reply: a question per 4 KiB at most, not per byte.
  queries = 0
  await fakeServer(t, join(dir, 'one'), {
    size,
    answer: (s, req) => {
      if (req.type !== NBD.CMD.BLOCK_STATUS) return honest(s, req)
      queries++
      s.write(statusChunk(req.cookie, [[1, 3]]))
    },
  })
  start = performance.now()
  const one = await openNbdDisk(`nbd+unix:///?socket=${join(dir, 'one')}`)
  const oneMap = await one.map(0, size)
  t.ok(queries <= 2 * size / 4096, `${queries} questions for a 1 MiB export`)
  t.ok(oneMap.every(e => e.offset % 4096 === 0 && e.length % 4096 === 0), 'extents in whole 4 KiB grains')
  await one.close()

  // Holes of a grain or more stay holes; a byte of data makes its grain data.
  await fakeServer(t, join(dir, 'mixed'), {
    size,
    answer: (s, req) => {
      if (req.type !== NBD.CMD.BLOCK_STATUS) return honest(s, req)
      // The layout, cut to the range asked about.
      const layout: Array<[number, number, number]> = [[0, 10000, 3], [10000, 10001, 0], [10001, 40001, 3], [40001, size, 0]]
      const end = req.offset + req.length
      s.write(statusChunk(req.cookie, layout.filter(([a, b]) => b > req.offset && a < end).map(([a, b, f]) => [Math.min(b, end) - Math.max(a, req.offset), f])))
    },
  })
  const mixed = await openNbdDisk(`nbd+unix:///?socket=${join(dir, 'mixed')}`)
  t.same(await mixed.map(0, size), [
    { offset: 0, length: 8192, data: false },
    { offset: 8192, length: 4096, data: true },
    { offset: 12288, length: 36864 - 12288, data: false },
    { offset: 36864, length: size - 36864, data: true },
  ], 'holes kept in whole grains, data grown to whole grains')
  t.same(await mixed.map(5000, 30000), [
    { offset: 5000, length: 8192 - 5000, data: false },
    { offset: 8192, length: 4096, data: true },
    { offset: 12288, length: 35000 - 12288, data: false },
  ], 'and the same for a range that starts and ends off the grain')
  await mixed.close()

  // The whole way: pack-vma of the byte-extent export in bounded time, and the archive holds the server's bytes.
  reads = 0
  start = performance.now()
  const archive = join(dir, 'tiny.vma')
  exits(t, await run(process.execPath, [PACK_VMA, `nbd+unix:///?socket=${join(dir, 'tiny')}`, '-o', archive]), 0, 'pack-vma')
  const took = performance.now() - start
  t.ok(took < 20_000, `pack-vma of a 1 MiB export told in 1-byte extents took ${(took / 1000).toFixed(1)} s, ${reads} READs`)
  const out = join(dir, 'out')
  exits(t, await vma(['extract', archive, out]), 0)
  t.ok(readFileSync(join(out, 'disk-drive-scsi0.raw')).equals(pattern(0, size)), 'the archive holds the server\'s bytes')
})

t.test('a handshake that never ends is cut short', async t => {
  const dir = tempDir(t)
  const name = (text: string): Buffer => Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from(text)])
  const flood = (make: (i: number) => Buffer) => async (reply: (type: number, data: Buffer) => Promise<boolean>): Promise<void> => {
    for (let i = 0; i < 200_000; i++) if (!await reply(NBD.REP.META_CONTEXT, make(i))) return
    await reply(NBD.REP.ACK, Buffer.alloc(0))
  }
  const cases: Array<[string, FloodCase]> = [
    ['contexts not asked for, 4 KiB names', { meta: flood(i => name(`x:${i}`.padEnd(4000, '.'))) }],
    ['the asked-for context again and again', { meta: flood(() => name('base:allocation')) }],
    ['a flood of NBD_REP_INFO', { infos: true }],
  ]
  for (const [i, [what, c]] of cases.entries()) {
    const socket = join(dir, `h${i}`)
    await fakeServer(t, socket, {
      answer: honest,
      ...(c.meta !== undefined ? { meta: c.meta } : {}),
      ...(c.infos === true ? { blockSize: [1, 4096, MiB], infoFlood: 200_000 } : {}),
    })
    const before = process.memoryUsage().rss
    await refused(t, async () => await NbdClient.connect(`nbd+unix:///?socket=${socket}`, { contexts: ['base:allocation'] }), 'E_NBD_PROTOCOL', 5, what)
    const grew = (process.memoryUsage().rss - before) / MiB
    t.ok(grew < 64, `${what}: memory grew by ${grew.toFixed(0)} MiB`)
  }
})

interface FloodCase { meta?: (reply: (type: number, data: Buffer) => Promise<boolean>) => Promise<void>, infos?: boolean }

t.test('NbdDiskWriter takes the timeout too', async t => {
  const dir = tempDir(t)
  await fakeServer(t, join(dir, 'w'), { answer: (s, req) => { if (req.type !== NBD.CMD.WRITE_ZEROES) honest(s, req) }, flags: 1 | 64 | 2048 })
  const err = await failure(NbdDiskWriter.open(`nbd+unix:///?socket=${join(dir, 'w')}`, { id: 1, name: 'drive-scsi0', size: 65536 }, { timeout: 200 }))
  t.equal(err?.code, 'E_NBD_CONNECT', 'a fast zero that never returns: given up on')
})

t.test('block status chunks: one per selected context, no more', async t => {
  const dir = tempDir(t)
  const cases: Array<[string, (s: Socket, req: SeenRequest) => void]> = [
    ['a context never selected', (s, req) => {
      const chunk = statusChunk(req.cookie, [[req.length, 0]])
      chunk.writeUInt32BE(7, 20)
      s.write(chunk)
    }],
    ['chunk after chunk for the same context, never done', (s, req) => {
      for (let i = 0; i < 1000; i++) s.write(statusChunk(req.cookie, [[4096, 0]], 0))
    }],
  ]
  for (const [i, [what, answer]] of cases.entries()) {
    const socket = join(dir, `b${i}`)
    await fakeServer(t, socket, { answer: (s, req) => { if (req.type === NBD.CMD.BLOCK_STATUS) answer(s, req); else honest(s, req) } })
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`, { contexts: ['base:allocation'] })
    await refused(t, async () => await client.blockStatus('base:allocation', 0, MiB), 'E_NBD_PROTOCOL', 2, what)
  }
})
