/**
 * A Parallels .hdd bundle read as one disk: DiskDescriptor.xml names the
 * images, its Snapshots chain the layers from the top snapshot down to the
 * root, and each range of the disk reads from the topmost layer that holds
 * it. Extents carry that layer's depth (1 = top) and the top image's dirty
 * bitmaps are the bundle's.
 */
import { type Stats } from 'node:fs'
import { open, realpath, stat } from 'node:fs/promises'
import { dirname, isAbsolute, join, relative, resolve, sep } from 'node:path'
import { type VmapipeError, ioError } from '../errors.js'
import type { DirtyBitmap, DiskDescription, Extent, RandomAccessDisk } from '../contracts.js'
import { describeBitmaps, mappedBytes } from '../io/disk-records.js'
import { RawImage } from '../raw/image.js'
import { type DescriptorImage, type DiskDescriptor, ROOT_PARENT, fail, parseDescriptor, topOf } from './disk-descriptor.js'
import { ParallelsImage } from './image.js'
import { SECTOR_SIZE } from './format.js'

export const DESCRIPTOR_NAME = 'DiskDescriptor.xml'
/** Descriptors are a few KiB; a larger one is refused unread. */
const MAX_DESCRIPTOR_BYTES = 4 << 20

export interface BundleLayer extends DescriptorImage {
  /** The image file, resolved. */
  path: string
  disk: RandomAccessDisk
}

/**
 * The images from the top snapshot down to the root. Refuses what the spec
 * does not cover (Padding 1, split storages) and what cannot be a chain:
 * unknown GUIDs, loops, more than one root, overlays that are not expandable.
 */
export function snapshotChain (d: DiskDescriptor, where: string): DescriptorImage[] {
  if (d.padding !== 0) throw fail(where, `Padding is ${d.padding}: only 0 is supported (the spec does not cover Padding 1)`)
  if (d.storages.length !== 1) throw fail(where, `${d.storages.length} storages: split images are not supported, one Storage is`)
  const storage = d.storages[0]
  if (storage.start !== 0 || storage.end !== d.diskSize) {
    throw fail(where, `the Storage covers sectors ${storage.start} to ${storage.end}, not the whole disk (0 to ${d.diskSize})`)
  }
  const images = new Map<string, DescriptorImage>()
  for (const image of storage.images) {
    if (images.has(image.guid)) throw fail(where, `two Images have GUID ${image.guid}`)
    images.set(image.guid, image)
  }
  const parents = new Map<string, string>()
  for (const shot of d.shots) {
    if (parents.has(shot.guid)) throw fail(where, `two Shots have GUID ${shot.guid}`)
    parents.set(shot.guid, shot.parentGuid)
  }
  const roots = d.shots.filter(s => s.parentGuid === ROOT_PARENT).map(s => s.guid)
  if (roots.length !== 1) {
    throw fail(where,
      roots.length === 0 ? 'no root snapshot (a Shot whose ParentGUID is all zeros)' : `${roots.length} root snapshots (${roots.join(', ')}), one expected`)
  }
  const chain: DescriptorImage[] = []
  const seen = new Set<string>()
  const top = topOf(d, where)
  if (top === ROOT_PARENT) throw fail(where, `<TopGUID> is ${ROOT_PARENT}, which marks the root's parent, not a snapshot`)
  for (let guid = top; guid !== ROOT_PARENT;) {
    if (seen.has(guid)) throw fail(where, `the snapshots loop back to ${guid}`)
    seen.add(guid)
    const parent = parents.get(guid)
    if (parent === undefined) {
      throw fail(where,
        chain.length === 0 ? `the top snapshot ${guid} has no Shot` : `snapshot ${chain[chain.length - 1].guid} names parent ${guid}, which has no Shot`)
    }
    const image = images.get(guid)
    if (image === undefined) throw fail(where, `snapshot ${guid} has no Image in the Storage`)
    if (parent !== ROOT_PARENT && image.type !== 'Compressed') {
      throw fail(where, `overlay ${guid} (${image.file}) is ${image.type}; overlays must be expandable (Compressed)`)
    }
    chain.push(image)
    guid = parent
  }
  return chain
}

/** A file the descriptor names that is not there: the bundle is incomplete (E_PARALLELS_XML), not the system failing. */
function missing (err: NodeJS.ErrnoException, where: string, element: string): VmapipeError | undefined {
  return err.code === 'ENOENT' || err.code === 'ENOTDIR' ? fail(where, `${element} does not exist`) : undefined
}

/** An image's path: absolute as given, or relative to the bundle and not leaving it, symbolic links included. */
async function imagePath (dir: string, file: string, where: string): Promise<string> {
  if (isAbsolute(file)) return file
  const full = resolve(dir, file)
  const outside = (from: string, to: string): boolean => {
    const rel = relative(from, to)
    return rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)
  }
  if (outside(dir, full)) throw fail(where, `File ${file} climbs out of the bundle`)
  const real = await realpath(full).catch(err => { throw missing(err, where, `File ${file}`) ?? ioError(err, `cannot open ${full}`) })
  if (outside(await realpath(dir), real)) throw fail(where, `File ${file} leads out of the bundle through a symbolic link`)
  return full
}

/** What a file system entry is, for a message. */
function kindOf (st: Stats): string {
  if (st.isDirectory()) return 'a directory'
  if (st.isCharacterDevice()) return 'a character device'
  if (st.isFIFO()) return 'a named pipe'
  if (st.isSocket()) return 'a socket'
  return 'not a regular file'
}

/**
 * The descriptor's text, read only from a regular file (a pipe would block)
 * and never more than MAX_DESCRIPTOR_BYTES of it, whatever its size claims:
 * files in /proc claim 0. `bundle` is the directory it was found in, if any.
 */
async function readDescriptor (where: string, bundle?: string): Promise<string> {
  const st = await stat(where).catch(err => {
    throw bundle !== undefined && err.code === 'ENOENT'
      ? ioError(err, `${bundle} is a directory without a ${DESCRIPTOR_NAME}, not a .hdd bundle`)
      : ioError(err, `cannot open ${where}`)
  })
  if (!st.isFile()) throw fail(where, `${kindOf(st)}, not a descriptor file`)
  const file = await open(where, 'r').catch(err => { throw ioError(err, `cannot open ${where}`) })
  try {
    const chunks: Buffer[] = []
    let length = 0
    for (;;) {
      const chunk = Buffer.alloc(65536)
      const { bytesRead } = await file.read(chunk, 0, chunk.length, length).catch(err => { throw ioError(err, `cannot read ${where}`) })
      if (bytesRead === 0) break
      chunks.push(chunk.subarray(0, bytesRead))
      length += bytesRead
      if (length > MAX_DESCRIPTOR_BYTES) throw fail(where, `more than ${MAX_DESCRIPTOR_BYTES} bytes, more than a descriptor can be`)
    }
    return Buffer.concat(chunks).toString('utf8')
  } finally {
    await file.close()
  }
}

/**
 * Opens the image an Image element names. What cannot hold a disk (a
 * directory, a pipe, a character device, an empty file such as /proc/self/mem)
 * is refused by the element before a byte is read from it.
 */
async function openLayer (dir: string, image: DescriptorImage, where: string): Promise<BundleLayer> {
  const path = await imagePath(dir, image.file, where)
  const element = `<File> ${image.file} of Image ${image.guid}`
  const st = await stat(path).catch(err => { throw missing(err, where, element) ?? ioError(err, `cannot open ${element}`) })
  if (!st.isFile() && !st.isBlockDevice()) throw fail(where, `${element} is ${kindOf(st)}, not an image`)
  if (st.isFile() && st.size === 0) throw fail(where, `${element} is empty (0 bytes), not an image`)
  const opening = image.type === 'Plain' ? RawImage.open(path) : ParallelsImage.open(path)
  const disk = await opening.catch(err => { throw ioError(err, `cannot read ${element}`) })
  return { ...image, path, disk }
}

export class ParallelsBundle implements RandomAccessDisk {
  readonly size: number
  readonly bitmaps: DirtyBitmap[]

  /** `xml` is the DiskDescriptor.xml as read, `descriptor` what it says. */
  private constructor (readonly descriptorPath: string, readonly xml: string, readonly descriptor: DiskDescriptor, readonly layers: BundleLayer[]) {
    this.size = descriptor.diskSize * SECTOR_SIZE
    this.bitmaps = layers[0].disk.bitmaps ?? []
  }

  /** Opens a bundle: its directory, or its DiskDescriptor.xml. */
  static async open (path: string): Promise<ParallelsBundle> {
    const st = await stat(path).catch(err => { throw ioError(err, `cannot open ${path}`) })
    const where = st.isDirectory() ? join(path, DESCRIPTOR_NAME) : path
    const xml = await readDescriptor(where, st.isDirectory() ? path : undefined)
    const d = parseDescriptor(xml, where)
    const chain = snapshotChain(d, where)
    const layers: BundleLayer[] = []
    try {
      for (const image of chain) {
        const layer = await openLayer(dirname(where), image, where)
        layers.push(layer)
        const { disk } = layer
        if (disk.size !== d.diskSize * SECTOR_SIZE) throw fail(where, `${image.file} holds ${disk.size} bytes, the disk is ${d.diskSize * SECTOR_SIZE}`)
        if (disk instanceof ParallelsImage && disk.clusterSize !== d.storages[0].blockSize * SECTOR_SIZE) {
          throw fail(where, `${image.file} has clusters of ${disk.clusterSize / SECTOR_SIZE} sectors, the Storage's Blocksize is ${d.storages[0].blockSize}`)
        }
      }
    } catch (err) {
      await Promise.allSettled(layers.map(async l => { await l.disk.close() }))
      throw err
    }
    return new ParallelsBundle(where, xml, d, layers)
  }

  async map (offset: number, length: number): Promise<Extent[]> {
    const found: Extent[] = []
    let pending = [{ offset, length: Math.max(0, Math.min(length, this.size - offset)) }].filter(r => r.length > 0)
    for (const [i, layer] of this.layers.entries()) {
      const holes: typeof pending = []
      for (const range of pending) {
        for (const e of await layer.disk.map(range.offset, range.length)) {
          if (e.data) found.push({ offset: e.offset, length: e.length, data: true, depth: i + 1 })
          else holes.push({ offset: e.offset, length: e.length })
        }
      }
      pending = holes
      if (pending.length === 0) break
    }
    for (const hole of pending) found.push({ ...hole, data: false, depth: 0 })
    found.sort((a, b) => a.offset - b.offset)
    const merged: Extent[] = []
    for (const e of found) {
      const last = merged[merged.length - 1]
      if (last !== undefined && last.depth === e.depth && last.offset + last.length === e.offset) last.length += e.length
      else merged.push(e)
    }
    return merged
  }

  async read (buf: Buffer, offset: number): Promise<void> {
    buf.fill(0)
    for (const e of await this.map(offset, buf.length)) {
      if (e.data) await this.layers[(e.depth as number) - 1].disk.read(buf.subarray(e.offset - offset, e.offset - offset + e.length), e.offset)
    }
  }

  async describe (signal?: AbortSignal): Promise<DiskDescription> {
    const allocated = await mappedBytes(async (o, l) => await this.map(o, l), this.size, e => e.data, signal)
    const details: Record<string, string | number> = {}
    for (const [i, layer] of this.layers.entries()) details[`layer ${i + 1}`] = `${layer.file} (${layer.type}, ${layer.guid})`
    return { format: 'parallels-bundle', size: this.size, allocated, layers: this.layers.length, bitmaps: await describeBitmaps(this.bitmaps), details }
  }

  async close (): Promise<void> {
    await Promise.all(this.layers.map(async l => { await l.disk.close() }))
  }
}
