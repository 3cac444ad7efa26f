/** qcow2: extract to qcow2 against qemu-img convert -O qcow2; pack from qcow2 against qemu-img convert -O raw. */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, Table, best, q, timed, packVma, vma } from './lib.js'

export async function benchQcow2 (dir: string, gib: number): Promise<void> {
  const table = new Table('disk')
  const size = gib * GIB
  const disk = join(dir, 'disk.raw')
  const archive = join(dir, 'disk.vma')
  process.stderr.write(`generating a ${gib} GiB disk and its archive\n`)
  // The same seed makes the same clusters: the archive holds exactly the raw disk.
  await writeBenchDisk(disk, size, 7)
  await writeBenchArchive(archive, size, 'forward', 7)
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })
  await timed(`cat ${q(disk)} ${q(archive)} > /dev/null`)

  // vmapipe fsyncs what it writes; qemu-img does not unless told, so both figures are given.
  const convert = await best(3, `qemu-img convert -f raw -O qcow2 ${q(disk)} ${q(out)}`, clean)
  const convertSync = await best(3, `qemu-img convert -f raw -O qcow2 ${q(disk)} ${q(out)} && sync ${q(out)}`, clean)
  table.add('qemu-img convert -O qcow2 disk.raw', convert, size)
  table.add('qemu-img convert -O qcow2 disk.raw && sync', convertSync, size)
  const extract = await best(3, `${vma} extract -q --format qcow2 ${q(archive)} ${q(out)}`, clean)
  table.add('vma extract --format qcow2 archive', extract, size, convertSync, 'qemu-img+sync')
  table.add('  (the same against qemu-img without sync)', extract, size, convert, 'qemu-img')
  table.add('vma extract --format qcow2 --data-file',
    await best(3, `${vma} extract -q --format qcow2 --data-file ${q(archive)} ${q(out)}`, clean), size, convertSync, 'qemu-img+sync')

  const image = join(dir, 'disk.qcow2')
  await timed(`qemu-img convert -f raw -O qcow2 ${q(disk)} ${q(image)}`)
  const toRaw = await best(3, `qemu-img convert -f qcow2 -O raw ${q(image)} ${q(out)}`, clean)
  const toRawSync = await best(3, `qemu-img convert -f qcow2 -O raw ${q(image)} ${q(out)} && sync ${q(out)}`, clean)
  table.add('qemu-img convert -O raw disk.qcow2', toRaw, size)
  table.add('qemu-img convert -O raw disk.qcow2 && sync', toRawSync, size)
  table.add('pack-vma disk.qcow2 > /dev/null', await best(3, `${packVma} -q ${q(image)} > /dev/null`), size, toRaw, 'qemu-img')
  table.add('pack-vma disk.qcow2 -o archive', await best(3, `${packVma} -q ${q(image)} -o ${q(out)}`, clean), size, toRawSync, 'qemu-img+sync')
  rmSync(image)
  rmSync(archive)
  rmSync(disk)
  table.print(`qcow2: ${gib} GiB disk`)
}
