/**
 * Typed errors with stable codes. Every error the library raises on purpose is
 * a VmapipeError; its `code` is part of the API and never changes meaning.
 */

/** Exit status of the command-line tools, documented in the README and --help. */
export const EXIT = {
  OK: 0,
  /** The input is not a valid, complete archive or image. */
  INVALID: 1,
  /** Wrong arguments. */
  USAGE: 2,
  /** The system failed us: unreadable input, target exists, disk full, missing tool. */
  IO: 3,
  /** vma backup: nothing was done (another run of the job holds its lock). */
  NOTHING_DONE: 4,
  /** vma backup: the archive was written, but some old ones could not be pruned. */
  PARTLY_PRUNED: 5,
  /** Stopped by SIGINT (128 + 2, as shells report ^C); also E_INTERRUPTED, where the signal is not known. */
  INTERRUPTED: 130,
  /** Stopped by SIGTERM (128 + 15). */
  TERMINATED: 143,
} as const

/** Codes that say the system failed rather than the input being wrong. */
const SYSTEM_CODES: ReadonlySet<string> = new Set(['E_IO', 'E_TOOL_MISSING', 'E_TARGET_EXISTS', 'E_NBD_CONNECT', 'E_NBD_SERVER_ERROR'])
const USAGE_CODES: ReadonlySet<string> = new Set(['E_USAGE', 'E_NOT_FOUND', 'E_LIMIT', 'E_JOB', 'E_FORMAT_UNKNOWN', 'E_OPTION'])

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
  // a format name no registered format has
  | 'E_FORMAT_UNKNOWN'
  // options a job was given that do not go together or do not apply
  | 'E_OPTION'
  // what a format cannot hold
  | 'E_LIMIT'
  // qcow2 images
  | 'E_QCOW2_HEADER' | 'E_QCOW2_L1' | 'E_QCOW2_L2' | 'E_QCOW2_DATA' | 'E_QCOW2_BACKING'
  // compression
  | 'E_COMPRESSED_DATA' | 'E_TOOL_MISSING'
  // the command line and the file system
  | 'E_USAGE' | 'E_NOT_FOUND' | 'E_TARGET_EXISTS' | 'E_NAME_CLASH' | 'E_IO' | 'E_INTERRUPTED'
  // backup jobs
  | 'E_JOB' | 'E_LOCKED'
  // NBD: a server we talk to breaks the protocol, cannot be reached, or answers with an error
  | 'E_NBD_PROTOCOL' | 'E_NBD_CONNECT' | 'E_NBD_SERVER_ERROR'

export interface ErrorPlace {
  /** Byte offset in the (decompressed) input where the problem was found. */
  offset?: number
  /** Device name, when the problem belongs to one device. */
  device?: string
  /** Cluster number inside that device. */
  cluster?: number
}

export class VmapipeError extends Error implements ErrorPlace {
  readonly code: ErrorCode
  readonly offset?: number
  readonly device?: string
  readonly cluster?: number

  constructor (code: ErrorCode, message: string, place: ErrorPlace & { cause?: unknown } = {}) {
    super(message + describePlace(place), place.cause === undefined ? undefined : { cause: place.cause })
    this.name = 'VmapipeError'
    this.code = code
    if (place.offset !== undefined) this.offset = place.offset
    if (place.device !== undefined) this.device = place.device
    if (place.cluster !== undefined) this.cluster = place.cluster
  }

  get exitCode (): number {
    if (USAGE_CODES.has(this.code)) return EXIT.USAGE
    if (SYSTEM_CODES.has(this.code)) return EXIT.IO
    if (this.code === 'E_INTERRUPTED') return EXIT.INTERRUPTED
    if (this.code === 'E_LOCKED') return EXIT.NOTHING_DONE
    return EXIT.INVALID
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
