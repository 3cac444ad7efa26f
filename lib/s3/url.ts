/** `s3://BUCKET/KEY` URLs: where an archive or an output lies in an object store. */
import { VmapipeError } from '../errors.js'

export interface S3Location {
  bucket: string
  /** The object's key; '' for the whole bucket, or ending in '/' for a prefix. */
  key: string
}

/** Whether `s` names an object store location rather than a path. */
export function isS3Url (s: string): boolean {
  return /^s3:\/\//i.test(s)
}

/** Bucket names as S3 allows them (3 to 63 of a-z 0-9 . -, starting and ending with a letter or digit), plus the upper case some stores take. */
const BUCKET = /^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$/

/** Splits `s3://BUCKET/KEY`; E_S3_URL for anything else. The key is kept as written (keys are not URL-encoded paths). */
export function parseS3Url (s: string): S3Location {
  if (!isS3Url(s)) throw new VmapipeError('E_S3_URL', `${s}: not an s3://BUCKET/KEY URL`)
  const rest = s.slice('s3://'.length)
  const slash = rest.indexOf('/')
  const bucket = slash < 0 ? rest : rest.slice(0, slash)
  const key = slash < 0 ? '' : rest.slice(slash + 1)
  if (!BUCKET.test(bucket)) throw new VmapipeError('E_S3_URL', `${s}: "${bucket}" is not a bucket name`)
  if (key.length > 1024) throw new VmapipeError('E_S3_URL', `${s}: a key is at most 1024 bytes`)
  return { bucket, key }
}

/** `s3://BUCKET/KEY` again, for messages. */
export function formatS3Url (location: S3Location): string {
  return `s3://${location.bucket}/${location.key}`
}
