/**
 * Clients that break the rules, against `vma serve` in its own process:
 * each gets an error or a closed connection, the server serves on, and its
 * memory stays bounded.
 */
import t, { type Test } from 'tap'
import { writeFileSync, truncateSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import {
  type RawPeer as Peer, type Served, NBD, RawPeer, chunkError, goData, handshake, lstring, metaData, open, option,
  readChunk, readOptionReply, readReply, readSimple, request, rssKiB, startServe,
} from './helpers/nbd.js'

const MiB = 1048576
const BIG = 5 * 1024 * MiB

/** The archive's disks, and big.raw: 5 GiB, sparse, for reads as large as the protocol allows. */
async function serve (t: Test): Promise<{ server: Served, socket: string, size: number }> {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(81))
  const big = join(dir, 'big.raw')
  writeFileSync(big, '')
  truncateSync(big, BIG)
  const socket = join(dir, 'sock')
  const server = await startServe(t, [fx.archive, big, '--socket', socket])
  return { server, socket, size: fx.spec.devices[0].size }
}

async function connect (socket: string): Promise<Peer> {
  return await RawPeer.connect({ socket })
}

/** The server still serves: nbdinfo reads an export's size. */
async function stillServes (t: Test, server: Served, what: string): Promise<void> {
  const r = await run('nbdinfo', ['--size', server.uri('drive-scsi0')])
  exits(t, r, 0, `${what}: the server serves on`)
}

t.test('broken handshakes are hung up on', async t => {
  const { server, socket } = await serve(t)
  const cases: Array<[string, (p: Peer) => Promise<void>]> = [
    ['unknown client flags', async p => { await handshake(p, 0x80000001) }],
    ['wrong option magic', async p => { await handshake(p); p.write(Buffer.concat([Buffer.from('IHAVEOPX'), Buffer.alloc(8)])) }],
    ['an option of 4 GiB - 1', async p => { await handshake(p); p.write(option(99, Buffer.alloc(0), 0xffffffff)) }],
    ['an option just over 64 KiB', async p => { await handshake(p); p.write(option(NBD.OPT.GO, Buffer.alloc(0), 65537)) }],
    ['NBD_OPT_EXPORT_NAME of an unknown export', async p => { await handshake(p); p.write(option(NBD.OPT.EXPORT_NAME, Buffer.from('nope'))) }],
    ['an oldstyle client that sends nothing but garbage', async p => { await p.read(18); p.write(Buffer.alloc(64, 0xff)) }],
  ]
  for (const [what, act] of cases) {
    const p = await connect(socket)
    await act(p)
    await p.closed
    t.pass(`${what}: closed`)
  }
  await stillServes(t, server, 'after broken handshakes')
  const log = server.logs().filter(l => l.level === 40).map(l => String(l.msg))
  t.ok(log.some(m => /unknown client flags/.test(m)) && log.some(m => /4294967295 bytes of data/.test(m)), 'each is logged at warn with the reason')
})

t.test('options: errors for what is unknown or malformed, and the connection goes on', async t => {
  const { server, socket, size } = await serve(t)
  const p = await connect(socket)
  await handshake(p)
  const ask = async (opt: number, data?: Buffer, length?: number): Promise<number | undefined> => {
    p.write(option(opt, data, length))
    return (await readOptionReply(p))?.type
  }
  t.equal(await ask(99), NBD.REP.ERR_UNSUP, 'an unknown option')
  t.equal(await ask(NBD.OPT.STARTTLS), NBD.REP.ERR_UNSUP, 'STARTTLS: no TLS here')
  t.equal(await ask(NBD.OPT.LIST, Buffer.from('x')), NBD.REP.ERR_INVALID, 'NBD_OPT_LIST with data')
  t.equal(await ask(NBD.OPT.GO, Buffer.concat([lstring('drive-scsi0').subarray(0, 4), Buffer.alloc(2)])), NBD.REP.ERR_INVALID, 'NBD_OPT_GO whose name runs past the data')
  t.equal(await ask(NBD.OPT.GO, Buffer.concat([goData('drive-scsi0'), Buffer.alloc(1)])), NBD.REP.ERR_INVALID, 'NBD_OPT_GO with a byte too many')
  t.equal(await ask(NBD.OPT.INFO, goData('drive-nope')), NBD.REP.ERR_UNKNOWN, 'an unknown export')
  t.equal(await ask(NBD.OPT.SET_META_CONTEXT, metaData('drive-scsi0', ['base:allocation'])), NBD.REP.ERR_INVALID, 'contexts before structured replies')
  const lying = Buffer.concat([lstring('drive-scsi0'), Buffer.from([0xff, 0xff, 0xff, 0xff])])
  t.equal(await ask(NBD.OPT.STRUCTURED_REPLY), NBD.REP.ACK, 'structured replies')
  t.equal(await ask(NBD.OPT.LIST_META_CONTEXT, lying), NBD.REP.ERR_INVALID, 'a query count of 2^32 - 1 in 19 bytes')
  t.equal(await ask(NBD.OPT.GO, Buffer.concat([lstring('drive-\0scsi0'), Buffer.alloc(2)])), NBD.REP.ERR_INVALID, 'a name with NUL')
  p.write(option(NBD.OPT.GO, goData('drive-scsi0', [3])))
  const infos: number[] = []
  for (let r = await readOptionReply(p); r?.type === NBD.REP.INFO; r = await readOptionReply(p)) infos.push(r.data.readUInt16BE(0))
  t.same(infos.sort(), [0, 3], 'after all that, NBD_OPT_GO works: NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE')
  p.write(request(NBD.CMD.READ, 0, 4096))
  const chunks = await readReply(p)
  t.ok(chunks.every(c => chunkError(c) === 0), 'and so does a read')
  p.destroy()

  for (const [flags, padding] of [[3, 0], [1, 124]]) {
    const old = await connect(socket)
    await handshake(old, flags)
    old.write(option(NBD.OPT.EXPORT_NAME, Buffer.from('drive-scsi0')))
    const reply = await old.read(10 + padding)
    t.equal(reply?.readBigUInt64BE(0), BigInt(size), `NBD_OPT_EXPORT_NAME (client flags ${flags}): the size, then ${padding} bytes of padding`)
    old.write(request(NBD.CMD.READ, 0, 4096))
    t.equal((await readSimple(old))?.error, 0, 'and simple replies')
    old.destroy()
  }

  const abort = await connect(socket)
  await handshake(abort)
  abort.write(option(NBD.OPT.ABORT))
  t.equal((await readOptionReply(abort))?.type, NBD.REP.ACK, 'NBD_OPT_ABORT is acknowledged')
  await abort.closed
  await stillServes(t, server, 'after bad options')
})

t.test('a thousand options: answered until the cap, then hung up on', async t => {
  const { server, socket } = await serve(t)
  const p = await connect(socket)
  await handshake(p)
  p.write(Buffer.concat(Array.from({ length: 1000 }, () => option(99))))
  let answered = 0
  while ((await readOptionReply(p))?.type === NBD.REP.ERR_UNSUP) answered++
  await p.closed
  t.ok(answered > 0 && answered < 100, `${answered} answered with NBD_REP_ERR_UNSUP, then closed`)
  await stillServes(t, server, 'after a flood of options')
})

t.test('requests: errors for what is out of bounds or not allowed, EPERM for writes; the connection goes on', async t => {
  const { server, socket, size } = await serve(t)
  for (const structured of [true, false]) {
    const p = await connect(socket)
    await open(p, 'big.raw', { structured })
    const error = async (): Promise<number> =>
      structured ? chunkError((await readReply(p)).at(-1) as NonNullable<Awaited<ReturnType<typeof readChunk>>>) : (await readSimple(p))?.error ?? -1
    const mode = structured ? 'structured' : 'simple'
    const cases: Array<[string, Buffer, number]> = [
      ['read past the end', request(NBD.CMD.READ, BIG - 4096, 8192), NBD.EINVAL],
      ['read at an offset of 2^63', request(NBD.CMD.READ, 2 ** 63, 4096), NBD.EINVAL],
      ['read of length 0', request(NBD.CMD.READ, 0, 0), NBD.EINVAL],
      // Too large: EOVERFLOW where structured replies let the server say so.
      ['read of 4 GiB - 1', request(NBD.CMD.READ, 0, 0xffffffff), structured ? NBD.EOVERFLOW : NBD.EINVAL],
      ['read of 32 MiB + 1', request(NBD.CMD.READ, 0, 32 * MiB + 1), structured ? NBD.EOVERFLOW : NBD.EINVAL],
      ['read with an unknown flag', request(NBD.CMD.READ, 0, 4096, { flags: 0x40 }), NBD.EINVAL],
      ['read with DF, not offered', request(NBD.CMD.READ, 0, 4096, { flags: 4 }), NBD.EINVAL],
      ['an unknown command', request(42, 0, 4096), NBD.EINVAL],
      ['trim', request(NBD.CMD.TRIM, 0, 4096), NBD.EPERM],
      ['write zeroes', request(NBD.CMD.WRITE_ZEROES, 0, 4096), NBD.EPERM],
      ['write of 1 MiB, payload sent', Buffer.concat([request(NBD.CMD.WRITE, 0, MiB), Buffer.alloc(MiB, 7)]), NBD.EPERM],
      ['flush with a length', request(NBD.CMD.FLUSH, 0, 1), NBD.EINVAL],
      ['cache past the end', request(NBD.CMD.CACHE, BIG, 1), NBD.EINVAL],
      ['block status without contexts', request(NBD.CMD.BLOCK_STATUS, 0, 4096), NBD.EINVAL],
    ]
    for (const [what, bytes, expected] of cases) {
      p.write(bytes)
      t.equal(await error(), expected, `${mode}: ${what}`)
    }
    p.write(request(NBD.CMD.FLUSH, 0, 0))
    t.equal((await readSimple(p))?.error, 0, `${mode}: flush is a no-op that succeeds`)
    p.write(request(NBD.CMD.CACHE, 0, 65536))
    t.equal((await readSimple(p))?.error, 0, `${mode}: so is cache`)
    p.write(request(NBD.CMD.READ, BIG - 32 * MiB, 32 * MiB, { cookie: 99 }))
    if (structured) {
      const chunks = await readReply(p)
      // The file is one hole, found since raw files' holes are: hole chunks answer for those bytes.
      const answered = (c: typeof chunks[number]): number =>
        c.type === NBD.CHUNK.OFFSET_DATA ? c.payload.length - 8 : c.type === NBD.CHUNK.OFFSET_HOLE ? c.payload.readUInt32BE(8) : 0
      const bytes = chunks.reduce((n, c) => n + answered(c), 0)
      t.ok(chunks.every(c => c.cookie === 99n && chunkError(c) === 0) && bytes === 32 * MiB, `${mode}: a read of 32 MiB at the end works, cookie echoed`)
    } else {
      const reply = await readSimple(p)
      t.same([reply?.error, reply?.cookie, (await p.read(32 * MiB))?.length], [0, 99n, 32 * MiB], `${mode}: a read of 32 MiB at the end works, cookie echoed`)
    }
    p.write(request(NBD.CMD.DISC, 0, 0))
    await p.closed
  }

  const s = await connect(socket)
  const ids = await open(s, 'drive-scsi0', { contexts: ['base:allocation', 'qemu:allocation-depth', 'base:', 'x-unknown:thing'] })
  t.same([...ids.keys()].sort(), ['base:allocation', 'qemu:allocation-depth'], 'SET_META_CONTEXT selects the known contexts and ignores the rest')
  s.write(request(NBD.CMD.BLOCK_STATUS, 0, size, { flags: NBD.FLAG_REQ_ONE }))
  const one = await readReply(s)
  t.equal(one.length, 2, 'REQ_ONE: a chunk per context')
  for (const c of one) {
    t.equal(c.type, NBD.CHUNK.BLOCK_STATUS, 'block status chunks')
    t.equal(c.payload.length, 12, 'with exactly one descriptor')
    t.ok(c.payload.readUInt32BE(4) <= size, 'no longer than asked')
  }
  s.write(request(NBD.CMD.BLOCK_STATUS, 0, 8192, { flags: NBD.FLAG_REQ_ONE | 1 }))
  t.equal(chunkError((await readReply(s))[0]), NBD.EINVAL, 'FUA on block status is refused')
  s.destroy()
  await stillServes(t, server, 'after bad requests')
})

t.test('framing broken in transmission, and clients that vanish mid-request', async t => {
  const { server, socket } = await serve(t)
  const cases: Array<[string, (p: Peer) => void]> = [
    ['wrong request magic', p => p.write(request(NBD.CMD.READ, 0, 4096, { magic: 0x25609514 }))],
    ['a write of 64 MiB', p => p.write(request(NBD.CMD.WRITE, 0, 64 * MiB))],
  ]
  for (const [what, act] of cases) {
    const p = await connect(socket)
    await open(p, 'drive-scsi0')
    act(p)
    await p.closed
    t.pass(`${what}: closed`)
  }
  const gone: Array<[string, (p: Peer) => void]> = [
    ['half a request header', p => p.write(request(NBD.CMD.READ, 0, 4096).subarray(0, 13))],
    ['sixteen reads, then gone', p => { for (let i = 0; i < 16; i++) p.write(request(NBD.CMD.READ, 0, 2 * MiB, { cookie: i })) }],
    ['half a write payload', p => p.write(Buffer.concat([request(NBD.CMD.WRITE, 0, MiB), Buffer.alloc(1000)]))],
    ['NBD_CMD_DISC with reads in flight', p => { p.write(request(NBD.CMD.READ, 0, MiB)); p.write(request(NBD.CMD.DISC, 0, 0)) }],
  ]
  for (const [what, act] of gone) {
    const p = await connect(socket)
    await open(p, 'drive-scsi0')
    act(p)
    p.destroy()
    await p.closed
    await stillServes(t, server, what)
  }
  const mid = await connect(socket)
  await handshake(mid)
  mid.write(option(NBD.OPT.GO, goData('drive-scsi0')).subarray(0, 20))
  mid.destroy()
  await stillServes(t, server, 'gone inside an option')
})

t.test('hundreds of idle connections cost little; clients that never read replies cannot grow the server', async t => {
  const { server, socket } = await serve(t)
  await stillServes(t, server, 'warm')
  const before = await rssKiB(server.pid)
  const idle: Peer[] = []
  for (let i = 0; i < 300; i++) {
    const p = await connect(socket)
    // A hundred each: silent after connecting, stopped in the options, idle in transmission.
    if (i % 3 === 1) await handshake(p)
    if (i % 3 === 2) await open(p, 'drive-scsi0')
    idle.push(p)
  }
  await stillServes(t, server, 'with 300 idle connections')
  const copy = await run('nbdcopy', [server.uri('drive-scsi0'), join(tempDir(t), 'copy')])
  exits(t, copy, 0, 'nbdcopy too')
  const idleGrowth = await rssKiB(server.pid) - before
  t.ok(idleGrowth < 40 * 1024, `300 idle connections grew the server by ${idleGrowth} KiB`)

  // Clients that ask for 32 MiB reads by the dozen and read nothing: each holds at most one budget.
  const greedy: Peer[] = []
  for (let i = 0; i < 4; i++) {
    const p = await connect(socket)
    await open(p, 'big.raw')
    for (let r = 0; r < 24; r++) p.write(request(NBD.CMD.READ, 0, 32 * MiB, { cookie: r }))
    greedy.push(p)
  }
  await stillServes(t, server, 'with greedy clients')
  const greedyGrowth = await rssKiB(server.pid) - before
  t.ok(greedyGrowth < 400 * 1024, `4 clients asking for 3 GiB and reading none of it grew the server by ${greedyGrowth} KiB`)
  for (const p of [...idle, ...greedy]) p.destroy()
  await Promise.all([...idle, ...greedy].map(async p => await p.closed))
  await stillServes(t, server, 'after they left')
})
