/**
 * Parallels: extracting an archive to .hds against qemu-img convert -O
 * parallels of the same disk from raw, in the same run; reading .hds back
 * (from a path and from a pipe) against packing the raw disk.
 */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, Table, best, peakMiB, q, timed, packVma, vma } from './lib.js'

export async function benchParallels (dir: string, gib: number): Promise<void> {
  const table = new Table('disk')
  const size = gib * GIB
  const disk = join(dir, 'disk.raw')
  const archive = join(dir, 'disk.vma')
  const reversed = join(dir, 'reversed.vma')
  process.stderr.write(`generating a ${gib} GiB raw disk and archives of it, in order and reversed\n`)
  // The same seed gives the disk and the archives the same contents.
  await writeBenchDisk(disk, size)
  await writeBenchArchive(archive, size, 'forward')
  await writeBenchArchive(reversed, size, 'reverse')
  const image = join(dir, 'qemu.hds')
  const out = join(dir, 'out')
  const clean = (): void => { rmSync(out, { recursive: true, force: true }); rmSync(image, { force: true }) }

  await timed(`cat ${q(disk)} ${q(archive)} > /dev/null`) // warm the page cache
  // qemu-img flushes the image when it closes it; sync after it makes both durable, as vma's fsync does.
  const qemu = await best(3, `qemu-img convert -f raw -O parallels ${q(disk)} ${q(image)} && sync ${q(image)}`, clean)
  table.add('qemu-img convert -O parallels disk.raw (1 MiB clusters)', qemu, size)
  table.add('vma extract --format parallels (1 MiB clusters)',
    await best(3, `${vma} extract -q ${q(archive)} ${q(out)} --format parallels`, clean), size, qemu, 'qemu-img')
  const reverse = await best(3, `${vma} extract ${q(reversed)} ${q(out)} --format parallels`, clean)
  table.add('... clusters in reverse order', reverse, size, qemu, 'qemu-img')
  table.add('vma extract --format parallels-bundle',
    await best(3, `${vma} extract -q ${q(archive)} ${q(out)} --format parallels-bundle`, clean), size, qemu, 'qemu-img')
  rmSync(reversed)

  await timed(`qemu-img convert -f raw -O parallels ${q(disk)} ${q(image)}`)
  const raw = await best(3, `${packVma} -q ${q(disk)} > /dev/null`)
  table.add('pack-vma disk.raw > /dev/null', raw, size)
  table.add('pack-vma disk.hds > /dev/null', await best(3, `${packVma} -q ${q(image)} > /dev/null`), size, raw, 'pack-vma raw')
  const piped = await best(3, `cat ${q(image)} | ${packVma} > /dev/null`)
  table.add('cat disk.hds | pack-vma > /dev/null (streamed)', piped, size, raw, 'pack-vma raw')
  // qemu-img cannot write raw to /dev/null (it will not grow a device), so it writes a file it does not sync.
  const dropOut = (): void => rmSync(out, { force: true })
  table.add('qemu-img convert -O raw disk.hds out.raw', await best(3, `qemu-img convert -f parallels -O raw ${q(image)} ${q(out)}`, dropOut), size)
  clean()
  rmSync(disk)
  rmSync(archive)

  table.print(`Parallels: ${gib} GiB disk`)
  process.stdout.write(`\npeak RSS, MiB: vma extract of the reversed archive to .hds ${peakMiB(reverse, 'extract')}, ` +
    `cat disk.hds | pack-vma ${peakMiB(piped, 'pack-vma')}\n`)
}
