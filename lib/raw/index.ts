/**
 * Raw disks: the guest's bytes and nothing else. Raw has no magic, so it is
 * what detection falls back to when no other format claims a file.
 */
export { RawImage } from './image.js'
export { dataExtents } from './holes.js'
export { RawReader } from './stream.js'
export { RawFileWriter, RawStreamWriter } from './writer.js'
export type { ReorderOptions } from '../io/reorder.js'
export { raw, rawOutput } from './descriptor.js'
