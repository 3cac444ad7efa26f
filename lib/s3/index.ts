/**
 * S3, the transport: archives in object stores (AWS S3 and the stores that
 * speak its protocol), streamed in and out with bounded memory. Which
 * archives and outputs live there is chosen above, in jobs/.
 */
export { isS3Url, parseS3Url, formatS3Url, type S3Location } from './url.js'
export { s3Client, checksumOf, type S3Options, type S3Checksum } from './client.js'
export {
  listObjects, headObject, getObjectBytes, putObjectBytes, putIfAbsent, deleteObject, abortStaleUploads, type S3Object,
} from './objects.js'
export { createS3Upload, S3Upload, type S3UploadOptions, type S3UploadStats } from './upload.js'
export { openS3Read, type S3ReadOptions, type S3ReadStats, type S3ReadStream } from './read.js'
export { s3Error, isNetworkError } from './fail.js'
export type { S3Log } from './log.js'
export { openS3Ranged, type S3RangedOptions, type S3RangedReader, type S3RangedStats } from './ranged.js'
