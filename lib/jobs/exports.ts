/**
 * What `vma serve` exports: every disk of an uncompressed VMA archive, named
 * by its device, through an index of the archive; of any other archive
 * (compressed, a pipe, stdin) through a live restore (jobs/live.ts); and
 * images (raw or any registered format, backing chains followed), named by
 * file name or as given.
 */
import { stat } from 'node:fs/promises'
import { basename } from 'node:path'
import { VmapipeError, ioError } from '../errors.js'
import { disksOf } from './archive.js'
import { DETECT_BYTES, detectCompression } from '../io/compression.js'
import { type Input, openInput, readHead } from '../io/input.js'
import type { PositionalReader } from '../io/pread.js'
import type { LiveArchive, LiveOptions } from './live.js'
import { openImageFile } from './sources.js'
import { openArchiveIndex } from '../vma/archive-index.js'
import { VMA_MAGIC } from '../vma/format.js'
import type { NbdExport } from '../nbd/server.js'
import { clipExtents } from '../nbd/client.js'
import type { Extent, RandomAccessDisk } from '../contracts.js'

/** Guest bytes of an image's map looked up at once; windows kept (most recently used), and for how long (ms). */
const MAP_WINDOW = 64 * 1024 * 1024
const MAP_WINDOWS = 32
const MAP_TTL = 1000
import { type S3Access, openArchiveInput, openS3Reader } from './s3.js'
import { isS3Url } from '../s3/url.js'

export interface OpenedExports {
  exports: NbdExport[]
  /** Closes every disk (after the server has stopped). */
  close: () => Promise<void>
  /** The archives served while a pass reads them. */
  live: LiveArchive[]
}

/**
 * Opens `paths` (`-`: stdin) for serving. `names` go to the images among
 * them, in order; images without one are named by file name. An archive that
 * cannot be indexed is read by a live pass with `live`; with `live.keepDir`
 * every archive is (the pass is what restores it). An `s3://` archive is
 * indexed by ranged GETs where it is uncompressed, else read by a live pass
 * over one streamed GET; `s3` reaches the store.
 */
export async function openExports (paths: string[], names: string[] = [], live: LiveOptions = {}, s3: S3Access = {}): Promise<OpenedExports> {
  const exports: NbdExport[] = []
  const passes: LiveArchive[] = []
  const close = async (): Promise<void> => { await Promise.allSettled(exports.map(async e => await e.disk.close())) }
  const left = [...names]
  try {
    for (const path of paths) exports.push(...await (isS3Url(path) ? openObject(path, live, passes, s3) : openSource(path, left, live, passes)))
    if (left.length > 0) throw new VmapipeError('E_OPTION', `more export names than images: ${left.join(', ')}`, { option: 'names' })
  } catch (err) {
    await close()
    throw err
  }
  return { exports, close, live: passes }
}

async function openSource (path: string, names: string[], live: LiveOptions, passes: LiveArchive[]): Promise<NbdExport[]> {
  if (path === '-') return await openLive(path, live, passes)
  const st = await stat(path).catch(err => { throw ioError(err, `cannot open ${path}`) })
  if (st.isFIFO()) return await openLive(path, live, passes)
  // Directories go on: image bundles are directories.
  if (!st.isFile() && !st.isBlockDevice() && !st.isDirectory()) throw new VmapipeError('E_NOT_SEEKABLE', `${path} is neither a file, a pipe nor a directory`)
  const head = st.isDirectory() ? Buffer.alloc(0) : await readHead(path, DETECT_BYTES)
  const vma = head.subarray(0, VMA_MAGIC.length).equals(VMA_MAGIC)
  if (detectCompression(head) !== 'none' || (vma && live.keepDir !== undefined)) return await openLive(path, live, passes)
  if (vma) return await indexedDisks(path, basename(path))
  const name = names.shift() ?? basename(path)
  const { format, disk } = await openImageFile(path)
  return [{ name, description: `${format} image ${basename(path)}`, disk: withMapCache(disk) }]
}

/**
 * The image with its map looked up in aligned windows, several kept for a
 * second: the server asks for the map of every READ and BLOCK_STATUS, and
 * clients such as nbdcopy read several parts of a disk at once over several
 * connections, each a little at a time. A raw file's map costs two lseeks per
 * extent, and the file keeps one window of its own, which would be looked up
 * afresh at nearly every request. An image's map changes only if the file is
 * written while it is served; the second bounds how long that goes unseen.
 */
function withMapCache (disk: RandomAccessDisk & { readSync?: (buf: Buffer, offset: number) => void }): RandomAccessDisk {
  const windows = new Map<number, { at: number, extents: Promise<Extent[]> }>()
  const windowAt = async (index: number): Promise<Extent[]> => {
    let w = windows.get(index)
    windows.delete(index)
    if (w === undefined || performance.now() - w.at > MAP_TTL) {
      const start = index * MAP_WINDOW
      const fresh = { at: performance.now(), extents: disk.map(start, Math.min(MAP_WINDOW, disk.size - start)) }
      fresh.extents.catch(() => { if (windows.get(index) === fresh) windows.delete(index) })
      w = fresh
    }
    windows.set(index, w)
    if (windows.size > MAP_WINDOWS) windows.delete(windows.keys().next().value as number)
    return await w.extents
  }
  const map = async (offset: number, length: number): Promise<Extent[]> => {
    const end = offset + length
    const out: Extent[] = []
    for (let index = Math.floor(offset / MAP_WINDOW); index * MAP_WINDOW < end; index++) {
      for (const e of clipExtents(await windowAt(index), offset, end)) out.push(e)
    }
    return out
  }
  return {
    size: disk.size,
    map,
    read: async (buf, offset) => { await disk.read(buf, offset) },
    // A raw file's reads without the thread pool, as an archive's (nbd/server.ts readDisk).
    ...(disk.readSync !== undefined ? { readSync: disk.readSync.bind(disk) } : {}),
    close: async () => { await disk.close() },
    ...(disk.bitmaps !== undefined ? { bitmaps: disk.bitmaps } : {}),
    ...(disk.describe !== undefined ? { describe: disk.describe.bind(disk) } : {}),
  }
}

/** The disks of an uncompressed archive by its index (of a file, or of an object by ranged reads). */
async function indexedDisks (source: string | PositionalReader, name: string): Promise<NbdExport[]> {
  const index = await openArchiveIndex(source)
  const exports = disksOf(index.info.devices).map(d => ({
    name: d.name,
    description: `${d.name} of ${name} (${index.info.uuid})`,
    disk: index.disk(d),
  }))
  // The disks keep the archive open; the index itself is no longer needed.
  await index.close()
  return exports
}

/** An archive in a store: by ranged GETs where it is uncompressed, else by a live pass over one streamed GET. */
async function openObject (url: string, live: LiveOptions, passes: LiveArchive[], s3: S3Access): Promise<NbdExport[]> {
  const reader = await openS3Reader(url, s3)
  const head = Buffer.alloc(Math.min(DETECT_BYTES, reader.size))
  try {
    await reader.read(head, 0)
  } catch (err) {
    await reader.close()
    throw err
  }
  if (detectCompression(head) !== 'none' || live.keepDir !== undefined) {
    await reader.close()
    return await openLive(url, live, passes, await openArchiveInput(url, s3))
  }
  return await indexedDisks(reader, basename(url))
}

async function openLive (path: string, live: LiveOptions, passes: LiveArchive[], opened?: Input): Promise<NbdExport[]> {
  if (live.keepDir !== undefined && passes.length > 0) {
    throw new VmapipeError('E_OPTION', 'one archive at a time can be restored into a directory', { option: 'keepDir' })
  }
  const input = opened ?? openInput(path)
  // Loaded here: a live pass brings the stream reader and the extract targets, which serving a file by position never uses.
  const { openLiveArchive } = await import('./live.js')
  const archive = await openLiveArchive(input, live)
  passes.push(archive)
  return archive.disks.map(disk => ({ name: disk.device.name, description: `${disk.device.name} of ${input.name} (${archive.info.uuid}), live`, disk }))
}
