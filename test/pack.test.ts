import t from 'tap'
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { execFileSync, spawn } from 'node:child_process'
import { PACK_VMA, VMA, cmp, exits, q, run, sh, smallFileSystem, tempDir, vma, vmaCmd } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { walk } from './helpers/walk.js'
import { RawReader } from '../lib/raw/stream.js'
import { RecordMerger } from '../lib/jobs/merge.js'
import { VmaWriter } from '../lib/vma/writer.js'
import { VmaReader } from '../lib/vma/stream.js'
import type { ArchiveInfo, StreamItem } from '../lib/contracts.js'

const packCmd = `${q(process.execPath)} ${q(PACK_VMA)}`
const fileOf = (name: string): string => name === 'vmstate' ? 'vmstate.bin' : `disk-${name}.raw`

t.test('vma create round-trips several disks and configs through every compression, from files and stdin', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(41))
  const conf = join(dir, 'qemu-server.conf')
  writeFileSync(conf, fx.spec.configs[0].data)
  for (const ext of ['', '.zst', '.gz', '.lzo']) {
    const archive = join(dir, `packed.vma${ext}`)
    // drive-virtio1 (all zeros) comes from stdin; the rest from files.
    const disks = fx.spec.devices.map(d => d.name === 'drive-virtio1' ? `-d size=${d.size}:${d.name}=-` : `-d ${d.name}=${q(fx.sources.get(d.name) as string)}`).join(' ')
    const r = await sh(`${vmaCmd} create ${q(archive)} -c ${q(conf)} ${disks} < ${q(fx.sources.get('drive-virtio1') as string)}`)
    exits(t, r, 0, `create ${ext || '.vma'}`)
    const list = JSON.parse((await vma(['list', archive, '--json'])).stdout.toString())
    t.equal(list.compression, { '': 'none', '.zst': 'zstd', '.gz': 'gzip', '.lzo': 'lzo' }[ext], 'compression follows the name')
    t.same(list.devices.map((d: { id: number }) => d.id), [1, 2, 3, 4, 5], 'device ids from 1 in -d order')
    exits(t, await vma(['verify', archive]), 0, 'vma verify accepts it')
    const out = join(dir, `out${ext}`)
    exits(t, await vma(['extract', archive, out]), 0)
    for (const d of fx.spec.devices) t.ok(cmp(join(out, fileOf(d.name)), fx.sources.get(d.name) as string), `${ext || '.vma'}: ${d.name}`)
    t.same(readFileSync(join(out, 'qemu-server.conf')), fx.spec.configs[0].data)
  }
})

t.test('the archive follows the reference layout', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(42))
  const archive = join(dir, 'a.vma')
  exits(t, await vma(['create', archive, '--uuid', '6e51303b-e166-46c9-a269-63ed8b57f811', '--ctime', '2024-01-31T02:00:01Z', ...fx.spec.devices.flatMap(d => ['-d', `${d.name}=${fx.sources.get(d.name)}`])]), 0)
  const bytes = readFileSync(archive)
  const w = walk(bytes)
  t.ok(w.headerMd5Ok, 'header MD5')
  t.equal(w.uuid, '6e51303be16646c9a26963ed8b57f811')
  t.equal(bytes.readBigUInt64BE(24), 1706666401n, 'ctime')
  t.equal(w.headerSize % 512, 0)
  t.ok(w.extents.every(e => e.md5Ok), 'every extent MD5 and uuid')
  t.ok(w.extents.every(e => e.slots.length >= 1 && e.slots.length <= 58), 'extents of 1..58 clusters')
  t.ok(w.extents.slice(0, -1).every(e => e.slots.length === 58), 'full extents but the last')
  t.ok(w.extents.every(e => e.blockCount === e.slots.reduce((n, s) => n + popcount(s.mask), 0)), 'block_count matches the masks')
  const virtio = w.extents.flatMap(e => e.slots).filter(s => s.dev === 3)
  t.equal(virtio.length, 16, 'every cluster of the all-zero disk is present')
  t.ok(virtio.every(s => s.mask === 0), '... with mask 0')
  const order = w.extents.flatMap(e => e.slots.map(s => s.dev))
  t.same([...new Set(order)], [1, 2, 3, 4, 5], 'disks one after another, in -d order')
  t.equal(order.filter((d, i) => i > 0 && d !== order[i - 1]).length, 4)
  const vm = w.extents.flatMap(e => e.slots).filter(s => s.dev === 4).map(s => s.cluster)
  t.same(vm, [...vm].sort((a, b) => a - b), 'vmstate in order')
})

t.test('--interleave mixes the disks in extents and still round-trips', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(47))
  const archive = join(dir, 'i.vma')
  exits(t, await vma(['create', archive, '--interleave', ...fx.spec.devices.flatMap(d => ['-d', `${d.name}=${fx.sources.get(d.name)}`])]), 0)
  const first = walk(readFileSync(archive)).extents[0].slots
  t.ok(new Set(first.map(s => s.dev)).size > 1, 'the first extent holds several disks')
  exits(t, await vma(['extract', archive, join(dir, 'o')]), 0)
  for (const d of fx.spec.devices) t.ok(cmp(join(dir, 'o', fileOf(d.name)), fx.sources.get(d.name) as string), d.name)
})

t.test('pack-vma: a file or stdin to stdout, -o with compression by name', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(43))
  const src = fx.sources.get('drive-scsi1') as string
  const size = readFileSync(src).length
  exits(t, await sh(`cat ${q(src)} | ${packCmd} --size ${size} | ${vmaCmd} extract - ${q(join(dir, 'a'))}`), 0)
  t.ok(cmp(join(dir, 'a/disk-drive-scsi0.raw'), src), 'cat disk | pack-vma --size N | vma extract - out')
  const conf = join(dir, '100.conf')
  writeFileSync(conf, 'cores: 4\n')
  exits(t, await sh(`${packCmd} ${q(src)} --name drive-virtio3 -c ${q(conf)} > ${q(join(dir, 'b.vma'))}`), 0)
  exits(t, await vma(['extract', join(dir, 'b.vma'), join(dir, 'b')]), 0)
  t.ok(cmp(join(dir, 'b/disk-drive-virtio3.raw'), src))
  t.equal(readFileSync(join(dir, 'b/qemu-server.conf'), 'utf8'), 'cores: 4\n', 'a lone <vmid>.conf stored as qemu-server.conf, as vzdump names it')
  exits(t, await run(process.execPath, [PACK_VMA, src, '-o', join(dir, 'c.vma.gz')]), 0)
  t.equal(JSON.parse((await vma(['list', join(dir, 'c.vma.gz'), '--json'])).stdout.toString()).compression, 'gzip')
  const help = await run(process.execPath, [PACK_VMA, '--help'])
  exits(t, help, 0)
  t.match(help.stdout.toString(), /Usage: pack-vma/)
})

t.test('pack then extract in one process round-trips (library)', async t => {
  const spec = multiDeviceSpec(44)
  const info: ArchiveInfo = { kind: 'archive', uuid: '01234567-89ab-cdef-0123-456789abcdef', ctime: 1, configs: spec.configs, devices: spec.devices.map(d => ({ id: d.id, name: d.name, size: d.size })) }
  const sources = spec.devices.map(d => Readable.from([d.data.subarray(0, 100000), d.data.subarray(100000)])
    .pipe(new RawReader({ id: d.id, name: d.name, size: d.size })))
  const disks = new Map(spec.devices.map(d => [d.id, Buffer.alloc(d.size)]))
  let got: ArchiveInfo | undefined
  await pipeline(new RecordMerger(info, sources), new VmaWriter(), new VmaReader(), new Writable({
    objectMode: true,
    write (item: StreamItem, _e, cb) {
      if (item.kind === 'archive') got = item
      else {
        const disk = disks.get(item.device) as Buffer
        let at = 0
        for (let b = 0; b < 16; b++) {
          if ((item.mask >> b) & 1) {
            item.data.copy(disk, item.cluster * 65536 + b * 4096, at, at + Math.min(4096, disk.length - item.cluster * 65536 - b * 4096))
            at += 4096
          }
        }
      }
      cb()
    },
  }))
  t.same(got?.devices, info.devices)
  for (const d of spec.devices) t.ok(disks.get(d.id)?.equals(d.data), `${d.name} round-trips`)
})

t.test('bad inputs: clear error, non-zero exit, no archive under the final name', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(45))
  const src = fx.sources.get('drive-efidisk0') as string
  const size = readFileSync(src).length
  const out = join(dir, 'out.vma')
  const nothingLeft = (what: string): void => { t.same(readdirSync(dir).filter(f => f.includes('out.vma')), [], `${what}: nothing left behind`) }
  const cases: Array<[string, string, number, string | RegExp]> = [
    ['a disk shorter than declared', `cat ${q(src)} | ${vmaCmd} create ${q(out)} -d size=${size + 4096}:drive-scsi0=-`, 1, /E_INPUT_SIZE.*ended after 540672 bytes; 544768 were declared/],
    ['a disk longer than declared', `cat ${q(src)} | ${vmaCmd} create ${q(out)} -d size=${size - 512}:drive-scsi0=-`, 1, 'E_INPUT_SIZE'],
    ['a size that contradicts the file', `${vmaCmd} create ${q(out)} -d size=1M:drive-scsi0=${q(src)}`, 1, 'E_INPUT_SIZE'],
    ['raw stdin without a size', `cat ${q(src)} | ${vmaCmd} create ${q(out)} -d drive-scsi0=-`, 2, /size of stdin cannot be seen/],
    ['a missing input', `${vmaCmd} create ${q(out)} -d drive-scsi0=${q(join(dir, 'nope.raw'))}`, 3, 'E_IO'],
    ['a directory as input', `${vmaCmd} create ${q(out)} -d drive-scsi0=${q(dir)}`, 3, 'E_IO'],
    ['an unreadable config', `${vmaCmd} create ${q(out)} -c ${q(join(dir, 'nope.conf'))} -d drive-scsi0=${q(src)}`, 3, 'E_IO'],
    ['a config blob over 65535 bytes', `${vmaCmd} create ${q(out)} -c ${q(src)} -d drive-scsi0=${q(src)}`, 2, 'E_LIMIT'],
    ['an unsafe device name', `${vmaCmd} create ${q(out)} -d ../evil=${q(src)}`, 2, /not a safe file name/],
    ['two disks from stdin', `${vmaCmd} create ${q(out)} -d size=1M:a=- -d size=1M:b=-`, 2, 'E_USAGE'],
    ['an unknown compression', `${vmaCmd} create ${q(out)} --compress xz -d a=${q(src)}`, 2, /--compress xz/],
    ['more devices than VMA holds', `${vmaCmd} create ${q(out)} ${Array.from({ length: 255 }, (_, i) => `-d d${i}=${q(src)}`).join(' ')}`, 2, 'E_LIMIT'],
  ]
  for (const [what, script, code, expected] of cases) {
    const r = await sh(script)
    exits(t, r, code, `${what}: exit ${code}`)
    // A code where the error has its own; the wording where a usage error's words are all there is to tell them apart.
    if (typeof expected === 'string') t.equal(failure(r).code, expected, `${what}: ${expected}`)
    else t.match(r.stderr, expected, `${what}: says so`)
    nothingLeft(what)
  }
  writeFileSync(out, 'precious')
  const exists = await vma(['create', out, '-d', `drive-scsi0=${src}`])
  exits(t, exists, 3, 'an existing output is kept')
  t.equal(readFileSync(out, 'utf8'), 'precious')
  exits(t, await vma(['create', out, '--force', '-d', `drive-scsi0=${src}`]), 0, '--force replaces it')
})

t.test('a full disk while writing: exit 3, no archive under the final name', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(46))
  const args = fx.spec.devices.flatMap(d => ['-d', `${d.name}=${fx.sources.get(d.name)}`])
  const full = await sh(`${vmaCmd} create - ${args.map(q).join(' ')} > /dev/full`)
  exits(t, full, 3, 'stdout on /dev/full')
  t.match(full.stderr, /no space left on device/)
  const mnt = smallFileSystem(t, dir, '1m')
  if (mnt === undefined) return
  const r = await vma(['create', join(mnt, 'backup.vma'), ...args])
  exits(t, r, 3, 'a 1 MiB file system fills up')
  t.equal(failure(r).code, 'E_IO')
  t.same(readdirSync(mnt), [], 'neither the archive nor its temporary file is left')
})

function popcount (m: number): number { let n = 0; for (; m; m &= m - 1) n++; return n }

t.test('SIGTERM mid-create: exit 143, neither archive nor temporary file left', async t => {
  const dir = tempDir(t)
  const out = join(dir, 'backup.vma.zst')
  const child = spawn(process.execPath, [VMA, 'create', out, '-d', 'size=8M:drive-scsi0=-'], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  child.stdin.on('error', () => {}) // the rest of the input meets a closed pipe
  child.stdin.write(Buffer.alloc(4 << 20, 1))
  for (let i = 0; i < 100 && !readdirSync(dir).some(f => f.includes('partial')); i++) await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(readdirSync(dir).some(f => f.includes('partial')), 'writing had started, under a temporary name')
  child.kill('SIGTERM')
  const code = await new Promise(resolve => child.on('close', resolve))
  t.equal(code, 143, 'exit 143', { stderr })
  t.same(readdirSync(dir), [], 'nothing left')
})

t.test('an output that is a device or a FIFO is written in place, never replaced by a file', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(48))
  const src = fx.sources.get('drive-efidisk0') as string
  exits(t, await run(process.execPath, [PACK_VMA, src, '-o', '/dev/null', '--force']), 0)
  t.equal(statSync('/dev/null').isCharacterDevice(), true, '/dev/null is still a device')
  const fifo = join(dir, 'out.fifo')
  execFileSync('mkfifo', [fifo])
  const reader = run('sh', ['-c', `cat ${q(fifo)} > ${q(join(dir, 'through-fifo.vma'))}`])
  exits(t, await run(process.execPath, [PACK_VMA, src, '-o', fifo]), 0, 'no --force needed for a FIFO')
  exits(t, await reader, 0)
  t.ok(statSync(fifo).isFIFO(), 'the FIFO is still a FIFO')
  exits(t, await vma(['extract', join(dir, 'through-fifo.vma'), join(dir, 'out')]), 0)
  t.ok(cmp(join(dir, 'out', 'disk-drive-scsi0.raw'), src))
})
