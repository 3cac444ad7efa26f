/**
 * Typed errors with stable codes. Every error the library raises on purpose is
 * a VmapipeError; its `code` is part of the API and never changes meaning.
 */

/**
 * Who is at fault, in library terms: the input's bytes (invalid, damaged,
 * incomplete), the call (an option, a limit, a name that is not there), the
 * system (I/O, a missing tool, a target that exists, an NBD server), another
 * run holding a lock, or a stop asked for (a signal, an abort).
 */
export type ErrorFault = 'input' | 'call' | 'system' | 'locked' | 'stopped'

const SYSTEM_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'E_IO', 'E_TOOL_MISSING', 'E_TARGET_EXISTS', 'E_NBD_CONNECT', 'E_NBD_SERVER_ERROR',
  'E_S3_ACCESS', 'E_S3_REQUEST', 'E_S3_NETWORK', 'E_S3_UNSUPPORTED',
])
const CALL_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'E_USAGE', 'E_NOT_FOUND', 'E_LIMIT', 'E_JOB', 'E_OPTION', 'E_INPUT_SIZE_UNKNOWN', 'E_NOT_SEEKABLE', 'E_BACKING', 'E_TERMINAL',
  'E_S3_URL', 'E_S3_NOT_FOUND',
])

export type ErrorCode =
  // VMA format
  | 'E_VMA_MAGIC' | 'E_VMA_VERSION' | 'E_VMA_HEADER' | 'E_VMA_HEADER_SIZE' | 'E_VMA_HEADER_MD5'
  | 'E_VMA_BLOB' | 'E_VMA_NAME' | 'E_VMA_NO_DEVICES' | 'E_VMA_EXTENT_MAGIC' | 'E_VMA_EXTENT_MD5'
  | 'E_VMA_EXTENT_UUID' | 'E_VMA_BLOCK_COUNT' | 'E_VMA_DEVICE' | 'E_VMA_DUPLICATE'
  | 'E_VMA_CLUSTER_RANGE' | 'E_VMA_VMSTATE_ORDER' | 'E_VMA_TRUNCATED' | 'E_VMA_MISSING'
  // Parallels images and .hdd bundles
  | 'E_PARALLELS_HEADER' | 'E_PARALLELS_BAT' | 'E_PARALLELS_EXTENSION' | 'E_PARALLELS_XML'
  // streams of records handed to writers, and inputs that break their promises
  | 'E_RECORD' | 'E_INPUT_SIZE'
  // an input in a format read by other tools (another image format, a compressed file, an archive) where a disk was wanted
  | 'E_INPUT_FORMAT'
  // what a format cannot hold
  | 'E_LIMIT'
  // qcow2 images
  | 'E_QCOW2_HEADER' | 'E_QCOW2_L1' | 'E_QCOW2_L2' | 'E_QCOW2_DATA' | 'E_QCOW2_BACKING'
  // compression
  | 'E_COMPRESSED_DATA' | 'E_TOOL_MISSING'
  // what a call asks for: an option's value or a combination of options that cannot be (the error's `option` names it)
  | 'E_OPTION'
  // a raw input from a stream whose size cannot be seen, with no `size` given
  | 'E_INPUT_SIZE_UNKNOWN'
  // a stream (a pipe, stdin, a compressed archive) where random access or the files beside an image are needed
  | 'E_NOT_SEEKABLE'
  // an image with a backing file, read without `followBacking`
  | 'E_BACKING'
  // binary data to be read from a terminal
  | 'E_TERMINAL'
  // the command line (raised in cli/ only) and the file system
  | 'E_USAGE' | 'E_NOT_FOUND' | 'E_TARGET_EXISTS' | 'E_NAME_CLASH' | 'E_IO' | 'E_INTERRUPTED'
  // backup jobs
  | 'E_JOB' | 'E_LOCKED'
  // NBD: a server we talk to breaks the protocol, cannot be reached, or answers with an error
  | 'E_NBD_PROTOCOL' | 'E_NBD_CONNECT' | 'E_NBD_SERVER_ERROR'
  // S3 object stores: a malformed s3:// URL; no such bucket or key; credentials refused or access denied; the store answered
  // with an error; the store unreachable, or the connection dropped, after the retries; a feature the store refuses
  // (a conditional create); a conditional request that lost (the object exists, or changed while it was read)
  | 'E_S3_URL' | 'E_S3_NOT_FOUND' | 'E_S3_ACCESS' | 'E_S3_REQUEST' | 'E_S3_NETWORK' | 'E_S3_UNSUPPORTED' | 'E_S3_PRECONDITION'

export interface ErrorPlace {
  /** Byte offset in the (decompressed) input where the problem was found. */
  offset?: number
  /** Device name, when the problem belongs to one device. */
  device?: string
  /** Cluster number inside that device. */
  cluster?: number
}

export interface ErrorDetails extends ErrorPlace {
  cause?: unknown
  /** The option of the call that the problem is about, by its name in the library's options (`size`, `followBacking`, `force`, `format`). */
  option?: string
}

export class VmapipeError extends Error implements ErrorPlace {
  readonly code: ErrorCode
  readonly offset?: number
  readonly device?: string
  readonly cluster?: number
  readonly option?: string

  constructor (code: ErrorCode, message: string, details: ErrorDetails = {}) {
    super(message + describePlace(details), details.cause === undefined ? undefined : { cause: details.cause })
    this.name = 'VmapipeError'
    this.code = code
    if (details.offset !== undefined) this.offset = details.offset
    if (details.device !== undefined) this.device = details.device
    if (details.cluster !== undefined) this.cluster = details.cluster
    if (details.option !== undefined) this.option = details.option
  }

  get fault (): ErrorFault {
    if (CALL_CODES.has(this.code)) return 'call'
    if (SYSTEM_CODES.has(this.code)) return 'system'
    if (this.code === 'E_INTERRUPTED') return 'stopped'
    if (this.code === 'E_LOCKED' || this.code === 'E_S3_PRECONDITION') return 'locked'
    return 'input'
  }
}

/** ` (device D, cluster C, byte offset N)`: where a problem is, as messages end. */
export function describePlace (place: ErrorPlace): string {
  const parts: string[] = []
  if (place.device !== undefined) parts.push(`device ${place.device}`)
  if (place.cluster !== undefined) parts.push(`cluster ${place.cluster}`)
  if (place.offset !== undefined) parts.push(`byte offset ${place.offset}`)
  return parts.length > 0 ? ` (${parts.join(', ')})` : ''
}

/** Wraps a system error (ENOSPC, EACCES, ...) so that callers see one error type. */
export function ioError (err: unknown, what: string): VmapipeError {
  if (err instanceof VmapipeError) return err
  const e = err as NodeJS.ErrnoException
  const reason = e?.code === 'ENOSPC' ? 'no space left on device' : (e?.message ?? String(err))
  return new VmapipeError('E_IO', `${what}: ${reason}`, { cause: err })
}
