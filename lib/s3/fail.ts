/** The AWS SDK's errors as VmapipeErrors: one code per kind of failure, the store's own code and status in the message. */
import { VmapipeError } from '../errors.js'

interface SdkError {
  name?: string
  code?: string
  message?: string
  $metadata?: { httpStatusCode?: number }
  $fault?: 'client' | 'server'
}

const NOT_FOUND = new Set(['NoSuchKey', 'NoSuchBucket', 'NotFound', 'NoSuchUpload'])
const ACCESS = new Set([
  'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'ExpiredToken', 'InvalidToken', 'CredentialsProviderError',
  'AccountProblem', 'AllAccessDisabled', 'InvalidClientTokenId', 'UnrecognizedClientException',
])
/** Errors of the connection rather than an answer from the store. */
const NETWORK_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ECONNABORTED'])
const NETWORK_NAMES = new Set(['TimeoutError', 'RequestTimeout', 'RequestTimeoutException'])

function statusOf (err: unknown): number | undefined {
  return (err as SdkError | undefined)?.$metadata?.httpStatusCode
}

/** Whether a failure lies in the connection (reset, refused, timed out, a body cut short): worth trying again. */
export function isNetworkError (err: unknown): boolean {
  if (err instanceof VmapipeError) return err.code === 'E_S3_NETWORK'
  const e = err as SdkError | undefined
  if (e === undefined || e === null) return false
  if (e.code !== undefined && NETWORK_CODES.has(e.code)) return true
  if (e.name !== undefined && NETWORK_NAMES.has(e.name)) return true
  if (e.code === 'ERR_STREAM_PREMATURE_CLOSE' || e.message === 'aborted' || e.message === 'socket hang up') return true
  const status = statusOf(err)
  return status !== undefined && status >= 500 && status !== 501
}

/** The status and the store's code, for messages. */
function describe (err: unknown): string {
  const e = err as SdkError
  const status = statusOf(err)
  const code = e?.name !== undefined && e.name !== 'Error' ? e.name : e?.code
  // A HEAD's answer has no body: the SDK's message for it says nothing.
  const message = e?.message === 'UnknownError' || e?.message === code ? undefined : e?.message
  return [status !== undefined ? `HTTP ${status}` : undefined, code, message].filter(m => m !== undefined && m !== '').join(': ')
}

/** A VmapipeError for a failed request about `what` (`s3://bucket/key`, or an action on it). */
export function s3Error (err: unknown, what: string): VmapipeError {
  if (err instanceof VmapipeError) return err
  const e = err as SdkError | undefined
  const status = statusOf(err)
  const name = e?.name ?? ''
  if (name === 'AbortError') return new VmapipeError('E_INTERRUPTED', `${what}: stopped`, { cause: err })
  if (NOT_FOUND.has(name) || status === 404) return new VmapipeError('E_S3_NOT_FOUND', `${what}: not found (${describe(err)})`, { cause: err })
  if (ACCESS.has(name) || status === 403 || status === 401) {
    return new VmapipeError('E_S3_ACCESS', `${what}: access refused (${describe(err)})`, { cause: err })
  }
  if (name === 'PreconditionFailed' || status === 412) {
    return new VmapipeError('E_S3_PRECONDITION', `${what}: precondition failed (${describe(err)})`, { cause: err })
  }
  if (name === 'NotImplemented' || status === 501) {
    return new VmapipeError('E_S3_UNSUPPORTED', `${what}: the store does not do this (${describe(err)})`, { cause: err })
  }
  if (isNetworkError(err) && (status === undefined || status >= 500)) {
    return new VmapipeError('E_S3_NETWORK', `${what}: no answer from the store (${describe(err)})`, { cause: err })
  }
  return new VmapipeError('E_S3_REQUEST', `${what}: the store refused (${describe(err)})`, { cause: err })
}

/** Milliseconds before attempt `n` (1, 2, ...) is made again: 200 ms doubling, at most 5 s, with jitter. */
export function backoff (attempt: number): number {
  const base = Math.min(5000, 200 * 2 ** (attempt - 1))
  return base / 2 + Math.random() * base / 2
}
