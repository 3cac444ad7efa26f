import t from 'tap'
import { readFileSync } from 'node:fs'
import { gunzipSync } from 'node:zlib'
import { assemble, readArchive } from './helpers/read.js'
import { multiDeviceSpec } from './helpers/fixtures.js'
import { type BuildSpec, Rng, TEST_UUID, buildArchive, buildExtent, buildHeader, scatter } from './helpers/vma-builder.js'
import { makeDisk } from './helpers/random.js'
import { SAMPLE } from './helpers/run.js'

t.test('records rebuild every device, whatever the chunking of the input', async t => {
  const spec = multiDeviceSpec(11)
  const bytes = buildArchive(spec)
  for (const chunk of [4093, 65536, 1 << 20, 7 << 20]) {
    const { info, records, error } = await readArchive(bytes, {}, chunk)
    t.equal(error, undefined, `no error with chunks of ${chunk}`)
    const disks = assemble(info!, records)
    for (const d of spec.devices) t.ok(disks.get(d.name)!.equals(d.data), `${d.name} with chunks of ${chunk}`)
    const clusters = spec.devices.reduce((n, d) => n + Math.ceil(d.size / 65536), 0)
    t.equal(records.length, clusters, 'one record per cluster')
  }
})

t.test('one byte at a time', async t => {
  const rng = new Rng(5)
  const devices = [{ id: 1, name: 'drive-sata0', size: 200704, data: makeDisk(rng, 200704) }]
  const spec: BuildSpec = { configs: [{ name: 'a.conf', data: Buffer.from('x') }], devices, extents: scatter(rng, devices) }
  const { info, records, error } = await readArchive(buildArchive(spec), {}, 1)
  t.equal(error, undefined)
  t.ok(assemble(info!, records).get('drive-sata0')!.equals(devices[0].data))
})

t.test('the real Proxmox sample: header as VMA-NOTES.md describes it, then missing clusters', async t => {
  const bytes = gunzipSync(readFileSync(SAMPLE))
  const { info, records, error } = await readArchive(bytes)
  t.equal(info?.uuid, '04fc12eb-0fed-4322-9aaa-f4e412f68096')
  t.equal(info?.ctime, 1635680622)
  t.same(info?.devices, [{ id: 1, name: 'drive-scsi0', size: 10737418240 }])
  t.equal(info?.configs[0].name, 'qemu-server.conf')
  t.equal(info?.configs[0].data.length, 417)
  t.equal(records.length, 116, 'two extents of 58 clusters')
  t.same(records.slice(58, 67).map(r => r.cluster), [90, 96, 112, 128, 144, 48, 160, 16, 91], 'records come in archive order, out of cluster order')
  t.equal(records.reduce((n, r) => n + r.data.length, 0), 128 * 4096, '16 + 112 data blocks')
  t.equal(error?.code, 'E_VMA_MISSING')
  t.equal(error?.device, 'drive-scsi0')
  t.equal(error?.offset, 538112)
  const partial = await readArchive(bytes, { requireComplete: false })
  t.equal(partial.error, undefined, 'without the completeness rule the prefix is consistent')
})

t.test('select passes on only the chosen devices and asks completeness of them alone', async t => {
  const spec = multiDeviceSpec(12)
  const bytes = buildArchive({ ...spec, extents: spec.extents.map(e => e.filter(s => !(s.dev === 1 && s.cluster === 3))) })
  const all = await readArchive(bytes)
  t.equal(all.error?.code, 'E_VMA_MISSING')
  t.equal(all.error?.device, 'drive-scsi0')
  t.equal(all.error?.cluster, undefined)
  t.match(all.error?.message, /1 of 49 clusters are missing \(first missing: cluster 3\)/)
  const some = await readArchive(bytes, { select: devices => devices.filter(d => d.name === 'drive-efidisk0') })
  t.equal(some.error, undefined)
  t.ok(some.records.every(r => r.device === 2))
  t.equal(some.records.length, 9)
})

t.test('the header survives the test encoder unchanged in every field', async t => {
  const head = buildHeader({ uuid: TEST_UUID, ctime: 42, configs: [{ name: 'x', data: Buffer.alloc(0) }], devices: [{ id: 255, name: 'd', size: 1, data: Buffer.alloc(1) }] })
  const { info, error } = await readArchive(Buffer.concat([head, buildExtent({ devices: [{ id: 255, name: 'd', size: 1, data: Buffer.from([7]) }] }, [{ dev: 255, cluster: 0 }])]))
  t.equal(error, undefined)
  t.same(info, { kind: 'archive', uuid: '01234567-89ab-cdef-0123-456789abcdef', ctime: 42, configs: [{ name: 'x', data: Buffer.alloc(0) }], devices: [{ id: 255, name: 'd', size: 1 }] })
})
