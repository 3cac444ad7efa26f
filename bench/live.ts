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
import { GIB, MB, type Run, Table, median, pair, processUsage, q, shell, vma } from './lib.js'
import type { Teardown } from '../test/helpers/nbd.js'
import { spawnServe } from '../test/helpers/live.js'
import { openNbdDisk } from '../lib/nbd/client.js'

/** A serve run: also when cluster 0 could first be read. */
interface Served extends Run { first: number }

export async function benchLive (dir: string, gib: number): Promise<void> {
  const size = Math.round(gib * GIB / 65536) * 65536
  const archive = join(dir, 'a.vma')
  process.stderr.write(`generating a ${(size / MB).toFixed(0)} MB disk's archive, compressed with zstd -3\n`)
  await writeBenchArchive(archive, size, 'forward')
  const zst = `${archive}.zst`
  await shell(`zstd -q -T0 -3 -c ${q(archive)} > ${q(zst)}`)
  const bytes = statSync(archive).size
  rmSync(archive)
  await shell(`cat ${q(zst)} > /dev/null`) // warm the page cache
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })

  const table = new Table('live', 'archive')
  const piped = `zstd -q -d -c ${q(zst)} | ${vma} extract -q - ${q(out)}`
  const peerName = 'zstd -dc | vma extract - DIR'
  table.add('vma extract a.vma.zst DIR (built-in zstd)', bytes, await pair(`${vma} extract -q ${q(zst)} ${q(out)}`, piped, { after: clean }), peerName)
  const firsts: Array<[string, number[]]> = []
  for (const [job, args] of [['vma serve a.vma.zst', [zst]], ['vma serve a.vma.zst --keep DIR', [zst, '--keep', out]]] as const) {
    const runs: Served[] = []
    const result = await pair(async () => { const r = await served(dir, [...args]); runs.push(r); return r }, piped, { after: clean })
    table.add(`${job}: until the pass is complete`, bytes, result, peerName)
    firsts.push([job, runs.map(r => r.first)])
  }
  table.print(`Live restore of a ${(bytes / MB).toFixed(0)} MB archive (zstd, ${(bytes / statSync(zst).size).toFixed(2)}:1)`)
  const first = firsts.map(([job, f]) => `${job} ${median(f).toFixed(3)}`).join('; ')
  process.stdout.write(`\nfirst byte readable over NBD, seconds from the start, median: ${first}\n`)
}

/** `vma serve ARGS`: seconds from its start to a read of cluster 0 over NBD, and to the end of the pass. */
async function served (dir: string, args: string[]): Promise<Served> {
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
    const wall = (performance.now() - started) / 1000
    const { cpu, rssKiB } = processUsage(server.child.pid as number)
    await server.stop()
    return { first, wall, cpu, rssKiB, stderr: server.stderr() }
  } finally {
    for (const fn of cleanups.reverse()) await fn()
  }
}
