/**
 * The NBD protocol (../shared/specs/nbd-proto.md, fixed newstyle, with
 * structured replies and QEMU's metadata contexts from nbd.rst): constants,
 * and pure encoders and decoders over Buffers. Decoders check every length
 * against the bytes given and throw E_NBD_PROTOCOL; what a violation costs
 * (an error reply, a closed connection) is the caller's decision.
 */
import { VmapipeError } from '../errors.js'

export const NBD_MAGIC = 0x4e42444d41474943n // 'NBDMAGIC'
export const IHAVEOPT = 0x49484156454f5054n // 'IHAVEOPT'
/** The second magic of an oldstyle server, which we do not speak. */
export const OLDSTYLE_MAGIC = 0x00420281861253n
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n
export const REQUEST_MAGIC = 0x25609513
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef

export const HANDSHAKE_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const
export const CLIENT_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const

export const TRANSMISSION_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const

export const OPTION = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const

const ERR = 0x80000000
export const REPLY = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const

export const COMMAND = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const

export const COMMAND_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const

export const REPLY_FLAG_DONE = 1

export const CHUNK = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const

/** Error values on the wire; errno numbers of Linux, as the spec chose them. */
export const ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const

/** base:allocation */
export const STATE_HOLE = 1
export const STATE_ZERO = 2
/** qemu:dirty-bitmap:<name> */
export const STATE_DIRTY = 1

export const CONTEXT_ALLOCATION = 'base:allocation'
export const CONTEXT_DEPTH = 'qemu:allocation-depth'
export const CONTEXT_BITMAP_PREFIX = 'qemu:dirty-bitmap:'

/** Strings (export names, queries, messages) the spec allows. */
export const MAX_STRING = 4096
/** The payload every server should take and the most we send or accept in one READ or WRITE. */
export const MAX_PAYLOAD = 32 * 1024 * 1024

export const GREETING_SIZE = 18
export const OPTION_HEADER_SIZE = 16
export const OPTION_REPLY_HEADER_SIZE = 20
export const REQUEST_SIZE = 28
export const SIMPLE_REPLY_SIZE = 16
export const CHUNK_HEADER_SIZE = 20
/** Size and transmission flags after NBD_OPT_EXPORT_NAME, then 124 zero bytes unless NO_ZEROES. */
export const EXPORT_NAME_REPLY_SIZE = 10
export const EXPORT_NAME_PADDING = 124

const NAMES: Record<string, Record<string, number>> = { OPTION, REPLY, COMMAND, CHUNK, ERRNO }

/** NBD_OPT_GO, NBD_REP_ERR_UNSUP, ...: a value's name for messages and logs. */
export function nameOf (table: 'OPTION' | 'REPLY' | 'COMMAND' | 'CHUNK' | 'ERRNO', value: number): string {
  const name = Object.entries(NAMES[table]).find(([, v]) => v === value)?.[0]
  const prefix = { OPTION: 'NBD_OPT_', REPLY: 'NBD_REP_', COMMAND: 'NBD_CMD_', CHUNK: 'NBD_REPLY_TYPE_', ERRNO: 'NBD_' }[table]
  return name === undefined ? `${prefix}${value}` : `${prefix}${name}`
}

function violation (message: string): VmapipeError {
  return new VmapipeError('E_NBD_PROTOCOL', message)
}

const utf8 = new TextDecoder('utf-8', { fatal: true })

/** A string from the wire: valid UTF-8, no NUL, at most MAX_STRING bytes. */
function decodeString (bytes: Buffer, what: string): string {
  if (bytes.length > MAX_STRING) throw violation(`${what} is ${bytes.length} bytes; strings are at most ${MAX_STRING}`)
  let text: string
  try {
    text = utf8.decode(bytes)
  } catch {
    throw violation(`${what} is not valid UTF-8`)
  }
  if (text.includes('\0')) throw violation(`${what} contains a NUL character`)
  return text
}

/** A string for the wire; the caller's own strings must already fit. */
function encodeString (text: string, what: string): Buffer {
  const bytes = Buffer.from(text, 'utf8')
  if (bytes.length > MAX_STRING || text.includes('\0')) throw new VmapipeError('E_LIMIT', `${what} must be at most ${MAX_STRING} bytes of UTF-8 without NUL`)
  return bytes
}

/** Reads payload fields in order, refusing to run past the end. */
class FieldReader {
  private at = 0
  constructor (private readonly buf: Buffer, private readonly what: string) {}

  private need (n: number): number {
    if (this.at + n > this.buf.length) throw violation(`${this.what} is too short (${this.buf.length} bytes)`)
    const at = this.at
    this.at += n
    return at
  }

  u16 (): number { return this.buf.readUInt16BE(this.need(2)) }
  u32 (): number { return this.buf.readUInt32BE(this.need(4)) }
  u64 (): number {
    const value = this.buf.readBigUInt64BE(this.need(8))
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw violation(`${this.what} carries ${value}, beyond what we address`)
    return Number(value)
  }

  bytes (n: number): Buffer { const at = this.need(n); return this.buf.subarray(at, at + n) }
  string (n: number, what: string): string { return decodeString(this.bytes(n), what) }
  rest (): Buffer { return this.bytes(this.remaining()) }
  remaining (): number { return this.buf.length - this.at }

  end (): void {
    if (this.at !== this.buf.length) throw violation(`${this.what} has ${this.buf.length - this.at} bytes too many`)
  }
}

// ---------------------------------------------------------------- handshake

export function encodeGreeting (flags: number): Buffer {
  const b = Buffer.alloc(GREETING_SIZE)
  b.writeBigUInt64BE(NBD_MAGIC, 0)
  b.writeBigUInt64BE(IHAVEOPT, 8)
  b.writeUInt16BE(flags, 16)
  return b
}

export function decodeGreeting (b: Buffer): { flags: number } {
  if (b.readBigUInt64BE(0) !== NBD_MAGIC) throw violation(`not an NBD server: magic 0x${b.subarray(0, 8).toString('hex')}`)
  const second = b.readBigUInt64BE(8)
  if (second === OLDSTYLE_MAGIC) {
    throw violation('the server speaks the oldstyle handshake, which has no export names or options; only fixed newstyle is supported')
  }
  if (second !== IHAVEOPT) throw violation(`unexpected second handshake magic 0x${b.subarray(8, 16).toString('hex')}`)
  return { flags: b.readUInt16BE(16) }
}

export function encodeClientFlags (flags: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(flags)
  return b
}

export function encodeOption (option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_SIZE + data.length)
  b.writeBigUInt64BE(IHAVEOPT, 0)
  b.writeUInt32BE(option, 8)
  b.writeUInt32BE(data.length, 12)
  data.copy(b, OPTION_HEADER_SIZE)
  return b
}

export function decodeOptionHeader (b: Buffer): { option: number, length: number } {
  if (b.readBigUInt64BE(0) !== IHAVEOPT) throw violation(`option magic is 0x${b.subarray(0, 8).toString('hex')}, not IHAVEOPT`)
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) }
}

export function encodeOptionReply (option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_SIZE + data.length)
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0)
  b.writeUInt32BE(option, 8)
  b.writeUInt32BE(type, 12)
  b.writeUInt32BE(data.length, 16)
  data.copy(b, OPTION_REPLY_HEADER_SIZE)
  return b
}

export function decodeOptionReplyHeader (b: Buffer): { option: number, type: number, length: number } {
  if (b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw violation(`option reply magic is 0x${b.subarray(0, 8).toString('hex')}`)
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) }
}

export function isErrorReply (type: number): boolean {
  return type >= ERR
}

/** An error reply's payload: a message for people. */
export function encodeErrorMessage (message: string): Buffer {
  return Buffer.from(message.slice(0, MAX_STRING / 4), 'utf8')
}

/** NBD_OPT_INFO and NBD_OPT_GO: an export name and the NBD_INFO items asked for. */
export interface ExportRequest { name: string, infos: number[] }

export function encodeExportRequest (request: ExportRequest): Buffer {
  const name = encodeString(request.name, 'an export name')
  const b = Buffer.alloc(4 + name.length + 2 + 2 * request.infos.length)
  b.writeUInt32BE(name.length, 0)
  name.copy(b, 4)
  b.writeUInt16BE(request.infos.length, 4 + name.length)
  request.infos.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i))
  return b
}

export function decodeExportRequest (data: Buffer): ExportRequest {
  const r = new FieldReader(data, 'the export request')
  const name = r.string(r.u32(), 'the export name')
  const count = r.u16()
  const infos: number[] = []
  for (let i = 0; i < count; i++) infos.push(r.u16())
  r.end()
  return { name, infos }
}

/** NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export name and queries. */
export interface MetaRequest { name: string, queries: string[] }

export function encodeMetaRequest (request: MetaRequest): Buffer {
  const parts = [request.name, ...request.queries].map(s => encodeString(s, 'a metadata context query'))
  const b = Buffer.alloc(parts.reduce((n, p) => n + 4 + p.length, 4))
  let at = 0
  const put = (p: Buffer): void => { at = b.writeUInt32BE(p.length, at); at += p.copy(b, at) }
  put(parts[0])
  at = b.writeUInt32BE(request.queries.length, at)
  for (const p of parts.slice(1)) put(p)
  return b
}

export function decodeMetaRequest (data: Buffer): MetaRequest {
  const r = new FieldReader(data, 'the metadata context request')
  const name = r.string(r.u32(), 'the export name')
  const count = r.u32()
  // Each query takes at least its 4-byte length: a count beyond that is a lie, not an allocation.
  if (count > r.remaining() / 4) throw violation(`the metadata context request claims ${count} queries in ${data.length} bytes`)
  const queries: string[] = []
  for (let i = 0; i < count; i++) queries.push(r.string(r.u32(), 'a metadata context query'))
  r.end()
  return { name, queries }
}

/** NBD_REP_SERVER: one export of an NBD_OPT_LIST. */
export function encodeServerReply (name: string, description = ''): Buffer {
  const n = encodeString(name, 'an export name')
  const d = encodeString(description, 'an export description')
  const b = Buffer.alloc(4 + n.length + d.length)
  b.writeUInt32BE(n.length, 0)
  n.copy(b, 4)
  d.copy(b, 4 + n.length)
  return b
}

export function decodeServerReply (data: Buffer): { name: string, description: string } {
  const r = new FieldReader(data, 'NBD_REP_SERVER')
  const name = r.string(r.u32(), 'the export name')
  return { name, description: decodeString(r.rest(), 'the export description') }
}

/** NBD_REP_META_CONTEXT */
export function encodeMetaContextReply (id: number, name: string): Buffer {
  const n = encodeString(name, 'a metadata context name')
  const b = Buffer.alloc(4 + n.length)
  b.writeUInt32BE(id, 0)
  n.copy(b, 4)
  return b
}

export function decodeMetaContextReply (data: Buffer): { id: number, name: string } {
  const r = new FieldReader(data, 'NBD_REP_META_CONTEXT')
  const id = r.u32()
  return { id, name: decodeString(r.rest(), 'the metadata context name') }
}

export function encodeInfoExport (size: number, flags: number): Buffer {
  const b = Buffer.alloc(12)
  b.writeUInt16BE(INFO.EXPORT, 0)
  b.writeBigUInt64BE(BigInt(size), 2)
  b.writeUInt16BE(flags, 10)
  return b
}

export function encodeInfoBlockSize (minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14)
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0)
  b.writeUInt32BE(minimum, 2)
  b.writeUInt32BE(preferred, 6)
  b.writeUInt32BE(maximum, 10)
  return b
}

export function encodeInfoString (type: typeof INFO.NAME | typeof INFO.DESCRIPTION, text: string): Buffer {
  const t = encodeString(text, 'an export name or description')
  const b = Buffer.alloc(2 + t.length)
  b.writeUInt16BE(type, 0)
  t.copy(b, 2)
  return b
}

export type InfoReply =
  | { type: typeof INFO.EXPORT, size: number, flags: number }
  | { type: typeof INFO.BLOCK_SIZE, minimum: number, preferred: number, maximum: number }
  | { type: number }

/** An NBD_REP_INFO payload; types we do not know come back with their number only. */
export function decodeInfo (data: Buffer): InfoReply {
  const r = new FieldReader(data, 'NBD_REP_INFO')
  const type = r.u16()
  if (type === INFO.EXPORT) {
    const info = { type, size: r.u64(), flags: r.u16() }
    r.end()
    return info
  }
  if (type === INFO.BLOCK_SIZE) {
    const info = { type, minimum: r.u32(), preferred: r.u32(), maximum: r.u32() }
    r.end()
    return info
  }
  return { type }
}

/** What follows NBD_OPT_EXPORT_NAME: size, flags, and the padding unless NO_ZEROES was agreed. */
export function encodeExportNameReply (size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_PADDING))
  b.writeBigUInt64BE(BigInt(size), 0)
  b.writeUInt16BE(flags, 8)
  return b
}

export function decodeExportNameReply (b: Buffer): { size: number, flags: number } {
  return { size: new FieldReader(b.subarray(0, 8), 'the export size').u64(), flags: b.readUInt16BE(8) }
}

// ------------------------------------------------------------- transmission

export interface Request {
  flags: number
  type: number
  cookie: bigint
  offset: number
  length: number
}

export function encodeRequest (r: Request): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_SIZE)
  b.writeUInt32BE(REQUEST_MAGIC, 0)
  b.writeUInt16BE(r.flags, 4)
  b.writeUInt16BE(r.type, 6)
  b.writeBigUInt64BE(r.cookie, 8)
  b.writeBigUInt64BE(BigInt(r.offset), 16)
  b.writeUInt32BE(r.length, 24)
  return b
}

/** A request header; an offset beyond 2^53 is kept as Infinity, so that any bounds check refuses it. */
export function decodeRequest (b: Buffer): Request {
  const magic = b.readUInt32BE(0)
  if (magic !== REQUEST_MAGIC) throw violation(`request magic is 0x${magic.toString(16)}, not 0x${REQUEST_MAGIC.toString(16)}`)
  const offset = b.readBigUInt64BE(16)
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(offset),
    length: b.readUInt32BE(24),
  }
}

export function encodeSimpleReply (error: number, cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE)
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
  b.writeUInt32BE(error, 4)
  b.writeBigUInt64BE(cookie, 8)
  return b
}

/** A structured chunk's header, `extra` bytes of its payload written after it by the caller. */
function chunkHeader (flags: number, type: number, cookie: bigint, length: number, extra: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + extra)
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0)
  b.writeUInt16BE(flags, 4)
  b.writeUInt16BE(type, 6)
  b.writeBigUInt64BE(cookie, 8)
  b.writeUInt32BE(length, 16)
  return b
}

export function encodeNoneChunk (cookie: bigint): Buffer {
  return chunkHeader(REPLY_FLAG_DONE, CHUNK.NONE, cookie, 0, 0)
}

/** NBD_REPLY_TYPE_OFFSET_DATA up to the data, which the caller sends next (dataLength bytes). */
export function encodeOffsetDataHeader (flags: number, cookie: bigint, offset: number, dataLength: number): Buffer {
  const b = chunkHeader(flags, CHUNK.OFFSET_DATA, cookie, 8 + dataLength, 8)
  b.writeBigUInt64BE(BigInt(offset), CHUNK_HEADER_SIZE)
  return b
}

export function encodeOffsetHole (flags: number, cookie: bigint, offset: number, length: number): Buffer {
  const b = chunkHeader(flags, CHUNK.OFFSET_HOLE, cookie, 12, 12)
  b.writeBigUInt64BE(BigInt(offset), CHUNK_HEADER_SIZE)
  b.writeUInt32BE(length, CHUNK_HEADER_SIZE + 8)
  return b
}

/** One block status descriptor: a length and the context's flags for it. */
export interface Descriptor { length: number, flags: number }

export function encodeBlockStatus (flags: number, cookie: bigint, contextId: number, descriptors: Descriptor[]): Buffer {
  const b = chunkHeader(flags, CHUNK.BLOCK_STATUS, cookie, 4 + 8 * descriptors.length, 4 + 8 * descriptors.length)
  b.writeUInt32BE(contextId, CHUNK_HEADER_SIZE)
  descriptors.forEach((d, i) => {
    b.writeUInt32BE(d.length, CHUNK_HEADER_SIZE + 4 + 8 * i)
    b.writeUInt32BE(d.flags, CHUNK_HEADER_SIZE + 8 + 8 * i)
  })
  return b
}

export function decodeBlockStatus (payload: Buffer): { contextId: number, descriptors: Descriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw violation(`a block status chunk of ${payload.length} bytes is not 4 + 8n`)
  const descriptors: Descriptor[] = []
  for (let at = 4; at < payload.length; at += 8) {
    const length = payload.readUInt32BE(at)
    if (length === 0) throw violation('a block status descriptor has length 0')
    descriptors.push({ length, flags: payload.readUInt32BE(at + 4) })
  }
  return { contextId: payload.readUInt32BE(0), descriptors }
}

export function encodeErrorChunk (flags: number, cookie: bigint, error: number, message: string): Buffer {
  const text = encodeErrorMessage(message)
  const b = chunkHeader(flags, CHUNK.ERROR, cookie, 6 + text.length, 6 + text.length)
  b.writeUInt32BE(error, CHUNK_HEADER_SIZE)
  b.writeUInt16BE(text.length, CHUNK_HEADER_SIZE + 4)
  text.copy(b, CHUNK_HEADER_SIZE + 6)
  return b
}

/** Any error chunk (bit 15 of the type): the error, its message, and the offset where the type says so. */
export function decodeErrorChunk (type: number, payload: Buffer): { error: number, message: string, offset?: number } {
  const r = new FieldReader(payload, nameOf('CHUNK', type))
  const error = r.u32()
  const message = r.bytes(r.u16()).toString('utf8')
  if (type === CHUNK.ERROR_OFFSET) return { error, message, offset: r.u64() }
  return { error, message }
}

export function isErrorChunk (type: number): boolean {
  return (type & 0x8000) !== 0
}

export interface ChunkHeader { flags: number, type: number, cookie: bigint, length: number }

export function decodeChunkHeader (b: Buffer): ChunkHeader {
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), length: b.readUInt32BE(16) }
}

export function decodeSimpleReply (b: Buffer): { error: number, cookie: bigint } {
  return { error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8) }
}
