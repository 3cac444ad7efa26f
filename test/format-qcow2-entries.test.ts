/**
 * Issue 12, defects 5 and 13: every form of qcow2 L1/L2 entry is read as
 * QEMU reads it (`qemu-img convert -O raw` of the same hand-patched image is
 * the oracle), and the file reader and the stream reader give the same
 * verdict on the same bytes. One deliberate difference from QEMU: data or an
 * L2 table past the end of the file is refused (QEMU reads zeros; qemu-img
 * check calls it corruption), so that a cut-short copy is never read as a disk.
 */
import t, { type Test } from 'tap'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { deflateRawSync } from 'node:zlib'
import { Qcow2Image } from '../lib/qcow2/image.js'
import { streamQcow2 } from '../lib/qcow2/stream.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { CLUSTER_SIZE, expandCluster } from '../lib/record.js'
import type { ErrorCode } from '../lib/errors.js'
import { verdict } from './helpers/read.js'
import { run, tempDir } from './helpers/run.js'

const C = 0x8000000000000000n // COPIED
const Z = 1n // the zero flag
const CMP = 0x4000000000000000n // compressed
const DATA2 = 0x60000n // host offset of guest cluster 2's data in the base images (qemu-img lays them out so)

type Base = 'std' | 'ext' | 'v2'
interface Case {
  base: Base
  /** What both our readers must do: read what QEMU reads, fail where it fails, or refuse data QEMU reads as zeros past the file's end. */
  expect: 'reads' | 'fails' | 'refused'
  /** The error both readers give where they do not read it. */
  code?: ErrorCode
  /** Patches the image (given the L1 table's and the first L2 table's offsets). */
  patch: (img: Buffer, l1: number, l2: number) => Buffer
}

const l2 = (base: Base, cluster: number, entry: bigint, bitmap?: bigint) => (img: Buffer, _l1: number, l2: number): Buffer => {
  const width = base === 'ext' ? 16 : 8
  img.writeBigUInt64BE(entry, l2 + cluster * width)
  if (bitmap !== undefined) img.writeBigUInt64BE(bitmap, l2 + cluster * width + 8)
  return img
}
const l1 = (index: number, entry: bigint) => (img: Buffer, l1: number): Buffer => { img.writeBigUInt64BE(entry, l1 + index * 8); return img }

/** Cluster 1 becomes a compressed cluster of `inflated` 0x44 bytes appended to the file, with `flags` and an extended bitmap if given. */
const compressed = (base: Base, flags: bigint, bitmap?: bigint, inflated = 65536) => (img: Buffer, l1: number, l2table: number): Buffer => {
  const data = deflateRawSync(Buffer.alloc(inflated, 0x44), { windowBits: 12 })
  const host = BigInt(img.length)
  const sectors = BigInt(Math.ceil(data.length / 512) - 1)
  const out = Buffer.concat([img, data, Buffer.alloc((512 - data.length % 512) % 512)])
  return l2(base, 1, CMP | flags | (sectors << 54n) | host, bitmap)(out, l1, l2table)
}

const CASES: Record<string, Case> = {
  'COPIED with offset 0 (the reported defect)': { base: 'std', expect: 'reads', patch: l2('std', 1, C) },
  'zero flag, offset 0, COPIED': { base: 'std', expect: 'reads', patch: l2('std', 1, C | Z) },
  'zero flag with an offset (preallocated zero)': { base: 'std', expect: 'reads', patch: l2('std', 1, C | DATA2 | Z) },
  'zero flag with an unaligned offset': { base: 'std', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('std', 1, C | DATA2 | 0x200n | Z) },
  'reserved bits 1-8': { base: 'std', expect: 'reads', patch: l2('std', 1, C | DATA2 | 0x2n) },
  'reserved bits 56-61': { base: 'std', expect: 'reads', patch: l2('std', 1, C | 0x0100000000000000n | DATA2) },
  'no COPIED flag on data': { base: 'std', expect: 'reads', patch: l2('std', 1, DATA2) },
  'unaligned data offset': { base: 'std', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('std', 1, C | DATA2 | 0x200n) },
  'data past the end of the file': { base: 'std', expect: 'refused', code: 'E_QCOW2_L2', patch: l2('std', 1, C | 0x10000000n) },
  // Bit 31 of the low word: read as a signed 32-bit number it made the offset negative, and the header was read as data (found by npm run fuzz).
  'data past the end of the file, offset bit 31 set': { base: 'std', expect: 'refused', code: 'E_QCOW2_L2', patch: l2('std', 1, C | 0x80000000n) },
  'compressed descriptor at offset 0': { base: 'std', expect: 'fails', code: 'E_QCOW2_DATA', patch: l2('std', 1, CMP) },
  'compressed cluster': { base: 'std', expect: 'reads', patch: compressed('std', 0n) },
  'compressed cluster with COPIED': { base: 'std', expect: 'reads', patch: compressed('std', C) },
  'compressed cluster that inflates past its cluster (cut there)': { base: 'std', expect: 'reads', patch: compressed('std', 0n, undefined, 70000) },
  'compressed cluster that inflates short': { base: 'std', expect: 'fails', code: 'E_QCOW2_DATA', patch: compressed('std', 0n, undefined, 1000) },
  'version 2: zero flag': { base: 'v2', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('v2', 1, Z) },
  'version 2: zero flag with an offset': { base: 'v2', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('v2', 1, C | DATA2 | Z) },
  'extended: COPIED, offset 0, subclusters allocated': { base: 'ext', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('ext', 1, C, 0xffffffffn) },
  'extended: offset 0, subclusters allocated': { base: 'ext', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('ext', 1, 0n, 0xffffffffn) },
  'extended: COPIED, offset 0, subclusters zero': { base: 'ext', expect: 'reads', patch: l2('ext', 1, C, 0xffffffff00000000n) },
  'extended: offset 0, some subclusters zero': { base: 'ext', expect: 'reads', patch: l2('ext', 2, 0n, 0x0000ff0000000000n) },
  'extended: the zero flag (ignored)': { base: 'ext', expect: 'reads', patch: l2('ext', 1, C | DATA2 | Z, 0xffffffffn) },
  'extended: allocated and zero at once': { base: 'ext', expect: 'fails', code: 'E_QCOW2_L2', patch: l2('ext', 1, C | DATA2, 0x1ffffffffn) },
  'extended: an offset and no subcluster bits': { base: 'ext', expect: 'reads', patch: l2('ext', 1, C | DATA2, 0n) },
  'extended: half the subclusters allocated': { base: 'ext', expect: 'reads', patch: l2('ext', 1, C | DATA2, 0x0000ffffn) },
  'extended: reserved bits': { base: 'ext', expect: 'reads', patch: l2('ext', 1, C | DATA2 | 0x4n, 0xffffffffn) },
  'extended: compressed with subcluster bits': { base: 'ext', expect: 'reads', patch: compressed('ext', 0n, 0xffn) },
  'L1: reserved bits 0-8': { base: 'std', expect: 'reads', patch: l1(0, C | 0x40000n | 0x100n) },
  'L1: reserved bits 56-62': { base: 'std', expect: 'reads', patch: l1(0, C | 0x0100000000000000n | 0x40000n) },
  'L1: COPIED with offset 0': { base: 'std', expect: 'reads', patch: l1(0, C) },
  'L1: unaligned': { base: 'std', expect: 'fails', code: 'E_QCOW2_L1', patch: l1(0, C | 0x40200n) },
  'L1: an L2 table past the end of the file': { base: 'std', expect: 'refused', code: 'E_QCOW2_L1', patch: l1(0, C | 0x10000000n) },
  'L1: an L2 table past the end of the file, offset bit 31 set': { base: 'std', expect: 'refused', code: 'E_QCOW2_L1', patch: l1(0, C | 0x80000000n) },
  // Issue 13: entries QEMU never looks at, past the disk's end, are not checked by either reader.
  'L2 entries past the disk (unaligned, allocated without offset)': {
    base: 'std',
    expect: 'reads',
    patch: (img, l1t, l2t) => l2('std', 20, C | 0x10200n)(l2('std', 8191, 0x4000000000000000n)(img, l1t, l2t), l1t, l2t),
  },
  'L1 entries past the disk (unaligned, past the file)': {
    base: 'std',
    expect: 'reads',
    patch: (img, l1t) => { img.writeUInt32BE(3, 36); return l1(2, 0x10000000n)(l1(1, C | 0x10200n)(img, l1t), l1t) },
  },
  'a size that is not whole sectors (QEMU rounds it down)': { base: 'std', expect: 'reads', patch: img => { img.writeBigUInt64BE(1000001n, 24); return img } },
}

async function makeBase (t: Test, dir: string, base: Base): Promise<string> {
  const path = join(dir, `${base}.qcow2`)
  const opts = base === 'ext' ? ['-o', 'extended_l2=on'] : base === 'v2' ? ['-o', 'compat=0.10'] : []
  t.equal((await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, path, '1M'])).code, 0)
  const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 64k 64k', '-c', 'write -P 0x33 128k 64k', path])
  t.equal(io.code, 0, 'qemu-io writes three clusters')
  return path
}

/** The image as QEMU reads it, or undefined where qemu-img convert fails. */
async function qemuReads (dir: string, image: string): Promise<Buffer | undefined> {
  const out = join(dir, 'qemu.raw')
  const r = await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out])
  return r.code === 0 && existsSync(out) ? readFileSync(out) : undefined
}

async function fromFile (path: string): Promise<Buffer> {
  const image = await Qcow2Image.open(path)
  try {
    const buf = Buffer.alloc(image.size)
    await image.read(buf, 0)
    return buf
  } finally {
    await image.close()
  }
}

async function fromStream (bytes: Buffer, dir: string): Promise<Buffer> {
  const streamed = await streamQcow2(Readable.from([bytes.subarray(0, 1000), bytes.subarray(1000)]), { tmpDir: dir })
  const disk = Buffer.alloc(streamed.size)
  for await (const rec of await streamed.records(1)) {
    const r = rec as ClusterRecord
    expandCluster(r, streamed.size).copy(disk, r.cluster * CLUSTER_SIZE)
  }
  return disk
}

t.test('every L1/L2 entry form: both readers agree with qemu-img convert', async t => {
  const dir = tempDir(t)
  const bases = { std: await makeBase(t, dir, 'std'), ext: await makeBase(t, dir, 'ext'), v2: await makeBase(t, dir, 'v2') }
  for (const [name, c] of Object.entries(CASES)) {
    const img = readFileSync(bases[c.base])
    const l1Offset = Number(img.readBigUInt64BE(40))
    const l2Offset = Number(img.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n)
    const patched = c.patch(Buffer.from(img), l1Offset, l2Offset)
    const path = join(dir, 'case.qcow2')
    writeFileSync(path, patched)
    const qemu = await qemuReads(dir, path)
    const check = await run('qemu-img', ['check', '-f', 'qcow2', path])
    const file = await verdict(async () => await fromFile(path))
    const stream = await verdict(async () => await fromStream(patched, dir))
    t.test(name, async t => {
      t.comment(`qemu-img check exits ${check.code ?? 'signal'}`)
      t.equal(qemu !== undefined, c.expect !== 'fails', c.expect === 'fails' ? 'QEMU fails to read it' : 'QEMU reads it')
      if (c.expect === 'reads') {
        const same = 'bytes' in file && qemu !== undefined && file.bytes.equals(qemu)
        t.ok(same, 'the file reader reads what QEMU reads', 'code' in file ? { code: file.code } : {})
      } else {
        t.same(file, { code: c.code }, `the file reader refuses it with ${c.code ?? 'a code'}`)
      }
      t.same(stream, file, 'the stream reader gives the same verdict')
    })
  }
})
