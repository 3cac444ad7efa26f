/**
 * NbdClient: one connection to an NBD server (qemu-nbd, nbdkit, vma serve)
 * over a Unix socket or TCP, named by a URI (nbd://host[:port]/export,
 * nbd+unix:///export?socket=PATH). It negotiates fixed newstyle with
 * NBD_OPT_GO, structured replies and metadata contexts, then keeps several
 * requests in flight, their replies matched by cookie. Everything the server
 * sends is checked (magics, cookies, lengths, chunk bounds); a server that
 * breaks the protocol gets E_NBD_PROTOCOL and the connection is dropped.
 *
 * openNbdDisk() makes an export a RandomAccessDisk: map from BLOCK_STATUS
 * base:allocation (so holes are never read), reads by READ, and the dirty
 * bitmaps asked for as qemu:dirty-bitmap:NAME contexts.
 */
import { connect, type Socket } from 'node:net'
import { VmapipeError } from '../errors.js'
import type { DirtyBitmap, Extent, RandomAccessDisk } from '../contracts.js'
import { mappedBytes } from '../io/disk-records.js'
import { ByteQueue } from '../util/byte-queue.js'
import {
  type ChunkHeader, type Descriptor, CHUNK, CHUNK_HEADER_SIZE, CLIENT_FLAG, COMMAND, CONTEXT_ALLOCATION,
  CONTEXT_BITMAP_PREFIX, EXPORT_NAME_PADDING, EXPORT_NAME_REPLY_SIZE, GREETING_SIZE, HANDSHAKE_FLAG, INFO,
  MAX_PAYLOAD, MAX_STRING, OPTION, OPTION_REPLY_HEADER_SIZE, REPLY, REPLY_FLAG_DONE, SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE, STATE_DIRTY, STATE_ZERO, STRUCTURED_REPLY_MAGIC, TRANSMISSION_FLAG,
  decodeBlockStatus, decodeChunkHeader, decodeErrorChunk, decodeExportNameReply, decodeGreeting, decodeInfo,
  decodeMetaContextReply, decodeOptionReplyHeader, decodeSimpleReply, encodeClientFlags, encodeExportRequest,
  encodeMetaRequest, encodeOption, encodeRequest, isErrorChunk, isErrorReply, nameOf,
} from './protocol.js'

export interface NbdAddress {
  /** A Unix socket path; otherwise host and port. */
  socket?: string
  host?: string
  port?: number
  /** The export name ('' for the server's default). */
  export: string
}

export interface NbdClientOptions {
  /** Metadata contexts to select, e.g. base:allocation (default none). */
  contexts?: string[]
  /** Requests in flight at most (default 16). */
  maxInFlight?: number
  /** Milliseconds the server has to connect and finish the handshake (default 30 s). */
  handshakeTimeout?: number
  /** Milliseconds the server has to answer each request in full (default 60 s; 0: wait for ever). */
  timeout?: number
}

export interface NbdClientStats {
  /** READ requests and the bytes they asked for. */
  reads: number
  readBytes: number
  /** WRITE requests and their bytes; WRITE_ZEROES requests and the bytes they zeroed. */
  writes: number
  writeBytes: number
  zeroes: number
  zeroBytes: number
  /** BLOCK_STATUS requests. */
  statusQueries: number
}

/** A request the server answered with an error: the NBD error value is kept for callers that can react. */
export class NbdReplyError extends VmapipeError {
  constructor (readonly errno: number, message: string) {
    super('E_NBD_SERVER_ERROR', message)
  }
}

const DEFAULT_PORT = 10809
/** Bytes asked for by one READ (at most what the server takes). */
const READ_REQUEST = 2 * 1024 * 1024
/** Option replies we accept: names, descriptions and messages are at most 4 KiB. */
const MAX_OPTION_REPLY = 64 * 1024
/** The longest block status chunk the spec allows: 2^20 descriptors. */
const MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)
/** Guest bytes one BLOCK_STATUS asks about; the length field is 32 bits. */
const MAX_STATUS_LENGTH = 2 ** 31
/** Option replies in the whole handshake: a real server sends a handful per option. */
const MAX_HANDSHAKE_REPLIES = 256
/** Disjoint pieces a READ's reply may be in at once before it is refused: chunks come in order from real servers. */
const MAX_READ_PIECES = 1024
/**
 * The finest a map is told in: holes shorter than this are read as data, so
 * that the work of a map and of reading it is bounded by the bytes, whatever
 * extents the server reports (VMA's block, and no finer than 512 per the spec).
 */
const MAP_GRAIN = 4096
/** The largest minimum block size the spec allows. */
const MAX_MINIMUM_BLOCK = 65536
const DEFAULT_REQUEST_TIMEOUT = 60_000
/** What the socket reads into when no READ payload is due (headers, status, handshake); what is kept of it is copied out. */
const SCRATCH = 128 * 1024
/** A READ payload with at least this much still to come is read from the socket straight into its buffer; less goes through the scratch buffer. */
const DIRECT_MIN = 16 * 1024
/** Guest bytes of the allocation map asked for at once: readers ask a MiB at a time, and each question is a round trip. */
const MAP_WINDOW = 64 * 1024 * 1024
/** The longest delay setTimeout takes; longer timeouts are checked again when it runs out. */
const MAX_TIMER = 2 ** 31 - 1

export function isNbdUri (text: string): boolean {
  return /^nbds?(\+[a-z]+)?:\/\//i.test(text)
}

/** nbd://host[:port]/export, nbd+unix:///export?socket=PATH (the NBD URI format, without TLS). */
export function parseNbdUri (text: string): NbdAddress {
  const usage = (why: string): VmapipeError => new VmapipeError('E_OPTION', `${text}: ${why} (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`)
  let url: URL
  try {
    url = new URL(text)
  } catch {
    throw usage('not a URI')
  }
  const scheme = url.protocol.slice(0, -1).toLowerCase()
  if (scheme !== 'nbd' && scheme !== 'nbd+unix') throw usage(`${scheme}:// is not supported (no TLS, no vsock)`)
  let name: string
  try {
    name = decodeURIComponent(url.pathname.replace(/^\//, ''))
  } catch {
    throw usage('the export name is not valid percent-encoding')
  }
  if (scheme === 'nbd+unix') {
    const socket = url.searchParams.get('socket')
    if (url.host !== '') throw usage('nbd+unix:// takes no host')
    if (socket === null || socket === '') throw usage('nbd+unix:// needs ?socket=PATH')
    return { socket, export: name }
  }
  if (url.hostname === '') throw usage('no host')
  const port = url.port === '' ? DEFAULT_PORT : Number(url.port)
  return { host: url.hostname.replace(/^\[(.*)\]$/, '$1'), port, export: name }
}

/** An address as people write it, for messages. */
export function describeAddress (a: NbdAddress): string {
  const name = encodeURIComponent(a.export)
  if (a.socket !== undefined) return `nbd+unix:///${name}?socket=${a.socket}`
  return `nbd://${a.host?.includes(':') === true ? `[${a.host}]` : a.host}:${a.port}/${name}`
}

interface Pending {
  type: number
  offset: number
  length: number
  /** READ: where the bytes go, and the ranges of it the reply has covered so far (sorted, disjoint, relative to `offset`). */
  buf?: Buffer
  covered: Array<[number, number]>
  /** When the request was sent (ms, monotonic). */
  sent: number
  /** BLOCK_STATUS: descriptors by context id. */
  status: Map<number, Descriptor[]>
  error?: VmapipeError
  resolve: (status: Map<number, Descriptor[]>) => void
  reject: (err: Error) => void
}

/** Payload bytes of a reply going straight into a read buffer. */
interface Copy {
  cookie: bigint
  target: Buffer
  /** Whether the request is complete once the copy is. */
  done: boolean
}

export class NbdClient {
  /** Export size in bytes. */
  size = 0
  /** Transmission flags (TRANSMISSION_FLAG). */
  flags = 0
  /** Largest payload the server takes (NBD_INFO_BLOCK_SIZE, else the spec's default). */
  maxPayload = MAX_PAYLOAD
  /** Smallest block the server deals in (NBD_INFO_BLOCK_SIZE, else 512). */
  minimumBlock = 512
  structured = false
  /** Selected metadata contexts: name -> id. */
  readonly contexts = new Map<string, number>()
  readonly stats: NbdClientStats = { reads: 0, readBytes: 0, writes: 0, writeBytes: 0, zeroes: 0, zeroBytes: 0, statusQueries: 0 }
  readonly where: string

  private readonly queue = new ByteQueue()
  private readonly pending = new Map<bigint, Pending>()
  private readonly maxInFlight: number
  private waiters: Array<() => void> = []
  private nextCookie = 1n
  private transmitting = false
  private copy?: Copy
  private failure?: Error
  private closing = false
  private closed?: Promise<void>
  private readonly timeout: number
  private timer?: NodeJS.Timeout
  private handshakeReplies = 0
  private readonly scratch: Buffer

  private constructor (private readonly socket: Socket, address: NbdAddress, options: NbdClientOptions, scratch: Buffer) {
    this.where = describeAddress(address)
    this.maxInFlight = options.maxInFlight ?? 16
    this.timeout = options.timeout ?? DEFAULT_REQUEST_TIMEOUT
    this.scratch = scratch
    socket.on('error', (err: NodeJS.ErrnoException) =>
      this.fail(new VmapipeError('E_NBD_CONNECT', `${this.where}: connection lost (${err.code ?? err.message})`, { cause: err })))
    socket.on('close', () => this.fail(new VmapipeError('E_NBD_CONNECT', `${this.where}: the server closed the connection`)))
  }

  static async connect (target: NbdAddress | string, options: NbdClientOptions = {}): Promise<NbdClient> {
    const address = typeof target === 'string' ? parseNbdUri(target) : target
    // Reads go into buffers we choose (onread): a READ's payload straight into the caller's buffer, the rest into one reused scratch buffer.
    const scratch = Buffer.allocUnsafeSlow(SCRATCH)
    const to: { client?: NbdClient } = {}
    const onread = {
      buffer: () => to.client?.nextBuffer() ?? scratch,
      callback: (n: number, buf: Uint8Array): boolean => { to.client?.received(n, buf); return true },
    }
    const socket = address.socket !== undefined
      ? connect({ path: address.socket, onread })
      : connect({ port: address.port ?? DEFAULT_PORT, ...(address.host !== undefined ? { host: address.host } : {}), onread })
    socket.setNoDelay(true)
    const client = new NbdClient(socket, address, options, scratch)
    to.client = client
    const timeout = options.handshakeTimeout ?? 30_000
    const timer = setTimeout(() => {
      client.fail(new VmapipeError('E_NBD_CONNECT', `${client.where}: no connection and handshake within ${timeout / 1000} s`))
    }, timeout)
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve)
        // The constructor's 'close' listener, registered first, has set the failure.
        socket.once('close', () => reject(client.failure as Error))
        socket.once('error', (err: NodeJS.ErrnoException) =>
          reject(new VmapipeError('E_NBD_CONNECT', `cannot connect to ${client.where}: ${err.code ?? err.message}`, { cause: err })))
      })
      await client.handshake(address.export, options.contexts ?? [])
    } catch (err) {
      socket.destroy()
      throw err
    } finally {
      clearTimeout(timer)
    }
    return client
  }

  // ------------------------------------------------------------- reading

  /** Where the socket's next read goes: the rest of the READ payload being received when nothing else is queued, else the scratch buffer. */
  private nextBuffer (): Buffer {
    const copy = this.copy
    return copy !== undefined && this.queue.length === 0 && copy.target.length >= DIRECT_MIN ? copy.target : this.scratch
  }

  /** `n` bytes read into `buf`: the scratch buffer, or the payload target nextBuffer() gave. */
  private received (n: number, buf: Uint8Array): void {
    if (buf !== this.scratch) {
      // Straight into a READ's buffer: nothing to parse or copy.
      const copy = this.copy as Copy
      copy.target = copy.target.subarray(n)
      if (copy.target.length === 0) {
        this.copy = undefined
        if (copy.done) this.complete(copy.cookie)
      }
      return
    }
    this.queue.push(this.scratch.subarray(0, n))
    if (this.transmitting) this.parse()
    else this.wake()
    // The scratch buffer is read into again: what is left of it is copied out (a partial header or chunk, a handshake reply not yet taken).
    if (this.queue.length > 0) {
      const rest = Buffer.from(this.queue.take(this.queue.length) as Buffer)
      this.queue.push(rest)
    }
  }

  // ----------------------------------------------------------- handshake

  private wake (): void {
    const waiters = this.waiters
    this.waiters = []
    for (const w of waiters) w()
  }

  /** During the handshake: the next `n` bytes from the server. */
  private async take (n: number): Promise<Buffer> {
    for (;;) {
      if (this.failure !== undefined) throw this.failure
      const bytes = this.queue.take(n)
      if (bytes !== null) return bytes
      await new Promise<void>(resolve => this.waiters.push(resolve))
    }
  }

  private async optionReply (option: number): Promise<{ type: number, data: Buffer }> {
    const header = decodeOptionReplyHeader(await this.take(OPTION_REPLY_HEADER_SIZE))
    if (++this.handshakeReplies > MAX_HANDSHAKE_REPLIES) throw this.violation(`more than ${MAX_HANDSHAKE_REPLIES} option replies in the handshake`)
    if (header.option !== option) throw this.violation(`a reply to ${nameOf('OPTION', header.option)} came while ${nameOf('OPTION', option)} was asked`)
    if (header.length > MAX_OPTION_REPLY) throw this.violation(`${nameOf('REPLY', header.type)} of ${header.length} bytes`)
    return { type: header.type, data: header.length === 0 ? Buffer.alloc(0) : await this.take(header.length) }
  }

  private replyError (option: number, reply: { type: number, data: Buffer }): VmapipeError {
    const detail = reply.data.length > 0 ? `: ${reply.data.subarray(0, MAX_STRING).toString('utf8')}` : ''
    const message = `${this.where}: ${nameOf('OPTION', option)} failed with ${nameOf('REPLY', reply.type)}${detail}`
    return new VmapipeError(reply.type === REPLY.ERR_UNKNOWN ? 'E_NOT_FOUND' : 'E_NBD_SERVER_ERROR', message)
  }

  private async handshake (name: string, contexts: string[]): Promise<void> {
    const { flags } = decodeGreeting(await this.take(GREETING_SIZE))
    if ((flags & HANDSHAKE_FLAG.FIXED_NEWSTYLE) === 0) throw this.violation('the server does not speak fixed newstyle')
    const noZeroes = (flags & HANDSHAKE_FLAG.NO_ZEROES) !== 0
    this.socket.write(encodeClientFlags(CLIENT_FLAG.FIXED_NEWSTYLE | (noZeroes ? CLIENT_FLAG.NO_ZEROES : 0)))

    this.socket.write(encodeOption(OPTION.STRUCTURED_REPLY))
    const structured = await this.optionReply(OPTION.STRUCTURED_REPLY)
    if (structured.type !== REPLY.ACK && !isErrorReply(structured.type)) throw this.violation(`${nameOf('REPLY', structured.type)} to NBD_OPT_STRUCTURED_REPLY`)
    this.structured = structured.type === REPLY.ACK

    if (this.structured && contexts.length > 0) {
      this.socket.write(encodeOption(OPTION.SET_META_CONTEXT, encodeMetaRequest({ name, queries: contexts })))
      for (;;) {
        const reply = await this.optionReply(OPTION.SET_META_CONTEXT)
        if (reply.type === REPLY.META_CONTEXT) {
          const context = decodeMetaContextReply(reply.data)
          // Only what was asked for, once each: anything else is a server making up replies.
          if (!contexts.includes(context.name)) {
            throw this.violation(`NBD_REP_META_CONTEXT for ${JSON.stringify(context.name.slice(0, 100))}, which was not asked for`)
          }
          if (this.contexts.has(context.name)) throw this.violation(`NBD_REP_META_CONTEXT for ${context.name} twice`)
          this.contexts.set(context.name, context.id)
        } else if (reply.type === REPLY.ACK || isErrorReply(reply.type)) {
          // A server that cannot select contexts is still a server: we read without them.
          if (reply.type !== REPLY.ACK) this.contexts.clear()
          break
        } else {
          throw this.violation(`${nameOf('REPLY', reply.type)} to NBD_OPT_SET_META_CONTEXT`)
        }
      }
    }

    this.socket.write(encodeOption(OPTION.GO, encodeExportRequest({ name, infos: [INFO.BLOCK_SIZE] })))
    let sized = false
    for (;;) {
      const reply = await this.optionReply(OPTION.GO)
      if (reply.type === REPLY.INFO) {
        const info = decodeInfo(reply.data)
        if ('size' in info) {
          this.size = info.size
          this.flags = info.flags
          sized = true
        } else if ('maximum' in info) {
          this.blockSizes(info.minimum, info.preferred, info.maximum)
        }
        continue
      }
      if (reply.type === REPLY.ACK) {
        if (!sized) throw this.violation('NBD_OPT_GO succeeded without NBD_INFO_EXPORT')
        break
      }
      if (reply.type !== REPLY.ERR_UNSUP) {
        throw isErrorReply(reply.type) ? this.replyError(OPTION.GO, reply) : this.violation(`${nameOf('REPLY', reply.type)} to NBD_OPT_GO`)
      }
      // An old server: the old way, which has no error reply (an unknown export just hangs up).
      this.socket.write(encodeOption(OPTION.EXPORT_NAME, Buffer.from(name, 'utf8')))
      const reply2 = decodeExportNameReply(await this.take(EXPORT_NAME_REPLY_SIZE))
      if (!noZeroes) await this.take(EXPORT_NAME_PADDING)
      this.size = reply2.size
      this.flags = reply2.flags
      break
    }
    if ((this.flags & TRANSMISSION_FLAG.HAS_FLAGS) === 0) throw this.violation('the transmission flags lack NBD_FLAG_HAS_FLAGS')
    this.transmitting = true
    this.parse()
  }

  /** NBD_INFO_BLOCK_SIZE, checked against the spec's rules: reads are sized by it. */
  private blockSizes (minimum: number, preferred: number, maximum: number): void {
    const power = (n: number): boolean => n > 0 && (n & (n - 1)) === 0
    const wrong = !power(minimum) || minimum > MAX_MINIMUM_BLOCK
      ? `a minimum block size of ${minimum} (a power of 2 up to ${MAX_MINIMUM_BLOCK})`
      : !power(preferred) || preferred < Math.max(minimum, 512)
          ? `a preferred block size of ${preferred} (a power of 2, at least 512 and the minimum ${minimum})`
          : maximum < preferred ? `a maximum payload of ${maximum} (at least the preferred block size ${preferred})` : undefined
    if (wrong !== undefined) throw this.violation(`NBD_INFO_BLOCK_SIZE gives ${wrong}`)
    this.minimumBlock = minimum
    // Whole minimum blocks: requests must be multiples of it.
    this.maxPayload = Math.min(MAX_PAYLOAD, maximum) - Math.min(MAX_PAYLOAD, maximum) % minimum
  }

  // -------------------------------------------------------- transmission

  private violation (message: string): VmapipeError {
    return new VmapipeError('E_NBD_PROTOCOL', `${this.where}: ${message}`)
  }

  /** Ends the connection for good: every request still waiting fails with `err`. */
  private fail (err: Error): void {
    if (this.failure !== undefined) return
    this.failure = this.closing ? new VmapipeError('E_NBD_CONNECT', `${this.where}: the connection is closed`) : err
    for (const p of this.pending.values()) p.reject(this.failure)
    this.pending.clear()
    clearTimeout(this.timer)
    this.socket.destroy()
    this.wake()
  }

  /** Resolves once fewer than the maximum of requests are in flight; undefined if that is so now. */
  ready (): Promise<void> | undefined {
    if (this.pending.size < this.maxInFlight || this.failure !== undefined) return undefined
    return new Promise<void>(resolve => this.waiters.push(resolve))
  }

  private async send (
    type: number, flags: number, offset: number, length: number, options: { buf?: Buffer, payload?: Buffer[] } = {}
  ): Promise<Map<number, Descriptor[]>> {
    while (this.failure === undefined && this.pending.size >= this.maxInFlight) await this.ready()
    if (this.failure !== undefined) throw this.failure
    const cookie = this.nextCookie++
    return await new Promise((resolve, reject) => {
      const buf = options.buf !== undefined ? { buf: options.buf } : {}
      this.pending.set(cookie, { type, offset, length, ...buf, covered: [], sent: performance.now(), status: new Map(), resolve, reject })
      this.watch()
      this.socket.cork()
      this.socket.write(encodeRequest({ flags, type, cookie, offset, length }))
      for (const p of options.payload ?? []) this.socket.write(p)
      this.socket.uncork()
    })
  }

  /**
   * One timer for all requests: they are sent in order with the same
   * timeout, so the oldest in flight is the first due. It fails the
   * connection when that one has waited too long, else waits for the next.
   */
  private watch (): void {
    if (this.timeout <= 0 || this.timer !== undefined) return
    const oldest = this.pending.values().next().value
    if (oldest === undefined) return
    this.timer = setTimeout(() => {
      this.timer = undefined
      const due = this.pending.values().next().value
      if (due !== undefined && performance.now() - due.sent >= this.timeout) {
        const what = `${nameOf('COMMAND', due.type)} of ${due.length} bytes at ${due.offset}`
        this.fail(new VmapipeError('E_NBD_CONNECT', `${this.where}: no complete reply to ${what} within ${this.timeout / 1000} s`))
        return
      }
      this.watch()
    }, Math.min(MAX_TIMER, Math.max(0, oldest.sent + this.timeout - performance.now())))
    this.timer.unref()
  }

  private complete (cookie: bigint): void {
    const p = this.pending.get(cookie) as Pending
    this.pending.delete(cookie)
    const covered = p.covered.length === 1 ? p.covered[0][1] - p.covered[0][0] : 0
    if (p.error !== undefined) p.reject(p.error)
    else if (p.type === COMMAND.READ && covered !== p.length) {
      const got = p.covered.length === 0 ? 'none' : p.covered.slice(0, 4).map(([a, b]) => `${p.offset + a}-${p.offset + b}`).join(', ')
      const err = this.violation(`the reply to a READ of ${p.length} bytes at ${p.offset} left bytes unanswered (it covered ${got})`)
      p.reject(err)
      this.fail(err)
    } else p.resolve(p.status)
    this.wake()
  }

  private pendingFor (cookie: bigint): Pending {
    const p = this.pending.get(cookie)
    if (p === undefined) throw this.violation(`a reply for cookie ${cookie}, which no request in flight has`)
    return p
  }

  /** Takes replies from what has arrived, as far as they are complete. */
  private parse (): void {
    try {
      while (this.failure === undefined && this.parseOne()) { /* next reply */ }
    } catch (err) {
      this.fail(err as Error)
    }
  }

  private parseOne (): boolean {
    if (this.copy !== undefined) return this.copyPayload(this.copy)
    const magic = this.queue.peek(4)
    if (magic === null) return false
    const value = magic.readUInt32BE(0)
    if (value === SIMPLE_REPLY_MAGIC) {
      const head = this.queue.take(SIMPLE_REPLY_SIZE)
      if (head === null) return false
      const { error, cookie } = decodeSimpleReply(head)
      const p = this.pendingFor(cookie)
      if (error !== 0) p.error = this.serverError(p, error, '')
      else if (p.type === COMMAND.READ) {
        if (this.structured) throw this.violation('a simple reply with data to a READ, after structured replies were agreed')
        p.covered = [[0, p.length]]
        this.copy = { cookie, target: p.buf as Buffer, done: true }
        return true
      }
      this.complete(cookie)
      return true
    }
    if (value !== STRUCTURED_REPLY_MAGIC) throw this.violation(`reply magic 0x${value.toString(16)}`)
    const head = this.queue.peek(CHUNK_HEADER_SIZE)
    if (head === null) return false
    const chunk = decodeChunkHeader(head)
    const p = this.pendingFor(chunk.cookie)
    if (chunk.type === CHUNK.OFFSET_DATA) return this.offsetData(chunk, p)
    if (chunk.length > this.chunkLimit(chunk.type)) throw this.violation(`${nameOf('CHUNK', chunk.type)} of ${chunk.length} bytes`)
    if (this.queue.length < CHUNK_HEADER_SIZE + chunk.length) return false
    this.queue.skip(CHUNK_HEADER_SIZE)
    const payload = chunk.length === 0 ? Buffer.alloc(0) : this.queue.take(chunk.length) as Buffer
    this.chunk(chunk, p, payload)
    if ((chunk.flags & REPLY_FLAG_DONE) !== 0) this.complete(chunk.cookie)
    return true
  }

  private chunkLimit (type: number): number {
    if (type === CHUNK.OFFSET_HOLE) return 12
    if (type === CHUNK.BLOCK_STATUS) return MAX_STATUS_CHUNK
    if (isErrorChunk(type)) return 14 + MAX_STRING
    return 0
  }

  private chunk (chunk: ChunkHeader, p: Pending, payload: Buffer): void {
    if (isErrorChunk(chunk.type)) {
      const e = decodeErrorChunk(chunk.type, payload)
      p.error ??= this.serverError(p, e.error, e.message)
      return
    }
    switch (chunk.type) {
      case CHUNK.NONE:
        if ((chunk.flags & REPLY_FLAG_DONE) === 0) throw this.violation('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE')
        return
      case CHUNK.OFFSET_HOLE: {
        if (p.type !== COMMAND.READ || payload.length !== 12) throw this.violation('a hole chunk that does not answer a READ')
        const offset = Number(payload.readBigUInt64BE(0))
        const length = payload.readUInt32BE(8)
        this.cover(p, offset, length)
        ;(p.buf as Buffer).fill(0, offset - p.offset, offset - p.offset + length)
        return
      }
      case CHUNK.BLOCK_STATUS: {
        if (p.type !== COMMAND.BLOCK_STATUS) throw this.violation('a block status chunk that does not answer BLOCK_STATUS')
        const { contextId, descriptors } = decodeBlockStatus(payload)
        // Exactly one chunk per selected context (the spec's words): anything else would pile up until the timeout.
        if (![...this.contexts.values()].includes(contextId)) throw this.violation(`a block status chunk for context ${contextId}, which was not selected`)
        if (p.status.has(contextId)) throw this.violation(`two block status chunks for context ${contextId} in one reply`)
        p.status.set(contextId, descriptors)
        return
      }
      default:
        throw this.violation(`unknown reply chunk type ${chunk.type}`)
    }
  }

  /**
   * A content chunk must lie inside its request, carry something, and not
   * overlap what earlier chunks answered (the spec's MUST NOT): each byte of
   * a READ is answered once, and complete() checks that all were.
   */
  private cover (p: Pending, offset: number, length: number): void {
    if (length === 0 || offset < p.offset || offset + length > p.offset + p.length) {
      throw this.violation(`a chunk for ${length} bytes at ${offset} answers a READ of ${p.length} bytes at ${p.offset}`)
    }
    const from = offset - p.offset
    const to = from + length
    const ranges = p.covered
    // The first range that ends after `from`: the only one that could overlap or follow.
    let lo = 0
    let hi = ranges.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (ranges[mid][1] <= from) lo = mid + 1
      else hi = mid
    }
    const next = ranges[lo]
    if (next !== undefined && next[0] < to) {
      throw this.violation(`a chunk for ${length} bytes at ${offset} overlaps one already received for the READ of ${p.length} bytes at ${p.offset}`)
    }
    const before = ranges[lo - 1]
    const joinsBefore = before !== undefined && before[1] === from
    const joinsNext = next !== undefined && next[0] === to
    if (joinsBefore && joinsNext) {
      before[1] = next[1]
      ranges.splice(lo, 1)
    } else if (joinsBefore) before[1] = to
    else if (joinsNext) next[0] = from
    else {
      if (ranges.length >= MAX_READ_PIECES) {
        throw this.violation(`the reply to a READ of ${p.length} bytes at ${p.offset} comes in more than ${MAX_READ_PIECES} separate pieces`)
      }
      ranges.splice(lo, 0, [from, to])
    }
  }

  /** OFFSET_DATA: once its offset is in, the data is copied into the read buffer as it arrives. */
  private offsetData (chunk: ChunkHeader, p: Pending): boolean {
    if (p.type !== COMMAND.READ || chunk.length < 9) throw this.violation(`a data chunk of ${chunk.length} bytes that does not answer a READ`)
    const head = this.queue.peek(CHUNK_HEADER_SIZE + 8)
    if (head === null) return false
    this.queue.skip(CHUNK_HEADER_SIZE + 8)
    const offset = Number(head.readBigUInt64BE(CHUNK_HEADER_SIZE))
    const length = chunk.length - 8
    this.cover(p, offset, length)
    this.copy = {
      cookie: chunk.cookie,
      target: (p.buf as Buffer).subarray(offset - p.offset, offset - p.offset + length),
      done: (chunk.flags & REPLY_FLAG_DONE) !== 0,
    }
    return true
  }

  private copyPayload (copy: Copy): boolean {
    if (this.queue.length === 0) return false
    const piece = this.queue.take(Math.min(copy.target.length, this.queue.length)) as Buffer
    piece.copy(copy.target)
    copy.target = copy.target.subarray(piece.length)
    if (copy.target.length > 0) return false
    this.copy = undefined
    if (copy.done) this.complete(copy.cookie)
    return true
  }

  private serverError (p: Pending, error: number, message: string): NbdReplyError {
    const detail = message === '' ? '' : `: ${message}`
    return new NbdReplyError(error,
      `${this.where}: ${nameOf('COMMAND', p.type)} of ${p.length} bytes at ${p.offset} failed with ${nameOf('ERRNO', error)}${detail}`)
  }

  // ------------------------------------------------------------ commands

  /** Fills `buf` with the export's bytes at `offset`, in requests of at most 2 MiB, all in flight at once. */
  async read (buf: Buffer, offset: number): Promise<void> {
    const step = Math.min(READ_REQUEST, this.maxPayload)
    if (buf.length <= step) {
      // The usual case (readers ask a MiB at a time): one request, no array of promises.
      this.stats.reads++
      this.stats.readBytes += buf.length
      await this.send(COMMAND.READ, 0, offset, buf.length, { buf })
      return
    }
    const parts: Array<Promise<unknown>> = []
    for (let at = 0; at < buf.length; at += step) {
      const length = Math.min(step, buf.length - at)
      this.stats.reads++
      this.stats.readBytes += length
      parts.push(this.send(COMMAND.READ, 0, offset + at, length, { buf: buf.subarray(at, at + length) }))
    }
    await Promise.all(parts)
  }

  /** The descriptors of one selected context for a range (which the server may answer only in part). */
  async blockStatus (context: string, offset: number, length: number): Promise<Descriptor[]> {
    const id = this.contexts.get(context)
    if (id === undefined) throw new VmapipeError('E_OPTION', `${this.where}: metadata context ${context} was not selected`, { option: 'contexts' })
    this.stats.statusQueries++
    const status = await this.send(COMMAND.BLOCK_STATUS, 0, offset, Math.min(length, MAX_STATUS_LENGTH))
    const descriptors = status.get(id)
    if (descriptors === undefined) throw this.violation(`the block status reply has no chunk for ${context}`)
    return descriptors
  }

  /** Writes `buffers` one after another at `offset`, in one WRITE (together at most maxPayload bytes). */
  async write (offset: number, buffers: Buffer[]): Promise<void> {
    const length = buffers.reduce((n, b) => n + b.length, 0)
    if (length > this.maxPayload) throw new VmapipeError('E_LIMIT', `a write of ${length} bytes is more than ${this.where} takes (${this.maxPayload})`)
    this.stats.writes++
    this.stats.writeBytes += length
    await this.send(COMMAND.WRITE, 0, offset, length, { payload: buffers })
  }

  /** WRITE_ZEROES with COMMAND_FLAG.NO_HOLE and/or FAST_ZERO as given. */
  async writeZeroes (offset: number, length: number, flags = 0): Promise<void> {
    this.stats.zeroes++
    this.stats.zeroBytes += length
    await this.send(COMMAND.WRITE_ZEROES, flags, offset, length)
  }

  /** TRIM: the server may discard the range; what it then reads as is undefined. */
  async trim (offset: number, length: number): Promise<void> {
    await this.send(COMMAND.TRIM, 0, offset, length)
  }

  async flush (): Promise<void> {
    await this.send(COMMAND.FLUSH, 0, 0, 0)
  }

  /** Drops the connection now; requests in flight fail. */
  destroy (): void {
    this.closing = true
    this.fail(new VmapipeError('E_NBD_CONNECT', `${this.where}: the connection is closed`))
  }

  /** Waits for the requests in flight, says NBD_CMD_DISC and closes; calling it again waits for the same. */
  async close (): Promise<void> {
    this.closed ??= this.shutdown()
    await this.closed
  }

  private async shutdown (): Promise<void> {
    while (this.failure === undefined && this.pending.size > 0) await new Promise<void>(resolve => this.waiters.push(resolve))
    if (this.failure !== undefined) return
    this.closing = true
    const closed = new Promise<void>(resolve => this.socket.once('close', () => resolve()))
    if (this.transmitting) this.socket.write(encodeRequest({ flags: 0, type: COMMAND.DISC, cookie: 0n, offset: 0, length: 0 }))
    this.socket.end()
    // A server that never hangs up after NBD_CMD_DISC is hung up on.
    const timer = this.timeout > 0 ? setTimeout(() => this.socket.destroy(), Math.min(MAX_TIMER, this.timeout)) : undefined
    await closed
    clearTimeout(timer)
  }
}

/**
 * Extents over [start, end) built front to back in MAP_GRAIN units: a set
 * range grows out to whole grains (reading a hole as data costs a read,
 * never a wrong byte), an unset one keeps only its whole grains. However
 * short the server's extents, there are at most two per grain.
 */
class GrainedExtents {
  readonly extents: Extent[] = []
  constructor (readonly start: number, readonly end: number) {}

  /** Where the extents reach: past the last range added when a set grain was rounded up. */
  get reached (): number {
    const last = this.extents[this.extents.length - 1]
    return last === undefined ? this.start : last.offset + last.length
  }

  /** Adds [at, at + n), which follows the ranges added before. */
  add (at: number, n: number, data: boolean): void {
    let from = at
    let to = at + n
    if (data) {
      from = Math.max(this.start, from - from % MAP_GRAIN)
      to = Math.min(this.end, Math.ceil(to / MAP_GRAIN) * MAP_GRAIN)
    }
    const out = this.extents
    let last = out[out.length - 1]
    if (from < this.reached) {
      if (!data) from = this.reached
      else {
        // Rounded down into the unset extent before: that grain becomes set.
        if (!last.data) {
          last.length = from - last.offset
          if (last.length <= 0) out.pop()
        }
        last = out[out.length - 1]
        from = this.reached
      }
    }
    if (to > from) {
      if (last !== undefined && last.data === data && last.offset + last.length === from) last.length += to - from
      else out.push({ offset: from, length: to - from, data })
    }
  }
}

export interface NbdDisk extends RandomAccessDisk {
  readonly client: NbdClient
  readonly bitmaps: DirtyBitmap[]
}

export interface OpenNbdDiskOptions {
  /** Dirty bitmaps to select as qemu:dirty-bitmap:NAME; each must exist. */
  dirtyBitmaps?: string[]
  maxInFlight?: number
  /** Milliseconds the server has to answer each request (NbdClientOptions.timeout). */
  timeout?: number
}

/**
 * A map asked for in windows of at least MAP_WINDOW bytes, the last window
 * kept: a reader going front to back a MiB at a time asks the server once per
 * window, not once per MiB. Callers asking at once share the window's question.
 */
function windowed (size: number, fetch: (offset: number, length: number) => Promise<Extent[]>): (offset: number, length: number) => Promise<Extent[]> {
  let window: { start: number, end: number, extents: Promise<Extent[]> } | undefined
  return async (offset, length) => {
    const end = offset + length
    if (window === undefined || offset < window.start || end > window.end) {
      const to = Math.max(end, Math.min(size, offset + MAP_WINDOW))
      window = { start: offset, end: to, extents: fetch(offset, to - offset) }
      // A failed question is asked again by the next caller.
      const failed = window
      failed.extents.catch(() => { if (window === failed) window = undefined })
    }
    return clipExtents(await window.extents, offset, end)
  }
}

/** The parts of sorted, adjoining extents inside [offset, end), found by bisection (a fragmented map has thousands). */
export function clipExtents (extents: Extent[], offset: number, end: number): Extent[] {
  let lo = 0
  let hi = extents.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (extents[mid].offset + extents[mid].length <= offset) lo = mid + 1
    else hi = mid
  }
  const out: Extent[] = []
  for (let i = lo; i < extents.length && extents[i].offset < end; i++) {
    const e = extents[i]
    const from = Math.max(e.offset, offset)
    out.push({ ...e, offset: from, length: Math.min(e.offset + e.length, end) - from })
  }
  return out
}

/** An NBD export as a RandomAccessDisk. */
export async function openNbdDisk (target: NbdAddress | string, options: OpenNbdDiskOptions = {}): Promise<NbdDisk> {
  const names = options.dirtyBitmaps ?? []
  const client = await NbdClient.connect(target, {
    contexts: [CONTEXT_ALLOCATION, ...names.map(n => CONTEXT_BITMAP_PREFIX + n)],
    ...(options.maxInFlight !== undefined ? { maxInFlight: options.maxInFlight } : {}),
    ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
  })
  const missing = names.find(n => !client.contexts.has(CONTEXT_BITMAP_PREFIX + n))
  if (missing !== undefined) {
    await client.close()
    throw new VmapipeError('E_NOT_FOUND', `${client.where} offers no dirty bitmap ${missing} (qemu-nbd exports one with -B ${missing})`)
  }
  /**
   * Extents of a context over [offset, offset + length), asking as often as
   * the server answers in part, told in MAP_GRAIN units (see grainExtents).
   * A reply that ends inside a grain has that grain's rest taken as set:
   * each question moves on by a grain at least, however little the server answers.
   */
  const extentsOf = async (context: string, offset: number, length: number, set: (flags: number) => boolean): Promise<Extent[]> => {
    const out = new GrainedExtents(offset, offset + length)
    for (let at = offset; at < out.end;) {
      let position = at
      for (const d of await client.blockStatus(context, at, out.end - at)) {
        const n = Math.min(d.length, out.end - position)
        out.add(position, n, set(d.flags))
        position += n
        if (position >= out.end) break
      }
      const next = Math.max(position, out.reached)
      if (next < out.end && next - at < MAP_GRAIN && next % MAP_GRAIN !== 0) out.add(next, MAP_GRAIN - next % MAP_GRAIN, true)
      at = Math.max(next, out.reached)
    }
    return out.extents
  }
  const allocated = client.contexts.has(CONTEXT_ALLOCATION)
  const allocation = windowed(client.size, async (offset, length) => await extentsOf(CONTEXT_ALLOCATION, offset, length, flags => (flags & STATE_ZERO) === 0))
  return {
    client,
    size: client.size,
    map: async (offset, length) => allocated ? await allocation(offset, length) : [{ offset, length, data: true }],
    read: async (buf, offset) => { await client.read(buf, offset) },
    close: async () => { await client.close() },
    bitmaps: names.map(name => {
      const dirty = windowed(client.size,
        async (offset, length) => await extentsOf(CONTEXT_BITMAP_PREFIX + name, offset, length, flags => (flags & STATE_DIRTY) !== 0))
      const map = async (offset: number, length: number): Promise<Array<{ offset: number, length: number, dirty: boolean }>> =>
        (await dirty(offset, length)).map(e => ({ offset: e.offset, length: e.length, dirty: e.data }))
      return {
        id: name,
        // NBD does not tell a bitmap's granularity; the export's block size is the finest it can answer in.
        granularity: client.minimumBlock,
        map,
        dirtyBytes: async () => await mappedBytes(map, client.size, r => r.dirty),
      }
    }),
  }
}
