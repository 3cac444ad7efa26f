/**
 * runStages, the one way the library awaits a line of streams: the first real
 * error is the one reported, an AbortSignal tears every stage down and closes
 * every file before the promise settles, and an extract aborted midway leaves
 * no partial file behind.
 */
import t from 'tap'
import { createReadStream, createWriteStream, existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PassThrough, Readable, Transform, Writable } from 'node:stream'
import { createGunzip, createGzip } from 'node:zlib'
import pump from 'pump'
import { tempDir } from './helpers/run.js'
import { buildArchive } from './helpers/vma-builder.js'
import { multiDeviceSpec } from './helpers/fixtures.js'
import { chain, runStages } from '../lib/io/chain.js'
import { VmapipeError } from '../lib/errors.js'
import { extractToDirectory } from '../lib/jobs/extract.js'
import { readArchiveInfo } from '../lib/jobs/archive.js'

/** Endless bytes, one 64 KiB chunk per read. */
function endless (): Readable {
  return new Readable({ read () { this.push(Buffer.alloc(65536, 7)) } })
}

/** Passes `n` chunks, then fails with `failure`. */
function failsAfter (n: number, failure: Error): Transform {
  let seen = 0
  return new Transform({ transform (chunk: Buffer, _enc, callback) { if (++seen > n) callback(failure); else callback(null, chunk) } })
}

/** Takes everything, keeps nothing. */
function discard (): Writable {
  return new Writable({ write (_chunk, _enc, callback) { callback() } })
}

/** Open file descriptors of this process. */
function fds (): number {
  return readdirSync('/proc/self/fd').length
}

t.test('the first error wins, and every stage is closed when runStages settles', async t => {
  const failure = new VmapipeError('E_COMPRESSED_DATA', 'bad block')
  const stages = [endless(), failsAfter(3, failure), new PassThrough(), discard()]
  const err = await runStages(stages).then(() => undefined, (e: unknown) => e)
  t.equal(err, failure, 'runStages rejects with the failure itself')
  t.ok(stages.every(s => s.destroyed && s.closed), 'every stage destroyed and closed when it settles')
})

t.test('chain: whoever reads the joined stream sees the first error, not a "premature close"', async t => {
  const failure = new VmapipeError('E_VMA_EXTENT_MD5', 'checksum')
  const drain = async (s: Readable): Promise<unknown> => { try { for await (const _ of s); } catch (err) { return err } }
  // Bare pump destroys the last stream without the error: its reader learns only that it closed early.
  const bare = new PassThrough()
  pump(endless(), failsAfter(3, failure), bare, () => {})
  t.equal((await drain(bare) as NodeJS.ErrnoException).code, 'ERR_STREAM_PREMATURE_CLOSE', 'bare pump: premature close')
  t.equal(await drain(chain(endless(), failsAfter(3, failure), new PassThrough())), failure, 'chain: the failure itself')
})

t.test('a later failure of another stage does not replace the first', async t => {
  const first = new VmapipeError('E_VMA_EXTENT_MD5', 'checksum')
  // The sink fails too, on its way down, as a writer that cannot close its file would.
  const sink = new Writable({
    write (_chunk, _enc, callback) { callback() },
    destroy (_err, callback) { callback(new VmapipeError('E_IO', 'closing failed')) },
  })
  await t.rejects(runStages([endless(), failsAfter(1, first), sink]), { code: 'E_VMA_EXTENT_MD5' })
})

t.test('system errors are named after their stage and typed E_IO', async t => {
  const dir = tempDir(t)
  const err = await runStages([
    { stream: createReadStream(join(dir, 'missing')), what: 'reading the archive' },
    { stream: createWriteStream(join(dir, 'out')), what: 'writing' },
  ]).then(() => undefined, (e: unknown) => e)
  t.ok(err instanceof VmapipeError)
  t.equal((err as VmapipeError).code, 'E_IO')
  t.equal(((err as VmapipeError).cause as NodeJS.ErrnoException).code, 'ENOENT', 'the cause is the system error')
})

t.test('a line that completes resolves, and its output is whole', async t => {
  const dir = tempDir(t)
  const bytes = Buffer.alloc(3 << 20, 1)
  writeFileSync(join(dir, 'in'), bytes)
  const out = join(dir, 'out.gz')
  await runStages([createReadStream(join(dir, 'in')), createGzip(), createWriteStream(out)])
  const back: Buffer[] = []
  await runStages([createReadStream(out), createGunzip(), new Writable({ write (b: Buffer, _enc, callback) { back.push(b); callback() } })])
  t.ok(Buffer.concat(back).equals(bytes), 'the bytes made it through gzip and back')
})

t.test('aborting tears every stage down and closes every file before it settles', async t => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'in'), Buffer.alloc(64 << 20))
  const before = fds()
  const controller = new AbortController()
  const input = createReadStream(join(dir, 'in'), { highWaterMark: 65536 })
  const gzip = createGzip()
  const output = createWriteStream(join(dir, 'out'))
  let read = 0
  input.on('data', (b: string | Buffer) => { read += b.length; if (read >= 1 << 20) controller.abort() })
  const err = await runStages([input, gzip, output], controller.signal).then(() => undefined, (e: unknown) => e)
  t.equal((err as VmapipeError).code, 'E_INTERRUPTED')
  t.ok(read < 64 << 20, 'it stopped before the input was read through')
  for (const [name, s] of [['input', input], ['gzip', gzip], ['output', output]] as Array<[string, Readable | Writable]>) {
    t.ok(s.destroyed, `${name} destroyed`)
    t.ok(s.closed, `${name} closed`)
  }
  t.equal(fds(), before, 'no file descriptor left open')
})

t.test('a signal aborted before the start stops the line at once', async t => {
  const controller = new AbortController()
  controller.abort()
  const stages = [endless(), new PassThrough(), new PassThrough()]
  await t.rejects(runStages(stages, controller.signal), { code: 'E_INTERRUPTED' })
  t.ok(stages.every(s => s.destroyed), 'every stage destroyed')
})

t.test('aborting a stage that has already read its input still stops the rest', async t => {
  // The input is done (it ended), the sink is the one still busy: the abort must reach the sink too.
  const controller = new AbortController()
  const input = Readable.from([Buffer.alloc(10)])
  const stuck = new PassThrough({ highWaterMark: 1 })
  const sink = new PassThrough({ highWaterMark: 1 })
  const done = runStages([input, stuck, sink], controller.signal)
  await new Promise(resolve => input.once('end', resolve))
  controller.abort()
  await t.rejects(done, { code: 'E_INTERRUPTED' })
  t.ok(stuck.destroyed && sink.destroyed, 'the stages after it are destroyed')
})

t.test('an extract to a directory aborted midway removes its partial files', async t => {
  const dir = tempDir(t)
  const archive = buildArchive(multiDeviceSpec(3))
  for (const existing of [false, true]) {
    const target = join(dir, existing ? 'existing' : 'new')
    if (existing) mkdirSync(target)
    const input = new PassThrough()
    const controller = new AbortController()
    // Half the archive, then nothing more: the extract is midway, with files open in its staging directory.
    input.write(archive.subarray(0, archive.length >> 1))
    const extract = extractToDirectory(input, target, { signal: controller.signal, force: existing })
    const staged = async (): Promise<string[]> => {
      const staging = existsSync(target) ? readdirSync(target) : []
      return staging.length === 1 ? readdirSync(join(target, staging[0])) : []
    }
    const deadline = Date.now() + 20000
    while ((await staged()).filter(n => n.endsWith('.raw')).length === 0 && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 10))
    t.ok((await staged()).some(n => n.endsWith('.raw')), 'disk files were being written')
    controller.abort()
    await t.rejects(extract, { code: 'E_INTERRUPTED' })
    t.ok(input.destroyed, 'the input was torn down')
    if (existing) t.same(readdirSync(target), [], 'the existing target is left as it was: empty')
    else t.notOk(existsSync(target), 'the target the extract made is gone')
  }
})

t.test('readArchiveInfo stops the line once it has the header, and closes an input that has not ended', async t => {
  const spec = multiDeviceSpec(4)
  const archive = buildArchive(spec)
  const input = new PassThrough()
  input.write(archive.subarray(0, archive.length >> 1))
  const { info, compression } = await readArchiveInfo(input)
  t.same(info.devices.map(d => d.name), spec.devices.map(d => d.name), 'the header read')
  t.equal(compression, 'none')
  t.ok(input.destroyed && input.closed, 'the input is closed, not left waiting for the rest')
  const cut = new PassThrough()
  cut.end(archive.subarray(0, 100))
  await t.rejects(readArchiveInfo(cut), { code: 'E_VMA_TRUNCATED' }, 'an input that ends inside the header')
  const controller = new AbortController()
  const waiting = readArchiveInfo(new PassThrough(), { signal: controller.signal })
  controller.abort()
  await t.rejects(waiting, { code: 'E_INTERRUPTED' }, 'an abort before the header')
})
