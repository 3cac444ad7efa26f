/**
 * NBD, the transport: the wire protocol, a client that reads (and writes)
 * exports, and a server that serves RandomAccessDisks. What is served and
 * where records go are chosen above, in jobs/.
 */
export { NbdServer, type NbdExport, type NbdServerOptions, type ServerLog, type ListenAddress } from './server.js'
export {
  NbdClient, NbdReplyError, openNbdDisk, parseNbdUri, isNbdUri, describeAddress,
  type NbdAddress, type NbdClientOptions, type NbdClientStats, type NbdDisk, type OpenNbdDiskOptions,
} from './client.js'
export { NbdDiskWriter, type NbdWriteStats } from './writer.js'
/** The wire format: constants, encoders and decoders. */
export * as protocol from './protocol.js'
