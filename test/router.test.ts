/**
 * DeviceRouter on its own: several devices written to real sparse files, one
 * of them slow. Records reach their own device's writer in the order given,
 * each writer is finished (or aborted) once, a writer's failure is the
 * pipeline's failure, and a record stream without its ArchiveInfo is refused.
 */
import t from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { tempDir } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'
import { DeviceRouter } from '../lib/jobs/router.js'
import type { ArchiveInfo, ClusterRecord, DiskWriter, StreamItem } from '../lib/contracts.js'
import { RawFileWriter } from '../lib/raw/writer.js'
import { runStages } from '../lib/io/chain.js'
import { VmapipeError } from '../lib/errors.js'
import { CLUSTER_SIZE, clusterFromBytes } from '../lib/record.js'

const SIZE = 24 * CLUSTER_SIZE + 12345
const CLUSTERS = Math.ceil(SIZE / CLUSTER_SIZE)

/** Three devices, and their records interleaved, each device's clusters in a shuffled order of its own. */
function archive (seed: number): { info: ArchiveInfo, disks: Map<number, Buffer>, items: StreamItem[], order: Map<number, number[]> } {
  const rng = new Rng(seed)
  const devices = [1, 2, 3].map(id => ({ id, name: `drive-scsi${id}`, size: SIZE }))
  const info: ArchiveInfo = { kind: 'archive', uuid: '00000000-0000-4000-8000-000000000000', ctime: 0, configs: [], devices }
  const disks = new Map(devices.map(d => [d.id, makeDisk(rng, SIZE)]))
  const order = new Map(devices.map(d => [d.id, rng.shuffle([...Array(CLUSTERS).keys()])]))
  const items: StreamItem[] = [info]
  for (let i = 0; i < CLUSTERS; i++) {
    for (const d of rng.shuffle([...devices])) {
      const cluster = (order.get(d.id) as number[])[i]
      const bytes = (disks.get(d.id) as Buffer).subarray(cluster * CLUSTER_SIZE, (cluster + 1) * CLUSTER_SIZE)
      items.push(clusterFromBytes(d.id, cluster, bytes))
    }
  }
  return { info, disks, items, order }
}

/** Shared by the writers of one router: whether the slow device has a write in flight, and what began meanwhile. */
interface Slow { pending: boolean, overlaps: number }

/** What the router did to one device's writer; the writing itself goes to a real RawFileWriter. */
class Watched implements DiskWriter {
  readonly seen: number[] = []
  finished = 0
  aborted = 0

  constructor (
    private readonly inner: DiskWriter,
    private readonly options: { slow?: Slow, delay?: number, failAt?: number, failure?: Error } = {}
  ) {}

  write (rec: ClusterRecord): Promise<void> | undefined {
    this.seen.push(rec.cluster)
    const slow = this.options.slow
    if (slow?.pending === true) slow.overlaps++
    if (this.seen.length === this.options.failAt) return Promise.reject(this.options.failure ?? new Error('failAt without a failure'))
    const wait = this.inner.write(rec)
    if (slow === undefined || this.options.delay === undefined) return wait
    slow.pending = true
    return Promise.all([wait, sleep(this.options.delay)]).then(() => { slow.pending = false })
  }

  async finish (): Promise<void> { this.finished++; await this.inner.finish() }
  async abort (): Promise<void> { this.aborted++; await this.inner.abort() }
}

/** A router whose writers write disk-<id>.raw in `dir`, watched; device 2 is the slow one, device 3 may fail. */
function router (dir: string, fail: { failAt?: number, failure?: Error } = {}): { router: DeviceRouter, writers: Map<number, Watched>, slow: Slow } {
  const writers = new Map<number, Watched>()
  const slow: Slow = { pending: false, overlaps: 0 }
  const r = new DeviceRouter(async (info, add) => {
    for (const d of info.devices) {
      const inner = await RawFileWriter.create(join(dir, `disk-${d.id}.raw`), d.size)
      const w = new Watched(inner, { slow, ...(d.id === 2 ? { delay: 3 } : {}), ...(d.id === 3 ? fail : {}) })
      writers.set(d.id, w)
      add(d.id, w)
    }
  })
  return { router: r, writers, slow }
}

t.test('a slow device among several: every record reaches its own writer in order, each writer is finished once', async t => {
  const dir = tempDir(t)
  const { disks, items, order } = archive(1)
  const { router: r, writers, slow } = router(dir)
  await runStages([Readable.from(items, { objectMode: true }), r])
  // What the header comment says: devices share one queue, so nothing else is written while the slow device writes.
  t.equal(slow.overlaps, 0, 'no write of any device began while the slow device had one in flight')
  for (const [id, w] of writers) {
    t.same(w.seen, order.get(id), `device ${id} got its clusters, in the order given`)
    t.equal(w.finished, 1, `device ${id} finished once`)
    t.ok(w.aborted <= 1, `device ${id} aborted at most once (closing after finish)`)
    t.ok(readFileSync(join(dir, `disk-${id}.raw`)).equals(disks.get(id) as Buffer), `disk-${id}.raw holds device ${id}'s bytes`)
  }
})

t.test('a writer that fails fails the pipeline with its own error; every writer is aborted once, none finished', async t => {
  const dir = tempDir(t)
  const { items } = archive(2)
  const failure = new VmapipeError('E_IO', 'the disk went away')
  const { router: r, writers } = router(dir, { failAt: 5, failure })
  const source = Readable.from(items, { objectMode: true })
  const err = await runStages([source, r]).then(() => undefined, (e: unknown) => e)
  t.equal(err, failure, 'the writer\'s error, not a later one')
  t.ok(source.destroyed, 'the source was torn down')
  t.equal(writers.size, 3)
  for (const [id, w] of writers) {
    t.equal(w.aborted, 1, `device ${id} aborted once`)
    t.equal(w.finished, 0, `device ${id} never finished`)
  }
  t.equal((writers.get(3) as Watched).seen.length, 5, 'no record went to the failed writer after its failure')
})

t.test('a writer that throws at once fails the pipeline the same way', async t => {
  const dir = tempDir(t)
  const { items } = archive(3)
  const failure = new VmapipeError('E_RECORD', 'cluster given twice')
  const writers: Watched[] = []
  const r = new DeviceRouter(async (info, add) => {
    for (const d of info.devices) {
      const inner = await RawFileWriter.create(join(dir, `disk-${d.id}.raw`), d.size)
      const w = new Watched(inner)
      if (d.id === 1) w.write = () => { throw failure }
      writers.push(w)
      add(d.id, w)
    }
  })
  await t.rejects(runStages([Readable.from(items, { objectMode: true }), r]), { code: 'E_RECORD' })
  t.same(writers.map(w => w.aborted), [1, 1, 1], 'every writer aborted once')
})

t.test('a factory that fails after adding some writers: those are aborted, the pipeline has its error', async t => {
  const dir = tempDir(t)
  const { items } = archive(4)
  const added: Watched[] = []
  const r = new DeviceRouter(async (_info, add) => {
    const w = new Watched(await RawFileWriter.create(join(dir, 'disk-1.raw'), SIZE))
    added.push(w)
    add(1, w)
    throw new VmapipeError('E_TARGET_EXISTS', 'disk-2.raw exists')
  })
  await t.rejects(runStages([Readable.from(items, { objectMode: true }), r]), { code: 'E_TARGET_EXISTS' })
  t.equal(added[0].aborted, 1, 'the writer made before the failure is aborted')
  t.equal(added[0].finished, 0)
})

t.test('a record stream that ends before its ArchiveInfo is an error, not an empty success', async t => {
  const { items } = archive(5)
  let opened = false
  const r = new DeviceRouter(async () => { opened = true })
  await t.rejects(runStages([Readable.from([], { objectMode: true }), r]), { code: 'E_RECORD' }, 'an empty stream')
  t.notOk(opened, 'no writer was made')
  const r2 = new DeviceRouter(async () => { opened = true })
  // Records without the ArchiveInfo first have no writer to go to; the end still finds no header.
  await t.rejects(runStages([Readable.from(items.slice(1, 4), { objectMode: true }), r2]), { code: 'E_RECORD' }, 'records alone')
  t.notOk(opened)
})
