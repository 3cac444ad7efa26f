import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { VMA, cmp, exits, run, smallFileSystem, tempDir, vma } from './helpers/run.js'
import { failure, logged } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture, writeJob } from './helpers/fixtures.js'
import { planPrune, type Retention } from '../lib/backup/retention.js'
import { archiveName, parseArchiveName } from '../lib/backup/naming.js'
import { checkJob } from '../lib/backup/job.js'
import { runBackupJob } from '../lib/backup/run.js'

const NAME = /^vzdump-qemu-100-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}\.vma\.zst$/

t.test('a job with two disks and configs: a vzdump-named archive that verifies and extracts equal', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(61))
  const target = join(dir, 'dump')
  mkdirSync(target)
  const conf = join(dir, '100.conf')
  writeFileSync(conf, 'cores: 2\n')
  const job = writeJob(dir, {
    vmid: 100,
    disks: [{ name: 'drive-scsi0', path: fx.sources.get('drive-scsi0') }, { name: 'drive-efidisk0', path: fx.sources.get('drive-efidisk0'), format: 'raw' }],
    configs: [{ name: 'qemu-server.conf', path: conf }, join(dir, 'test.vma')].slice(0, 1),
    target,
    verify: true,
    notes: 'before the upgrade',
    log: { file: join(dir, 'logs', 'job.log') },
  })
  const r = await vma(['backup', job])
  exits(t, r, 0)
  const archives = readdirSync(target).filter(f => f.endsWith('.vma.zst'))
  t.equal(archives.length, 1)
  t.match(archives[0], NAME, 'named as vzdump names it')
  const archive = join(target, archives[0])
  exits(t, await vma(['verify', archive]), 0, 'vma verify accepts it')
  exits(t, await vma(['extract', archive, join(dir, 'out')]), 0)
  t.ok(cmp(join(dir, 'out/disk-drive-scsi0.raw'), fx.sources.get('drive-scsi0') as string))
  t.ok(cmp(join(dir, 'out/disk-drive-efidisk0.raw'), fx.sources.get('drive-efidisk0') as string))
  t.equal(readFileSync(join(dir, 'out/qemu-server.conf'), 'utf8'), 'cores: 2\n')
  const base = archives[0].replace(/\.vma\.zst$/, '')
  t.match(readFileSync(join(target, `${base}.log`), 'utf8'), /INFO: finished backup of VM 100/, 'a .log sidecar')
  t.equal(readFileSync(join(target, `${archives[0]}.notes`), 'utf8'), 'before the upgrade')
  t.same(readdirSync(target).filter(f => f.startsWith('.')), [], 'no lock or temporary file left')
  const lines = readFileSync(join(dir, 'logs', 'job.log'), 'utf8').trim().split('\n').map(l => JSON.parse(l) as Record<string, unknown>)
  const done = lines.find(l => l.msg === 'backup job done') as Record<string, unknown>
  t.match(done, { job: 'vzdump-qemu-100', result: 'ok', archive, diskBytes: 3158016 + 540672 })
  t.ok(typeof done.rate === 'number' && typeof done.seconds === 'number' && typeof done.bytes === 'number', 'bytes, rate and duration logged')
  t.equal(r.stderr, '', 'with a log file, stderr stays quiet')
})

t.test('overlapping runs: the second refuses (exit 4); a SIGKILLed run leaves no archive and the next run cleans up', async t => {
  const dir = tempDir(t)
  const target = join(dir, 'dump')
  mkdirSync(target)
  const fifo = join(dir, 'disk.fifo')
  spawnSync('mkfifo', [fifo])
  const size = 4 << 20
  const slow = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: fifo, size }], target, compression: 'none' })
  const first = spawn(process.execPath, [VMA, 'backup', slow], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  const firstDone = new Promise<number | null>(resolve => first.on('close', resolve))
  for (let i = 0; i < 100 && !existsSync(join(target, '.vzdump-qemu-100.lock')); i++) await new Promise(resolve => setTimeout(resolve, 50))
  const second = await vma(['backup', slow])
  exits(t, second, 4, 'the second run does nothing')
  t.match(logged(second).find(l => l.result === 'nothing-done'), { code: 'E_LOCKED' }, 'logged as nothing-done, E_LOCKED')
  // Now feed the first run its disk.
  const writer = spawn('sh', ['-c', `head -c ${size} /dev/urandom > '${fifo}'`])
  await new Promise(resolve => writer.on('close', resolve))
  t.equal(await firstDone, 0, 'the first run completes')
  t.equal(readdirSync(target).filter(f => NAME.test(f.replace('.vma', '.vma.zst'))).length, 1)

  // A run killed in the middle of writing.
  await new Promise(resolve => setTimeout(resolve, 1100)) // a new second, a new archive name
  const victim = spawn(process.execPath, [VMA, 'backup', slow], { stdio: ['ignore', 'ignore', 'ignore'], env: { ...process.env, NODE_OPTIONS: '' } })
  // Half a disk, then silence: the run is caught writing.
  const feeder = spawn('sh', ['-c', `(head -c ${size >> 1} /dev/urandom; sleep 30) > '${fifo}'`], { stdio: 'ignore', detached: true })
  for (let i = 0; i < 100 && !readdirSync(target).some(f => f.includes('.partial-')); i++) await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(readdirSync(target).some(f => f.includes('.partial-')), 'the killed run was writing')
  victim.kill('SIGKILL')
  await new Promise(resolve => victim.on('close', resolve))
  process.kill(-(feeder.pid as number), 'SIGKILL')
  const archives = readdirSync(target).filter(f => /\.vma$/.test(f))
  t.equal(archives.length, 1, 'no new archive under a final name')
  t.ok(existsSync(join(target, '.vzdump-qemu-100.lock')), 'its lock is left behind')
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, Buffer.alloc(size, 5))
  await new Promise(resolve => setTimeout(resolve, 1100))
  const next = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk }], target, compression: 'none' })])
  exits(t, next, 0, 'the next run succeeds')
  t.ok(logged(next).some(l => l.level === 40 && typeof l.stalePid === 'number'), 'it logged taking over the dead run\'s lock')
  t.ok(logged(next).some(l => l.level === 40 && /^\.vzdump-qemu-100-.*\.partial-/.test(String(l.file))), 'and removing its partial archive')
  t.same(readdirSync(target).filter(f => f.startsWith('.')), [], 'leftovers and lock gone')
  t.equal(readdirSync(target).filter(f => /\.vma$/.test(f)).length, 2)
})

t.test('retention: keep-last/daily/weekly/monthly as Proxmox prunes, protected kept, sidecars removed', async t => {
  // Fabricated archives, one a day at 02:00 from 2024-01-01 to 2024-03-31, plus a second one on some days.
  const dir = tempDir(t)
  const names: string[] = []
  for (let d = new Date(2024, 0, 1, 2); d < new Date(2024, 3, 1); d.setDate(d.getDate() + 1)) names.push(archiveName(100, d, 'zstd'))
  names.push(archiveName(100, new Date(2024, 2, 30, 14), 'zstd'), archiveName(100, new Date(2024, 0, 15, 14), 'zstd'))
  const protectedOne = archiveName(100, new Date(2024, 0, 3, 2), 'zstd')
  for (const n of names) {
    writeFileSync(join(dir, n), '')
    writeFileSync(join(dir, n.replace('.vma.zst', '.log')), '')
    writeFileSync(join(dir, `${n}.notes`), '')
  }
  writeFileSync(join(dir, `${protectedOne}.protected`), '')
  writeFileSync(join(dir, archiveName(101, new Date(2024, 0, 1, 2), 'zstd')), '') // another VM: never touched
  const policy: Retention = { 'keep-last': 2, 'keep-daily': 3, 'keep-weekly': 2, 'keep-monthly': 3 }
  // The expectation, worked out by hand (newest first):
  const expected = [
    archiveName(100, new Date(2024, 3, 1, 2), 'zstd'), // the new backup (keep-last)
    archiveName(100, new Date(2024, 2, 31, 2), 'zstd'), // keep-last
    archiveName(100, new Date(2024, 2, 30, 14), 'zstd'), // daily: 03-30 (its newest)
    archiveName(100, new Date(2024, 2, 29, 2), 'zstd'), // daily: 03-29
    archiveName(100, new Date(2024, 2, 28, 2), 'zstd'), // daily: 03-28
    archiveName(100, new Date(2024, 2, 24, 2), 'zstd'), // weekly: 2024-W12 (Sunday 03-24); W13 is covered by kept ones
    archiveName(100, new Date(2024, 2, 17, 2), 'zstd'), // weekly: 2024-W11
    archiveName(100, new Date(2024, 1, 29, 2), 'zstd'), // monthly: 2024-02 (March is covered)
    archiveName(100, new Date(2024, 0, 31, 2), 'zstd'), // monthly: 2024-01
    protectedOne,
  ]
  const fx = writeFixture(dir, multiDeviceSpec(62))
  const result = await runBackupJob(checkJob({ vmid: 100, disks: [{ name: 'drive-efidisk0', path: fx.sources.get('drive-efidisk0') }], target: dir, retention: policy }), { now: new Date(2024, 3, 1, 2) })
  t.equal(result.pruneFailures.length, 0)
  const left = readdirSync(dir).filter(f => parseArchiveName(f)?.vmid === 100).sort()
  t.same(left, [...expected].sort(), 'exactly the expected archives remain')
  for (const n of expected.filter(n => n !== expected[0])) t.ok(existsSync(join(dir, `${n}.notes`)), `${n}: notes kept with it`)
  for (const n of names.filter(n => !expected.includes(n))) {
    t.notOk(existsSync(join(dir, n.replace('.vma.zst', '.log'))), `${n}: its .log went with it`)
    t.notOk(existsSync(join(dir, `${n}.notes`)), `${n}: its .notes went with it`)
  }
  t.ok(existsSync(join(dir, archiveName(101, new Date(2024, 0, 1, 2), 'zstd'))), 'other VMs untouched')
})

t.test('planPrune follows the rules on its own', async t => {
  const at = (d: number, h = 2): { name: string, time: Date, protected: boolean } => ({ name: `a${d}-${h}`, time: new Date(2024, 0, d, h), protected: false })
  const items = [at(1), at(2), at(2, 10), at(3), at(8), at(9)]
  const keep = (policy: Retention): string[] => [...planPrune(items, policy)].filter(([, m]) => m === 'keep').map(([n]) => n).sort()
  t.same(keep({}), items.map(i => i.name).sort(), 'no policy keeps everything')
  t.same(keep({ 'keep-last': 2 }), ['a8-2', 'a9-2'])
  t.same(keep({ 'keep-daily': 2 }), ['a8-2', 'a9-2'])
  t.same(keep({ 'keep-daily': 4 }), ['a2-10', 'a3-2', 'a8-2', 'a9-2'], 'the newest of a day stands for it')
  t.same(keep({ 'keep-weekly': 2 }), ['a3-2', 'a9-2'], '2024-01-01..07 is week 1, 08..14 week 2')
  t.same(keep({ 'keep-last': 1, 'keep-weekly': 2 }), ['a3-2', 'a9-2'], 'a week covered by keep-last does not use the quota')
})

t.test('bad job files: exit 2 naming the key', async t => {
  const dir = tempDir(t)
  for (const [job, key] of [
    [{ vmid: 100, disks: [], target: dir }, 'job.disks'],
    [{ vmid: 100, disks: [{ name: 'a', path: '/x' }], target: dir, retention: { 'keep-lats': 1 } }, 'job.retention.keep-lats'],
    [{ vmid: 'x', disks: [{ name: 'a', path: '/x' }], target: dir }, 'job.vmid'],
    [{ vmid: 1, disks: [{ name: 'a' }], target: dir }, 'job.disks[0].path'],
    [{ vmid: 1, disks: [{ name: 'a', path: '/x' }], target: dir, compression: 'xz' }, 'job.compression'],
  ] as Array<[unknown, string]>) {
    const r = await vma(['backup', writeJob(dir, job as Record<string, unknown>)])
    exits(t, r, 2)
    t.equal(failure(r).code, 'E_JOB', `${key}: E_JOB`)
    t.ok(failure(r).msg?.startsWith(`${key}:`), `the error names ${key}`)
  }
  const missing = await vma(['backup', join(dir, 'nope.json')])
  exits(t, missing, 3)
})

t.test('a full disk during a run: exit 3, no partial archive, older archives intact', async t => {
  const dir = tempDir(t)
  const mnt = smallFileSystem(t, dir, '2m')
  if (mnt === undefined) return
  const older = archiveName(100, new Date(2024, 0, 1, 2), 'none')
  writeFileSync(join(mnt, older), 'an older archive')
  const disk = join(dir, 'disk.raw')
  const { Rng } = await import('./helpers/random.js')
  writeFileSync(disk, new Rng(63).fill(Buffer.alloc(8 << 20)))
  const r = await run(process.execPath, [VMA, 'backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk }], target: mnt, compression: 'none', retention: { 'keep-last': 1 } })])
  exits(t, r, 3)
  t.match(logged(r).find(l => l.result === 'failed'), { code: 'E_IO' }, 'the run failed with E_IO')
  t.same(readdirSync(mnt), [older], 'only the older archive, untouched')
  t.equal(readFileSync(join(mnt, older), 'utf8'), 'an older archive')
})
