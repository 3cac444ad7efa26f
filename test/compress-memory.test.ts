/**
 * Writing compressed archives with bounded memory: zstd, lzop and gzip all
 * compressed in the main thread, straight into slabs (no libzstd worker
 * threads, no worker thread of ours). A disk large enough for many slabs and
 * many lzop blocks, half incompressible and half text, is written by
 * `vma create` and `pack-vma` with each; the real programs decompress it to
 * the very archive written uncompressed, Proxmox's vma verifies that, and
 * the peak RSS stays near the uncompressed run's.
 */
import t from 'tap'
import { readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, PVE_VMA, VMA, cmp, exits, q, run, sh, smallFileSystem, tempDir } from './helpers/run.js'
import { failure, logged } from './helpers/logged.js'
import { Rng } from './helpers/random.js'

const SIZE = 64 << 20
const FIXED = ['--uuid', '0b7f1f1a-7d2c-4d2e-9a3c-0123456789ab', '--ctime', '1700000000']
const KINDS = [
  { kind: 'zstd', unpack: 'zstd -q -d -c' },
  { kind: 'lzo', unpack: 'lzop -d -c' },
  { kind: 'gzip', unpack: 'gzip -d -c' },
] as const
/** tap's coverage (NODE_V8_COVERAGE) in the tools and the lzop worker would weigh in their RSS: measured without it. */
const PLAIN_NODE = { NODE_V8_COVERAGE: '' }
/**
 * What compressing may add to the uncompressed run's peak RSS: the codec's
 * state (libzstd's 2 MiB window and tables, deflate's, LZO's 256 KiB block)
 * and a few slabs of output. Measured under tap: zstd +5, lzo +5, gzip +4 MiB;
 * with libzstd's worker threads zstd added 12 MiB, the lzop worker 52 MiB.
 * Since the uncompressed run writes its file by position, holding no extent
 * for its header, a compressed one also holds that extent (4-5 slabs) more.
 */
const EXTRA_RSS_KIB = { zstd: 15 << 10, lzo: 15 << 10, gzip: 15 << 10 }

/** Half random bytes, half words with zero runs: both of zstd's paths, and stored as well as packed lzop blocks. */
function writeDisk (path: string): void {
  const rng = new Rng(14)
  const disk = Buffer.alloc(SIZE)
  for (let at = 0; at < SIZE / 2; at += 4) disk.writeUInt32LE(rng.next(), at)
  const words = Array.from({ length: 512 }, (_, i) => Buffer.from(`w${(i * 7919).toString(36)} `))
  for (let at = SIZE / 2; at < SIZE;) {
    if (rng.next() % 16 === 0) at += 65536
    else at += words[rng.next() % words.length].copy(disk, at)
  }
  writeFileSync(path, disk)
}

function maxRss (r: { stderr: string }): number {
  return Number(logged(r).find(l => l.maxRssKiB !== undefined)?.maxRssKiB)
}

t.test('vma create and pack-vma --compress zstd|lzo: the programs decompress the uncompressed archive, in bounded memory', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeDisk(disk)
  const plain = join(dir, 'plain.vma')
  const created = await run(process.execPath, [VMA, 'create', plain, ...FIXED, '-d', `drive-scsi0=${disk}`], { env: PLAIN_NODE })
  exits(t, created, 0, 'uncompressed reference')
  const plainRss = maxRss(created)
  t.ok(plainRss > 0, 'the run logs its peak RSS')
  exits(t, await sh(`${q(process.execPath)} ${q(PACK_VMA)} ${q(disk)} ${FIXED.join(' ')} > ${q(join(dir, 'packed.vma'))}`), 0, 'pack-vma, uncompressed')

  for (const { kind, unpack } of KINDS) {
    const ours = join(dir, `ours.vma.${kind}`)
    const r = await run(process.execPath, [VMA, 'create', ours, '--compress', kind, ...FIXED, '-d', `drive-scsi0=${disk}`], { env: PLAIN_NODE })
    exits(t, r, 0, `${kind}: create`)
    t.ok(maxRss(r) - plainRss < EXTRA_RSS_KIB[kind], `${kind}: peak RSS ${maxRss(r)} KiB, uncompressed ${plainRss} KiB`)
    const back = join(dir, `back-${kind}.vma`)
    exits(t, await sh(`${unpack} ${q(ours)} > ${q(back)}`), 0, `${kind}: the program decompresses it`)
    t.ok(cmp(back, plain), `${kind}: byte for byte the uncompressed archive`)
    if (PVE_VMA !== undefined) exits(t, await run(PVE_VMA, ['verify', back]), 0, `${kind}: pve-vma verifies it`)

    // pack-vma to stdout: the chunks are given back by stdout's writer, not by the file's.
    const piped = await sh(`${q(process.execPath)} ${q(PACK_VMA)} ${q(disk)} --compress ${kind} ${FIXED.join(' ')} | ${unpack} | cmp - ${q(join(dir, 'packed.vma'))}`)
    exits(t, piped, 0, `${kind}: pack-vma to a pipe decompresses to its uncompressed archive`)
  }
  if (PVE_VMA === undefined) t.comment('skip: pve-vma not found')
})

t.test('a file system that fills up while compressing: E_IO, exit 3, nothing left behind', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeDisk(disk)
  const mnt = smallFileSystem(t, dir, '4m')
  if (mnt === undefined) return
  for (const { kind } of KINDS) {
    const r = await run(process.execPath, [VMA, 'create', join(mnt, `backup.vma.${kind}`), '--compress', kind, '-d', `drive-scsi0=${disk}`])
    exits(t, r, 3, `${kind}: a 4 MiB file system fills up`)
    t.equal(failure(r).code, 'E_IO', `${kind}: a typed error`)
    t.same(readdirSync(mnt), [], `${kind}: neither the archive nor its temporary file is left`)
  }
})
