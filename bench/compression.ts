/**
 * Compressed archives: our engines (zstd-napi or node:zlib, our LZO1X, zlib) against
 * the same commands running the `zstd` and `lzop` programs (VMAPIPE_EXTERNAL_COMPRESSION=1,
 * the path of earlier versions) and against the programs alone, in interleaved pairs of
 * the same run. Wall and CPU seconds (CPU: all threads and children).
 */
import { createWriteStream, rmSync, statSync } from 'node:fs'
import { once } from 'node:events'
import { join } from 'node:path'
import { Rng } from '../test/helpers/random.js'
import { GIB, MB, Table, pair, q, shell, vma } from './lib.js'

/**
 * A raw disk that compresses about as a used system disk does (zstd -3 roughly 2:1, lzop less):
 * text of words from a small vocabulary gives the match finders work and entropy coding some
 * gain; one MiB in ten is zero.
 */
async function writeCompressibleDisk (path: string, size: number): Promise<void> {
  const rng = new Rng(7)
  const words = Array.from({ length: 4096 }, () => Buffer.from(rng.fill(Buffer.alloc(3 + rng.int(10))).map(b => 97 + (b % 26))))
  const pool = Buffer.alloc(16 << 20)
  for (let at = 0; at < pool.length;) {
    const word = words[rng.int(words.length)]
    at += word.copy(pool, at)
    if (at < pool.length) pool[at++] = 32 + rng.int(2) * 10
  }
  const out = createWriteStream(path, { highWaterMark: 8 << 20 })
  for (let done = 0; done < size; done += 1 << 20) {
    const at = rng.int(15) << 20
    const piece = rng.int(10) === 0 ? Buffer.alloc(1 << 20) : pool.subarray(at, at + (1 << 20))
    if (!out.write(Buffer.from(piece))) await once(out, 'drain')
  }
  out.end()
  await once(out, 'finish')
}

const KINDS = [
  { kind: 'zstd', ext: '.zst', pack: 'zstd -q -T0 -3 -c', unpack: 'zstd -q -d -c', program: 'zstd' },
  { kind: 'lzo', ext: '.lzo', pack: 'lzop -c', unpack: 'lzop -d -c', program: 'lzop' },
  { kind: 'gzip', ext: '.gz', pack: 'gzip -1 -c', unpack: 'gzip -d -c', program: undefined },
] as const
const EXTERNAL = 'VMAPIPE_EXTERNAL_COMPRESSION=1'

export async function benchCompression (dir: string, gib: number): Promise<void> {
  // A quarter of BENCH_GIB: the compressed rows are slow to set up, and the ratios settle early.
  const size = Math.max(64 << 20, Math.round(gib * GIB / 4 / (1 << 20)) << 20)
  const disk = join(dir, 'disk.raw')
  process.stderr.write(`generating a ${(size / MB).toFixed(0)} MB compressible disk and its archive\n`)
  await writeCompressibleDisk(disk, size)
  const archive = join(dir, 'a.vma')
  const table = new Table('compression', 'archive')
  await shell(`${vma} create -q ${q(archive)} -d drive-scsi0=${q(disk)}`)
  const bytes = statSync(archive).size
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })

  for (const { kind, ext, pack, unpack, program } of KINDS) {
    const compressed = join(dir, `a.vma${ext}`)
    await shell(`${pack} ${q(archive)} > ${q(compressed)}`)
    const ratio = (bytes / statSync(compressed).size).toFixed(2)
    const peer = `${unpack} ${q(compressed)} | cat > /dev/null`
    const peerName = `${unpack.split(' ')[0]} -d | cat (${ratio}:1)`
    // Built in, then (for zstd and lzo) through the program, the path of earlier versions.
    for (const [how, env] of [['built in', ''], ...(program ? [[`${program} program`, `${EXTERNAL} `]] : [])]) {
      table.add(`${kind}: vma verify, ${how}`, bytes, await pair(`${env}${vma} verify -q ${q(compressed)}`, peer), peerName)
      table.add(`${kind}: vma extract to a directory, ${how}`, bytes,
        await pair(`${env}${vma} extract -q ${q(compressed)} ${q(out)}`, peer, { after: clean }), peerName)
    }
    rmSync(compressed)
  }

  // Writing: vma create --compress against the program compressing the uncompressed archive.
  for (const { kind, ext, pack, program } of KINDS) {
    if (program === undefined) continue
    const target = join(dir, `c.vma${ext}`)
    const create = `${vma} create -q --force ${q(target)} -d drive-scsi0=${q(disk)}`
    const alone = `${pack} ${q(archive)} > ${q(target)}`
    const peerName = `${pack.replace(' -c', '')} archive > file`
    table.add(`${kind}: vma create --compress ${kind}, built in`, bytes, await pair(create, alone), peerName)
    table.add(`${kind}: vma create --compress ${kind}, ${program} program`, bytes, await pair(`${EXTERNAL} ${create}`, alone), peerName)
    rmSync(target, { force: true })
  }
  table.print(`Compressed archives: ${(bytes / MB).toFixed(0)} MB archive`)
}
