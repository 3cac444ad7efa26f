/** qcow2 images: read by random access or as they stream in, written with or without an external data file. */
export { QCOW2_MAGIC, isQcow2, parseHeader, encodeHeader, type Qcow2Header, type Qcow2Geometry, type HeaderSpec } from './format.js'
export { Qcow2Image, type Qcow2OpenOptions } from './image.js'
export { streamQcow2 } from './stream.js'
export { Qcow2FileWriter, writeQcow2Stream, type Qcow2WriterOptions } from './writer.js'

export { qcow2 } from './descriptor.js'
