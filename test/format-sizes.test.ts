/**
 * Issue 12, defect 11: disks whose size is not a multiple of 512 keep their
 * tail in every format. VMA records whole sectors as Proxmox's writer does
 * (its `vma extract` restores only whole sectors), qcow2 writes the size QEMU
 * reads back whole; both pad with zeros.
 */
import t, { type Test } from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Rng, makeDisk } from './helpers/random.js'
import { buildArchive, scatter } from './helpers/vma-builder.js'
import { PACK_VMA, PVE_VMA, cmp, exits, needsPveVma, run, tempDir, vma } from './helpers/run.js'

const SIZE = 10_000_001
const PADDED = 10_000_384

function oddDisk (dir: string): { raw: string, padded: string } {
  const data = makeDisk(new Rng(11), SIZE)
  data[SIZE - 1] = 0x5a // the last byte, alone in its sector, is not zero
  const raw = join(dir, 'odd.raw')
  const padded = join(dir, 'padded.raw')
  writeFileSync(raw, data)
  writeFileSync(padded, Buffer.concat([data, Buffer.alloc(PADDED - SIZE)]))
  return { raw, padded }
}

async function compareStrict (t: Test, image: string, format: string, raw: string): Promise<void> {
  const info = await run('qemu-img', ['info', '--output=json', '-f', format, image])
  t.equal(JSON.parse(info.stdout.toString())['virtual-size'], PADDED, `${format}: QEMU sees ${PADDED} bytes`)
  exits(t, await run('qemu-img', ['compare', '-f', format, '-F', 'raw', image, raw]), 0, `${format}: qemu-img compare with the zero-padded disk`)
}

t.test('pack records whole sectors; Proxmox and vmapipe restore every byte', async t => {
  const dir = tempDir(t)
  const { raw, padded } = oddDisk(dir)
  const archive = join(dir, 'odd.vma')
  exits(t, await run(process.execPath, [PACK_VMA, raw, '-q', '-o', archive]), 0, 'pack-vma')
  const report = JSON.parse((await vma(['verify', '--json', archive])).stdout.toString())
  t.equal(report.devices[0].size, PADDED, 'the header records the size rounded up to 512')
  exits(t, await vma(['extract', '-q', archive, join(dir, 'ours')]), 0)
  t.ok(cmp(join(dir, 'ours/disk-drive-scsi0.raw'), padded), 'vma extract: the disk and its zero padding, byte for byte')

  t.test('Proxmox vma extract', needsPveVma, async t => {
    exits(t, await run(PVE_VMA as string, ['verify', archive]), 0, 'pve-vma verify')
    exits(t, await run(PVE_VMA as string, ['extract', archive, join(dir, 'pve')]), 0, 'pve-vma extract')
    t.ok(cmp(join(dir, 'pve/disk-drive-scsi0.raw'), padded), 'the last partial sector is restored, not zeros')
  })
  t.test('Proxmox vma create records the same size', needsPveVma, async t => {
    const ref = join(dir, 'ref.vma')
    exits(t, await run(PVE_VMA as string, ['create', ref, '-v', `drive-scsi0=${raw}`]), 0)
    t.equal(JSON.parse((await vma(['verify', '--json', ref])).stdout.toString()).devices[0].size, PADDED)
  })
})

t.test('an archive that records an odd size (older writers): qcow2 and Parallels output keep its tail', async t => {
  const dir = tempDir(t)
  const { padded } = oddDisk(dir)
  const data = readFileSync(padded).subarray(0, SIZE)
  const devices = [{ id: 1, name: 'drive-scsi0', size: SIZE, data }]
  const archive = join(dir, 'odd.vma')
  writeFileSync(archive, buildArchive({ configs: [], devices, extents: scatter(new Rng(3), devices) }))

  exits(t, await vma(['extract', '-q', archive, join(dir, 'raw')]), 0)
  t.equal(readFileSync(join(dir, 'raw/disk-drive-scsi0.raw')).length, SIZE, 'raw extract keeps the recorded size exactly')
  t.ok(readFileSync(join(dir, 'raw/disk-drive-scsi0.raw')).equals(data))

  exits(t, await vma(['extract', '-q', archive, join(dir, 'q'), '--format', 'qcow2']), 0)
  await compareStrict(t, join(dir, 'q/disk-drive-scsi0.qcow2'), 'qcow2', padded)
  exits(t, await run('qemu-img', ['check', join(dir, 'q/disk-drive-scsi0.qcow2')]), 0, 'qemu-img check')

  const piped = join(dir, 'piped.qcow2')
  const r = await vma(['extract', '-q', archive, '-', '--format', 'qcow2', '--tmpdir', dir])
  exits(t, r, 0, 'qcow2 to stdout')
  writeFileSync(piped, r.stdout)
  await compareStrict(t, piped, 'qcow2', padded)

  exits(t, await vma(['extract', '-q', archive, join(dir, 'p'), '--format', 'parallels']), 0)
  await compareStrict(t, join(dir, 'p/disk-drive-scsi0.hds'), 'parallels', padded)
})
