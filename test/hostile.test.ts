import t from 'tap'
import { readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { readArchive } from './helpers/read.js'
import { type BuildDevice, type BuildSpec, type Slot, Rng, buildExtent, buildHeader, scatter } from './helpers/vma-builder.js'
import { makeDisk } from './helpers/random.js'
import { exits, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'

/** A small, valid archive to break: two devices, one of 100 KiB, and a config. */
function smallSpec (): BuildSpec {
  const rng = new Rng(77)
  const devices: BuildDevice[] = [
    { id: 1, name: 'drive-scsi0', size: 102400, data: makeDisk(rng, 102400) },
    { id: 2, name: 'vmstate', size: 131072, data: makeDisk(rng, 131072) },
  ]
  return { configs: [{ name: 'qemu-server.conf', data: Buffer.from('cores: 1\n') }], devices, extents: scatter(rng, devices) }
}

interface Case {
  name: string
  code: string
  /** Where the error must point, when it is known exactly. */
  offset?: number
  bytes: () => Buffer
}

const spec = smallSpec()
const header = (tweak?: (h: Buffer) => void, s: Partial<BuildSpec> = {}): Buffer => buildHeader({ ...spec, ...s }, tweak)
const extent = (slots: Slot[], tweak = {}): Buffer => buildExtent(spec, slots, tweak)
const goodExtents = (): Buffer[] => spec.extents.map(e => extent(e))
const H = header().length
const all: Slot[] = [{ dev: 1, cluster: 0 }, { dev: 1, cluster: 1 }, { dev: 2, cluster: 0 }, { dev: 2, cluster: 1 }]
const named = (devName: string, configName = 'qemu-server.conf'): Buffer => buildHeader({
  configs: [{ name: configName, data: Buffer.from('x') }],
  devices: [{ ...spec.devices[0], name: devName }],
})

const cases: Case[] = [
  { name: 'wrong magic', code: 'E_VMA_MAGIC', offset: 0, bytes: () => { const b = Buffer.concat([header(), ...goodExtents()]); b.write('QFI', 0, 'latin1'); return b } },
  { name: 'short garbage', code: 'E_VMA_MAGIC', offset: 0, bytes: () => Buffer.from('hello') },
  { name: 'empty input', code: 'E_VMA_TRUNCATED', offset: 0, bytes: () => Buffer.alloc(0) },
  { name: 'header MD5 wrong', code: 'E_VMA_HEADER_MD5', offset: 32, bytes: () => { const h = header(); h[40] ^= 1; return Buffer.concat([h, ...goodExtents()]) } },
  { name: 'version 2', code: 'E_VMA_VERSION', offset: 4, bytes: () => Buffer.concat([header(h => h.writeUInt32BE(2, 4)), ...goodExtents()]) },
  { name: 'header_size absurdly large', code: 'E_VMA_HEADER_SIZE', offset: 56, bytes: () => { const h = header(); h.writeUInt32BE(0xfffffe00, 56); return h } },
  { name: 'header_size too small', code: 'E_VMA_HEADER_SIZE', offset: 56, bytes: () => { const h = header(); h.writeUInt32BE(512, 56); return h } },
  { name: 'blob buffer past header_size', code: 'E_VMA_BLOB', offset: 52, bytes: () => Buffer.concat([header(h => h.writeUInt32BE(H, 52)), ...goodExtents()]) },
  { name: 'blob buffer inside the fixed header', code: 'E_VMA_BLOB', offset: 48, bytes: () => Buffer.concat([header(h => h.writeUInt32BE(4096, 48)), ...goodExtents()]) },
  { name: 'device name pointer to nowhere', code: 'E_VMA_BLOB', offset: 4096 + 32, bytes: () => Buffer.concat([header(h => h.writeUInt32BE(7, 4096 + 32)), ...goodExtents()]) },
  { name: 'config data pointer to nowhere', code: 'E_VMA_BLOB', offset: 3068, bytes: () => Buffer.concat([header(h => h.writeUInt32BE(3, 3068)), ...goodExtents()]) },
  { name: 'name without its NUL', code: 'E_VMA_BLOB', offset: 2044, bytes: () => Buffer.concat([header(h => { h[12288 + 1 + 2 + 'qemu-server.conf'.length] = 0x41 }), ...goodExtents()]) },
  { name: 'no devices', code: 'E_VMA_NO_DEVICES', bytes: () => buildHeader({ configs: [], devices: [] }) },
  { name: 'device larger than VMA can address', code: 'E_VMA_HEADER', offset: 4096 + 32 + 8, bytes: () => Buffer.concat([header(h => h.writeBigUInt64BE(2n ** 60n, 4096 + 32 + 8)), ...goodExtents()]) },
  { name: 'device name with /', code: 'E_VMA_NAME', bytes: () => named('a/b') },
  { name: 'device name ..', code: 'E_VMA_NAME', bytes: () => named('..') },
  { name: 'device name climbing out', code: 'E_VMA_NAME', bytes: () => named('../../etc/x') },
  { name: 'device name with a NUL inside', code: 'E_VMA_NAME', bytes: () => named('drive\0x') },
  { name: 'device name with a newline', code: 'E_VMA_NAME', bytes: () => named('drive\nx') },
  { name: 'config name with /', code: 'E_VMA_NAME', bytes: () => named('drive-scsi0', 'etc/passwd') },
  { name: 'config name climbing out', code: 'E_VMA_NAME', bytes: () => named('drive-scsi0', '../../../x.conf') },
  { name: 'config name with an escape character', code: 'E_VMA_NAME', bytes: () => named('drive-scsi0', 'a\x1bb') },
  { name: 'two devices with one name', code: 'E_VMA_NAME', bytes: () => buildHeader({ configs: [], devices: [spec.devices[0], { ...spec.devices[0], id: 3 }] }) },
  { name: 'extent MD5 wrong', code: 'E_VMA_EXTENT_MD5', offset: H + 24, bytes: () => Buffer.concat([header(), extent(all, { after: (h: Buffer) => { h[100] ^= 4 } })]) },
  { name: 'extent uuid wrong', code: 'E_VMA_EXTENT_UUID', offset: H + 8, bytes: () => Buffer.concat([header(), extent(all, { header: (h: Buffer) => { h[9] ^= 1 } })]) },
  { name: 'extent magic wrong', code: 'E_VMA_EXTENT_MAGIC', offset: H, bytes: () => Buffer.concat([header(), extent(all, { header: (h: Buffer) => { h.write('VMAX', 0, 'latin1') } })]) },
  { name: 'extent reserved field set', code: 'E_VMA_EXTENT_MAGIC', offset: H, bytes: () => Buffer.concat([header(), extent(all, { header: (h: Buffer) => { h[5] = 1 } })]) },
  { name: 'garbage after the header', code: 'E_VMA_EXTENT_MAGIC', offset: H, bytes: () => Buffer.concat([header(), Buffer.alloc(512, 0x55)]) },
  { name: 'block_count above the masks', code: 'E_VMA_BLOCK_COUNT', offset: H + 6, bytes: () => Buffer.concat([header(), extent(all, { blockCount: 944 })]) },
  { name: 'block_count below the masks', code: 'E_VMA_BLOCK_COUNT', offset: H + 6, bytes: () => Buffer.concat([header(), extent(all, { blockCount: 1 })]) },
  { name: 'dev_id with no device', code: 'E_VMA_DEVICE', offset: H + 40 + 8, bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 0 }, { dev: 9, cluster: 0, data: Buffer.alloc(65536, 1) }])]) },
  { name: 'duplicated cluster in one extent', code: 'E_VMA_DUPLICATE', offset: H + 40 + 16, bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 0 }, { dev: 1, cluster: 1 }, { dev: 1, cluster: 0 }])]) },
  { name: 'duplicated cluster across extents', code: 'E_VMA_DUPLICATE', bytes: () => Buffer.concat([header(), ...goodExtents(), extent([{ dev: 1, cluster: 1 }])]) },
  { name: 'cluster past its device end', code: 'E_VMA_CLUSTER_RANGE', offset: H + 40, bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 2 }])]) },
  { name: 'cluster number 2^32-1', code: 'E_VMA_CLUSTER_RANGE', offset: H + 40, bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 0xffffffff, data: Buffer.alloc(65536, 3) }])]) },
  { name: 'blocks past the end of a partial last cluster', code: 'E_VMA_CLUSTER_RANGE', offset: H + 40, bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 1, data: Buffer.alloc(65536, 9) }])]) },
  { name: 'vmstate out of order', code: 'E_VMA_VMSTATE_ORDER', offset: H + 40, bytes: () => Buffer.concat([header(), extent([{ dev: 2, cluster: 1 }, { dev: 2, cluster: 0 }])]) },
  { name: 'vmstate cluster repeated', code: 'E_VMA_VMSTATE_ORDER', offset: H + 40 + 16, bytes: () => Buffer.concat([header(), extent([{ dev: 2, cluster: 0 }, { dev: 1, cluster: 0 }, { dev: 2, cluster: 0 }])]) },
  { name: 'a missing cluster', code: 'E_VMA_MISSING', bytes: () => Buffer.concat([header(), extent([{ dev: 1, cluster: 0 }, { dev: 2, cluster: 0 }, { dev: 2, cluster: 1 }])]) },
  { name: 'truncated inside the data of an extent', code: 'E_VMA_TRUNCATED', bytes: () => Buffer.concat([header(), extent(all)]).subarray(0, H + 512 + 5000) },
]

for (const c of cases) {
  t.test(`${c.name}: ${c.code}`, async t => {
    const { error } = await readArchive(c.bytes())
    t.equal(error?.code, c.code, error?.message ?? 'no error')
    if (c.offset !== undefined) t.equal(error?.offset, c.offset, 'the error points at the problem')
    t.match(error?.message, /\(.*byte offset \d+\)$|device|name|declares no devices/, 'the message says where')
  })
}

t.test('the command line: exit 1, no output under a final name, nothing outside the target', async t => {
  const dir = tempDir(t)
  for (const c of cases) {
    const archive = join(dir, 'bad.vma')
    writeFileSync(archive, c.bytes())
    const r = await vma(['extract', archive, join(dir, 'out')])
    exits(t, r, 1, `${c.name}: exit 1`)
    t.same(readdirSync(dir), ['bad.vma'], `${c.name}: nothing left behind`)
    const last = JSON.parse(r.stderr.trim().split('\n').pop() as string) as { code: string, level: number }
    t.equal(last.code, c.code, `${c.name}: the log names the error`)
  }
  for (const c of cases.filter(c => ['E_VMA_HEADER_MD5', 'E_VMA_DUPLICATE', 'E_VMA_TRUNCATED'].includes(c.code))) {
    const archive = join(dir, 'bad.vma')
    writeFileSync(archive, c.bytes())
    const verify = await vma(['verify', archive])
    exits(t, verify, 1, `${c.name}: verify fails`)
    t.match(verify.stdout.toString(), new RegExp(`FAILED: ${c.code}: .*byte offset \\d+`), 'verify names the problem and where')
  }
})

t.test('a config blob named like a disk file is refused before anything is written', async t => {
  const dir = tempDir(t)
  const archive = join(dir, 'clash.vma')
  writeFileSync(archive, Buffer.concat([buildHeader({ configs: [{ name: 'disk-drive-scsi0.raw', data: Buffer.from('x') }], devices: [spec.devices[0]] }), extent([{ dev: 1, cluster: 0 }, { dev: 1, cluster: 1 }])]))
  const r = await vma(['extract', archive, join(dir, 'out')])
  exits(t, r, 1)
  t.equal(failure(r).code, 'E_NAME_CLASH')
  t.same(readdirSync(dir), ['clash.vma'])
})

t.test('truncation at any byte is an error, never a crash or a hang', async t => {
  const parts = [header(), ...goodExtents()]
  const whole = Buffer.concat(parts)
  // Every byte of the header and of each extent header, and every 509th byte of the data.
  const cuts = new Set<number>()
  let start = 0
  for (const part of parts) {
    for (let i = 0; i < Math.min(part.length, start === 0 ? part.length : 514); i++) cuts.add(start + i)
    for (let i = 0; i < part.length; i += 509) cuts.add(start + i)
    start += part.length
  }
  const seen = new Map<string, number>()
  for (const n of cuts) {
    const { error } = await readArchive(whole.subarray(0, n))
    seen.set(error?.code ?? 'none', (seen.get(error?.code ?? 'none') ?? 0) + 1)
  }
  t.same([...seen.keys()].sort(), ['E_VMA_MISSING', 'E_VMA_TRUNCATED'], `all ${cuts.size} cuts fail (${JSON.stringify(Object.fromEntries(seen))})`)
  t.equal(seen.get('E_VMA_MISSING'), spec.extents.length, 'only cuts at extent boundaries read as complete-but-missing')
  t.equal((await readArchive(whole)).error, undefined, 'the whole archive is fine')
})
