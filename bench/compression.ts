/**
 * Compressed archives: our engines (zstd-napi or node:zlib, our LZO1X, zlib) against
 * the same commands running the `zstd` and `lzop` programs (VMAPIPE_EXTERNAL_COMPRESSION=1,
 * the path of earlier versions) and against the programs alone, in interleaved pairs of
 * the same run. Wall and CPU seconds (CPU: all threads and children).
 */
import { spawn } from 'node:child_process'
import { createWriteStream, rmSync, statSync } from 'node:fs'
import { once } from 'node:events'
import { join } from 'node:path'
import { Rng } from '../test/helpers/random.js'
import { GIB, MB, q, vma } from './lib.js'

interface Run { seconds: number, cpu: number }

/** Runs a bash script; CPU time is what bash's `times` says its children used. */
async function timedCpu (script: string): Promise<Run> {
  const started = process.hrtime.bigint()
  const child = spawn('bash', ['-c', `set -o pipefail; ${script}\ntimes >&2`], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  if (code !== 0) throw new Error(`${script} failed (${code}): ${stderr}`)
  const children = stderr.trim().split('\n').pop() ?? ''
  const cpu = [...children.matchAll(/(\d+)m([\d.]+)s/g)].reduce((sum, m) => sum + Number(m[1]) * 60 + Number(m[2]), 0)
  return { seconds, cpu }
}

/** The best (by wall time) of `n` runs of each script, taken in turns so a busy moment of the machine hits them alike. */
async function interleaved (n: number, scripts: string[], after?: () => void): Promise<Run[]> {
  const top: Array<Run | undefined> = scripts.map(() => undefined)
  for (let i = 0; i < n; i++) {
    for (const [k, script] of scripts.entries()) {
      const r = await timedCpu(script)
      after?.()
      if (top[k] === undefined || r.seconds < top[k].seconds) top[k] = r
    }
  }
  return top as Run[]
}

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

const rows: string[][] = []
function row (job: string, r: Run, bytes: number, peer?: Run, peerName?: string): void {
  rows.push([job, r.seconds.toFixed(2), r.cpu.toFixed(2), (bytes / MB / r.seconds).toFixed(0),
    peer ? `${(peer.seconds / r.seconds).toFixed(2)}x ${peerName}` : ''])
}

const KINDS = [
  { kind: 'zstd', ext: '.zst', pack: 'zstd -q -T0 -3 -c', unpack: 'zstd -q -d -c', program: 'zstd' },
  { kind: 'lzo', ext: '.lzo', pack: 'lzop -c', unpack: 'lzop -d -c', program: 'lzop' },
  { kind: 'gzip', ext: '.gz', pack: 'gzip -1 -c', unpack: 'gzip -d -c', program: undefined },
] as const
const EXTERNAL = 'VMAPIPE_EXTERNAL_COMPRESSION=1'
/** Runs of each job; the best counts. This VM is shared and noisy, so more than the other suites. */
const ROUNDS = 5

export async function benchCompression (dir: string, gib: number): Promise<void> {
  // A quarter of BENCH_GIB: the compressed rows are slow to set up, and the ratios settle early.
  const size = Math.max(64 << 20, Math.round(gib * GIB / 4 / (1 << 20)) << 20)
  const disk = join(dir, 'disk.raw')
  process.stderr.write(`generating a ${(size / MB).toFixed(0)} MB compressible disk and its archive\n`)
  await writeCompressibleDisk(disk, size)
  const archive = join(dir, 'a.vma')
  await timedCpu(`${vma} create -q ${q(archive)} -d drive-scsi0=${q(disk)}`)
  const bytes = statSync(archive).size
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })

  for (const { kind, ext, pack, unpack, program } of KINDS) {
    const compressed = join(dir, `a.vma${ext}`)
    await timedCpu(`${pack} ${q(archive)} > ${q(compressed)}`)
    const ratio = (bytes / statSync(compressed).size).toFixed(2)
    const verify = [
      `${vma} verify -q ${q(compressed)}`,
      ...(program ? [`${EXTERNAL} ${vma} verify -q ${q(compressed)}`] : []),
      `${unpack} ${q(compressed)} | cat > /dev/null`,
    ]
    const [ours, theirs, alone] = await interleaved(ROUNDS, verify)
    const peer = program ? alone : theirs
    const peerName = `${kind === 'gzip' ? 'gzip' : program as string} -d | cat`
    row(`${kind} (${ratio}:1): ${unpack.split(' ')[0]} -d | cat > /dev/null`, peer, bytes)
    row(`${kind}: vma verify, built in`, ours, bytes, peer, peerName)
    if (program) row(`${kind}: vma verify, ${program} program`, theirs, bytes, peer, peerName)
    const extract = [`${vma} extract -q ${q(compressed)} ${q(out)}`, ...(program ? [`${EXTERNAL} ${vma} extract -q ${q(compressed)} ${q(out)}`] : [])]
    const [oursX, theirsX] = await interleaved(ROUNDS, extract, clean)
    row(`${kind}: vma extract to a directory, built in`, oursX, bytes, peer, peerName)
    if (program) row(`${kind}: vma extract to a directory, ${program} program`, theirsX, bytes, peer, peerName)
    rmSync(compressed)
  }

  // Writing: vma create --compress against the program compressing the uncompressed archive.
  for (const { kind, ext, pack, program } of KINDS) {
    if (program === undefined) continue
    const target = join(dir, `c.vma${ext}`)
    const create = `${vma} create -q --force ${q(target)} -d drive-scsi0=${q(disk)}`
    const [ours, theirs, alone] = await interleaved(ROUNDS, [create, `${EXTERNAL} ${create}`, `${pack} ${q(archive)} > ${q(target)}`])
    row(`${kind}: ${pack.replace(' -c', '')} archive > file`, alone, bytes)
    row(`${kind}: vma create --compress ${kind}, built in`, ours, bytes, alone, program)
    row(`${kind}: vma create --compress ${kind}, ${program} program`, theirs, bytes, alone, program)
    rmSync(target, { force: true })
  }

  const table = [['job', 'seconds', 'CPU s', 'MB/s of archive', 'speed vs peer (peer time / ours)'], ...rows]
  const widths = table[0].map((_, i) => Math.max(...table.map(r => r[i].length)))
  process.stdout.write(`\nCompressed archives: ${(bytes / MB).toFixed(0)} MB archive, best of ${ROUNDS} interleaved\n\n`)
  for (const [i, r] of table.entries()) {
    process.stdout.write(`| ${r.map((c, j) => c.padEnd(widths[j])).join(' | ')} |\n`)
    if (i === 0) process.stdout.write(`| ${widths.map(w => '-'.repeat(w)).join(' | ')} |\n`)
  }
}
