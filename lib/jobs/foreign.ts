/**
 * Formats vmapipe recognises but does not read as disks: other image formats,
 * compressed files and VMA archives. Read as raw, such a file's container bytes
 * would be packed as if they were the guest's disk, so format detection
 * refuses them and says what to do instead.
 */
import { VmapipeError } from '../errors.js'
import { FORMATS } from './registry.js'

interface ForeignFormat {
  /** With its article, for messages: "a VHDX image". */
  name: string
  /** What to do with a file of this format (`path` undefined: it comes on stdin). */
  advice: (path?: string) => string
}

const at = (head: Buffer, offset: number, magic: string | number[]): boolean => {
  const bytes = typeof magic === 'string' ? Buffer.from(magic, 'latin1') : Buffer.from(magic)
  return head.length >= offset + bytes.length && head.subarray(offset, offset + bytes.length).equals(bytes)
}

const image = (name: string): ForeignFormat => ({ name, advice: path => `convert it first (qemu-img convert -O qcow2 ${path ?? 'FILE'} disk.qcow2)` })
const compressed = (name: string, tool: string): ForeignFormat => ({
  name,
  advice: path => path === undefined
    ? `decompress it on the way in (${tool} -dc | ...)`
    : `decompress it first (${tool} -d ${path}), or on the way in (${tool} -dc ${path} | ...)`,
})

/** A VHD's footer: all of a fixed VHD's metadata, at its end; a dynamic VHD has a copy at the front. */
const VHD_COOKIE = 'conectix'

/** Each format and how its first bytes announce it. */
const FOREIGN: Array<[ForeignFormat, (head: Buffer) => boolean]> = [
  [image('a VMDK image (sparse)'), h => at(h, 0, 'KDMV')],
  [image('a VMDK image (ESX sparse)'), h => at(h, 0, 'COWD')],
  [image('a VMDK descriptor'), h => at(h, 0, '# Disk DescriptorFile')],
  [image('a VHD image (dynamic)'), h => at(h, 0, VHD_COOKIE)],
  [image('a VHDX image'), h => at(h, 0, 'vhdxfile')],
  // VirtualBox: the signature 0xbeda107f (little-endian) after a 64-byte text banner.
  [image('a VDI image'), h => at(h, 0x40, [0x7f, 0x10, 0xda, 0xbe])],
  [image('a QED image'), h => at(h, 0, 'QED\0')],
  // Archives the registry knows (VMA): several disks, not one.
  ...FORMATS.filter(f => f.kind === 'archive').map((f): [ForeignFormat, (head: Buffer) => boolean] =>
    [{ name: `a ${f.name.toUpperCase()} archive`, advice: () => 'extract its disks, or copy it as it is' }, f.detect]),
  [compressed('a zstd-compressed file', 'zstd'), h => at(h, 0, [0x28, 0xb5, 0x2f, 0xfd])],
  // Deflate (method 8) is the only method gzip writes; the third byte keeps a raw disk's chance match small.
  [compressed('a gzip-compressed file', 'gzip'), h => at(h, 0, [0x1f, 0x8b, 0x08])],
  [compressed('an xz-compressed file', 'xz'), h => at(h, 0, [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])],
  [compressed('an lzop-compressed file', 'lzop'), h => at(h, 0, [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a])],
  // "BZh", the block size digit, then the magic of a first block or of the end of an empty stream.
  [compressed('a bzip2-compressed file', 'bzip2'), h => /^BZh[1-9]$/.test(h.toString('latin1', 0, 4)) &&
    (at(h, 4, [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]) || at(h, 4, [0x17, 0x72, 0x45, 0x38, 0x50, 0x90]))],
]

/** Bytes at a file's end that hold a fixed VHD's footer (512; some old writers left out the last byte). */
export const TAIL_BYTES = 512

/** The last bytes of a file and where they start. */
interface Tail { bytes: Buffer, offset: number }

/** The foreign format a file's first bytes (and, where known, its last TAIL_BYTES) announce, with where it shows. */
function foreignFormat (head: Buffer, tail?: Tail): { format: ForeignFormat, offset: number } | undefined {
  const found = FOREIGN.find(([, test]) => test(head))
  if (found !== undefined) return { format: found[0], offset: 0 }
  const skip = tail === undefined ? undefined : [0, 1].find(s => at(tail.bytes, s, VHD_COOKIE))
  if (tail !== undefined && skip !== undefined) return { format: image('a VHD image (fixed)'), offset: tail.offset + skip }
  return undefined
}

/**
 * Refuses an input (`path`, or - for stdin) in a format vmapipe does not read
 * as a disk, naming the format and what to do; the raw format packs its bytes
 * regardless.
 */
export function refuseForeign (path: string, head: Buffer, tail?: Tail): void {
  const found = foreignFormat(head, tail)
  if (found === undefined) return
  const { format, offset } = found
  const file = path === '-' ? undefined : path
  throw new VmapipeError('E_INPUT_FORMAT',
    `${file ?? 'stdin'} is ${format.name}, not a disk vmapipe reads: ${format.advice(file)}; or give its format as raw to take its bytes as they are`,
    { offset })
}
