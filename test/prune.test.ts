import t, { type Test } from 'tap'
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { ListObjectsV2Command, PutObjectCommand } from '@aws-sdk/client-s3'
import { exits, tempDir, vma } from './helpers/run.js'
import { writeJob } from './helpers/fixtures.js'
import { needsS3, s3Store, type S3Store } from './helpers/s3.js'
import { archiveName } from '../lib/backup/naming.js'
import { planPrune } from '../lib/backup/retention.js'

/** Where the fabricated backups live: a local directory, or a bucket under a prefix. */
interface Site {
  target: string
  env: NodeJS.ProcessEnv
  /** Makes the VM's lock look held by a live run. */
  hold: () => Promise<void>
  put: (name: string, data: string) => Promise<void>
  names: () => Promise<string[]>
}

function dirSite (t: Test): Site {
  const target = join(tempDir(t), 'dump')
  mkdirSync(target)
  return {
    target,
    env: {},
    // This test process, alive, on this host: as a running job's lock reads.
    hold: async () => { writeFileSync(join(target, '.vzdump-qemu-100.lock'), JSON.stringify({ pid: process.pid, host: hostname(), started: new Date().toISOString() })) },
    put: async (name, data) => { writeFileSync(join(target, name), data) },
    names: async () => readdirSync(target).filter(n => !n.startsWith('.')).sort(),
  }
}

async function bucketSite (store: S3Store): Promise<Site> {
  const bucket = await store.bucket()
  const prefix = 'pve1/'
  return {
    target: `s3://${bucket}/${prefix}`,
    env: store.env,
    hold: async () => {
      const body = JSON.stringify({ host: 'other-host', pid: 1, started: new Date().toISOString(), expires: new Date(Date.now() + 3600_000).toISOString() })
      await store.client.send(new PutObjectCommand({ Bucket: bucket, Key: `${prefix}locks/vzdump-qemu-100.lock`, Body: body }))
    },
    put: async (name, data) => { await store.client.send(new PutObjectCommand({ Bucket: bucket, Key: prefix + name, Body: data })) },
    names: async () => {
      const listed = await store.client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix }))
      return (listed.Contents ?? []).map(o => (o.Key as string).slice(prefix.length)).filter(n => !n.startsWith('locks/')).sort()
    },
  }
}

/** Backups of VM 100 at known local times (years back, so that a job's new backup is in another day, month and year). */
const AT: Record<string, Date> = {
  A: new Date(2024, 10, 20, 23, 0, 0),
  B: new Date(2024, 10, 20, 10, 0, 0),
  C: new Date(2024, 10, 19, 12, 0, 0),
  D: new Date(2024, 10, 18, 12, 0, 0),
  E: new Date(2024, 10, 17, 12, 0, 0),
  F: new Date(2024, 9, 5, 12, 0, 0),
  G: new Date(2024, 9, 1, 12, 0, 0),
  H: new Date(2023, 11, 31, 12, 0, 0),
  I: new Date(2022, 5, 1, 12, 0, 0),
}
const name = (k: string): string => archiveName(100, AT[k], 'zstd')
const log = (k: string): string => name(k).replace(/\.vma\.zst$/, '.log')
const POLICY = ['--keep-last', '1', '--keep-daily', '2', '--keep-monthly', '2', '--keep-yearly', '2']

/** Every archive with its .log; B with .notes, C .protected; and files that are not VM 100's archives. */
async function fabricate (site: Site): Promise<string[]> {
  const others = [archiveName(10, AT.A, 'zstd'), archiveName(1000, AT.I, 'none'), `${name('A')}.tmp`, 'README']
  for (const k of Object.keys(AT)) {
    await site.put(name(k), `archive ${k}`)
    await site.put(log(k), `log ${k}`)
  }
  await site.put(`${name('B')}.notes`, 'notes of B')
  await site.put(`${name('C')}.protected`, '')
  for (const other of others) await site.put(other, 'not ours')
  return others
}

/** The names a site holds once the archives `gone` are pruned (with their .log and .notes). */
function remaining (others: string[], gone: string[], extra: string[] = []): string[] {
  const kept = Object.keys(AT).filter(k => !gone.includes(k)).flatMap(k => [name(k), log(k)])
  return [...kept, ...(gone.includes('B') ? [] : [`${name('B')}.notes`]), `${name('C')}.protected`, ...others, ...extra].sort()
}

t.test('planPrune: keep-hourly and keep-yearly', async t => {
  const at = (h: number, m: number, y = 2024): { name: string, time: Date, protected: boolean } =>
    ({ name: `${y}-${h}:${m}`, time: new Date(y, 0, 5, h, m), protected: false })
  const hourly = planPrune([at(10, 5), at(10, 30), at(9, 59), at(8, 0)], { 'keep-hourly': 2 })
  t.same(Object.fromEntries(hourly), { '2024-10:30': 'keep', '2024-10:5': 'remove', '2024-9:59': 'keep', '2024-8:0': 'remove' })
  const yearly = planPrune([at(1, 0, 2024), at(2, 0, 2024), at(1, 0, 2023), at(1, 0, 2021), at(1, 0, 2020)], { 'keep-yearly': 3 })
  t.same(Object.fromEntries(yearly), { '2024-2:0': 'keep', '2024-1:0': 'remove', '2023-1:0': 'keep', '2021-1:0': 'keep', '2020-1:0': 'remove' })
})

async function pruneCases (t: Test, site: () => Promise<Site>): Promise<void> {
  await t.test('vma prune --dry-run --json: the plan, nothing removed', async t => {
    const s = await site()
    const others = await fabricate(s)
    const before = await s.names()
    const r = await vma(['prune', s.target, '--vmid', '100', ...POLICY, '--dry-run', '--json'], { env: s.env })
    exits(t, r, 0)
    const out = JSON.parse(r.stdout.toString()) as { archives: Array<{ name: string, mark: string }>, pruned: string[] }
    t.same(out.archives.map(a => [a.name, a.mark]), [
      [name('A'), 'keep'], [name('B'), 'remove'], [name('C'), 'protected'], [name('D'), 'keep'], [name('E'), 'keep'],
      [name('F'), 'keep'], [name('G'), 'remove'], [name('H'), 'keep'], [name('I'), 'keep'],
    ], 'newest first, each with its mark')
    t.same(out.pruned, [name('B'), name('G')])
    t.same(await s.names(), before, 'nothing removed')
    t.ok(others.every(o => before.includes(o)))
  })

  await t.test('vma prune: removes exactly B and G with their sidecars, never C (protected) nor other VMs\' files', async t => {
    const s = await site()
    const others = await fabricate(s)
    const r = await vma(['prune', s.target, '--vmid', '100', ...POLICY], { env: s.env })
    exits(t, r, 0)
    t.same(await s.names(), remaining(others, ['B', 'G']))
    const again = await vma(['prune', s.target, '--vmid', '100', ...POLICY, '--json'], { env: s.env })
    exits(t, again, 0)
    t.same((JSON.parse(again.stdout.toString()) as { pruned: string[] }).pruned, [], 'a second prune finds nothing more')
    const protectedOnly = await vma(['prune', s.target, '--vmid', '100', '--keep-last', '0', '--keep-daily', '0'], { env: s.env })
    exits(t, protectedOnly, 0, 'no rule above 0: everything kept')
    t.same(await s.names(), remaining(others, ['B', 'G']))
  })

  await t.test('a backup job prunes by the same rules: the new archive counts, C stays', async t => {
    const s = await site()
    const others = await fabricate(s)
    const dir = tempDir(t)
    const disk = join(dir, 'disk.raw')
    writeFileSync(disk, Buffer.alloc(1 << 20, 7))
    const job = writeJob(dir, {
      vmid: 100,
      disks: [{ name: 'drive-scsi0', path: disk }],
      target: s.target,
      retention: { 'keep-last': 1, 'keep-daily': 2, 'keep-monthly': 2, 'keep-yearly': 2 },
    })
    // A .log written just before a job starts is a run that finished as it started (the job then does nothing): let a second pass.
    await new Promise(resolve => setTimeout(resolve, 1100))
    const r = await vma(['backup', '-q', job], { env: s.env })
    exits(t, r, 0)
    const after = await s.names()
    const fresh = after.filter(n => n.startsWith('vzdump-qemu-100-') && !remaining(others, []).includes(n))
    t.equal(fresh.length, 2, 'the new archive and its log', { fresh })
    t.same(after, remaining(others, ['B', 'E', 'G'], fresh))
  })

  await t.test('while a backup of the VM holds its lock: exit 4, nothing removed; --dry-run still plans', async t => {
    const s = await site()
    await fabricate(s)
    await s.hold()
    const before = await s.names()
    exits(t, await vma(['prune', s.target, '--vmid', '100', ...POLICY], { env: s.env }), 4)
    t.same(await s.names(), before)
    exits(t, await vma(['prune', s.target, '--vmid', '100', ...POLICY, '--dry-run'], { env: s.env }), 0)
  })

  await t.test('usage: --vmid is required, counts are whole numbers', async t => {
    const s = await site()
    exits(t, await vma(['prune', s.target, '--keep-last', '1'], { env: s.env }), 2)
    exits(t, await vma(['prune', s.target, '--vmid', '100', '--keep-last', '-1'], { env: s.env }), 2)
    exits(t, await vma(['prune', s.target, '--vmid', '100', '--keep-daily', 'x'], { env: s.env }), 2)
  })
}

t.test('a local directory', async t => { await pruneCases(t, async () => dirSite(t)) })

t.test('an S3 bucket', needsS3, async t => {
  const store = await s3Store(t)
  await pruneCases(t, async () => await bucketSite(store))
})
