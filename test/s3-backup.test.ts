import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { GetObjectCommand, ListMultipartUploadsCommand, ListObjectsV2Command, PutObjectCommand } from '@aws-sdk/client-s3'
import { VMA, cmp, exits, tempDir, vma } from './helpers/run.js'
import { logged } from './helpers/logged.js'
import { writeJob } from './helpers/fixtures.js'
import { needsS3, s3Store, type S3Store } from './helpers/s3.js'
import { s3FaultProxy } from './helpers/s3-fault-proxy.js'
import { S3BackupStore } from '../lib/backup/s3-store.js'
import { runBackupJob } from '../lib/backup/run.js'
import { checkJob } from '../lib/backup/job.js'
import { type LockObjects, acquireObjectLock } from '../lib/backup/object-lock.js'
import { VmapipeError } from '../lib/errors.js'

const ARCHIVE = /^vzdump-qemu-100-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}\.vma(\.zst)?$/
const LOCK = 'pve1/locks/vzdump-qemu-100.lock'

interface Bucket { name: string, target: string }

async function keys (store: S3Store, bucket: string): Promise<string[]> {
  const listed = await store.client.send(new ListObjectsV2Command({ Bucket: bucket }))
  return (listed.Contents ?? []).map(o => o.Key as string).sort()
}

async function uploads (store: S3Store, bucket: string): Promise<string[]> {
  const listed = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket }))
  return (listed.Uploads ?? []).map(u => u.Key as string)
}

async function download (store: S3Store, bucket: string, key: string, path: string): Promise<void> {
  const res = await store.client.send(new GetObjectCommand({ Bucket: bucket, Key: key }))
  writeFileSync(path, await (res.Body as { transformToByteArray: () => Promise<Uint8Array> }).transformToByteArray())
}

async function text (store: S3Store, bucket: string, key: string): Promise<string> {
  const res = await store.client.send(new GetObjectCommand({ Bucket: bucket, Key: key }))
  return await (res.Body as { transformToString: () => Promise<string> }).transformToString()
}

const archivesIn = (all: string[]): string[] => all.filter(k => ARCHIVE.test(k.slice('pve1/'.length)))

/** A disk of random bytes with a zero run in the middle. */
function disk (dir: string, bytes: number, name = 'disk.raw'): string {
  const data = Buffer.alloc(bytes)
  randomBytes(bytes >> 1).copy(data)
  const path = join(dir, name)
  writeFileSync(path, data)
  return path
}

/** A lock object as a run on `host` writes it. */
/** A named pipe fed `bytes` of random data, then silent: a run reading it is caught mid-upload. */
function stalledFifo (dir: string, bytes: number): { path: string, stop: () => void } {
  const path = join(dir, 'disk.fifo')
  spawnSync('mkfifo', [path])
  const feeder = spawn('sh', ['-c', `(head -c ${bytes} /dev/urandom; sleep 60) > '${path}'`], { stdio: 'ignore', detached: true })
  return { path, stop: () => { try { process.kill(-(feeder.pid as number), 'SIGKILL') } catch {} } }
}

/** Waits (up to 20 s) until the bucket has an unfinished multipart upload. */
async function untilUploading (store: S3Store, bucket: string): Promise<void> {
  for (let i = 0; i < 200 && (await uploads(store, bucket)).length === 0; i++) await new Promise(resolve => setTimeout(resolve, 100))
}

function lockBody (host: string, pid: number, expires: Date): string {
  return JSON.stringify({ host, pid, start: 1, started: new Date(Date.now() - 3600_000).toISOString(), expires: expires.toISOString(), token: 'x' })
}

t.test('S3 backup jobs', needsS3, async t => {
  const store = await s3Store(t)
  const bucket = async (): Promise<Bucket> => {
    const name = await store.bucket()
    return { name, target: `s3://${name}/pve1/` }
  }
  const env = store.env

  await t.test('a job to s3, plain and zstd: archive, sidecars, the upload logged; extracts identical to the disks', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const scsi = disk(dir, 24 << 20)
    const efi = disk(dir, 128 << 10, 'efi.raw')
    const conf = join(dir, '100.conf')
    writeFileSync(conf, 'cores: 2\n')
    for (const compression of ['none', 'zstd'] as const) {
      const job = writeJob(dir, {
        vmid: 100,
        disks: [{ name: 'drive-scsi0', path: scsi }, { name: 'drive-efidisk0', path: efi }],
        configs: [{ name: 'qemu-server.conf', path: conf }],
        target: b.target,
        compression,
        verify: compression === 'zstd',
        notes: `notes ${compression}`,
        protected: compression === 'none',
      })
      const r = await vma(['backup', job], { env })
      exits(t, r, 0, `${compression}: exits 0`)
      const all = await keys(store, b.name)
      const archive = archivesIn(all).find(k => compression === 'zstd' ? k.endsWith('.zst') : k.endsWith('.vma')) as string
      t.ok(archive, `${compression}: the archive under a vzdump name`, { all })
      const uploaded = logged(r).find(l => l.msg === 'uploaded')
      t.match(uploaded, { bytes: Number, parts: Number, retries: 0, rate: Number }, 'the upload logged: bytes, parts, retries, rate')
      if (compression === 'none') t.ok((uploaded?.parts as number) >= 2, 'a multipart upload (12 MiB of data in 6 MiB parts)')
      t.match(logged(r).find(l => l.msg === 'backup job done'), { archive: `s3://${b.name}/${archive}`, result: 'ok' })
      t.ok(logged(r).some(l => l.abortedUploads === 0), 'the count of stale uploads aborted is logged')
      const base = archive.replace(/\.vma(\.zst)?$/, '')
      t.match(await text(store, b.name, `${base}.log`), /INFO: uploaded \d+ bytes in \d+ parts \(0 retried\)/, 'the .log sidecar, with the upload')
      t.equal(await text(store, b.name, `${archive}.notes`), `notes ${compression}`)
      t.equal(all.includes(`${archive}.protected`), compression === 'none', '.protected as asked')
      if (compression === 'zstd') t.ok(logged(r).some(l => l.msg === 'the archive reads back complete and consistent'), 'verified from the bucket')
      const out = join(dir, `out-${compression}`)
      exits(t, await vma(['extract', `s3://${b.name}/${archive}`, out], { env }), 0, 'vma extract s3://')
      t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), scsi), `${compression}: drive-scsi0 identical`)
      t.ok(cmp(join(out, 'disk-drive-efidisk0.raw'), efi), `${compression}: drive-efidisk0 identical`)
      t.equal(readFileSync(join(out, 'qemu-server.conf'), 'utf8'), 'cores: 2\n')
      t.notOk((await keys(store, b.name)).some(k => k.includes('/locks/')), 'the lock is released')
      t.same(await uploads(store, b.name), [], 'no unfinished upload')
      await new Promise(resolve => setTimeout(resolve, 1100)) // the next job: a new second, a new name
    }
  })

  await t.test('two jobs for one VM at once, from two processes: one archive, the other exits 4', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const job = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk(dir, 16 << 20) }], target: b.target, compression: 'none' })
    const [one, two] = await Promise.all([vma(['backup', job], { env }), vma(['backup', job], { env })])
    t.same([one.code, two.code].sort(), [0, 4], 'one wins, the other does nothing', { one: one.stderr, two: two.stderr })
    const loser = one.code === 4 ? one : two
    t.match(logged(loser).find(l => l.result === 'nothing-done'), { code: 'E_LOCKED' })
    t.equal(archivesIn(await keys(store, b.name)).length, 1, 'exactly one archive')
  })

  await t.test('the lock object: contenders in one process, a lock past its expiry, one before it, a dead holder on this host', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const saved = { ...process.env }
    Object.assign(process.env, env)
    t.teardown(() => { process.env = saved })
    // Three runs race for a free lock, then for a stale one: each time exactly one gets it.
    for (const stale of [false, true]) {
      if (stale) await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: lockBody('gone-host', 4242, new Date(Date.now() - 1000)) }))
      const stores = [0, 1, 2].map(() => new S3BackupStore(b.target))
      const got = await Promise.allSettled(stores.map(async s => await s.lock(100, 'VM 100')))
      const won = got.filter(g => g.status === 'fulfilled')
      t.equal(won.length, 1, `${stale ? 'a stale' : 'a free'} lock: one of three contenders takes it`)
      t.ok(got.every(g => g.status === 'fulfilled' || (g.reason as VmapipeError).code === 'E_LOCKED'), 'the others: E_LOCKED')
      const lock = (won[0] as PromiseFulfilledResult<Awaited<ReturnType<S3BackupStore['lock']>>>).value
      if (stale) t.match(lock.tookOverFrom, { host: 'gone-host', pid: 4242 }, 'it says whose lock it took over')
      t.match(JSON.parse(await text(store, b.name, LOCK)), { host: hostname(), pid: process.pid }, 'the lock names its holder')
      await lock.release()
      t.notOk((await keys(store, b.name)).includes(LOCK), 'released: deleted')
      for (const s of stores) s.close()
    }

    // Renewal: the holder moves its expiry on while it runs; a lock replaced under it (taken over) is lost, and the run told.
    const holder = new S3BackupStore(b.target, { lockTtlMs: 1500 })
    const held = await holder.lock(100, 'VM 100')
    const first = JSON.parse(await text(store, b.name, LOCK)) as { expires: string }
    await new Promise(resolve => setTimeout(resolve, 2500))
    const renewed = JSON.parse(await text(store, b.name, LOCK)) as { expires: string }
    t.ok(Date.parse(renewed.expires) > Date.parse(first.expires), 'renewed while held', { first, renewed })
    t.equal(held.lost?.aborted, false)
    const other = lockBody('other-host', 4242, new Date(Date.now() + 3600_000))
    await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: other }))
    await new Promise(resolve => setTimeout(resolve, 1500))
    t.equal(held.lost?.aborted, true, 'replaced by another run: lost')
    t.equal((held.lost?.reason as VmapipeError).code, 'E_LOCKED')
    await held.release()
    t.equal(await text(store, b.name, LOCK), other, 'releasing a lost lock leaves the new holder\'s alone')
    holder.close()

    const job = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk(dir, 1 << 20) }], target: b.target })
    const live = lockBody('other-host', 4242, new Date(Date.now() + 3600_000))
    await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: live }))
    const refused = await vma(['backup', job], { env })
    exits(t, refused, 4, 'a lock of another host before its expiry: nothing done')
    t.equal(await text(store, b.name, LOCK), live, 'and that lock left alone')
    t.equal(archivesIn(await keys(store, b.name)).length, 0)

    await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: lockBody('other-host', 4242, new Date(Date.now() - 1000)) }))
    const took = await vma(['backup', job], { env })
    exits(t, took, 0, 'past its expiry: taken over')
    t.match(logged(took).find(l => l.level === 40 && l.stalePid !== undefined), { stalePid: 4242, staleHost: 'other-host' })

    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' })
    const deadBody = lockBody(hostname(), Number(dead.stdout), new Date(Date.now() + 3600_000))
    await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: deadBody }))
    await new Promise(resolve => setTimeout(resolve, 1100))
    const sameHost = await vma(['backup', job], { env })
    exits(t, sameHost, 0, 'a holder on this host that is gone: taken over before the expiry')
    t.equal(archivesIn(await keys(store, b.name)).length, 2)
    t.notOk((await keys(store, b.name)).includes(LOCK))
  })

  await t.test('kill -9 mid-upload: nothing under the final key; the next run aborts the stale upload and completes', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const size = 32 << 20
    // 20 MiB, then silence: the run is caught with parts sent and the upload open.
    const fifo = stalledFifo(dir, 20 << 20)
    t.teardown(fifo.stop)
    const slow = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: fifo.path, size }], target: b.target, compression: 'none' })
    const victim = spawn(process.execPath, [VMA, 'backup', slow], { stdio: 'ignore', env: { ...process.env, NODE_OPTIONS: '', ...env } })
    await untilUploading(store, b.name)
    await new Promise(resolve => setTimeout(resolve, 1000)) // a part or two on their way
    t.equal((await uploads(store, b.name)).length, 1, 'the run was uploading')
    victim.kill('SIGKILL')
    await new Promise(resolve => victim.on('close', resolve))
    fifo.stop()
    const left = await keys(store, b.name)
    t.same(archivesIn(left), [], 'no object under the final key')
    t.ok(left.includes(LOCK), 'its lock is left behind')
    t.equal((await uploads(store, b.name)).length, 1, 'its upload is left unfinished in the store')

    await new Promise(resolve => setTimeout(resolve, 1100))
    const next = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: disk(dir, 4 << 20) }], target: b.target })], { env })
    exits(t, next, 0, 'the next run completes')
    t.ok(logged(next).some(l => l.level === 40 && typeof l.stalePid === 'number'), 'it took over the dead run\'s lock')
    t.ok(logged(next).some(l => l.level === 40 && l.abortedUploads === 1), 'and aborted its upload, and says so')
    t.same(await uploads(store, b.name), [], 'ListMultipartUploads: no stale upload')
    t.equal(archivesIn(await keys(store, b.name)).length, 1)
    t.notOk((await keys(store, b.name)).includes(LOCK))
  })

  await t.test('SIGTERM mid-upload: exit 143, the upload aborted, the lock released, nothing under the final key', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const fifo = stalledFifo(dir, 20 << 20)
    t.teardown(fifo.stop)
    const job = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: fifo.path, size: 32 << 20 }], target: b.target, compression: 'none' })
    const victim = spawn(process.execPath, [VMA, 'backup', job], { stdio: 'ignore', env: { ...process.env, NODE_OPTIONS: '', ...env } })
    const code = new Promise<number | null>(resolve => victim.on('close', resolve))
    await untilUploading(store, b.name)
    t.equal((await uploads(store, b.name)).length, 1, 'the run was uploading')
    victim.kill('SIGTERM')
    t.equal(await code, 143)
    fifo.stop()
    t.same(await uploads(store, b.name), [], 'its upload aborted')
    t.same(await keys(store, b.name), [], 'no archive, no lock')
  })

  await t.test('a run whose lock is taken over while it uploads stops: E_LOCKED, the upload aborted, the new holder\'s lock kept', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const saved = { ...process.env }
    Object.assign(process.env, env)
    t.teardown(() => { process.env = saved })
    const fifo = stalledFifo(dir, 12 << 20)
    t.teardown(fifo.stop)
    const run = runBackupJob(checkJob({ vmid: 100, disks: [{ name: 'drive-scsi0', path: fifo.path, size: 32 << 20 }], target: b.target, compression: 'none' }),
      { lockTtlMs: 1500 })
    await untilUploading(store, b.name)
    const other = lockBody('other-host', 4242, new Date(Date.now() + 3600_000))
    await store.client.send(new PutObjectCommand({ Bucket: b.name, Key: LOCK, Body: other }))
    await t.rejects(run, { code: 'E_LOCKED' }, 'the run stops, saying why')
    t.same(await uploads(store, b.name), [], 'its upload aborted')
    t.same(await keys(store, b.name), [LOCK], 'no archive; the other run\'s lock untouched')
    t.equal(await text(store, b.name, LOCK), other)
  })

  await t.test('job files: an incremental job needs a directory; "lock" is exclusive or none', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const raw = disk(dir, 1 << 20)
    const incremental = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw, dirtyBitmap: 'b' }], target: b.target, incremental: true })
    exits(t, await vma(['backup', incremental], { env }), 2)
    exits(t, await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: b.target, lock: 'maybe' })], { env }), 2)
    exits(t, await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: dir, s3: { region: 'x' } })], { env }), 2,
      '"s3" with a directory target: a mistake')
    const none = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: b.target, lock: 'none' })], { env })
    exits(t, none, 0, '"lock": "none" runs without a lock object')
    t.equal(archivesIn(await keys(store, b.name)).length, 1)
  })

  await t.test('a store that refuses conditional creates: the job fails (E_S3_UNSUPPORTED, exit 3) unless "lock": "none"', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const proxy = await s3FaultProxy(t, store.endpoint, { refuseConditionalCreate: true })
    const via = { ...env, VMAPIPE_S3_ENDPOINT: proxy.endpoint }
    const raw = disk(dir, 1 << 20)
    const refused = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: b.target })], { env: via })
    exits(t, refused, 3)
    t.match(logged(refused).find(l => l.level >= 50), { code: 'E_S3_UNSUPPORTED', result: 'failed', hint: /"lock": "none"/ })
    t.ok(proxy.counts.refusedCreates >= 1, 'the proxy refused the create')
    t.same(await keys(store, b.name), [], 'nothing written')
    const prune = await vma(['prune', b.target, '--vmid', '100', '--keep-last', '1', '--s3-endpoint', proxy.endpoint], { env })
    exits(t, prune, 3, 'vma prune too (the store named by --s3-endpoint)')
    t.match(logged(prune).find(l => l.level >= 50), { code: 'E_S3_UNSUPPORTED', hint: /--no-lock/ })
    exits(t, await vma(['prune', b.target, '--vmid', '100', '--keep-last', '1', '--no-lock'], { env: via }), 0)
    const none = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: b.target, lock: 'none' })],
      { env: via })
    exits(t, none, 0, '"lock": "none": runs')
    t.equal(archivesIn(await keys(store, b.name)).length, 1)
  })

  await t.test('a part cut off mid-upload: the job retries it, logs the retry, and the archive is whole', async t => {
    const dir = tempDir(t)
    const b = await bucket()
    const proxy = await s3FaultProxy(t, store.endpoint, { dropPart: { afterBytes: 3 << 20, times: 1 } })
    const raw = disk(dir, 24 << 20)
    // The endpoint from the job file ("s3"), not the environment.
    const job = writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: raw }], target: b.target, compression: 'none', s3: { endpoint: proxy.endpoint } })
    const r = await vma(['backup', job], { env })
    exits(t, r, 0)
    t.equal(proxy.counts.droppedParts, 1, 'a part was cut')
    t.ok((logged(r).find(l => l.msg === 'uploaded')?.retries as number) >= 1, 'the retry is in the log')
    const archive = archivesIn(await keys(store, b.name))[0]
    await download(store, b.name, archive, join(dir, 'a.vma'))
    exits(t, await vma(['extract', join(dir, 'a.vma'), join(dir, 'out')]), 0)
    t.ok(cmp(join(dir, 'out/disk-drive-scsi0.raw'), raw), 'extracts identical')
    t.same(await uploads(store, b.name), [])
  })
})

t.test('a store that ignores If-None-Match (creates twice) is found out, not trusted', async t => {
  // As such a store behaves: every PUT replaces, whatever its conditions say.
  const objects = new Map<string, string>()
  const careless: LockObjects = {
    create: async (key, body) => { objects.set(key, body); return true },
    read: async key => objects.get(key),
    put: async (key, body) => { objects.set(key, body) },
    remove: async key => { objects.delete(key) },
    locate: key => `s3://b/${key}`,
  }
  await t.rejects(acquireObjectLock(careless, 'locks/x.lock', 'VM 100'), { code: 'E_S3_UNSUPPORTED', option: 'lock' })
  t.equal(objects.size, 0, 'and its probe is cleaned up')
})
