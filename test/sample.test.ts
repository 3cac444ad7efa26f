import t from 'tap'
import { exits, q, sh, vma, vmaCmd, SAMPLE } from './helpers/run.js'
import { failure } from './helpers/logged.js'

// test/fixtures/proxmox-sample.vma.gz: the first 538112 bytes of a real Proxmox archive.
const UUID = '04fc12eb-0fed-4322-9aaa-f4e412f68096'

const sources: Array<[string, (args: string[]) => ReturnType<typeof vma>]> = [
  ['a path', async args => await vma([args[0], SAMPLE, ...args.slice(1)])],
  ['stdin', async args => await vma([args[0], '-', ...args.slice(1)], { stdin: { file: SAMPLE } })],
]

for (const [from, run] of sources) {
  t.test(`list from ${from}`, async t => {
    const r = await run(['list'])
    exits(t, r, 0)
    const text = r.stdout.toString()
    t.match(text, UUID)
    t.match(text, '2021-10-31T11:43:42.000Z (1635680622)')
    t.match(text, /1\s+drive-scsi0\s+10737418240 bytes/)
    t.match(text, /qemu-server\.conf\s+417 bytes/)
    t.match(text, '(gzip)')
    const json = JSON.parse((await run(['list', '--json'])).stdout.toString())
    t.same(json, {
      uuid: UUID,
      ctime: 1635680622,
      created: '2021-10-31T11:43:42.000Z',
      compression: 'gzip',
      devices: [{ id: 1, name: 'drive-scsi0', size: 10737418240 }],
      configs: [{ name: 'qemu-server.conf', size: 417 }],
    })
  })

  t.test(`config from ${from}`, async t => {
    const r = await run(['config'])
    exits(t, r, 0)
    t.equal(r.stdout.length, 417)
    t.match(r.stdout.toString(), /^boot: order=scsi0;ide2;net0\n/)
    t.match(r.stdout.toString(), /#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n$/)
    const missing = await run(['config', '-c', 'qemu-server.fw'])
    exits(t, missing, 2)
    t.equal(failure(missing).code, 'E_NOT_FOUND')
    t.match(failure(missing).msg, /qemu-server\.fw.*qemu-server\.conf/, 'naming the blob and those the archive has')
  })

  t.test(`verify from ${from} fails on the missing clusters`, async t => {
    const r = await run(['verify'])
    exits(t, r, 1)
    const text = r.stdout.toString()
    t.match(text, 'clusters  116 present (108 all zero), 163724 missing')
    t.match(text, 'FAILED: E_VMA_MISSING: 163724 of 163840 clusters are missing (first missing: cluster 23) (device drive-scsi0, byte offset 538112)')
    const json = JSON.parse((await run(['verify', '--json'])).stdout.toString())
    t.equal(json.ok, false)
    t.equal(json.error.code, 'E_VMA_MISSING')
    t.equal(json.error.offset, 538112)
    t.equal(json.extents, 2)
    t.equal(json.dataBlocks, 128)
    t.equal(json.archiveBytes, 538112)
  })
}

t.test('extract of the sample fails and leaves no file under a final name', async t => {
  const r = await sh(`cd "$(mktemp -d)" && ${vmaCmd} extract ${q(SAMPLE)} out; echo "exit=$?"; ls -A`)
  t.match(r.stdout.toString(), /^exit=1\n$/, 'exit 1 and the directory holds nothing')
  t.equal(failure(r).code, 'E_VMA_MISSING')
})
