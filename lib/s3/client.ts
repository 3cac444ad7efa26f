/**
 * The S3 client: the AWS SDK's, configured for the stores vmapipe meets
 * (AWS, and MinIO, Ceph RGW, Wasabi, B2, R2 behind an endpoint URL).
 * Credentials and region come from the SDK's standard chain (environment,
 * shared config and credentials files, AWS_PROFILE).
 */
import { S3Client } from '@aws-sdk/client-s3'

/** How uploads prove their bytes: the SDK's flexible CRC32, a Content-MD5 header, or nothing (for stores that reject one kind). */
export type S3Checksum = 'crc32' | 'md5' | 'none'

export interface S3Options {
  /** The store's URL (http://127.0.0.1:9000); default the environment's VMAPIPE_S3_ENDPOINT, else AWS. */
  endpoint?: string
  /** Default the SDK's chain (AWS_REGION, the profile's region); 'us-east-1' where an endpoint is given and none is configured. */
  region?: string
  /** Bucket in the path, not the host name; default on where an endpoint is given (MinIO, Ceph). */
  forcePathStyle?: boolean
  /** Default 'crc32'. */
  checksum?: S3Checksum
  /** Attempts per request the SDK makes before giving up (default 5). */
  maxAttempts?: number
}

const CHECKSUMS = new WeakMap<S3Client, S3Checksum>()

/** The checksum kind a client was made with (`s3Client`'s option), 'crc32' for a client made elsewhere. */
export function checksumOf (client: S3Client): S3Checksum {
  return CHECKSUMS.get(client) ?? 'crc32'
}

/** Where an endpoint is given and the chain finds no region: most stores other than AWS accept any name. */
const FALLBACK_REGION = 'us-east-1'

/** The SDK's own region chain (environment, profile), or FALLBACK_REGION where it finds none. */
function regionOrFallback (): () => Promise<string> {
  const probe = new S3Client({})
  const chain = probe.config.region
  probe.destroy()
  return async () => await chain().catch(() => FALLBACK_REGION)
}

/** A client for `options`; the caller destroys it when done. */
export function s3Client (options: S3Options = {}): S3Client {
  // The SDK warns on Node 20 that later releases need Node 22; cron logs need no such line each run.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'
  const endpoint = options.endpoint ?? (process.env.VMAPIPE_S3_ENDPOINT !== '' ? process.env.VMAPIPE_S3_ENDPOINT : undefined)
  const checksum = options.checksum ?? 'crc32'
  const client = new S3Client({
    endpoint,
    region: options.region ?? (endpoint !== undefined ? regionOrFallback() : undefined),
    forcePathStyle: options.forcePathStyle ?? endpoint !== undefined,
    maxAttempts: options.maxAttempts ?? 5,
    // CRC32 is asked for per request where uploads want it; other requests carry none, and answers are not checked
    // against a checksum the store may not send.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  })
  CHECKSUMS.set(client, checksum)
  return client
}
