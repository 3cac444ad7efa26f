/**
 * An uncompressed archive file is verified and extracted by position (its
 * extent headers read, the data skipped or copied in large pieces); the same
 * bytes through a pipe take the streaming reader. Both must give the same
 * outcome: reports, files, bytes, error codes and offsets.
 */
import t from 'tap'
import { createReadStream, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PassThrough, Writable, type Readable } from 'node:stream'
import { extractToDirectory, extractToStream, verifyArchive } from '../lib/index.js'
import { VmapipeError } from '../lib/errors.js'
import { allocated, tempDir } from './helpers/run.js'
import { multiDeviceSpec } from './helpers/fixtures.js'
import { type BuildSpec, buildArchive, buildExtent, buildHeader } from './helpers/vma-builder.js'

/** The same bytes as a stream that is not a file. */
function piped (bytes: Buffer): Readable {
  const p = new PassThrough()
  p.end(bytes)
  return p
}

/** Damaged variants of a good archive, each named. */
function variants (spec: BuildSpec): Array<[string, Buffer]> {
  const good = buildArchive(spec)
  const headerSize = good.readUInt32BE(56)
  const firstExtent = buildExtent(spec, spec.extents[0])
  const badMd5 = Buffer.from(good)
  badMd5[headerSize + 30] ^= 1
  return [
    ['good', good],
    ['empty', Buffer.alloc(0)],
    ['cut in the prefix', good.subarray(0, 30)],
    ['cut in the header', good.subarray(0, headerSize - 1)],
    ['cut in an extent header', good.subarray(0, headerSize + 300)],
    ['cut in the data', good.subarray(0, good.length - 1)],
    ['cut between extents', good.subarray(0, headerSize + firstExtent.length)],
    ['garbage after the last extent', Buffer.concat([good, Buffer.alloc(512, 1)])],
    ['an extent checksum broken', badMd5],
    ['a missing cluster', buildArchive({ ...spec, extents: spec.extents.map(e => e.filter(s => s.dev !== 1 || s.cluster !== 0)) })],
    ['a repeated extent', buildArchive({ ...spec, extents: [...spec.extents, spec.extents[0]] })],
  ]
}

const errorOf = (err: unknown): Record<string, unknown> =>
  err instanceof VmapipeError ? { code: err.code, offset: err.offset, device: err.device, cluster: err.cluster } : { thrown: String(err) }

t.test('verify: a file read by position reports what the streaming reader reports', async t => {
  const dir = tempDir(t)
  const spec = multiDeviceSpec(31)
  for (const [name, bytes] of variants(spec)) {
    const path = join(dir, 'a.vma')
    writeFileSync(path, bytes)
    const byPosition = await verifyArchive(createReadStream(path))
    const streamed = await verifyArchive(piped(bytes))
    const shape = (r: typeof streamed): Record<string, unknown> => ({
      ok: r.ok, error: r.error && errorOf(r.error), uuid: r.info?.uuid, compression: r.compression,
      extents: r.extents, archiveBytes: r.archiveBytes, devices: r.devices,
    })
    t.same(shape(byPosition), shape(streamed), name)
    t.equal(byPosition.ok, name === 'good', `${name}: ${byPosition.error?.code ?? 'ok'}`)
  }
})

t.test('extract to a directory: the copy by position makes the files the stream makes, and fails as it fails', async t => {
  const dir = tempDir(t)
  const spec = multiDeviceSpec(32)
  for (const [name, bytes] of variants(spec)) {
    const path = join(dir, 'a.vma')
    writeFileSync(path, bytes)
    const run = async (input: Readable, out: string): Promise<Record<string, unknown>> =>
      await extractToDirectory(input, out).then(r => ({ files: r.files.map(f => f.slice(out.length)), archiveBytes: r.archiveBytes }), errorOf)
    const a = join(dir, `file-${name}`)
    const b = join(dir, `pipe-${name}`)
    t.same(await run(createReadStream(path), a), await run(piped(bytes), b), name)
    if (name !== 'good') continue
    for (const f of readdirSync(b)) {
      t.ok(readFileSync(join(a, f)).equals(readFileSync(join(b, f))), `${f}: the same bytes`)
      t.ok(allocated(join(a, f)) <= allocated(join(b, f)), `${f}: no more allocated than the streamed file`)
    }
    for (const d of spec.devices) {
      const file = join(a, d.name === 'vmstate' ? 'vmstate.bin' : `disk-${d.name}.raw`)
      t.ok(readFileSync(file).equals(d.data), `${d.name} equals its source`)
    }
  }
})

/** A Writable that keeps what it is given. */
function collector (): { out: Writable, bytes: () => Buffer } {
  const chunks: Buffer[] = []
  return { out: new Writable({ write (chunk: Buffer, _enc, cb) { chunks.push(Buffer.from(chunk)); cb() } }), bytes: () => Buffer.concat(chunks) }
}

t.test('extract one disk to a stream: by position, in any cluster order, the bytes and errors of the stream', async t => {
  const dir = tempDir(t)
  const spec = multiDeviceSpec(33)
  const scsi0 = spec.devices.find(d => d.name === 'drive-scsi0') as BuildSpec['devices'][number]
  // Clusters back to front (vmstate left out: its clusters must come in order): the streaming path spills them, the copy by position does not care.
  const vmstate = spec.devices.find(d => d.name === 'vmstate')?.id
  const reversed: BuildSpec = {
    ...spec,
    devices: spec.devices.filter(d => d.id !== vmstate),
    extents: [...spec.extents].reverse().map(e => [...e].reverse().filter(s => s.dev !== vmstate)).filter(e => e.length > 0),
  }
  for (const [name, bytes] of [...variants(spec), ['reversed', buildArchive(reversed)] as [string, Buffer]]) {
    const path = join(dir, 'a.vma')
    writeFileSync(path, bytes)
    let spilled = 0
    const run = async (input: Readable, archivePath?: string): Promise<{ outcome: Record<string, unknown>, bytes: Buffer }> => {
      const c = collector()
      const options = { devices: ['scsi0'], tmpDir: dir, ...(archivePath !== undefined ? { archivePath } : {}) }
      const outcome = await extractToStream(input, c.out, options).then(r => {
        spilled = r.spilledBytes
        return { device: r.device.name, archiveBytes: r.archiveBytes }
      }, errorOf)
      return { outcome, bytes: c.bytes() }
    }
    const byPosition = await run(createReadStream(path), path)
    const spilledByPosition = spilled
    const streamed = await run(piped(bytes))
    t.same(byPosition.outcome, streamed.outcome, name)
    if (name === 'reversed') t.ok(spilledByPosition === 0 && spilled > 0, `read by position, nothing spilled (streamed: ${spilled} bytes)`)
    if (name === 'good' || name === 'reversed') {
      t.ok(byPosition.bytes.equals(scsi0.data), `${name}: the disk's bytes`)
      t.ok(streamed.bytes.equals(scsi0.data), `${name}: the disk's bytes, streamed`)
    }
  }
})

t.test('a device not asked for may be incomplete, by position as streamed; one asked for may not', async t => {
  const dir = tempDir(t)
  const spec = multiDeviceSpec(34)
  const bytes = buildArchive({ ...spec, extents: spec.extents.map(e => e.filter(s => s.dev !== 2 || s.cluster !== 1)) })
  const path = join(dir, 'a.vma')
  writeFileSync(path, bytes)
  const out = join(dir, 'out')
  const r = await extractToDirectory(createReadStream(path), out, { devices: ['scsi0'] })
  t.same(r.files.map(f => f.slice(out.length + 1)).sort(), ['disk-drive-scsi0.raw', 'qemu-server.conf', 'qemu-server.fw'])
  const c = collector()
  await extractToStream(createReadStream(path), c.out, { devices: ['scsi1'], archivePath: path })
  t.ok(c.bytes().equals((spec.devices.find(d => d.name === 'drive-scsi1') as BuildSpec['devices'][number]).data), 'scsi1 to a stream')
  const err = await extractToStream(createReadStream(path), collector().out, { devices: ['efidisk0'], archivePath: path }).catch(errorOf)
  t.match(err, { code: 'E_VMA_MISSING', device: 'drive-efidisk0' }, 'the incomplete one asked for')
  // A header that declares a device far larger than the file: refused as the stream refuses it (clusters missing), nothing allocated for it.
  const huge = { configs: [], devices: [{ id: 1, name: 'drive-scsi0', size: 2 ** 47, data: Buffer.alloc(0) }] }
  const bomb = Buffer.concat([buildHeader(huge), buildExtent(huge, [{ dev: 1, cluster: 0, data: Buffer.alloc(65536, 1) }])])
  writeFileSync(path, bomb)
  const c2 = collector()
  t.same(await extractToStream(createReadStream(path), c2.out, { archivePath: path }).catch(errorOf),
    await extractToStream(piped(bomb), collector().out).catch(errorOf), 'a 128 TiB device in a small file')
  t.equal(c2.bytes().length, 0, 'nothing written')
})

t.test('read by position, an abort stops each job with E_INTERRUPTED and leaves no final file', async t => {
  const dir = tempDir(t)
  const spec = multiDeviceSpec(35)
  const path = join(dir, 'a.vma')
  writeFileSync(path, buildArchive(spec))
  const before = new AbortController()
  before.abort()
  t.match(await verifyArchive(createReadStream(path), { signal: before.signal }).catch(errorOf), { code: 'E_INTERRUPTED' }, 'verify')
  // Aborted once the copy is under way: at the first bytes it reports.
  const during = (): { signal: AbortSignal, progress: { add: () => void } } => {
    const c = new AbortController()
    return { signal: c.signal, progress: { add: () => { c.abort() } } }
  }
  const out = join(dir, 'out')
  t.match(await extractToDirectory(createReadStream(path), out, during()).catch(errorOf), { code: 'E_INTERRUPTED' }, 'extract to a directory')
  t.same(readdirSync(dir).filter(f => f !== 'a.vma'), [], 'no target left')
  const c = collector()
  t.match(await extractToStream(createReadStream(path), c.out, { ...during(), devices: ['scsi0'], archivePath: path }).catch(errorOf),
    { code: 'E_INTERRUPTED' }, 'extract to a stream')
  t.ok(c.bytes().length < (spec.devices.find(d => d.name === 'drive-scsi0') as BuildSpec['devices'][number]).size, 'stopped before the end')
})
