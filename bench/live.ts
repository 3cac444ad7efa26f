/**
 * Live restore: `vma serve backup.vma.zst` against `zstd -d | vma extract`
 * and `vma extract backup.vma.zst` of the same archive, in the same run. For each: when the first byte of the
 * disk can be read (for extract, once it has finished; for serve, an NBD read
 * of cluster 0 from the moment the command starts) and when the whole disk is
 * there (serve: the pass complete; with --keep, the disk restored into a directory).
 */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive } from './archives.js'
import { GIB, MB, logs, peakMiB, q, timed, vma } from './lib.js'
import type { Teardown } from '../test/helpers/nbd.js'
import { spawnServe } from '../test/helpers/live.js'
import { openNbdDisk } from '../lib/nbd/client.js'

const ROUNDS = 3
interface Times { first: number, whole: number, rssMiB: number }

export async function benchLive (dir: string, gib: number): Promise<void> {
  const size = Math.round(gib * GIB / 65536) * 65536
  const archive = join(dir, 'a.vma')
  process.stderr.write(`generating a ${(size / MB).toFixed(0)} MB disk's archive, compressed with zstd -3\n`)
  await writeBenchArchive(archive, size, 'forward')
  const zst = `${archive}.zst`
  await timed(`zstd -q -T0 -3 -c ${q(archive)} > ${q(zst)}`)
  const bytes = statSync(archive).size
  rmSync(archive)
  await timed(`cat ${q(zst)} > /dev/null`) // warm the page cache
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })

  const rows: Array<[string, Times]> = []
  const extract = await bestOf(async () => {
    const t = await timed(`zstd -q -d -c ${q(zst)} | ${vma} extract --log-format json - ${q(out)}`)
    clean()
    return { first: t.seconds, whole: t.seconds, rssMiB: Number(peakMiB(t, 'extract')) }
  })
  rows.push(['zstd -dc a.vma.zst piped to vma extract - DIR', extract])
  rows.push(['vma extract a.vma.zst DIR (built-in zstd)', await bestOf(async () => {
    const t = await timed(`${vma} extract --log-format json ${q(zst)} ${q(out)}`)
    clean()
    return { first: t.seconds, whole: t.seconds, rssMiB: Number(peakMiB(t, 'extract')) }
  })])
  rows.push(['vma serve a.vma.zst', await bestOf(async () => await served(dir, [zst]))])
  rows.push(['vma serve a.vma.zst --keep DIR', await bestOf(async () => {
    const t = await served(dir, [zst, '--keep', out])
    clean()
    return t
  })])

  const table = [['job', 'first byte readable (s)', 'whole disk (s)', 'MB/s of archive', 'whole disk, speed vs extract', 'peak RSS (MiB)'],
    ...rows.map(([job, t]) => [job, t.first.toFixed(3), t.whole.toFixed(2), (bytes / MB / t.whole).toFixed(0), `${(extract.whole / t.whole).toFixed(2)}x`,
      t.rssMiB.toFixed(0)])]
  const widths = table[0].map((_, i) => Math.max(...table.map(r => r[i].length)))
  process.stdout.write(`\nLive restore of a ${(bytes / MB).toFixed(0)} MB archive (zstd, ${(bytes / statSync(zst).size).toFixed(2)}:1), best of ${ROUNDS}\n\n`)
  for (const [i, r] of table.entries()) {
    process.stdout.write(`| ${r.map((c, j) => c.padEnd(widths[j])).join(' | ')} |\n`)
    if (i === 0) process.stdout.write(`| ${widths.map(w => '-'.repeat(w)).join(' | ')} |\n`)
  }
}

/** The best of ROUNDS runs, each time on its own; the highest peak RSS. */
async function bestOf (job: () => Promise<Times>): Promise<Times> {
  let top: Times = { first: Infinity, whole: Infinity, rssMiB: 0 }
  for (let i = 0; i < ROUNDS; i++) {
    const t = await job()
    top = { first: Math.min(top.first, t.first), whole: Math.min(top.whole, t.whole), rssMiB: Math.max(top.rssMiB, t.rssMiB) }
  }
  return top
}

/** `vma serve ARGS`: seconds from its start to a read of cluster 0 over NBD, and to the end of the pass. */
async function served (dir: string, args: string[]): Promise<Times> {
  const cleanups: Array<() => void | Promise<void>> = []
  const servers: Teardown = { teardown: fn => { cleanups.push(fn) } }
  const socket = join(dir, 'live.sock')
  try {
    const started = performance.now()
    const server = spawnServe(servers, [...args, '--socket', socket, '--log-format', 'json'])
    let first = 0
    for (;;) {
      const disk = await openNbdDisk(`nbd+unix:///drive-scsi0?socket=${socket}`).catch(() => undefined)
      if (disk === undefined) {
        if (server.child.exitCode !== null) throw new Error(`vma serve exited: ${server.stderr()}`)
        await new Promise(resolve => setTimeout(resolve, 5))
        continue
      }
      await disk.read(Buffer.alloc(65536), 0)
      first = (performance.now() - started) / 1000
      await disk.close()
      break
    }
    await server.waitLog(l => typeof l.msg === 'string' && l.msg.includes('pass complete'), 3_600_000)
    const whole = (performance.now() - started) / 1000
    await server.stop()
    const stopped = logs(server.stderr()).find(l => l.msg === 'server stopped')
    return { first, whole, rssMiB: Number(stopped?.maxRssKiB) / 1024 }
  } finally {
    for (const fn of cleanups.reverse()) await fn()
  }
}
