/**
 * Incremental backups: the clusters a dirty bitmap marks (an incremental
 * DiskSource, e.g. an NBD export with qemu:dirty-bitmap) written as an
 * overlay on the previous backup. Over a qcow2 or raw image: a new qcow2
 * whose backing file is that image (clusters that now read as zeros carry the
 * zero flag, so they hide it). Over a .hdd bundle: a new snapshot image in the
 * bundle, added to its DiskDescriptor.xml as the new top. Either way the new
 * file appears under its name only when complete, and the descriptor changes
 * only after that.
 */
import { rename, stat, unlink } from 'node:fs/promises'
import { basename, dirname, extname, join, relative } from 'node:path'
import { VmapipeError, ioError } from '../errors.js'
import type { ClusterRecord, DiskWriter, ProgressSink } from '../contracts.js'
import { partialPath, writeFileAtomically } from '../io/output.js'
import { type DiskSource, openImageFile } from './sources.js'
import { Qcow2FileWriter, type Qcow2WriterOptions } from '../qcow2/writer.js'
import { ParallelsWriter } from '../parallels/writer.js'
import { DESCRIPTOR_NAME, ParallelsBundle } from '../parallels/bundle.js'
import { addSnapshotImage, newGuid } from '../parallels/disk-descriptor.js'
import { SECTOR_SIZE } from '../parallels/format.js'

export interface OverlayOptions {
  /** Where a qcow2 overlay goes (default: beside the previous image, named after it and the time). */
  output?: string
  /** The overlay's time, for its default name (default now). */
  now?: Date
  progress?: ProgressSink
}

export interface OverlayResult {
  /** The new qcow2, or the new snapshot image inside the bundle. */
  path: string
  format: 'qcow2' | 'parallels'
  /** 64 KiB clusters written (the dirty ones). */
  clusters: number
}

const stamp = (d: Date): string => d.toISOString().replace(/\.\d+Z$/, '').replace(/[-:]/g, '').replace('T', '-')

export async function writeOverlay (source: DiskSource, previous: string, options: OverlayOptions = {}): Promise<OverlayResult> {
  if (source.incremental !== true) {
    throw new VmapipeError('E_OPTION', `${source.path} gives the whole disk; an overlay is made of the clusters a dirty bitmap marks`)
  }
  const st = await stat(previous).catch(err => { throw ioError(err, `cannot open the previous backup ${previous}`) })
  if (st.isDirectory() || basename(previous) === DESCRIPTOR_NAME) return await snapshotInBundle(source, previous, options)
  const { format, disk } = await openImageFile(previous)
  const size = disk.size
  await disk.close()
  if (format !== 'qcow2' && format !== 'raw') {
    throw new VmapipeError('E_OPTION', `${previous} is ${format}; a qcow2 overlay goes over a qcow2 or raw image, a snapshot into a .hdd bundle`)
  }
  checkSize(source, size, previous)
  const out = options.output ?? join(dirname(previous), `${basename(previous, extname(previous))}-${stamp(options.now ?? new Date())}.qcow2`)
  // QEMU finds a relative backing file from the overlay's directory.
  return await writeQcow2(source, out, { backing: { name: relative(dirname(out), previous), format } }, options)
}

/** A whole disk as a standalone qcow2 at `out` (the base of a chain of overlays). */
export async function writeImage (source: DiskSource, out: string, options: OverlayOptions = {}): Promise<OverlayResult> {
  if (source.incremental === true) throw new VmapipeError('E_OPTION', `${source.path} gives only what a dirty bitmap marks; a whole image needs the whole disk`)
  return await writeQcow2(source, out, {}, options)
}

async function writeQcow2 (source: DiskSource, out: string, writerOptions: Qcow2WriterOptions, options: OverlayOptions): Promise<OverlayResult> {
  if (await stat(out).then(() => true, () => false)) throw new VmapipeError('E_TARGET_EXISTS', `${out} exists already`)
  const clusters = await fillAs(source, out, async temp => await Qcow2FileWriter.create(temp, source.size, writerOptions), options)
  return { path: out, format: 'qcow2', clusters }
}

async function snapshotInBundle (source: DiskSource, previous: string, options: OverlayOptions): Promise<OverlayResult> {
  const base = await ParallelsBundle.open(previous)
  try {
    checkSize(source, base.size, previous)
    const where = base.descriptorPath
    const clusterSize = base.descriptor.storages[0].blockSize * SECTOR_SIZE
    const dir = dirname(where)
    const guid = newGuid()
    const file = `${basename(dir, extname(dir))}.${base.layers.length}.${guid}.hds`
    const clusters = await fillAs(source, join(dir, file), async temp => await ParallelsWriter.create(temp, base.size, { clusterSize, base }), options)
    await writeFileAtomically(where, addSnapshotImage(base.xml, { guid, type: 'Compressed', file }, where))
    return { path: join(dir, file), format: 'parallels', clusters }
  } finally {
    await base.close()
  }
}

function checkSize (source: DiskSource, size: number, previous: string): void {
  if (source.size !== size) throw new VmapipeError('E_INPUT_SIZE', `${source.path} is ${source.size} bytes but the previous backup ${previous} is ${size}`)
}

/** Writes the source's records through the writer `create` makes on a temporary name, which becomes `out` when complete. */
async function fillAs (source: DiskSource, out: string, create: (temp: string) => Promise<DiskWriter>, options: OverlayOptions): Promise<number> {
  const temp = partialPath(out)
  const clusters = await fill(source, await create(temp), temp, options)
  await rename(temp, out).catch(async err => { await unlink(temp).catch(() => {}); throw ioError(err, `cannot name ${out}`) })
  return clusters
}

/** Feeds the source's records to `writer` and completes it; on failure the file at `path` is removed. */
async function fill (source: DiskSource, writer: DiskWriter, path: string, options: OverlayOptions): Promise<number> {
  let clusters = 0
  try {
    for await (const rec of await source.records(1, options.progress)) {
      clusters++
      await writer.write(rec as ClusterRecord)
    }
    await writer.finish()
  } catch (err) {
    await writer.abort()
    await unlink(path).catch(() => {})
    throw err
  }
  return clusters
}
