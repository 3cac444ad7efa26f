/**
 * The contracts every part of vmapipe is written against: the records that
 * flow through pipelines, what writes them (a DiskWriter), what reads a disk
 * by random access (RandomAccessDisk) or as it streams in (StreamedImage),
 * and the descriptor each format folder exports for the registry
 * (jobs/registry.ts). Types only: it imports nothing but a type of node:stream.
 */
import type { Readable } from 'node:stream'

export interface DeviceInfo {
  /** dev_id in the archive, 1..255. */
  id: number
  name: string
  /** Bytes; need not be a multiple of the cluster size. */
  size: number
}

export interface ConfigBlob {
  name: string
  data: Buffer
}

/** Always the first item of a record stream. */
export interface ArchiveInfo {
  kind: 'archive'
  uuid: string
  /** Seconds since the epoch. */
  ctime: number
  configs: ConfigBlob[]
  devices: DeviceInfo[]
}

export interface ClusterRecord {
  kind: 'cluster'
  /** dev_id of the device this cluster belongs to. */
  device: number
  /** Index of the 64 KiB cluster inside the device. */
  cluster: number
  /** Bit i set = 4 KiB block i holds data; clear = all zeros. */
  mask: number
  /** Exactly the blocks whose bit is set, in order: popcount(mask) * 4096 bytes. */
  data: Buffer
}

export type StreamItem = ArchiveInfo | ClusterRecord

/** What every format's writer offers to a router. */
export interface DiskWriter {
  /** Takes one record; returns a promise when the caller should wait before the next. */
  write: (rec: ClusterRecord) => Promise<void> | undefined
  /** All records given: complete the output (tables, size, fsync) and close it. */
  finish: () => Promise<void>
  /** Give up: close what is open. Removing files is the caller's business. */
  abort: () => Promise<void>
}

/**
 * Creates the writers once the archive's header is known, handing each to
 * `add` as soon as it exists, so that an abort midway still closes it.
 */
export type WriterFactory = (info: ArchiveInfo, add: (device: number, writer: DiskWriter) => void) => Promise<void>

/** A range of the guest disk, and whether anything is stored there. */
export interface Extent {
  offset: number
  length: number
  /** false: nothing stored, reads as zeros (a hole, a zero cluster). */
  data: boolean
  /**
   * Images made of layers: the layer that holds the range, 1 = the top one,
   * 2 its backing file..., 0 none (qemu:allocation-depth). Without it: 1
   * where there is data, 0 elsewhere.
   */
  depth?: number
}

/** A dirty bitmap an image carries (Parallels, an NBD export's qemu:dirty-bitmap): which ranges of the disk changed. */
export interface DirtyBitmap {
  /** Its name: a Parallels bitmap's UUID, what follows qemu:dirty-bitmap: for NBD. */
  id: string
  /** Bytes one bit stands for. */
  granularity: number
  /** Ranges covering [offset, offset + length), in order, dirty or clean. */
  map: (offset: number, length: number) => Promise<Array<{ offset: number, length: number, dirty: boolean }>>
  /** Bytes of the disk marked dirty. */
  dirtyBytes: () => Promise<number>
}

/** What `vma info` shows of an image. */
export interface DiskDescription {
  format: string
  size: number
  /** Guest bytes the image stores data for; undefined when the format cannot tell (raw). */
  allocated?: number
  clusterSize?: number
  allocatedClusters?: number
  /** Images made of layers: how many. */
  layers?: number
  bitmaps?: Array<{ id: string, granularity: number, dirtyBytes: number }>
  /** Anything else of note, by name (header magic, ignored features...). */
  details?: Record<string, string | number>
}

export interface RandomAccessDisk {
  /** Guest size in bytes. */
  readonly size: number
  /** Extents covering [offset, offset + length), in order, adjacent ones of a kind merged or not. */
  map: (offset: number, length: number) => Promise<Extent[]>
  /** Fills `buf` with the guest bytes at `offset` (zeros where nothing is stored). */
  read: (buf: Buffer, offset: number) => Promise<void>
  close: () => Promise<void>
  /** Dirty bitmaps stored in the image. */
  readonly bitmaps?: DirtyBitmap[]
  /** What the image is; without it `vma info` sums up map(). */
  describe?: (signal?: AbortSignal) => Promise<DiskDescription>
}

/** An image read once as it streams in (stdin), without a temporary copy. */
export interface StreamedImage {
  size: number
  /** The disk as records for device id `device`; call once. */
  records: (device: number, progress?: ProgressSink) => Promise<Readable>
}

export interface ProgressSink {
  add: (bytes: number) => void
}

/** Positional writes shared by the writers of one job, so that the bytes in flight stay bounded (io/write-queue.ts). */
export interface FileWrites {
  /** Writes `bytes` at `position` of `fd`; returns a promise when the caller should wait before the next. */
  write: (fd: number, bytes: Buffer, position: number, what: string) => Promise<void> | undefined
  /** Settles when every write given so far has ended; rejects with the first that failed. */
  drain: () => Promise<void>
}

/** How an image is opened by random access. */
export interface OpenOptions {
  /** Read a backing chain instead of refusing an image that has one. */
  followBacking?: boolean
  /** Use this backing file, wherever it lies. */
  backing?: string
  /** The image is a temporary copy of a stream: names of other files in it mean nothing. */
  standalone?: boolean
}

/** How an image is read as it streams in. */
export interface StreamOptions {
  /** Directory for temporary files the reader may need (tables that come after the data). */
  tmpDir?: string
  /** What the stream is, for messages ("stdin"). */
  where?: string
  /** Bytes of the disk, for formats whose stream does not say (raw). */
  size?: number
}

/** What a disk is written as, beyond its format. */
export interface OutputOptions {
  /** qcow2: keep the data in a raw file beside the image (external data file). */
  dataFile?: boolean
  /** Cluster size in bytes, for formats that have clusters (Parallels: 1 MiB by default). */
  clusterSize?: number
}

/** One device written in a format: the entries it takes in a directory, and its writer. */
export interface DiskOutput {
  /** Entries (files or directories) the disk occupies in the target directory. */
  names: string[]
  /** Creates the writer in `dir`, where the entries are staged until all are complete. */
  create: (dir: string, writes: FileWrites) => Promise<DiskWriter>
}

/**
 * What a format folder exports from its index.ts: its name, how to know it,
 * and the faces it has. The registry (jobs/registry.ts) is the list of these.
 */
export interface FormatDescriptor<Name extends string = string> {
  /** The name users give to choose the format, and `vma info` shows. */
  name: Name
  /** An archive holds several disks (VMA); an image is one disk. */
  kind: 'image' | 'archive'
  /** Whether a file's first 512 bytes are this format's. */
  detect: (head: Buffer) => boolean
  /** The image opens a directory (a bundle), not a file. */
  directory?: boolean
  /** Opens the image by random access. */
  open?: (path: string, options: OpenOptions) => Promise<RandomAccessDisk>
  /** Reads the image front to back as it streams in; undefined (nothing read) when this one cannot be. */
  stream?: (input: Readable, options: StreamOptions) => Promise<StreamedImage | undefined>
  /** What a device becomes in this format. */
  writer?: (device: DeviceInfo, options: OutputOptions) => DiskOutput
  /** The output options the writer takes; giving another is an error. */
  outputOptions?: ReadonlyArray<keyof OutputOptions>
}
