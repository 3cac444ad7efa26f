/** qcow2: extract to qcow2 against qemu-img convert -O qcow2; pack from qcow2 against qemu-img convert -O raw. */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, Table, pair, q, shell, packVma, vma } from './lib.js'

export async function benchQcow2 (dir: string, gib: number): Promise<void> {
  const table = new Table('qcow2', 'disk')
  const size = gib * GIB
  const disk = join(dir, 'disk.raw')
  const archive = join(dir, 'disk.vma')
  process.stderr.write(`generating a ${gib} GiB disk and its archive\n`)
  // The same seed makes the same clusters: the archive holds exactly the raw disk.
  await writeBenchDisk(disk, size, 7)
  await writeBenchArchive(archive, size, 'forward', 7)
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })
  await shell(`cat ${q(disk)} ${q(archive)} > /dev/null`)

  // vmapipe fsyncs what it writes; qemu-img does not unless told, so both are given.
  const convert = `qemu-img convert -f raw -O qcow2 ${q(disk)} ${q(out)}`
  const extract = `${vma} extract -q --format qcow2 ${q(archive)} ${q(out)}`
  table.add('vma extract --format qcow2', size, await pair(extract, `${convert} && sync ${q(out)}`, { after: clean }), 'qemu-img convert -O qcow2 + sync')
  table.add('vma extract --format qcow2', size, await pair(extract, convert, { after: clean }), 'qemu-img convert -O qcow2')
  table.add('vma extract --format qcow2 --data-file', size, await pair(`${vma} extract -q --format qcow2 --data-file ${q(archive)} ${q(out)}`,
    `${convert} && sync ${q(out)}`, { after: clean }), 'qemu-img convert -O qcow2 + sync')

  const image = join(dir, 'disk.qcow2')
  await shell(`${convert.replace(q(out), q(image))}`)
  const toRaw = `qemu-img convert -f qcow2 -O raw ${q(image)} ${q(out)}`
  table.add('pack-vma disk.qcow2 > /dev/null', size, await pair(`${packVma} -q ${q(image)} > /dev/null`, toRaw, { after: clean }), 'qemu-img convert -O raw')
  table.add('pack-vma disk.qcow2 -o archive', size, await pair(`${packVma} -q ${q(image)} -o ${q(out)}`, `${toRaw} && sync ${q(out)}`, { after: clean }),
    'qemu-img convert -O raw + sync')
  rmSync(image)
  rmSync(archive)
  rmSync(disk)
  table.print(`qcow2: ${gib} GiB disk`)
}
