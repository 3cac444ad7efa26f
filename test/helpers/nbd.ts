/**
 * NBD peers for tests: `vma serve`, qemu-nbd and nbdkit as child processes
 * (stopped in teardown), and a raw socket that speaks bytes, for clients
 * that break the rules. Wire values are spelled out here on their own, not
 * taken from lib/nbd, so that the server is checked against a second reading
 * of the spec.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { connect, type Socket } from 'node:net'
import { VMA } from './run.js'

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

/** Where cleanups go: a tap Test, or the benchmarks' own list. */
export interface Teardown { teardown: (fn: () => void | Promise<void>) => void }

export interface Peer {
  child: ChildProcess
  /** stderr so far. */
  stderr: () => string
  /** SIGTERM, then the exit code. */
  stop: () => Promise<number | null>
}

function start (t: Teardown, command: string, args: string[]): Peer {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  child.stderr?.on('data', (b: Buffer) => { stderr += b.toString() })
  const exited = new Promise<number | null>(resolve => child.on('exit', code => resolve(code)))
  const stop = async (): Promise<number | null> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
    return await exited
  }
  t.teardown(async () => { await stop() })
  return { child, stderr: () => stderr, stop }
}

/** Waits until a Unix socket or TCP port accepts a connection (the peer is up), or the peer died. */
export async function waitForListener (peer: Peer, where: { socket: string } | { port: number }): Promise<void> {
  for (;;) {
    if (peer.child.exitCode !== null || peer.child.signalCode !== null) throw new Error(`the peer exited (${peer.child.exitCode ?? peer.child.signalCode}): ${peer.stderr()}`)
    const ok = await new Promise<boolean>(resolve => {
      const s = 'socket' in where ? connect(where.socket) : connect(where.port, '127.0.0.1')
      s.once('connect', () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) return
    await sleep(20)
  }
}

export interface Served extends Peer {
  /** nbd+unix:// or nbd:// URI of an export. */
  uri: (name?: string) => string
  pid: number
  port?: number
  /** The JSON log lines so far. */
  logs: () => Array<Record<string, unknown>>
}

/** `vma serve ARGS`, once its "serving" line is logged. */
export async function startServe (t: Teardown, args: string[]): Promise<Served> {
  // The bin itself, as users run it (npm links it; the build makes it executable).
  const peer = start(t, VMA, ['serve', ...args])
  const logs = (): Array<Record<string, unknown>> => peer.stderr().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Record<string, unknown>)
  for (;;) {
    const serving = logs().find(l => l.msg === 'serving')
    if (serving !== undefined) {
      const socket = serving.socket as string | undefined
      const port = serving.port as number | undefined
      const uri = (name = ''): string => socket !== undefined ? `nbd+unix:///${name}?socket=${socket}` : `nbd://127.0.0.1:${port ?? 0}/${name}`
      return { ...peer, uri, pid: peer.child.pid as number, logs, ...(port !== undefined ? { port } : {}) }
    }
    if (peer.child.exitCode !== null) throw new Error(`vma serve exited ${peer.child.exitCode}: ${peer.stderr()}`)
    await sleep(20)
  }
}

/** qemu-nbd in the foreground on a Unix socket or a port of 127.0.0.1, persistent (-t), with `args` before the image. */
export async function startQemuNbd (t: Teardown, where: { socket: string } | { port: number }, args: string[]): Promise<Peer> {
  const listen = 'socket' in where ? ['-k', where.socket] : ['-b', '127.0.0.1', '-p', String(where.port)]
  const peer = start(t, 'qemu-nbd', ['-t', ...listen, ...args])
  await waitForListener(peer, where)
  return peer
}

/** nbdkit in the foreground on a Unix socket: `nbdkit -f -U SOCKET ARGS`. */
export async function startNbdkit (t: Teardown, socket: string, args: string[]): Promise<Peer> {
  const peer = start(t, 'nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args])
  await waitForListener(peer, { socket })
  return peer
}

/** Resident memory of a process in KiB (Linux). */
export async function rssKiB (pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises')
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1])
}

/** A client that sends whatever bytes it is given and reads exactly what it asks for. */
export class RawPeer {
  private chunks: Buffer[] = []
  private length = 0
  private waiting?: () => void
  private ended = false
  readonly closed: Promise<void>

  private constructor (readonly socket: Socket) {
    socket.on('data', (b: Buffer) => { this.chunks.push(b); this.length += b.length; this.waiting?.() })
    socket.on('error', () => {})
    this.closed = new Promise(resolve => socket.on('close', () => { this.ended = true; this.waiting?.(); resolve() }))
  }

  static async connect (where: { socket: string } | { port: number }): Promise<RawPeer> {
    const socket = 'socket' in where ? connect(where.socket) : connect(where.port, '127.0.0.1')
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
    return new RawPeer(socket)
  }

  write (bytes: Buffer): void { this.socket.write(bytes) }

  /** The next `n` bytes, or null when the server closed before sending them. */
  async read (n: number): Promise<Buffer | null> {
    while (this.length < n) {
      if (this.ended) return null
      await new Promise<void>(resolve => { this.waiting = resolve })
    }
    const all = Buffer.concat(this.chunks)
    this.chunks = [all.subarray(n)]
    this.length -= n
    return all.subarray(0, n)
  }

  destroy (): void { this.socket.destroy() }
}

// The wire, spelled out.
export const NBD = {
  IHAVEOPT: Buffer.from('IHAVEOPT'),
  OPT: { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10 },
  REP: { ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4, ERR_UNSUP: 0x80000001, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006 },
  CMD: { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 },
  FLAG_REQ_ONE: 8,
  EPERM: 1,
  EINVAL: 22,
  EOVERFLOW: 75,
  SIMPLE: 0x67446698,
  STRUCTURED: 0x668e33ef,
  CHUNK: { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001 },
} as const

export function option (opt: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const head = Buffer.alloc(16)
  NBD.IHAVEOPT.copy(head)
  head.writeUInt32BE(opt, 8)
  head.writeUInt32BE(length, 12)
  return Buffer.concat([head, data])
}

/** u32 length + string, as names and queries go. */
export function lstring (s: string): Buffer {
  const b = Buffer.from(s)
  const n = Buffer.alloc(4)
  n.writeUInt32BE(b.length)
  return Buffer.concat([n, b])
}

export function goData (name: string, infos: number[] = []): Buffer {
  const tail = Buffer.alloc(2 + 2 * infos.length)
  tail.writeUInt16BE(infos.length)
  infos.forEach((v, i) => tail.writeUInt16BE(v, 2 + 2 * i))
  return Buffer.concat([lstring(name), tail])
}

export function metaData (name: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4)
  count.writeUInt32BE(queries.length)
  return Buffer.concat([lstring(name), count, ...queries.map(lstring)])
}

export function request (type: number, offset: number, length: number, options: { flags?: number, cookie?: number, magic?: number } = {}): Buffer {
  const b = Buffer.alloc(28)
  b.writeUInt32BE(options.magic ?? 0x25609513, 0)
  b.writeUInt16BE(options.flags ?? 0, 4)
  b.writeUInt16BE(type, 6)
  b.writeBigUInt64BE(BigInt(options.cookie ?? 7), 8)
  b.writeBigUInt64BE(BigInt(offset), 16)
  b.writeUInt32BE(length, 24)
  return b
}

export interface OptionReply { option: number, type: number, data: Buffer }

export async function readOptionReply (peer: RawPeer): Promise<OptionReply | null> {
  const head = await peer.read(20)
  if (head === null) return null
  const data = await peer.read(head.readUInt32BE(16))
  if (data === null) return null
  return { option: head.readUInt32BE(8), type: head.readUInt32BE(12), data }
}

/** Greeting read, client flags sent (fixed newstyle, no zeroes). */
export async function handshake (peer: RawPeer, flags = 3): Promise<void> {
  const greeting = await peer.read(18)
  if (greeting === null || greeting.subarray(0, 16).toString('latin1') !== 'NBDMAGICIHAVEOPT') throw new Error('no newstyle greeting')
  const f = Buffer.alloc(4)
  f.writeUInt32BE(flags)
  peer.write(f)
}

/** Handshake, structured replies (optional), contexts (optional), NBD_OPT_GO: ready for requests. */
export async function open (peer: RawPeer, name: string, options: { structured?: boolean, contexts?: string[] } = {}): Promise<Map<string, number>> {
  await handshake(peer)
  if (options.structured !== false) {
    peer.write(option(NBD.OPT.STRUCTURED_REPLY))
    await readOptionReply(peer)
  }
  const ids = new Map<string, number>()
  if (options.contexts !== undefined) {
    peer.write(option(NBD.OPT.SET_META_CONTEXT, metaData(name, options.contexts)))
    for (let r = await readOptionReply(peer); r !== null && r.type !== NBD.REP.ACK; r = await readOptionReply(peer)) {
      ids.set(r.data.subarray(4).toString(), r.data.readUInt32BE(0))
    }
  }
  peer.write(option(NBD.OPT.GO, goData(name)))
  for (let r = await readOptionReply(peer); r?.type !== NBD.REP.ACK; r = await readOptionReply(peer)) {
    if (r === null || r.type !== NBD.REP.INFO) throw new Error(`NBD_OPT_GO failed: ${r?.type} ${r?.data.toString()}`)
  }
  return ids
}

export interface Chunk { flags: number, type: number, cookie: bigint, payload: Buffer }

export async function readChunk (peer: RawPeer): Promise<Chunk | null> {
  const head = await peer.read(20)
  if (head === null) return null
  if (head.readUInt32BE(0) !== NBD.STRUCTURED) throw new Error(`not a structured reply: 0x${head.readUInt32BE(0).toString(16)}`)
  const payload = await peer.read(head.readUInt32BE(16))
  if (payload === null) return null
  return { flags: head.readUInt16BE(4), type: head.readUInt16BE(6), cookie: head.readBigUInt64BE(8), payload }
}

/** The chunks of one structured reply, up to the one flagged done. */
export async function readReply (peer: RawPeer): Promise<Chunk[]> {
  const chunks: Chunk[] = []
  for (;;) {
    const c = await readChunk(peer)
    if (c === null) throw new Error('the server closed inside a reply')
    chunks.push(c)
    if ((c.flags & 1) !== 0) return chunks
  }
}

export async function readSimple (peer: RawPeer): Promise<{ error: number, cookie: bigint } | null> {
  const head = await peer.read(16)
  if (head === null) return null
  if (head.readUInt32BE(0) !== NBD.SIMPLE) throw new Error(`not a simple reply: 0x${head.readUInt32BE(0).toString(16)}`)
  return { error: head.readUInt32BE(4), cookie: head.readBigUInt64BE(8) }
}

/** An error chunk's error value. */
export function chunkError (c: Chunk): number {
  return (c.type & 0x8000) !== 0 ? c.payload.readUInt32BE(0) : 0
}

/**
 * A client that opens an export (of 256 MiB at least), asks for `reads`
 * reads of 32 MiB and never reads a reply: what starved `vma serve` once.
 */
export async function flooder (socket: string, name: string, structured: boolean, reads = 64): Promise<RawPeer> {
  const p = await RawPeer.connect({ socket })
  await open(p, name, { structured })
  p.socket.pause()
  for (let r = 0; r < reads; r++) p.write(request(NBD.CMD.READ, (r % 8) * 32 * 1048576, 32 * 1048576, { cookie: r }))
  return p
}

/** A request as a fake server sees it, with the WRITE payload when there is one. */
export interface SeenRequest { flags: number, type: number, cookie: Buffer, offset: number, length: number, payload?: Buffer }

export interface FakeServerOptions {
  /** Export size (default 1 MiB). */
  size?: number
  /** NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum) sent in reply to NBD_OPT_GO, if given. */
  blockSize?: [number, number, number]
  /** Transmission flags (default HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES). */
  flags?: number
  /** NBD_REP_INFO replies (NBD_INFO_NAME) sent before the others in reply to NBD_OPT_GO, for floods. */
  infoFlood?: number
  /** Replies to NBD_OPT_SET_META_CONTEXT; default: base:allocation as context 1, then ACK. `reply` returns false once the client is gone. */
  meta?: (reply: (type: number, data: Buffer) => Promise<boolean>) => Promise<void>
  /** Answers one request (structured replies are agreed). */
  answer: (s: Socket, req: SeenRequest) => void
}

/**
 * An NBD server in the test process that speaks just enough of the
 * protocol for the client (fixed newstyle, structured replies, GO) and
 * answers requests as the test says: for servers that break the rules.
 */
export async function fakeServer (t: Teardown, socket: string, o: FakeServerOptions): Promise<void> {
  const { createServer } = await import('node:net')
  const sockets = new Set<Socket>()
  const server = createServer(s => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
    s.on('error', () => {})
    const greeting = Buffer.alloc(18)
    Buffer.from('NBDMAGICIHAVEOPT').copy(greeting)
    greeting.writeUInt16BE(3, 16)
    s.write(greeting)
    let buffered: Buffer = Buffer.alloc(0)
    let phase: 'flags' | 'options' | 'busy' | 'requests' = 'flags'
    const reply = async (option: number, type: number, data: Buffer = Buffer.alloc(0)): Promise<boolean> => {
      if (s.destroyed) return false
      const h = Buffer.alloc(20)
      h.writeBigUInt64BE(0x3e889045565a9n, 0)
      h.writeUInt32BE(option, 8)
      h.writeUInt32BE(type, 12)
      h.writeUInt32BE(data.length, 16)
      if (!s.write(Buffer.concat([h, data]))) await new Promise(resolve => { s.once('drain', resolve); s.once('close', resolve) })
      return !s.destroyed
    }
    const go = async (): Promise<void> => {
      const name = Buffer.concat([Buffer.from([0, 1]), Buffer.alloc(4000, 0x61)])
      for (let i = 0; i < (o.infoFlood ?? 0); i++) if (!await reply(7, 3, name)) return
      const info = Buffer.alloc(12)
      info.writeBigUInt64BE(BigInt(o.size ?? 1048576), 2)
      info.writeUInt16BE(o.flags ?? (1 | 4 | 64), 10)
      await reply(7, 3, info)
      if (o.blockSize !== undefined) {
        const b = Buffer.alloc(14)
        b.writeUInt16BE(3, 0)
        o.blockSize.forEach((v, i) => b.writeUInt32BE(v, 2 + 4 * i))
        await reply(7, 3, b)
      }
      await reply(7, 1)
    }
    const step = async (): Promise<void> => {
      for (;;) {
        if (phase === 'flags') {
          if (buffered.length < 4) return
          buffered = buffered.subarray(4)
          phase = 'options'
        } else if (phase === 'options') {
          if (buffered.length < 16 || buffered.length < 16 + buffered.readUInt32BE(12)) return
          const option = buffered.readUInt32BE(8)
          buffered = buffered.subarray(16 + buffered.readUInt32BE(12))
          phase = 'busy'
          if (option === 10) {
            if (o.meta !== undefined) await o.meta(async (type, data) => await reply(option, type, data))
            else { await reply(option, 4, Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('base:allocation')])); await reply(option, 1) }
          } else if (option === 7) {
            await go()
            phase = 'requests'
            continue
          } else await reply(option, 1)
          phase = 'options'
        } else if (phase === 'requests') {
          if (buffered.length < 28) return
          const length = buffered.readUInt32BE(24)
          const type = buffered.readUInt16BE(6)
          const payload = type === 1 ? length : 0
          if (buffered.length < 28 + payload) return
          o.answer(s, {
            flags: buffered.readUInt16BE(4),
            type,
            cookie: Buffer.from(buffered.subarray(8, 16)),
            offset: Number(buffered.readBigUInt64BE(16)),
            length,
            ...(payload > 0 ? { payload: buffered.subarray(28, 28 + payload) } : {}),
          })
          buffered = buffered.subarray(28 + payload)
        } else return
      }
    }
    let running = Promise.resolve()
    s.on('data', (b: Buffer) => {
      buffered = Buffer.concat([buffered, b])
      running = running.then(step).catch(() => { s.destroy() })
    })
  })
  await new Promise<void>(resolve => server.listen(socket, resolve))
  t.teardown(() => { server.close(); for (const s of sockets) s.destroy() })
}

/** A structured reply chunk for the cookie of a request. */
export function replyChunk (cookie: Buffer, type: number, payload: Buffer, flags = 1): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x668e33ef, 0)
  h.writeUInt16BE(flags, 4)
  h.writeUInt16BE(type, 6)
  cookie.copy(h, 8)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}

/** An OFFSET_DATA chunk: offset, then the bytes. */
export function dataChunk (cookie: Buffer, offset: number, bytes: Buffer, flags = 1): Buffer {
  const head = Buffer.alloc(8)
  head.writeBigUInt64BE(BigInt(offset))
  return replyChunk(cookie, NBD.CHUNK.OFFSET_DATA, Buffer.concat([head, bytes]), flags)
}

/** A BLOCK_STATUS chunk for context 1: [length, flags] pairs. */
export function statusChunk (cookie: Buffer, descriptors: Array<[number, number]>, flags = 1): Buffer {
  const b = Buffer.alloc(4 + 8 * descriptors.length)
  b.writeUInt32BE(1, 0)
  descriptors.forEach(([length, f], i) => { b.writeUInt32BE(length, 4 + 8 * i); b.writeUInt32BE(f, 8 + 8 * i) })
  return replyChunk(cookie, NBD.CHUNK.BLOCK_STATUS, b, flags)
}
