/**
 * Backpressure end to end: a disk's bytes are packed and read back in one
 * process (RawReader -> RecordMerger -> VmaWriter -> VmaReader -> DeviceRouter)
 * into a writer that stalls, and the same archive stream into `vma extract` to
 * a stdout nobody reads. While the sink stalls the source is no longer read
 * and memory stays flat; once it goes on, every byte arrives.
 */
import t from 'tap'
import { createHash } from 'node:crypto'
import { spawn } from 'node:child_process'
import { createReadStream } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { VMA, tempDir } from './helpers/run.js'
import { rssKiB } from './helpers/nbd.js'
import { Rng } from './helpers/random.js'
import { DeviceRouter } from '../lib/jobs/router.js'
import type { ArchiveInfo, ClusterRecord, DiskWriter } from '../lib/contracts.js'
import { RawFileWriter } from '../lib/raw/writer.js'
import { RawReader } from '../lib/raw/stream.js'
import { RecordMerger } from '../lib/jobs/merge.js'
import { VmaWriter } from '../lib/vma/writer.js'
import { VmaReader } from '../lib/vma/stream.js'
import { runStages } from '../lib/io/chain.js'

const MiB = 1 << 20
const SIZE = 192 * MiB
/** Records taken before the writer stalls (about 6 MiB of data). */
const STALL_AT = 100
/** What may be read from the source while the sink stalls: the buffers of the line, not the disk. */
const READ_BOUND = 32 * MiB
/** Growth of memory held by buffers while stalled. */
const MEMORY_BOUND = 64 * MiB
/** RSS of a stalled vma extract: Node itself (about 50 MiB) and the line's buffers; holding the disk would pass 240 MiB. */
const CHILD_RSS_BOUND = 160 * MiB

/** SIZE bytes of data that never repeats a MiB, counted and hashed as they are read. */
function source (): { stream: Readable, read: () => number, digest: () => string } {
  const pattern = new Rng(7).fill(Buffer.alloc(MiB))
  const hash = createHash('sha256')
  let at = 0
  const stream = new Readable({
    highWaterMark: MiB,
    read () {
      if (at >= SIZE) { this.push(null); return }
      const chunk = Buffer.from(pattern)
      chunk.writeUInt32LE(at / MiB, 0)
      hash.update(chunk)
      at += chunk.length
      this.push(chunk)
    },
  })
  return { stream, read: () => at, digest: () => hash.digest('hex') }
}

/** A RawFileWriter that stops taking records after STALL_AT until released. */
class Stalling implements DiskWriter {
  records = 0
  release!: () => void
  private readonly gate = new Promise<void>(resolve => { this.release = resolve })
  constructor (private readonly inner: DiskWriter) {}

  write (rec: ClusterRecord): Promise<void> | undefined {
    if (++this.records !== STALL_AT) return this.inner.write(rec)
    return this.gate.then(async () => { await this.inner.write(rec) })
  }

  async finish (): Promise<void> { await this.inner.finish() }
  async abort (): Promise<void> { await this.inner.abort() }
}

async function sha256File (path: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer)
  return hash.digest('hex')
}

/** The archive of one SIZE-byte disk, made as pack-vma makes it, from `input`. */
function archiveOf (input: Readable): { stream: Readable, done: Promise<unknown> } {
  const device = { id: 1, name: 'drive-scsi0', size: SIZE }
  const info: ArchiveInfo = { kind: 'archive', uuid: '00000000-0000-4000-8000-000000000002', ctime: 0, configs: [], devices: [device] }
  const records = new RawReader(device)
  const stream = new VmaWriter()
  const done = Promise.all([runStages([input, records]), runStages([new RecordMerger(info, [records]), stream])])
  return { stream, done }
}

t.test('a stalled writer stops the reading of the source, memory stays flat, and everything arrives once it goes on', async t => {
  const dir = tempDir(t)
  const input = source()
  const archive = archiveOf(input.stream)
  let writer: Stalling | undefined
  const router = new DeviceRouter(async (info, add) => {
    writer = new Stalling(await RawFileWriter.create(join(dir, 'disk.raw'), SIZE))
    add(info.devices[0].id, writer)
  })
  const before = process.memoryUsage()
  const done = Promise.all([archive.done, runStages([archive.stream, new VmaReader(), router])])

  while ((writer?.records ?? 0) < STALL_AT) await sleep(10)
  // Long enough for the line to fill every buffer it has.
  await sleep(1000)
  const stalledAt = input.read()
  const during = process.memoryUsage()
  await sleep(1000)
  // A busy machine may let the line move a little later still; what matters is that it stays within the buffers' bound.
  t.ok(input.read() < READ_BOUND, `the source is not read on while the writer stalls (${(input.read() / MiB).toFixed(1)} MiB read)`)
  const held = `${(stalledAt / MiB).toFixed(1)} MiB < ${READ_BOUND / MiB} MiB of a ${SIZE / MiB} MiB disk`
  t.ok(stalledAt < READ_BOUND, `what was read is what the buffers hold (${held})`)
  const grew = during.arrayBuffers - before.arrayBuffers
  t.ok(grew < MEMORY_BOUND, `buffers grew by ${(grew / MiB).toFixed(1)} MiB while stalled`)
  t.ok(during.rss - before.rss < 2 * MEMORY_BOUND, `RSS grew by ${((during.rss - before.rss) / MiB).toFixed(1)} MiB`)

  ;(writer as Stalling).release()
  await done
  t.equal(input.read(), SIZE, 'the rest was read once the writer went on')
  t.equal(await sha256File(join(dir, 'disk.raw')), input.digest(), 'and the disk arrived intact')
})

t.test('vma extract to a stdout nobody reads: it stops reading its input, its memory stays flat, and the disk arrives intact', async t => {
  const input = source()
  const archive = archiveOf(input.stream)
  const child = spawn(process.execPath, [VMA, 'extract', '-', '-', '-d', 'drive-scsi0'], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, NODE_OPTIONS: '' },
  })
  let stderr = ''
  child.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s })
  const exited = new Promise<number | null>(resolve => child.on('close', resolve))
  const fed = runStages([archive.stream, child.stdin])
  // Nobody reads the child's stdout yet: it is paused from the start.
  child.stdout.pause()
  // The line fills until the child, once it has started, stops reading: wait until nothing moved for a second.
  for (let still = 0, last = -1, i = 0; still < 5 && i < 150; i++) {
    await sleep(200)
    still = input.read() === last ? still + 1 : 0
    last = input.read()
  }
  const stalledAt = input.read()
  const rss = await rssKiB(child.pid as number) * 1024
  await sleep(1000)
  t.ok(input.read() < 2 * READ_BOUND, `the source is not read on while stdout stalls (${(input.read() / MiB).toFixed(1)} MiB read)`)
  t.ok(stalledAt < 2 * READ_BOUND, `what was read is what the buffers and pipes hold (${(stalledAt / MiB).toFixed(1)} MiB of ${SIZE / MiB} MiB)`)
  t.ok(rss < CHILD_RSS_BOUND, `vma extract's RSS while stalled: ${(rss / MiB).toFixed(0)} MiB`)

  const hash = createHash('sha256')
  let out = 0
  child.stdout.on('data', (b: Buffer) => { hash.update(b); out += b.length })
  child.stdout.resume()
  await Promise.all([fed, archive.done])
  t.equal(await exited, 0, 'vma extract exits 0', { stderr })
  t.equal(out, SIZE, 'the whole disk came out')
  t.equal(hash.digest('hex'), input.digest(), 'intact')
})
