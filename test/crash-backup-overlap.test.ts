/**
 * Runs of one backup job that overlap: exactly one writes an archive, the
 * other does nothing (exit 4), never a failure and never two archives; two
 * runs that both find a dead run's lock do not both take it over.
 */
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { VMA, run, tempDir } from './helpers/run.js'
import { logged } from './helpers/logged.js'
import { writeJob } from './helpers/fixtures.js'
import { runBackupJob } from '../lib/backup/run.js'
import { acquireLock } from '../lib/backup/lock.js'
import { VmapipeError } from '../lib/errors.js'

const ARCHIVE = /^vzdump-qemu-100-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}\.vma$/

/** Two runs of `job` started together: their exit codes, sorted, and what they logged. */
async function pair (job: string): Promise<{ codes: Array<number | null>, results: unknown[] }> {
  const both = await Promise.all([0, 1].map(async () => await run(process.execPath, [VMA, 'backup', job])))
  const results = new Set(both.flatMap(r => logged(r).map(l => (l as { result?: string }).result).filter(x => x !== undefined)))
  return { codes: both.map(r => r.code).sort(), results: [...results].sort() }
}

/**
 * A lock left by a run that is gone: by default this process's pid with
 * another start time, as after a reboot that reused it; or a pid that has exited.
 */
function deadLock (path: string, pid?: number): void {
  writeFileSync(path, JSON.stringify({ pid: pid ?? process.pid, host: hostname(), started: '2024-01-01T00:00:00.000Z', ...(pid === undefined ? { start: 1 } : {}) }) + '\n')
}

t.test('20 pairs of runs started together: one archive, one exit 0 and one exit 4, each time', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, Buffer.alloc(65536, 7))
  const tally = new Map<string, number>()
  for (let i = 0; i < 20; i++) {
    const target = join(dir, `t${i}`)
    mkdirSync(target)
    // Every other pair finds a dead run's lock: both may try to take it over at once.
    if (i % 2 === 1) deadLock(join(target, '.vzdump-qemu-100.lock'))
    const { codes, results } = await pair(writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk }], target, compression: 'none' }))
    const files = readdirSync(target)
    const archives = files.filter(f => ARCHIVE.test(f)).length
    const key = `exits ${codes.join(',')}, ${archives} archive(s), results ${results.join(',')}${files.some(f => f.startsWith('.')) ? ', dot files left' : ''}`
    tally.set(key, (tally.get(key) ?? 0) + 1)
  }
  t.same(Object.fromEntries(tally), { 'exits 0,4, 1 archive(s), results nothing-done,ok': 20 }, 'never two archives, never a failure')
})

t.test('a run whose archive name is taken for this second moves to the next second', async t => {
  const dir = tempDir(t)
  const target = join(dir, 'dump')
  mkdirSync(target)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, Buffer.alloc(65536, 9))
  const job = { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk }], target, compression: 'none' as const }
  const now = new Date(2024, 0, 31, 2, 0, 1, 500)
  const first = await runBackupJob(job, { now })
  const second = await runBackupJob(job, { now })
  t.match(first.archive, /vzdump-qemu-100-2024_01_31-02_00_01\.vma$/)
  t.match(second.archive, /vzdump-qemu-100-2024_01_31-02_00_02\.vma$/, 'the given time, one second on')
  // With the clock: back to back, most often inside one second.
  const a = await runBackupJob(job)
  const b = await runBackupJob(job)
  t.not(a.archive, b.archive, 'two runs one after the other: two names')
  t.equal(readdirSync(target).filter(f => ARCHIVE.test(f)).length, 4)
  t.equal(readdirSync(target).filter(f => f.endsWith('.log')).length, 4, 'each with its own log')
})

t.test('taking over a stale lock', async t => {
  const dir = tempDir(t)
  const lock = join(dir, 'x.lock')

  await t.test('a pid reused by another program does not keep a lock alive', async t => {
    deadLock(lock)
    const l = await acquireLock(lock, 'x')
    t.equal(l.tookOverFrom?.pid, process.pid)
    await l.release()
    t.same(readdirSync(dir), [])
  })

  await t.test('a takeover in progress in a live run: this one does nothing', async t => {
    deadLock(lock)
    writeFileSync(`${lock}.takeover`, JSON.stringify({ pid: process.ppid, host: hostname(), started: new Date().toISOString() }))
    const err = await acquireLock(lock, 'x').then(() => undefined, (e: unknown) => e)
    t.ok(err instanceof VmapipeError && err.code === 'E_LOCKED', 'E_LOCKED')
    t.same(readdirSync(dir).sort(), ['x.lock', 'x.lock.takeover'], 'neither is touched')
  })

  await t.test('a takeover marker left by a dead run is removed, and the lock taken', async t => {
    writeFileSync(`${lock}.takeover`, JSON.stringify({ pid: process.pid, host: hostname(), started: new Date().toISOString(), start: 1 }))
    const l = await acquireLock(lock, 'x')
    t.equal(l.tookOverFrom?.pid, process.pid)
    t.same(readdirSync(dir), ['x.lock'])
    await l.release()
  })

  await t.test('fifty takers at once in one process: exactly one gets the lock', async t => {
    deadLock(lock, spawnSync('true').pid)
    const tries = await Promise.allSettled(Array.from({ length: 50 }, async () => await acquireLock(lock, 'x')))
    const got = tries.filter(r => r.status === 'fulfilled')
    t.equal(got.length, 1, 'one lock')
    t.ok(tries.every(r => r.status === 'fulfilled' || (r.reason instanceof VmapipeError && r.reason.code === 'E_LOCKED')), 'the others: E_LOCKED')
    await got[0].value.release()
    t.same(readdirSync(dir), [])
  })
})
