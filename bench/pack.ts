/** Packing: pack-vma and vma create against cat, cp, zstd -T0 and Proxmox's vma create; memory of a pack | extract pipe. */
import { closeSync, ftruncateSync, openSync, readSync, rmSync, statSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchDisk } from './archives.js'
import { GIB, PVE_VMA, type Run, Table, logs, pair, q, shell, packVma, vma } from './lib.js'
import { packArchive } from '../lib/jobs/pack.js'
import { openDisk } from '../lib/jobs/sources.js'
import { openOutput } from '../lib/io/output.js'

/** Two disks packed by the library in this process, one after another or interleaved; no RSS (this process's is the bench's). */
async function twoDisks (disk: string, archive: string, interleave: boolean): Promise<Run> {
  const started = process.hrtime.bigint()
  const cpu = process.cpuUsage()
  const disks = [await openDisk({ name: 'drive-scsi0', path: disk }), await openDisk({ name: 'drive-scsi1', path: disk })]
  const output = await openOutput(archive, { force: true })
  await packArchive(disks, output, { interleave })
  await output.commit()
  const used = process.cpuUsage(cpu)
  rmSync(archive)
  return { wall: Number(process.hrtime.bigint() - started) / 1e9, cpu: (used.user + used.system) / 1e6, rssKiB: NaN, stderr: '' }
}

/** A file of 16 times the dense disk's size holding its bytes in 1 MiB pieces, one every 16 MiB; the rest holes. */
function writeSparseDisk (dense: string, path: string): number {
  const size = 16 * statSync(dense).size
  const piece = Buffer.alloc(1 << 20)
  const from = openSync(dense, 'r')
  const to = openSync(path, 'w')
  ftruncateSync(to, size)
  for (let at = 0, n; (n = readSync(from, piece, 0, piece.length, at)) > 0; at += n) writeSync(to, piece, 0, n, 16 * at)
  closeSync(from)
  closeSync(to)
  return size
}

export async function benchPack (dir: string, gib: number): Promise<void> {
  const table = new Table('pack', 'disk')
  const disk = join(dir, 'disk.raw')
  process.stderr.write(`generating a ${gib} GiB raw disk\n`)
  await writeBenchDisk(disk, gib * GIB)
  const size = statSync(disk).size
  const out = join(dir, 'out.vma')
  const clean = (): void => rmSync(out, { recursive: true, force: true })
  await shell(`cat ${q(disk)} > /dev/null`)
  const cat = `cat ${q(disk)} > /dev/null`
  table.add('pack-vma disk > /dev/null', size, await pair(`${packVma} -q ${q(disk)} > /dev/null`, cat), 'cat > /dev/null')
  table.add('pack-vma disk --compress zstd > /dev/null', size,
    await pair(`${packVma} -q ${q(disk)} --compress zstd > /dev/null`, `zstd -q -T0 -c ${q(disk)} > /dev/null`),
    'zstd -T0 > /dev/null')
  table.add('cat disk | pack-vma --size N > /dev/null', size, await pair(`cat ${q(disk)} | ${packVma} -q --size ${size} > /dev/null`, cat), 'cat > /dev/null')
  // vma create fsyncs the archive; the peers get a sync.
  const create = `${vma} create -q ${q(out)} -d drive-scsi0=${q(disk)}`
  if (PVE_VMA !== undefined) {
    const pveCreate = `${q(PVE_VMA)} create ${q(out)} -d format=raw:drive-scsi0=${q(disk)} 2>/dev/null && sync ${q(out)}`
    table.add('vma create (synced)', size, await pair(create, pveCreate, { after: clean }),
      'pve-vma create + sync')
  }
  table.add('vma create (synced)', size, await pair(create, `cp ${q(disk)} ${q(out)} && sync ${q(out)}`, { after: clean }), 'cp + sync')

  // A sparse disk: holes are found by SEEK_DATA/SEEK_HOLE (native/holes), as qemu-img finds them; both write what they hold and sync.
  const sparse = join(dir, 'sparse.raw')
  const sparseSize = writeSparseDisk(disk, sparse)
  const sparseName = `vma create of a ${16 * gib} GiB sparse raw (${gib} GiB data, synced)`
  const createSparse = `${vma} create -q ${q(out)} -d drive-scsi0=${q(sparse)}`
  table.add(sparseName, sparseSize, await pair(createSparse,
    `qemu-img convert -f raw -O raw ${q(sparse)} ${q(out)} && sync ${q(out)}`, { after: clean }), 'qemu-img convert -O raw + sync')
  table.add(sparseName, sparseSize, await pair(createSparse, `VMAPIPE_NO_HOLES=1 ${createSparse}`, { after: clean }), 'the same reading every hole')
  rmSync(sparse)

  // Two disks: interleaved (--interleave) against one after another (what vma create does by default).
  const two = join(dir, 'two.vma')
  table.add('two disks interleaved (library, to a file)', 2 * size,
    await pair(async () => await twoDisks(disk, two, true), async () => await twoDisks(disk, two, false)),
    'one after another')

  // Memory of a pipe of both, on a disk four times the size.
  process.stderr.write(`generating a ${4 * gib} GiB raw disk\n`)
  const big = join(dir, 'big.raw')
  await writeBenchDisk(big, 4 * gib * GIB, 3)
  const outDir = join(dir, 'out')
  const piped = await pair(`cat ${q(big)} | ${packVma} --size ${4 * gib * GIB} | ${vma} extract - ${q(outDir)}`,
    `dd if=${q(big)} of=${q(outDir)} bs=1M conv=fsync status=none`, { after: () => rmSync(outDir, { recursive: true, force: true }) })
  table.add(`cat ${4 * gib} GiB disk | pack-vma --size N | vma extract - out`, 4 * gib * GIB, piped, 'dd bs=1M conv=fsync')
  rmSync(big)
  rmSync(disk)

  table.print(`Packing: ${gib} GiB disk`)
  const peak = (cmd: string): string =>
    (Math.max(...piped.ours.map(r => Number(logs(r.stderr).filter(l => l.cmd === cmd).pop()?.maxRssKiB ?? 0))) / 1024).toFixed(0)
  process.stdout.write(`\npeak RSS of cat | pack-vma | vma extract, MiB: pack-vma ${peak('pack-vma')}, vma extract ${peak('extract')}\n`)
}
