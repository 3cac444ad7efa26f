/**
 * The flags of every command that takes an `s3://BUCKET/KEY` for an ARCHIVE
 * or OUT, their help, and the library options they become. The AWS SDK is
 * not loaded here: only a command given an s3:// URL loads it.
 */
import { VmapipeError } from '../errors.js'
import type { S3Access } from '../jobs/s3.js'
import type { S3Checksum } from '../s3/client.js'
import type { CliContext } from './context.js'

export const S3_OPTIONS = {
  's3-endpoint': { type: 'string' },
  's3-path-style': { type: 'boolean' },
  's3-virtual-host': { type: 'boolean' },
  's3-checksum': { type: 'string' },
} as const

export const S3_HELP = `S3 (an s3://BUCKET/KEY wherever an archive is read or written; credentials
and region from the AWS environment, ~/.aws/credentials, ~/.aws/config and
AWS_PROFILE):
  --s3-endpoint URL   the store, for MinIO, Ceph RGW, Wasabi, B2, R2...
                      (default $VMAPIPE_S3_ENDPOINT, else AWS)
  --s3-path-style     the bucket in the path, not the host name (the default
                      with an endpoint); --s3-virtual-host for the host name
  --s3-checksum KIND  what uploads send: crc32 (default), md5 (Content-MD5)
                      or none, for stores that reject one kind`

const CHECKSUMS: readonly S3Checksum[] = ['crc32', 'md5', 'none']

/**
 * The S3 options of a command line, with the command's log; `signal` where
 * the command cleans up after a signal (an upload is aborted).
 */
export function s3Access (values: Record<string, unknown>, ctx: CliContext, signal?: AbortSignal): S3Access {
  const checksum = values['s3-checksum'] as string | undefined
  if (checksum !== undefined && !(CHECKSUMS as readonly string[]).includes(checksum)) {
    throw new VmapipeError('E_USAGE', `--s3-checksum ${checksum}: choose one of ${CHECKSUMS.join(', ')}`)
  }
  if (values['s3-path-style'] === true && values['s3-virtual-host'] === true) {
    throw new VmapipeError('E_USAGE', '--s3-path-style and --s3-virtual-host do not go together')
  }
  const endpoint = values['s3-endpoint'] as string | undefined
  if (endpoint !== undefined && !/^https?:\/\/[^/]/.test(endpoint)) {
    throw new VmapipeError('E_USAGE', `--s3-endpoint ${endpoint}: expected an http:// or https:// URL`)
  }
  const forcePathStyle = values['s3-path-style'] === true ? true : values['s3-virtual-host'] === true ? false : undefined
  return {
    s3: {
      ...(endpoint !== undefined ? { endpoint } : {}),
      ...(forcePathStyle !== undefined ? { forcePathStyle } : {}),
      ...(checksum !== undefined ? { checksum: checksum as S3Checksum } : {}),
    },
    // Through ctx on first use: a command that logs nothing (vma list) loads no logger.
    log: {
      debug: (fields, message) => ctx.log.debug(fields, message),
      info: (fields, message) => ctx.log.info(fields, message),
      warn: (fields, message) => ctx.log.warn(fields, message),
    },
    ...(signal !== undefined ? { signal } : {}),
  }
}
