/**
 * What `vma serve` exports: every disk of an uncompressed VMA archive, named
 * by its device, through an index of the archive; and images (raw or any
 * registered format, backing chains followed), named by file name or as given.
 */
import { stat } from 'node:fs/promises'
import { basename } from 'node:path'
import { VmapipeError, ioError } from '../errors.js'
import { disksOf } from '../archive.js'
import { detectCompression } from '../io/compression.js'
import { readHead } from '../io/input.js'
import { openImageFile } from '../sources.js'
import { openVmaIndex } from '../vma/index.js'
import { VMA_MAGIC } from '../vma/format.js'
import type { NbdExport } from './server.js'

export interface OpenedExports {
  exports: NbdExport[]
  /** Closes every disk (after the server has stopped). */
  close: () => Promise<void>
}

/**
 * Opens `paths` for serving. `names` go to the images among them, in order;
 * images without one are named by file name.
 */
export async function openExports (paths: string[], names: string[] = []): Promise<OpenedExports> {
  const exports: NbdExport[] = []
  const close = async (): Promise<void> => { await Promise.allSettled(exports.map(async e => await e.disk.close())) }
  const left = [...names]
  try {
    for (const path of paths) exports.push(...await openSource(path, left))
    if (left.length > 0) throw new VmapipeError('E_USAGE', `more export names than images: ${left.join(', ')}`)
  } catch (err) {
    await close()
    throw err
  }
  return { exports, close }
}

async function openSource (path: string, names: string[]): Promise<NbdExport[]> {
  const st = await stat(path).catch(err => { throw ioError(err, `cannot open ${path}`) })
  // Directories go on: image bundles are directories.
  if (!st.isFile() && !st.isBlockDevice() && !st.isDirectory()) {
    throw new VmapipeError('E_USAGE', `${path} is not a regular file; serving needs random access (copy a pipe to a file first)`)
  }
  const head = st.isDirectory() ? Buffer.alloc(0) : await readHead(path, VMA_MAGIC.length)
  // Compressed files go to the index too, which says how to unpack them.
  if (head.equals(VMA_MAGIC) || detectCompression(head) !== 'none') {
    const index = await openVmaIndex(path)
    const exports = disksOf(index.info.devices).map(d => ({
      name: d.name, description: `${d.name} of ${basename(path)} (${index.info.uuid})`, disk: index.disk(d),
    }))
    // The disks keep the archive open; the index itself is no longer needed.
    await index.close()
    return exports
  }
  const name = names.shift() ?? basename(path)
  const { format, disk } = await openImageFile(path)
  return [{ name, description: `${format} image ${basename(path)}`, disk }]
}
