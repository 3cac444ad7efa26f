/**
 * Parallels: extracting an archive to .hds against qemu-img convert -O
 * parallels of the same disk from raw, in the same run; reading .hds back
 * (from a path and from a pipe) against qemu-img convert -O raw and against packing the raw disk.
 */
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, Table, pair, q, shell, packVma, vma } from './lib.js'

export async function benchParallels (dir: string, gib: number): Promise<void> {
  const table = new Table('parallels', 'disk')
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

  await shell(`cat ${q(disk)} ${q(archive)} ${q(reversed)} > /dev/null`) // warm the page cache
  // qemu-img flushes the image when it closes it; sync after it makes both durable, as vma's fsync does.
  const qemu = `qemu-img convert -f raw -O parallels ${q(disk)} ${q(image)} && sync ${q(image)}`
  const peerName = 'qemu-img convert -O parallels + sync'
  table.add('vma extract --format parallels (1 MiB clusters)', size,
    await pair(`${vma} extract -q ${q(archive)} ${q(out)} --format parallels`, qemu, { after: clean }),
    peerName)
  table.add('... clusters in reverse order', size,
    await pair(`${vma} extract -q ${q(reversed)} ${q(out)} --format parallels`, qemu, { after: clean }), peerName)
  table.add('vma extract --format parallels-bundle', size,
    await pair(`${vma} extract -q ${q(archive)} ${q(out)} --format parallels-bundle`, qemu, { after: clean }),
    peerName)
  rmSync(reversed)

  await shell(`qemu-img convert -f raw -O parallels ${q(disk)} ${q(image)}`)
  // qemu-img cannot write raw to /dev/null (it will not grow a device), so it writes a file it does not sync.
  const toRaw = `qemu-img convert -f parallels -O raw ${q(image)} ${q(out)}`
  const dropOut = (): void => rmSync(out, { force: true })
  const fromHds = `${packVma} -q ${q(image)} > /dev/null`
  table.add('pack-vma disk.hds > /dev/null', size, await pair(fromHds, toRaw, { after: dropOut }), 'qemu-img convert -O raw')
  table.add('pack-vma disk.hds > /dev/null', size, await pair(fromHds, `${packVma} -q ${q(disk)} > /dev/null`), 'pack-vma disk.raw')
  table.add('cat disk.hds | pack-vma > /dev/null (streamed)', size, await pair(`cat ${q(image)} | ${packVma} -q > /dev/null`, toRaw, { after: dropOut }),
    'qemu-img convert -O raw')
  clean()
  rmSync(disk)
  rmSync(archive)

  table.print(`Parallels: ${gib} GiB disk`)
}
