/**
 * openLiveArchive as a library: progress lines while the pass runs, the map
 * before and after the pass has passed a region, reads waiting when the
 * server stops, and a pass that meets a damaged extent.
 */
import t from 'tap'
import { readdirSync } from 'node:fs'
import { Readable } from 'node:stream'
import { tempDir } from './helpers/run.js'
import { orderedArchive } from './helpers/live.js'
import { Rng } from './helpers/random.js'
import { openLiveArchive } from '../lib/jobs/live.js'

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

/** The archive's bytes as a stream: [0, hold) in pieces with pauses, the rest only once `release` is called. */
function slowInput (bytes: Buffer, hold: number, pause = 20): { stream: Readable, release: () => void } {
  const stream = new Readable({ read () {} })
  let released = false
  let fed = false
  const rest = (): void => {
    if (!released || !fed || stream.destroyed) return
    stream.push(bytes.subarray(hold))
    stream.push(null)
  }
  void (async () => {
    for (let at = 0; at < hold && !stream.destroyed; at += 65536) {
      stream.push(bytes.subarray(at, Math.min(hold, at + 65536)))
      await sleep(pause)
    }
    fed = true
    rest()
  })()
  return { stream, release: () => { released = true; rest() } }
}

/** A disk of 4 MiB (two extents: clusters 0-58, 59-63): random data, then a last cluster of zeros. */
function disk (): { id: number, name: string, size: number, data: Buffer } {
  const data = Buffer.alloc(4 * 1048576)
  new Rng(171).fill(data.subarray(0, data.length - 65536))
  return { id: 1, name: 'drive-virtio0', size: data.length, data }
}

t.test('progress lines, the map before and after the pass, the cache unlinked', async t => {
  const dir = tempDir(t)
  const device = disk()
  const { archive, lastExtent } = orderedArchive(device)
  const input = slowInput(archive, lastExtent)
  const lines: Array<Record<string, unknown>> = []
  const note = (fields: Record<string, unknown>, msg: string): number => lines.push({ ...fields, msg })
  const log = { info: note, error: note }
  const live = await openLiveArchive({ stream: input.stream, name: 'slow', size: archive.length }, { cacheDir: dir, log, progressInterval: 100 })
  t.same(readdirSync(dir), [], 'nothing in the cache directory: the files are unlinked')
  const [d] = live.disks
  const tail = device.size - 65536
  t.same(await d.map(tail, 65536), [{ offset: tail, length: 65536, data: true }], 'a region not yet passed is data, though it will be a hole')
  const waiting = Buffer.alloc(65536, 0xff)
  const read = d.read(waiting, tail)
  await sleep(400)
  const progress = lines.filter(l => l.totalBytes !== undefined)
  t.ok(progress.length > 0, 'progress lines while the pass runs')
  const p = progress[progress.length - 1]
  t.equal(p.totalBytes, archive.length, 'with the total')
  t.ok(Number(p.inputBytes) > 0 && Number(p.inputBytes) <= lastExtent, `and the bytes read so far (${String(p.inputBytes)})`)
  t.ok(Number(p.bytesPerSecond) > 0 && typeof p.etaSeconds === 'number', 'the rate and an ETA')
  input.release()
  await read
  t.ok(waiting.equals(Buffer.alloc(65536)), 'the waiting read got the zeros once they came')
  const outcome = await live.outcome
  t.ok(outcome.ok, 'the pass completed')
  t.equal(outcome.inputBytes, archive.length)
  t.same(await d.map(tail - 65536, 131072), [{ offset: tail - 65536, length: 65536, data: true }, { offset: tail, length: 65536, data: false }],
    'then the hole is reported')
  t.ok(lines.some(l => String(l.msg).includes('pass complete')), 'and the end of the pass logged')
  await d.close()
})

t.test('stopping the server fails the reads still waiting (E_INTERRUPTED); later reads of what passed still work until closed', async t => {
  const dir = tempDir(t)
  const device = disk()
  const { archive, lastExtent } = orderedArchive(device)
  const input = slowInput(archive, lastExtent, 0)
  const stop = new AbortController()
  const live = await openLiveArchive({ stream: input.stream, name: 'stopped' }, { cacheDir: dir, signal: stop.signal })
  const [d] = live.disks
  const waiting = d.read(Buffer.alloc(4096), device.size - 4096)
  const head = Buffer.alloc(4096)
  await d.read(head, 0)
  t.ok(head.equals(device.data.subarray(0, 4096)), 'the first block is read')
  stop.abort()
  await t.rejects(waiting, { code: 'E_INTERRUPTED', device: device.name }, 'the waiting read fails')
  const outcome = await live.outcome
  t.equal(outcome.error?.code, 'E_INTERRUPTED')
  await d.read(head, 4096)
  t.ok(head.equals(device.data.subarray(4096, 8192)), 'what passed is still read')
  await d.close()
  await t.rejects(d.read(head, 0), 'closed: nothing more is read')
})

t.test('a damaged extent: what passed is served, waiting and later reads of the rest fail with its code', async t => {
  const dir = tempDir(t)
  const device = disk()
  const { archive, lastExtent } = orderedArchive(device)
  const broken = Buffer.from(archive)
  broken[lastExtent + 30] ^= 0xff // inside the extent header's MD5
  const input = slowInput(broken, lastExtent, 0)
  const lines: Array<Record<string, unknown>> = []
  const log = { info: () => {}, error: (fields: Record<string, unknown>, msg: string) => lines.push({ ...fields, msg }) }
  const live = await openLiveArchive({ stream: input.stream, name: 'damaged' }, { cacheDir: dir, log })
  const [d] = live.disks
  const waiting = d.read(Buffer.alloc(65536), device.size - 65536)
  input.release()
  await t.rejects(waiting, { code: 'E_VMA_EXTENT_MD5' }, 'the waiting read fails with the damage\'s code')
  await t.rejects(d.read(Buffer.alloc(512), device.size - 512), { code: 'E_VMA_EXTENT_MD5' }, 'so does a later one')
  const head = Buffer.alloc(65536)
  await d.read(head, 0)
  t.ok(head.equals(device.data.subarray(0, 65536)), 'what passed is served')
  const outcome = await live.outcome
  t.notOk(outcome.ok)
  t.equal(lines[0]?.code, 'E_VMA_EXTENT_MD5', 'the log says what')
  const at = Number(lines[0]?.offset)
  t.ok(at >= lastExtent && at < lastExtent + 512, `and where: in the last extent's header (byte ${at})`)
  await d.close()
})
