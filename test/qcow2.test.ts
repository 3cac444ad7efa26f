import t, { type Test } from 'tap'
import { existsSync, readFileSync, readdirSync, symlinkSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs'
import { join } from 'node:path'
import { deflateRawSync } from 'node:zlib'
import { PassThrough } from 'node:stream'
import { once } from 'node:events'
import { qcow2StreamRecords } from '../lib/qcow2/stream.js'
import type { ClusterRecord } from '../lib/contracts.js'
import { expandCluster } from '../lib/record.js'
import { PACK_VMA, cmp, exits, q, run, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { failure } from './helpers/logged.js'
import { type BuildDevice, type Slot, buildExtent, buildHeader } from './helpers/vma-builder.js'
import { Rng } from './helpers/random.js'

const qemuImg = async (args: string[], cwd?: string): Promise<{ code: number | null, out: string }> => {
  const r = await sh(`${cwd ? `cd ${q(cwd)} && ` : ''}qemu-img ${args.map(q).join(' ')}`)
  return { code: r.code, out: r.stdout.toString() + r.stderr }
}

/** qemu-img check must pass with no errors and no leaks; compare must find the images identical. */
async function checkImage (t: Test, image: string, source: string, cwd?: string): Promise<void> {
  const check = await qemuImg(['check', '-f', 'qcow2', image], cwd)
  t.equal(check.code, 0, `qemu-img check ${image}`, { output: check.out })
  t.match(check.out, /No errors were found on the image/)
  t.notMatch(check.out, /leaked/)
  const compare = await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', source, image], cwd)
  t.equal(compare.code, 0, `qemu-img compare ${image}`, { output: compare.out })
}

t.test('extract --format qcow2: every image checks clean and equals its source', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(51))
  const out = join(dir, 'out')
  exits(t, await vma(['extract', fx.archive, out, '--format', 'qcow2']), 0)
  t.same(readdirSync(out).sort(), ['disk-drive-efidisk0.qcow2', 'disk-drive-scsi0.qcow2', 'disk-drive-scsi1.qcow2', 'disk-drive-virtio1.qcow2', 'qemu-server.conf', 'qemu-server.fw', 'vmstate.bin'])
  for (const d of fx.spec.devices.filter(d => d.name !== 'vmstate')) await checkImage(t, join(out, `disk-${d.name}.qcow2`), fx.sources.get(d.name) as string)
  t.ok(cmp(join(out, 'vmstate.bin'), fx.sources.get('vmstate') as string), 'vmstate stays raw')
  const info = JSON.parse((await qemuImg(['info', '--output=json', join(out, 'disk-drive-virtio1.qcow2')])).out)
  t.equal(info['actual-size'] <= 5 * 65536, true, 'an all-zero disk allocates no data clusters')
  t.equal(info['cluster-size'], 65536)
  t.equal(info['format-specific'].data.compat, '1.1')
  t.equal(info['format-specific'].data['refcount-bits'], 16)
  const scsi0 = readFileSync(join(out, 'disk-drive-scsi0.qcow2'))
  t.equal(scsi0.length % 65536, 0)
  const map = JSON.parse((await qemuImg(['map', '--output=json', join(out, 'disk-drive-scsi0.qcow2')])).out) as Array<{ data: boolean, length: number }>
  const mapped = map.filter(m => m.data).reduce((n, m) => n + m.length, 0)
  t.ok(scsi0.length <= mapped + 6 * 65536, `compact: ${scsi0.length} bytes for ${mapped} bytes of data clusters`)
})

t.test('extract --format qcow2 --data-file: a raw disk usable alone, and a qcow2 over it', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(52))
  const out = join(dir, 'out')
  exits(t, await vma(['extract', fx.archive, out, '--format', 'qcow2', '--data-file', '-d', 'scsi0,efidisk0']), 0)
  for (const name of ['drive-scsi0', 'drive-efidisk0']) {
    t.ok(cmp(join(out, `disk-${name}.raw`), fx.sources.get(name) as string), `${name}: the raw data file alone equals the disk`)
    // QEMU 7.2 resolves a relative data file name against the current directory, so run it from the image's.
    await checkImage(t, `disk-${name}.qcow2`, fx.sources.get(name) as string, out)
    const info = (await qemuImg(['info', `disk-${name}.qcow2`], out)).out
    t.match(info, `data file: disk-${name}.raw`)
    t.match(info, 'data file raw: true')
  }
})

t.test('tiny disks, odd sizes, a 16 GiB mostly empty disk, and to stdout', async t => {
  const dir = tempDir(t)
  const rng = new Rng(53)
  const big = 16 * 2 ** 30
  const devices: BuildDevice[] = [
    { id: 1, name: 'tiny', size: 512, data: Buffer.from(rng.fill(Buffer.alloc(512))) },
    { id: 2, name: 'block', size: 4096, data: Buffer.alloc(4096, 3) },
    { id: 3, name: 'odd', size: 65536 * 3 + 512, data: rng.fill(Buffer.alloc(65536 * 3 + 512)) },
    { id: 4, name: 'big', size: big, data: Buffer.alloc(0) },
  ]
  const slots: Slot[] = []
  for (const d of devices.slice(0, 3)) for (let c = 0; c * 65536 < d.size; c++) slots.push({ dev: d.id, cluster: c })
  // The big disk: data in three far-apart clusters, the rest zero, in reverse order.
  const bigData = new Map([[5, 0x11], [131072, 0x22], [262143, 0x33]])
  for (let c = big / 65536 - 1; c >= 0; c--) {
    const fill = bigData.get(c)
    slots.push({ dev: 4, cluster: c, ...(fill !== undefined ? { data: Buffer.alloc(65536, fill) } : { mask: 0, data: Buffer.alloc(0) }) })
  }
  const archive = join(dir, 'a.vma')
  const fd = openSync(archive, 'w')
  writeSync(fd, buildHeader({ configs: [], devices }))
  for (let i = 0; i < slots.length; i += 58) writeSync(fd, buildExtent({ devices }, slots.slice(i, i + 58)))
  closeSync(fd)
  for (const d of devices.slice(0, 3)) writeFileSync(join(dir, `${d.name}.src`), d.data)
  const bigSrc = join(dir, 'big.src')
  const bfd = openSync(bigSrc, 'w')
  ftruncateSync(bfd, big)
  for (const [c, fill] of bigData) writeSync(bfd, Buffer.alloc(65536, fill), 0, 65536, c * 65536)
  closeSync(bfd)

  const out = join(dir, 'out')
  exits(t, await vma(['extract', archive, out, '--format', 'qcow2']), 0)
  for (const d of devices) await checkImage(t, join(out, `disk-${d.name}.qcow2`), join(dir, `${d.name}.src`))
  t.ok(readFileSync(join(out, 'disk-big.qcow2')).length < 2 << 20, 'the 16 GiB disk makes a small image')
  for (const name of ['odd', 'big']) {
    // From the archive file: indexed, tables first, no temporary copy.
    const piped = join(dir, `${name}-stdout.qcow2`)
    exits(t, await sh(`${vmaCmd} extract ${q(archive)} - -d ${name} --format qcow2 --tmpdir /nonexistent > ${q(piped)}`), 0, `${name} to stdout`)
    await checkImage(t, piped, join(dir, `${name}.src`))
    // From a pipe: built in --tmpdir, then copied out.
    const fromPipe = join(dir, `${name}-pipe.qcow2`)
    exits(t, await sh(`cat ${q(archive)} | ${vmaCmd} extract - - -d ${name} --format qcow2 --tmpdir ${q(dir)} > ${q(fromPipe)}`), 0, `${name} from a pipe to stdout`)
    await checkImage(t, fromPipe, join(dir, `${name}.src`))
  }
})

/** Builds qcow2 images with qemu's own tools; returns [image, raw equivalent]. */
async function qemuImages (dir: string, src: string): Promise<Array<[string, string, string[]]>> {
  const cases: Array<[string, string[]]> = [
    ['plain.qcow2', []],
    ['compressed.qcow2', ['-c']],
    ['extl2.qcow2', ['-o', 'extended_l2=on']],
    ['big-clusters.qcow2', ['-o', 'cluster_size=2M']],
    ['small-clusters.qcow2', ['-o', 'cluster_size=4096']],
    ['v2.qcow2', ['-o', 'compat=0.10']],
    ['datafile.qcow2', ['-o', 'data_file=datafile.data']],
  ]
  const out: Array<[string, string, string[]]> = []
  for (const [name, opts] of cases) {
    const r = await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', ...opts, src, name], dir)
    if (r.code !== 0) throw new Error(r.out)
    out.push([join(dir, name), src, []])
  }
  // Written by qemu-io: data, zero clusters (the zero flag), a discard, sub-cluster writes with extended L2.
  for (const [name, opts] of [['io.qcow2', []], ['io-extl2.qcow2', ['-o', 'extended_l2=on,cluster_size=128k']]] as Array<[string, string[]]>) {
    await qemuImg(['create', '-q', '-f', 'qcow2', ...opts, name, '5M'], dir)
    const io = await sh(`cd ${q(dir)} && qemu-io -f qcow2 -c 'write -P 0x55 0 300k' -c 'write -P 0xaa 1M 4k' -c 'write -z 64k 64k' -c 'write -P 0x11 2M 1M' -c 'discard 2304k 128k' -c 'write -P 0x77 4M 8k' ${name}`)
    if (io.code !== 0) throw new Error(io.stderr)
    const raw = join(dir, `${name}.raw`)
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', name, raw], dir)
    out.push([join(dir, name), raw, []])
  }
  // A backing chain: base <- overlay with its own writes; read with --follow-backing.
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', src, 'base.qcow2'], dir)
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir)
  await sh(`cd ${q(dir)} && qemu-io -f qcow2 -c 'write -P 0x42 128k 192k' -c 'write -z 0 64k' overlay.qcow2`)
  const overlayRaw = join(dir, 'overlay.raw')
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', 'overlay.qcow2', overlayRaw], dir)
  out.push([join(dir, 'overlay.qcow2'), overlayRaw, ['--follow-backing']])
  return out
}

t.test('qcow2 made by qemu-img and qemu-io: pack-vma then extract equals qemu-img convert -O raw', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(54))
  const src = fx.sources.get('drive-scsi1') as string
  for (const [image, raw, flags] of await qemuImages(dir, src)) {
    const name = image.split('/').pop() as string
    const fromPath = join(dir, `${name}.path.vma`)
    exits(t, await run(process.execPath, [PACK_VMA, image, '-o', fromPath, ...flags]), 0, `${name}: pack-vma from a path`)
    const out = join(dir, `${name}.out`)
    exits(t, await sh(`${vmaCmd} extract ${q(fromPath)} - > ${q(out)}`), 0)
    t.ok(cmp(out, raw), `${name}: extracts equal to qemu-img convert -O raw`)
    if (flags.length > 0 || name.startsWith('datafile')) continue
    exits(t, await sh(`cat ${q(image)} | ${q(process.execPath)} ${q(PACK_VMA)} | ${vmaCmd} extract - - > ${q(out)}`), 0, `${name}: through stdin`)
    t.ok(cmp(out, raw), `${name}: from stdin too`)
  }
  const overlay = join(dir, 'overlay.qcow2')
  const refused = await run(process.execPath, [PACK_VMA, overlay, '-o', join(dir, 'x.vma')])
  exits(t, refused, 2, 'a backing file without --follow-backing is refused')
  t.match(refused.stderr, /backing file base\.qcow2;/)
  t.match(refused.stderr, /hint: --follow-backing/, 'the hint names the flag')
  t.notOk(existsSync(join(dir, 'x.vma')))
  const datafile = await sh(`cat ${q(join(dir, 'datafile.qcow2'))} | ${q(process.execPath)} ${q(PACK_VMA)} > /dev/null`)
  exits(t, datafile, 2, 'an image from stdin cannot reach its data file')
})

t.test('vma create -d format=qcow2 and an explicit backing file outside the directory', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(55))
  const src = fx.sources.get('drive-scsi0') as string
  const sub = join(dir, 'sub')
  await sh(`mkdir ${q(sub)} && cd ${q(dir)} && qemu-img convert -f raw -O qcow2 ${q(src)} base.qcow2 && qemu-img create -q -f qcow2 -b ../base.qcow2 -F qcow2 sub/top.qcow2 && qemu-io -f qcow2 -c 'write -P 9 0 64k' sub/top.qcow2 && qemu-img convert -O raw sub/top.qcow2 top.raw`)
  const climbing = await vma(['create', join(dir, 'c.vma'), '--follow-backing', '-d', `drive-scsi0=${join(sub, 'top.qcow2')}`])
  exits(t, climbing, 1, 'a backing file outside the image directory is refused')
  t.equal(failure(climbing).code, 'E_QCOW2_BACKING')
  const archive = join(dir, 'ok.vma')
  exits(t, await vma(['create', archive, '-d', `format=qcow2,backing=${join(dir, 'base.qcow2')}:drive-scsi0=${join(sub, 'top.qcow2')}`]), 0, 'named explicitly, it is used')
  exits(t, await sh(`${vmaCmd} extract ${q(archive)} - > ${q(join(dir, 'ok.raw'))}`), 0)
  t.ok(cmp(join(dir, 'ok.raw'), join(dir, 'top.raw')))
})

t.test('hostile qcow2: a clear error, exit non-zero, no archive', async t => {
  const dir = tempDir(t)
  const src = join(dir, 'src.raw')
  // Repetitive data, so that qemu-img convert -c really compresses it.
  writeFileSync(src, Buffer.alloc(1 << 20, 'vmapipe '))
  const base = join(dir, 'base.qcow2')
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', src, base])
  const good = readFileSync(base)
  const l1Offset = Number(good.readBigUInt64BE(40))
  const l2Offset = Number(good.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n)
  const mutate = (f: (b: Buffer) => void): Buffer => { const b = Buffer.from(good); f(b); return b }
  const compressed = join(dir, 'c.qcow2')
  await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', src, compressed])
  const cgood = readFileSync(compressed)
  const cl2 = Number(cgood.readBigUInt64BE(Number(cgood.readBigUInt64BE(40))) & 0x00fffffffffffe00n)
  const chost = Number(cgood.readBigUInt64BE(cl2) & ((1n << 54n) - 1n))
  const cases: Array<[string, Buffer, string]> = [
    ['L1 table past the end of the file', mutate(b => b.writeBigUInt64BE(BigInt(good.length + 65536 * 4), 40)), 'E_QCOW2_HEADER'],
    ['unaligned L1 table', mutate(b => b.writeBigUInt64BE(BigInt(l1Offset + 8), 40)), 'E_QCOW2_HEADER'],
    ['L2 table past the end of the file', mutate(b => b.writeBigUInt64BE(BigInt(good.length * 4) | (1n << 63n), l1Offset)), 'E_QCOW2_L1'],
    ['unaligned L2 table', mutate(b => b.writeBigUInt64BE(BigInt(l2Offset + 512) | (1n << 63n), l1Offset)), 'E_QCOW2_L1'],
    ['refcount table past the end', mutate(b => b.writeBigUInt64BE(BigInt(good.length * 2), 48)), 'E_QCOW2_HEADER'],
    ['unaligned refcount table', mutate(b => b.writeBigUInt64BE(BigInt(65536 + 16), 48)), 'E_QCOW2_HEADER'],
    ['huge l1_size', mutate(b => b.writeUInt32BE(0x7fffffff, 36)), 'E_QCOW2_HEADER'],
    ['huge cluster_bits', mutate(b => b.writeUInt32BE(31, 20)), 'E_QCOW2_HEADER'],
    // Reserved bits in L1/L2 entries are ignored, as QEMU ignores them: test/format-qcow2-entries.test.ts.
    ['data cluster past the end', mutate(b => b.writeBigUInt64BE(BigInt(good.length * 8) | (1n << 63n), l2Offset)), 'E_QCOW2_L2'],
    ['unknown incompatible feature', mutate(b => b.writeUInt32BE(1 << 7, 76)), 'E_QCOW2_HEADER'],
    ['encrypted', mutate(b => b.writeUInt32BE(1, 32)), 'E_QCOW2_HEADER'],
    ['compressed cluster of garbage', (() => { const b = Buffer.from(cgood); b.fill(0xff, chost, chost + 32); return b })(), 'E_QCOW2_DATA'],
    // One that inflates past its cluster is cut there, as QEMU does: test/format-qcow2-entries.test.ts.
    ['compressed cluster that inflates short', (() => {
      const b = Buffer.from(cgood)
      deflateRawSync(Buffer.alloc(1000, 7)).copy(b, chost)
      return b
    })(), 'E_QCOW2_DATA'],
  ]
  for (const [what, bytes, code] of cases) {
    const image = join(dir, 'bad.qcow2')
    writeFileSync(image, bytes)
    const r = await run(process.execPath, [PACK_VMA, image, '-o', join(dir, 'bad.vma')])
    exits(t, r, 1, `${what}: exit 1`)
    t.equal(failure(r).code, code, `${what}: ${code}`)
    t.notMatch(r.stderr, /TypeError|RangeError|at .*\.js:\d+/, `${what}: no crash`)
    t.notOk(existsSync(join(dir, 'bad.vma')), `${what}: no archive`)
    const piped = await sh(`cat ${q(image)} | ${q(process.execPath)} ${q(PACK_VMA)} --tmpdir ${q(dir)} -o ${q(join(dir, 'bad.vma'))}`)
    exits(t, piped, 1, `${what}, through stdin: exit 1`)
    t.equal(failure(piped).code, code, `${what}, through stdin: ${code}`)
    t.notMatch(piped.stderr, /TypeError|RangeError|at .*\.js:\d+/, `${what}, through stdin: no crash`)
    t.notOk(existsSync(join(dir, 'bad.vma')), `${what}, through stdin: no archive`)
  }
  t.same(readdirSync(dir).filter(f => f.startsWith('vmapipe-')), [], 'no temporary file left')
  // Backing loops, and a data file that climbs out of the directory.
  await sh(`cd ${q(dir)} && qemu-img create -q -f qcow2 a.qcow2 1M && qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2 && qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2`)
  const loop = await run(process.execPath, [PACK_VMA, join(dir, 'b.qcow2'), '--follow-backing', '-o', join(dir, 'loop.vma')])
  exits(t, loop, 1, 'a backing loop')
  t.equal(failure(loop).code, 'E_QCOW2_BACKING')
  await sh(`mkdir -p ${q(join(dir, 'inner'))} && cd ${q(join(dir, 'inner'))} && qemu-img create -q -f qcow2 -o data_file=../outside.data d.qcow2 1M`)
  symlinkSync(join(dir, 'outside.data'), join(dir, 'inner', 'link.data'))
  const climb = await run(process.execPath, [PACK_VMA, join(dir, 'inner', 'd.qcow2'), '-o', join(dir, 'climb.vma')])
  exits(t, climb, 1, 'a data file outside the directory')
  t.equal(failure(climb).code, 'E_QCOW2_BACKING')
})

t.test('qcow2 from a stream: records come while the image is still arriving, and our own images spill', async t => {
  const dir = tempDir(t)
  const src = join(dir, 'src.raw')
  const size = 8 << 20
  writeFileSync(src, new Rng(57).fill(Buffer.alloc(size)))
  const image = join(dir, 'i.qcow2')
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', src, image])
  const bytes = readFileSync(image)
  const input = new PassThrough()
  const records = qcow2StreamRecords(input, { id: 1, name: 'd', size }, { tmpDir: dir })
  const got = new Map<number, Buffer>()
  records.on('data', (r: ClusterRecord) => got.set(r.cluster, expandCluster(r, size)))
  input.write(bytes.subarray(0, bytes.length >> 1))
  for (let i = 0; i < 100 && got.size === 0; i++) await new Promise(resolve => setTimeout(resolve, 20))
  t.ok(got.size > 0, `records before the end of the input (${got.size} clusters from half the image)`)
  input.end(bytes.subarray(bytes.length >> 1))
  await once(records, 'end')
  t.equal(got.size, 128)
  t.ok(Buffer.concat([...got.entries()].sort((a, b) => a[0] - b[0]).map(e => e[1])).equals(readFileSync(src)), 'the disk, whole')
  const ours = join(dir, 'ours.qcow2')
  exits(t, await sh(`${q(process.execPath)} ${q(PACK_VMA)} ${q(src)} | ${vmaCmd} extract - - --format qcow2 > ${q(ours)}`), 0)
  const back = join(dir, 'back.raw')
  exits(t, await sh(`cat ${q(ours)} | ${q(process.execPath)} ${q(PACK_VMA)} --tmpdir ${q(dir)} | ${vmaCmd} extract - - > ${q(back)}`), 0, 'tables last: spilled, then read')
  t.ok(cmp(back, src))
  t.same(readdirSync(dir).filter(f => f.startsWith('vmapipe-')), [], 'no temporary file left')
})
