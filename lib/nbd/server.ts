/**
 * NbdServer: read-only NBD exports of RandomAccessDisks over TCP or a Unix
 * socket, for qemu, the kernel, nbdcopy and friends. One state machine per
 * connection: greeting, client flags, options, then requests, several at
 * once. Everything a client sends is checked before anything is allocated
 * for it; a client that breaks the protocol's framing is disconnected and
 * the others are served on. Memory: small per idle connection; read buffers
 * are counted against a per-connection and a server-wide budget and given
 * back when the socket has taken the reply. A client that does not read its
 * replies holds at most its own budget and stops being read; it cannot hold
 * up another (each connection's first piece is outside the shared budget),
 * and it is dropped once nothing has moved for the idle timeout.
 */
import { createServer, type Server, type Socket } from 'node:net'
import { existsSync } from 'node:fs'
import { VmapipeError, ioError } from '../errors.js'
import type { Extent, RandomAccessDisk } from '../contracts.js'
import { ByteQueue } from '../util/byte-queue.js'
import {
  type Descriptor, type Request, CLIENT_FLAG, COMMAND, COMMAND_FLAG, CONTEXT_ALLOCATION,
  CONTEXT_BITMAP_PREFIX, CONTEXT_DEPTH, ERRNO, HANDSHAKE_FLAG, INFO, MAX_PAYLOAD, OPTION, OPTION_HEADER_SIZE,
  REPLY, REPLY_FLAG_DONE, REQUEST_SIZE, STATE_DIRTY, STATE_HOLE, STATE_ZERO, TRANSMISSION_FLAG,
  decodeExportRequest, decodeMetaRequest, decodeOptionHeader, decodeRequest, encodeBlockStatus, encodeErrorChunk,
  encodeErrorMessage, encodeExportNameReply, encodeGreeting, encodeInfoBlockSize, encodeInfoExport, encodeInfoString,
  encodeMetaContextReply, encodeOffsetDataHeader, encodeOffsetHole, encodeOptionReply, encodeServerReply,
  encodeSimpleReply, nameOf,
} from './protocol.js'

export interface NbdExport {
  name: string
  /** Shown by nbdinfo --list. */
  description?: string
  disk: RandomAccessDisk
}

/** The logging the server does: pino's Logger fits. */
export interface ServerLog {
  /** Optional: what is routine (a client that hangs up once it has its export list). */
  debug?: (fields: Record<string, unknown>, message: string) => void
  info: (fields: Record<string, unknown>, message: string) => void
  warn: (fields: Record<string, unknown>, message: string) => void
}

export interface NbdServerOptions {
  log?: ServerLog
  /** Milliseconds a client has from connecting to choosing an export (default 10 s, as qemu-nbd). */
  handshakeTimeout?: number
  /** Bytes of read buffers in use at once across all connections, beyond each one's first piece (default 256 MiB). */
  bufferLimit?: number
  /** Connections at once; more are refused with NBD_REP_ERR_POLICY and a warning in the log (default 1024). */
  maxConnections?: number
  /** Milliseconds a connection may go without a request arriving or a reply being taken before it is closed (default 10 min; 0: never). */
  idleTimeout?: number
}

export type ListenAddress = { socket: string } | { host: string, port: number }

const TRANSMISSION_FLAGS = TRANSMISSION_FLAG.HAS_FLAGS | TRANSMISSION_FLAG.READ_ONLY | TRANSMISSION_FLAG.SEND_FLUSH |
  TRANSMISSION_FLAG.SEND_CACHE | TRANSMISSION_FLAG.CAN_MULTI_CONN
/** The preferred block size we advertise: VMA's block. Any alignment is accepted. */
const PREFERRED_BLOCK = 4096
/** Option payloads we read; anything longer is a hostile client (the longest real one is a few KiB). */
const MAX_OPTION_DATA = 64 * 1024
/** Options per connection before it is closed, as nbdkit does; NBD_OPT_LIST adds as many per export once. */
const MAX_OPTIONS = 32
/**
 * Requests of one connection being served at once; the socket is not read beyond.
 * qemu-nbd's 16: the read budget lets fewer than that read at once anyway, and each
 * request waiting is garbage that lives long enough to grow the heap.
 */
const MAX_IN_FLIGHT = 16
/** Reply bytes waiting in a socket before we stop reading that client's requests or options. */
const MAX_BACKLOG = 4 * 1024 * 1024
/**
 * A READ is read and sent in pieces of at most this (structured: a data chunk each).
 * A socket takes a few hundred KiB at a time, so a piece being sent while the next is
 * read keeps it busy (measured, nbdcopy and qemu-img convert from an archive: as fast
 * with 256 KiB as with 1 MiB, and the server's peak RSS 65-66 MiB instead of 70-71;
 * 1 MiB pieces had been as fast as 4 MiB ones, and 40 MiB lower).
 */
const PIECE = 256 * 1024
/** Read buffers one connection may hold, read or waiting in its socket: a piece being sent while the next is read. */
const CONNECTION_BUFFERS = 2 * PIECE
/** What each connection holds outside the server-wide budget, so that clients that fill that budget stall only themselves. */
const OWN_SHARE = PIECE
/** Milliseconds between warnings about refused connections. */
const REFUSAL_LOG_INTERVAL = 10_000
/** Guest bytes one BLOCK_STATUS looks at, at most; clients ask again for the rest. */
const STATUS_WINDOW = 256 * 1024 * 1024
/** The first look for a REQ_ONE query, widened until the first extent ends inside it. */
const FIRST_WINDOW = 1024 * 1024
/** Milliseconds a client has at shutdown to take the replies to its last requests. */
const SHUTDOWN_GRACE = 5000
/** Bytes of read buffers kept for reuse: what four connections of one client (nbdcopy's default) can hold at once. */
const POOLED = 4 * CONNECTION_BUFFERS
/** Descriptors per chunk: the spec's 2^20 would be an 8 MiB reply. */
const MAX_DESCRIPTORS = 65536

/**
 * A disk that can also be read by synchronous positional reads (an indexed
 * archive): a READ then costs no thread-pool round trip per run of stored
 * blocks, which was 40% of the server's busy time serving an archive. One
 * whose source is read by requests (an object store) says E_NOT_SEEKABLE
 * and is read the usual way from then on.
 */
interface SyncReads { readSync: (buf: Buffer, offset: number) => void }
const asyncOnly = new WeakSet<RandomAccessDisk>()

async function readDisk (disk: RandomAccessDisk & Partial<SyncReads>, buf: Buffer, offset: number): Promise<void> {
  if (disk.readSync !== undefined && !asyncOnly.has(disk)) {
    try {
      disk.readSync(buf, offset)
      return
    } catch (err) {
      if (!(err instanceof VmapipeError) || err.code !== 'E_NOT_SEEKABLE') throw err
      asyncOnly.add(disk)
    }
  }
  await disk.read(buf, offset)
}

/** A value per range of the disk, as one metadata context sees it. */
interface Run { offset: number, length: number, value: number }

interface Context {
  name: string
  runs: (disk: RandomAccessDisk, offset: number, length: number) => Promise<Run[]>
}

interface SelectedContext extends Context { id: number }

/** Bytes handed out up to a limit, first come first served. */
class ByteBudget {
  private used = 0
  private readonly waiting: Array<{ bytes: number, grant: () => void }> = []
  constructor (private readonly limit: number) {}

  async acquire (bytes: number): Promise<void> {
    if (this.waiting.length === 0 && this.used + bytes <= this.limit) {
      this.used += bytes
      return
    }
    await new Promise<void>(resolve => this.waiting.push({ bytes, grant: resolve }))
  }

  /** Whether a request for more would wait. */
  get full (): boolean {
    return this.waiting.length > 0 || this.used >= this.limit
  }

  release (bytes: number): void {
    this.used -= bytes
    while (this.waiting.length > 0 && this.used + this.waiting[0].bytes <= this.limit) {
      const next = this.waiting.shift() as { bytes: number, grant: () => void }
      this.used += next.bytes
      next.grant()
    }
  }
}

/**
 * Bytes shared by all connections up to a limit. Whoever asks when there is
 * room gets it; a connection that cannot waits for the next release and asks
 * again (its need may have shrunk meanwhile: see Connection.hold).
 */
class SharedBudget {
  private used = 0
  private waiters: Array<() => void> = []
  constructor (private readonly limit: number) {}

  tryTake (bytes: number): boolean {
    if (this.used + bytes > this.limit) return false
    this.used += bytes
    return true
  }

  release (bytes: number): void {
    this.used -= bytes
    this.wake()
  }

  /** Resolves at the next release (or wake). */
  async changed (): Promise<void> {
    await new Promise<void>(resolve => this.waiters.push(resolve))
  }

  wake (): void {
    const waiters = this.waiters
    this.waiters = []
    for (const w of waiters) w()
  }
}

/**
 * Read buffers kept for reuse once a reply has gone out: allocating a fresh
 * one per READ costs more than the read (measured: GC and allocation took a
 * sixth of the server's time under nbdcopy). Every buffer is one piece long,
 * whatever part of it a read uses: buffers in powers of two by the length read
 * (pieces cut at holes have any length) missed the pool whenever the lengths
 * changed, and each miss was a new buffer soon garbage, which V8 frees only
 * when 32 MiB of them have piled up in its young generation (the bench's
 * 1 GiB archive: 105 buffers per nbdcopy, 4 with these; the server's peak
 * RSS after nbdcopy and qemu-img convert 83-95 MiB, 67 with these). A buffer
 * in use is counted against the budgets, so the buffers ever made are those
 * in use at once plus those kept.
 */
class BufferPool {
  private readonly free: ArrayBuffer[] = []
  /** Buffers allocated so far. */
  made = 0
  constructor (private readonly limit: number) {}

  take (length: number): Buffer {
    const memory = this.free.pop()
    if (memory !== undefined) return Buffer.from(memory, 0, length)
    this.made++
    return Buffer.allocUnsafeSlow(PIECE).subarray(0, length)
  }

  /** Keeps a buffer whose reply has gone out, as long as fewer than `limit` bytes are kept. */
  give (buf: Buffer): void {
    if ((this.free.length + 1) * PIECE <= this.limit) this.free.push(buf.buffer as ArrayBuffer)
  }
}

/**
 * Runs of equal value covering exactly [offset, offset + length), from a
 * disk's extents. A disk whose extents leave a gap breaks the
 * RandomAccessDisk contract: that is an error for the client, not a guess.
 */
function runsOf<T extends { offset: number, length: number }> (items: T[], value: (item: T) => number, offset: number, length: number): Run[] {
  const out: Run[] = []
  const end = offset + length
  let at = offset
  for (const item of items) {
    if (at >= end) break
    if (item.offset + item.length <= at) continue
    if (item.offset > at) throw new Error(`the disk's extents leave a gap at byte ${at}`)
    const to = Math.min(item.offset + item.length, end)
    const v = value(item)
    const last = out[out.length - 1]
    if (last !== undefined && last.value === v) last.length += to - at
    else out.push({ offset: at, length: to - at, value: v })
    at = to
  }
  if (at < end) throw new Error(`the disk's extents stop at byte ${at}, before ${end}`)
  return out
}

const allocation: Context = {
  name: CONTEXT_ALLOCATION,
  runs: async (disk, offset, length) => runsOf(await disk.map(offset, length), e => e.data ? 0 : STATE_HOLE | STATE_ZERO, offset, length),
}

/** A disk of layers tells the depth in its map; one of a single layer holds its data at depth 1. */
const depth: Context = {
  name: CONTEXT_DEPTH,
  runs: async (disk, offset, length) => runsOf<Extent>(await disk.map(offset, length), e => e.depth ?? (e.data ? 1 : 0), offset, length),
}

/** The metadata contexts an export offers: allocation, depth, and one per dirty bitmap. */
function contextsOf (disk: RandomAccessDisk): Context[] {
  const bitmaps = (disk.bitmaps ?? []).map((b): Context => ({
    name: CONTEXT_BITMAP_PREFIX + b.id,
    runs: async (_disk, offset, length) => runsOf(await b.map(offset, length), r => r.dirty ? STATE_DIRTY : 0, offset, length),
  }))
  return [allocation, depth, ...bitmaps]
}

/** NBD_OPT_LIST_META_CONTEXT: no queries lists all; `base:`, `qemu:` and `qemu:dirty-bitmap:` list their namespaces. */
function listMatches (available: Context[], queries: string[]): Context[] {
  if (queries.length === 0) return available
  return available.filter(c => queries.some(q => q === c.name || ((q === 'base:' || q === 'qemu:' || q === CONTEXT_BITMAP_PREFIX) && c.name.startsWith(q))))
}

/** Runs as block status descriptors, each at most 4 GiB - 4 KiB (a descriptor's length is 32 bits). */
function descriptorsOf (runs: Run[]): Descriptor[] {
  const out: Descriptor[] = []
  for (const r of runs) {
    for (let at = 0; at < r.length && out.length < MAX_DESCRIPTORS; at += 0xfffff000) out.push({ length: Math.min(0xfffff000, r.length - at), flags: r.value })
  }
  return out
}

type Phase = 'flags' | 'options' | 'requests' | 'closing'

let nextConnectionId = 1

class Connection {
  readonly id = nextConnectionId++
  private readonly queue = new ByteQueue()
  private phase: Phase = 'flags'
  private optionsLeft = MAX_OPTIONS
  private listed = false
  private structured = false
  private noZeroes = false
  /** Contexts chosen by the last NBD_OPT_SET_META_CONTEXT, and for which export. */
  private chosen?: { exportName: string, contexts: SelectedContext[] }
  private export?: NbdExport
  private contexts: SelectedContext[] = []
  private inFlight = 0
  /** Bytes of a refused write's payload still to skip. */
  private discard = 0
  /** Bytes of read buffers this connection holds, and how many of them come from the server-wide budget. */
  private held = 0
  private shared = 0
  private readonly budget = new ByteBudget(CONNECTION_BUFFERS)
  /** Simple replies: a READ's data goes out in pieces, so replies take turns (`tail`), `turns` of them waiting or under way. */
  private tail: Promise<void> = Promise.resolve()
  private turns = 0
  private closed = false
  private reason = 'the client closed the connection'
  private readonly started = Date.now()
  private requests = 0
  private bytesSent = 0
  private readonly timer: NodeJS.Timeout
  /** When a request last arrived or the socket last took a reply (ms, monotonic). */
  private active = performance.now()
  /** Reads waiting on the disk: a disk that is still arriving (a live restore) may keep one waiting for long; the client is not idle. */
  private reading = 0
  private idleTimer?: NodeJS.Timeout

  constructor (
    private readonly server: NbdServer, private readonly socket: Socket, private readonly log: ServerLog,
    handshakeTimeout: number, private readonly idleTimeout: number
  ) {
    socket.setNoDelay(true)
    socket.on('data', (chunk: Buffer) => {
      this.active = performance.now()
      this.queue.push(chunk)
      this.pump()
    })
    socket.on('drain', () => this.pump())
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.reason = `connection error: ${err.code ?? err.message}`
      // A client that hangs up once it has its list (nbdinfo --list) or said goodbye is done, not in trouble.
      const done = (this.listed || this.phase === 'closing') && (err.code === 'EPIPE' || err.code === 'ECONNRESET')
      if (done) this.reason = 'the client closed the connection'
      const fields = { conn: this.id, export: this.export?.name, code: err.code }
      if (done) this.log.debug?.(fields, this.reason)
      else this.log.warn(fields, this.reason)
    })
    socket.on('close', () => this.onClose())
    this.timer = setTimeout(() => this.fail(`no export chosen within ${handshakeTimeout / 1000} s`), handshakeTimeout)
    this.timer.unref()
    this.log.info({ conn: this.id, remote: this.remote() }, 'client connected')
    socket.write(encodeGreeting(HANDSHAKE_FLAG.FIXED_NEWSTYLE | HANDSHAKE_FLAG.NO_ZEROES))
  }

  /** Stops taking requests; closes once those under way are answered, or after a grace period if the client does not take the replies. */
  shutdown (): void {
    this.reason = 'the server is shutting down'
    if (this.phase !== 'requests') {
      this.socket.destroy()
      return
    }
    this.phase = 'closing'
    this.endWhenIdle()
    setTimeout(() => this.socket.destroy(), SHUTDOWN_GRACE).unref()
  }

  private remote (): string {
    return this.socket.remoteAddress === undefined ? 'unix socket' : `${this.socket.remoteAddress}:${this.socket.remotePort ?? 0}`
  }

  private onClose (): void {
    this.closed = true
    clearTimeout(this.timer)
    clearTimeout(this.idleTimer)
    this.server.budget.release(this.shared)
    this.held = 0
    this.shared = 0
    this.server.forget(this)
    this.log.info({
      conn: this.id, export: this.export?.name, requests: this.requests, bytesSent: this.bytesSent,
      seconds: (Date.now() - this.started) / 1000, reason: this.reason,
    }, 'client disconnected')
  }

  /** A client that broke the protocol: say why in the log and hang up. */
  private fail (reason: string): void {
    if (this.closed) return
    this.reason = reason
    this.log.warn({ conn: this.id, export: this.export?.name }, `closing the connection: ${reason}`)
    this.socket.destroy()
  }

  private send (parts: Buffer[], written?: () => void): void {
    if (this.closed) { written?.(); return }
    const taken = (): void => { this.active = performance.now(); written?.() }
    this.socket.cork()
    parts.forEach((p, i) => this.socket.write(p, i === parts.length - 1 ? taken : undefined))
    this.socket.uncork()
  }

  /** Sends a whole reply to a request: at once with structured replies, else when no simple READ reply is going out. */
  private answer (parts: Buffer[]): void {
    if (this.structured || this.turns === 0) this.send(parts)
    else void this.inTurn(async () => { this.send(parts) })
  }

  /** Runs `work` when the simple replies before it have gone out. */
  private async inTurn (work: () => Promise<void>): Promise<void> {
    this.turns++
    const run = this.tail.then(work).finally(() => { this.turns-- })
    this.tail = run.catch(() => {})
    await run
  }

  /** Closes a connection on which nothing has moved for the idle timeout; checked when it would have run out. */
  private watchIdle (): void {
    if (this.idleTimeout <= 0 || this.closed) return
    this.idleTimer = setTimeout(() => {
      const idle = performance.now() - this.active
      if (idle >= this.idleTimeout && this.reading === 0) {
        this.fail(`idle for ${Math.round(idle / 1000)} s (no request, no reply taken; the idle timeout is ${this.idleTimeout / 1000} s)`)
      } else this.watchIdle()
    }, Math.min(2 ** 31 - 1, this.reading > 0 ? 1000 : this.active + this.idleTimeout - performance.now()))
    this.idleTimer.unref()
  }

  /** Parses what has arrived, as far as it goes and as far as we are willing to go now. */
  private pump (): void {
    try {
      while (!this.closed && this.step()) { /* next message */ }
    } catch (err) {
      this.fail((err as Error).message)
      return
    }
    if (this.closed) return
    if (this.socket.writableLength > MAX_BACKLOG || this.inFlight >= MAX_IN_FLIGHT || this.budget.full || this.phase === 'closing') this.socket.pause()
    else this.socket.resume()
  }

  /** Handles one message if it is complete and we may; returns whether to go on. */
  private step (): boolean {
    if (this.socket.writableLength > MAX_BACKLOG) return false
    if (this.discard > 0) {
      if (this.queue.length === 0) return false
      const n = Math.min(this.discard, this.queue.length)
      this.queue.skip(n)
      this.discard -= n
      return this.discard === 0
    }
    switch (this.phase) {
      case 'flags': {
        const flags = this.queue.take(4)
        if (flags === null) return false
        const value = flags.readUInt32BE(0)
        if ((value & ~(CLIENT_FLAG.FIXED_NEWSTYLE | CLIENT_FLAG.NO_ZEROES)) !== 0) throw new Error(`unknown client flags 0x${value.toString(16)}`)
        this.noZeroes = (value & CLIENT_FLAG.NO_ZEROES) !== 0
        this.phase = 'options'
        return true
      }
      case 'options': {
        const head = this.queue.peek(OPTION_HEADER_SIZE)
        if (head === null) return false
        const { option, length } = decodeOptionHeader(head)
        if (length > MAX_OPTION_DATA) throw new Error(`${nameOf('OPTION', option)} with ${length} bytes of data (at most ${MAX_OPTION_DATA})`)
        if (this.queue.length < OPTION_HEADER_SIZE + length) return false
        if (this.optionsLeft-- === 0) throw new Error('too many options')
        this.queue.skip(OPTION_HEADER_SIZE)
        this.option(option, length === 0 ? Buffer.alloc(0) : this.queue.take(length) as Buffer)
        return true
      }
      case 'requests': {
        // Requests wait as bytes while the read buffers are all taken: decoded, each would wait as objects
        // that outlive collections and fill the old generation.
        if (this.inFlight >= MAX_IN_FLIGHT || this.budget.full) return false
        const head = this.queue.take(REQUEST_SIZE)
        if (head === null) return false
        this.request(decodeRequest(head))
        return true
      }
      case 'closing':
        return false
    }
  }

  // ------------------------------------------------------------- options

  private reply (option: number, type: number, data?: Buffer): void {
    this.send([encodeOptionReply(option, type, data)])
  }

  private refuse (option: number, type: number, message: string): void {
    this.reply(option, type, encodeErrorMessage(message))
  }

  private option (option: number, data: Buffer): void {
    switch (option) {
      case OPTION.EXPORT_NAME: return this.exportName(data)
      case OPTION.ABORT:
        this.reply(option, REPLY.ACK)
        this.reason = 'the client aborted the handshake'
        this.phase = 'closing'
        this.socket.end(() => this.socket.destroy())
        return
      case OPTION.LIST: return this.list(data)
      case OPTION.INFO:
      case OPTION.GO: return this.info(option, data)
      case OPTION.STRUCTURED_REPLY:
        if (data.length > 0) return this.refuse(option, REPLY.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data')
        this.structured = true
        return this.reply(option, REPLY.ACK)
      case OPTION.LIST_META_CONTEXT:
      case OPTION.SET_META_CONTEXT: return this.meta(option, data)
      default: return this.refuse(option, REPLY.ERR_UNSUP, `${nameOf('OPTION', option)} is not supported`)
    }
  }

  private exportName (data: Buffer): void {
    const name = data.toString('utf8')
    const chosen = this.server.find(name)
    // NBD_OPT_EXPORT_NAME has no error reply: an unknown export ends the session.
    if (chosen === undefined) throw new Error(`NBD_OPT_EXPORT_NAME asks for export ${JSON.stringify(name)}, which does not exist`)
    this.send([encodeExportNameReply(chosen.disk.size, TRANSMISSION_FLAGS, this.noZeroes)])
    this.start(chosen)
  }

  private list (data: Buffer): void {
    if (data.length > 0) return this.refuse(OPTION.LIST, REPLY.ERR_INVALID, 'NBD_OPT_LIST takes no data')
    const exports = this.server.exports
    for (const e of exports) this.reply(OPTION.LIST, REPLY.SERVER, encodeServerReply(e.name, e.description))
    this.reply(OPTION.LIST, REPLY.ACK)
    // A client that lists may then ask about each export.
    if (!this.listed) this.optionsLeft += MAX_OPTIONS * exports.length
    this.listed = true
  }

  private info (option: number, data: Buffer): void {
    let request
    try {
      request = decodeExportRequest(data)
    } catch (err) {
      return this.refuse(option, REPLY.ERR_INVALID, (err as Error).message)
    }
    const chosen = this.server.find(request.name)
    if (chosen === undefined) {
      const names = this.server.exports.map(e => JSON.stringify(e.name)).join(', ')
      return this.refuse(option, REPLY.ERR_UNKNOWN, `there is no export ${JSON.stringify(request.name)} (there are ${names})`)
    }
    this.reply(option, REPLY.INFO, encodeInfoExport(chosen.disk.size, TRANSMISSION_FLAGS))
    if (request.infos.includes(INFO.NAME)) this.reply(option, REPLY.INFO, encodeInfoString(INFO.NAME, chosen.name))
    if (request.infos.includes(INFO.DESCRIPTION) && chosen.description !== undefined) {
      this.reply(option, REPLY.INFO, encodeInfoString(INFO.DESCRIPTION, chosen.description))
    }
    this.reply(option, REPLY.INFO, encodeInfoBlockSize(1, PREFERRED_BLOCK, MAX_PAYLOAD))
    this.reply(option, REPLY.ACK)
    if (option === OPTION.GO) this.start(chosen)
  }

  private meta (option: number, data: Buffer): void {
    // A failed NBD_OPT_SET_META_CONTEXT still replaces the earlier choice.
    if (option === OPTION.SET_META_CONTEXT) this.chosen = undefined
    let request
    try {
      request = decodeMetaRequest(data)
    } catch (err) {
      return this.refuse(option, REPLY.ERR_INVALID, (err as Error).message)
    }
    if (option === OPTION.SET_META_CONTEXT && !this.structured) {
      return this.refuse(option, REPLY.ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies first')
    }
    const chosen = this.server.find(request.name)
    if (chosen === undefined) return this.refuse(option, REPLY.ERR_UNKNOWN, `there is no export ${JSON.stringify(request.name)}`)
    const available = contextsOf(chosen.disk)
    if (option === OPTION.LIST_META_CONTEXT) {
      for (const c of listMatches(available, request.queries)) this.reply(option, REPLY.META_CONTEXT, encodeMetaContextReply(0, c.name))
      return this.reply(option, REPLY.ACK)
    }
    const contexts = available.filter(c => request.queries.includes(c.name)).map((c, i) => ({ ...c, id: i + 1 }))
    this.chosen = { exportName: chosen.name, contexts }
    for (const c of contexts) this.reply(option, REPLY.META_CONTEXT, encodeMetaContextReply(c.id, c.name))
    this.reply(option, REPLY.ACK)
  }

  private start (chosen: NbdExport): void {
    clearTimeout(this.timer)
    this.active = performance.now()
    this.watchIdle()
    this.export = chosen
    this.contexts = this.chosen?.exportName === chosen.name ? this.chosen.contexts : []
    this.phase = 'requests'
    this.log.info({ conn: this.id, export: chosen.name, structured: this.structured, contexts: this.contexts.map(c => c.name) }, 'export opened')
  }

  // ------------------------------------------------------------ requests

  private request (req: Request): void {
    this.requests++
    const disk = (this.export as NbdExport).disk
    switch (req.type) {
      case COMMAND.WRITE:
        // Its payload follows: skip it, unless it is too large to be anything but an attack.
        if (req.length > MAX_PAYLOAD) throw new Error(`NBD_CMD_WRITE of ${req.length} bytes (at most ${MAX_PAYLOAD})`)
        this.discard = req.length
        return this.error(req, ERRNO.EPERM, 'the export is read-only')
      case COMMAND.TRIM:
      case COMMAND.WRITE_ZEROES:
        return this.error(req, ERRNO.EPERM, 'the export is read-only')
      case COMMAND.DISC:
        this.reason = 'the client disconnected (NBD_CMD_DISC)'
        this.phase = 'closing'
        return this.endWhenIdle()
      case COMMAND.FLUSH: {
        if (req.flags !== 0 || req.offset !== 0 || req.length !== 0) return this.error(req, ERRNO.EINVAL, 'NBD_CMD_FLUSH takes no flags, offset or length')
        return this.answer([encodeSimpleReply(0, req.cookie)])
      }
      case COMMAND.CACHE: {
        const wrong = this.invalid(req, 0, disk.size)
        if (wrong !== undefined) return this.error(req, ERRNO.EINVAL, wrong)
        return this.answer([encodeSimpleReply(0, req.cookie)])
      }
      case COMMAND.READ: {
        const wrong = this.invalid(req, 0, disk.size)
        if (wrong !== undefined) return this.error(req, ERRNO.EINVAL, wrong)
        if (req.length > MAX_PAYLOAD) return this.error(req, this.structured ? ERRNO.EOVERFLOW : ERRNO.EINVAL, `reads are at most ${MAX_PAYLOAD} bytes`)
        return this.serve(req, this.structured ? this.readChunks(req, disk) : this.inTurn(async () => { await this.readSimple(req, disk) }))
      }
      case COMMAND.BLOCK_STATUS: {
        if (this.contexts.length === 0) return this.error(req, ERRNO.EINVAL, 'no metadata context was selected with NBD_OPT_SET_META_CONTEXT')
        const wrong = this.invalid(req, COMMAND_FLAG.REQ_ONE, disk.size)
        if (wrong !== undefined) return this.error(req, ERRNO.EINVAL, wrong)
        return this.serve(req, this.blockStatus(req, disk))
      }
      default:
        return this.error(req, ERRNO.EINVAL, `unknown command ${req.type}`)
    }
  }

  /** What is wrong with a request's flags and range, if anything. */
  private invalid (req: Request, allowedFlags: number, size: number): string | undefined {
    if ((req.flags & ~allowedFlags) !== 0) return `flags 0x${req.flags.toString(16)} are not valid for ${nameOf('COMMAND', req.type)}`
    if (req.length === 0) return `${nameOf('COMMAND', req.type)} of length 0`
    if (req.offset + req.length > size) {
      return `${nameOf('COMMAND', req.type)} of ${req.length} bytes at ${req.offset} runs past the end of the export (${size} bytes)`
    }
    return undefined
  }

  private error (req: Request, errno: number, message: string): void {
    this.answer([this.structured ? encodeErrorChunk(REPLY_FLAG_DONE, req.cookie, errno, message) : encodeSimpleReply(errno, req.cookie)])
  }

  /** Counts a request as under way until `work` has answered it (with an error if it failed). */
  private serve (req: Request, work: Promise<void>): void {
    this.inFlight++
    work.catch((err: Error) => {
      this.log.warn({ conn: this.id, export: this.export?.name, offset: req.offset, length: req.length },
        `${nameOf('COMMAND', req.type)} failed: ${err.message}`)
      this.error(req, ERRNO.EIO, err.message)
    }).finally(() => {
      this.inFlight--
      if (this.phase === 'closing') this.endWhenIdle()
      else this.pump()
    })
  }

  private endWhenIdle (): void {
    if (this.inFlight === 0 && !this.closed) this.socket.end(() => this.socket.destroy())
  }

  /**
   * Takes `bytes` of read buffers: from this connection's budget, and what
   * goes beyond its own share from the server's. Waiting for the server's,
   * it asks again whenever anything is released, its own buffers included:
   * once they are back, its own share may be enough.
   */
  private async hold (bytes: number): Promise<void> {
    await this.budget.acquire(bytes)
    for (;;) {
      if (this.closed) {
        this.budget.release(bytes)
        throw new Error('the client went away')
      }
      const need = Math.max(0, this.held + bytes - OWN_SHARE - this.shared)
      if (this.server.budget.tryTake(need)) {
        this.shared += need
        this.held += bytes
        return
      }
      await this.server.budget.changed()
    }
  }

  private unhold (bytes: number): void {
    if (this.closed) return
    this.held -= bytes
    this.budget.release(bytes)
    const over = this.shared - Math.max(0, this.held - OWN_SHARE)
    if (over > 0) {
      this.shared -= over
      this.server.budget.release(over)
    } else this.server.budget.wake()
  }

  /** A buffer of the disk's bytes, held against the budgets until `done` gives it back. */
  private async readHeld (disk: RandomAccessDisk, offset: number, length: number): Promise<Buffer> {
    await this.hold(PIECE)
    const buf = this.server.buffers.take(length)
    this.reading++
    try {
      await readDisk(disk, buf, offset)
    } catch (err) {
      this.done(buf)
      throw err
    } finally {
      this.reading--
      this.active = performance.now()
    }
    this.bytesSent += length
    return buf
  }

  /** A read buffer whose reply the socket has taken: back to the budgets and the pool. */
  private done (buf: Buffer): void {
    this.unhold(PIECE)
    this.server.buffers.give(buf)
    if (!this.closed) this.pump()
  }

  /**
   * A simple reply: the header and the data in pieces, so that a large READ
   * holds a piece or two, not all of it. A piece that fails after the header
   * went out cannot be an error reply any more: the connection is closed.
   */
  private async readSimple (req: Request, disk: RandomAccessDisk): Promise<void> {
    const end = req.offset + req.length
    for (let at = req.offset; at < end && !this.closed;) {
      const first = at === req.offset
      const length = Math.min(PIECE, end - at)
      let buf: Buffer
      try {
        buf = await this.readHeld(disk, at, length)
      } catch (err) {
        if (first) throw err
        this.fail(`${nameOf('COMMAND', req.type)} of ${req.length} bytes at ${req.offset} failed after its reply began: ${(err as Error).message}`)
        return
      }
      this.send(first ? [encodeSimpleReply(0, req.cookie), buf] : [buf], () => this.done(buf))
      at += length
    }
  }

  /** Holes as OFFSET_HOLE chunks, data in OFFSET_DATA chunks of at most PIECE bytes; the last chunk says DONE. */
  private async readChunks (req: Request, disk: RandomAccessDisk): Promise<void> {
    const pieces: Run[] = []
    for (const run of runsOf(await disk.map(req.offset, req.length), e => e.data ? 1 : 0, req.offset, req.length)) {
      if (run.value === 0) { pieces.push(run); continue }
      for (let at = 0; at < run.length; at += PIECE) pieces.push({ offset: run.offset + at, length: Math.min(PIECE, run.length - at), value: 1 })
    }
    for (const [i, p] of pieces.entries()) {
      if (this.closed) return
      const flags = i === pieces.length - 1 ? REPLY_FLAG_DONE : 0
      if (p.value === 0) {
        this.send([encodeOffsetHole(flags, req.cookie, p.offset, p.length)])
        continue
      }
      const buf = await this.readHeld(disk, p.offset, p.length)
      this.send([encodeOffsetDataHeader(flags, req.cookie, p.offset, p.length), buf], () => this.done(buf))
    }
  }

  /** One chunk per selected context, sent together once all are known. */
  private async blockStatus (req: Request, disk: RandomAccessDisk): Promise<void> {
    const one = (req.flags & COMMAND_FLAG.REQ_ONE) !== 0
    const chunks: Buffer[] = []
    for (const [i, c] of this.contexts.entries()) {
      const descriptors = one ? [await this.firstDescriptor(c, disk, req)] : descriptorsOf(await c.runs(disk, req.offset, Math.min(req.length, STATUS_WINDOW)))
      chunks.push(encodeBlockStatus(i === this.contexts.length - 1 ? REPLY_FLAG_DONE : 0, req.cookie, c.id, descriptors))
    }
    this.send(chunks)
  }

  /** REQ_ONE: the first extent, looked at in windows that grow until it ends inside one. */
  private async firstDescriptor (c: Context, disk: RandomAccessDisk, req: Request): Promise<Descriptor> {
    const limit = Math.min(req.length, STATUS_WINDOW)
    for (let window = Math.min(limit, FIRST_WINDOW); ; window = Math.min(limit, window * 8)) {
      const runs = await c.runs(disk, req.offset, window)
      if (runs.length > 1 || window === limit) return descriptorsOf(runs.slice(0, 1))[0]
    }
  }
}

/**
 * A connection over the limit: the greeting, then NBD_REP_ERR_POLICY with
 * the reason to each option (clients try optional ones first and stop at
 * the one they need: what nbdinfo and qemu then show), for a few options and
 * a few seconds at most.
 */
function turnAway (socket: Socket, message: string): void {
  socket.on('error', () => {})
  socket.setTimeout(5000, () => socket.destroy())
  socket.write(encodeGreeting(HANDSHAKE_FLAG.FIXED_NEWSTYLE | HANDSHAKE_FLAG.NO_ZEROES))
  const queue = new ByteQueue()
  let flags = false
  let left = 16
  socket.on('data', (chunk: Buffer) => {
    queue.push(chunk)
    if (!flags) flags = queue.take(4) !== null
    for (let head = queue.peek(OPTION_HEADER_SIZE); flags && head !== null; head = queue.peek(OPTION_HEADER_SIZE)) {
      let header
      try {
        header = decodeOptionHeader(head)
      } catch {
        return socket.destroy()
      }
      const { option, length } = header
      if (length > MAX_OPTION_DATA || left-- === 0) return socket.destroy()
      if (queue.length < OPTION_HEADER_SIZE + length) return
      queue.skip(OPTION_HEADER_SIZE + length)
      socket.write(encodeOptionReply(option, REPLY.ERR_POLICY, encodeErrorMessage(message)))
      if (option === OPTION.ABORT) return socket.end()
    }
  })
}

export class NbdServer {
  readonly exports: NbdExport[]
  private readonly byName = new Map<string, NbdExport>()
  private readonly log: ServerLog
  private readonly handshakeTimeout: number
  private readonly idleTimeout: number
  private readonly maxConnections: number
  /** Read buffers beyond each connection's own share. */
  readonly budget: SharedBudget
  /** Read buffers for reuse. */
  readonly buffers = new BufferPool(POOLED)
  private readonly connections = new Set<Connection>()
  private readonly net: Server
  /** Connections turned away since the last warning about it, and when that was. */
  private refused = 0
  private refusalLogged = -Infinity

  constructor (exports: NbdExport[], options: NbdServerOptions = {}) {
    if (exports.length === 0) throw new VmapipeError('E_OPTION', 'nothing to serve: no exports')
    for (const e of exports) {
      if (this.byName.has(e.name)) {
        throw new VmapipeError('E_OPTION', `two exports are named ${JSON.stringify(e.name)}; give them different names`,
          { option: 'names' })
      }
      encodeInfoString(INFO.NAME, e.name)
      this.byName.set(e.name, e)
    }
    this.exports = exports
    this.log = options.log ?? { info: () => {}, warn: () => {} }
    this.handshakeTimeout = options.handshakeTimeout ?? 10_000
    this.idleTimeout = options.idleTimeout ?? 600_000
    this.maxConnections = options.maxConnections ?? 1024
    if (!Number.isSafeInteger(this.maxConnections) || this.maxConnections < 1) {
      throw new VmapipeError('E_OPTION', `the connection limit must be at least 1, not ${this.maxConnections}`, { option: 'maxConnections' })
    }
    this.budget = new SharedBudget(options.bufferLimit ?? 256 * 1024 * 1024)
    this.net = createServer(socket => {
      if (this.connections.size >= this.maxConnections) return this.turnAway(socket)
      this.connections.add(new Connection(this, socket, this.log, this.handshakeTimeout, this.idleTimeout))
    })
  }

  /** Refuses a connection over the limit, with a warning at most every 10 s saying how many were refused. */
  private turnAway (socket: Socket): void {
    const message = `too many connections: ${this.maxConnections} are open, the most this server takes`
    turnAway(socket, message)
    this.refused++
    const now = performance.now()
    if (now - this.refusalLogged < REFUSAL_LOG_INTERVAL) return
    this.log.warn({ refused: this.refused, connections: this.connections.size, maxConnections: this.maxConnections }, `connection refused: ${message}`)
    this.refused = 0
    this.refusalLogged = now
  }

  /** Connections open now. */
  get connectionCount (): number { return this.connections.size }

  /** Starts listening; resolves with where (for TCP, the port actually bound). */
  async listen (address: ListenAddress): Promise<ListenAddress> {
    if ('socket' in address && existsSync(address.socket)) {
      throw new VmapipeError('E_TARGET_EXISTS', `${address.socket} exists already; remove it or choose another socket path`)
    }
    await new Promise<void>((resolve, reject) => {
      this.net.once('error', reject)
      const ready = (): void => { this.net.off('error', reject); resolve() }
      if ('socket' in address) this.net.listen(address.socket, ready)
      else this.net.listen(address.port, address.host, ready)
    }).catch(err => { throw ioError(err, `cannot listen on ${'socket' in address ? address.socket : `${address.host}:${address.port}`}`) })
    if ('socket' in address) return address
    const bound = this.net.address()
    return { host: address.host, port: typeof bound === 'object' && bound !== null ? bound.port : address.port }
  }

  /** Stops listening, lets each client's requests under way finish, then closes every connection. */
  async close (): Promise<void> {
    const closed = new Promise<void>(resolve => this.net.close(() => resolve()))
    for (const c of this.connections) c.shutdown()
    await closed
  }

  /** The export a client names; the empty name is the first export. */
  find (name: string): NbdExport | undefined {
    return name === '' ? this.exports[0] : this.byName.get(name)
  }

  forget (c: Connection): void { this.connections.delete(c) }
}
