/**
 * NBD: nbdcopy from `vma serve` of a raw image against nbdcopy from
 * `qemu-nbd -r` of the same image (and against itself beside eight clients
 * that never read their replies), and from `vma serve` of a VMA archive
 * against qemu-nbd of the image with the same holes (also with qemu-img
 * convert); then our client: pack-vma from qemu-nbd against pack-vma of the
 * file, and a restore into qemu-nbd against nbdcopy of the raw disk into it.
 */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, MB, type Timed, Table, best, packVma, q, timed, vma } from './lib.js'
import { type Teardown, flooder, rssKiB, startQemuNbd, startServe } from '../test/helpers/nbd.js'

export async function benchNbd (dir: string, gib: number): Promise<void> {
  const cleanups: Array<() => void | Promise<void>> = []
  const servers: Teardown = { teardown: fn => { cleanups.push(fn) } }
  try {
    await run(dir, gib, servers)
  } finally {
    for (const fn of cleanups.reverse()) await fn()
  }
}

async function run (dir: string, gib: number, servers: Teardown): Promise<void> {
  const table = new Table('disk')
  const size = gib * GIB
  const disk = join(dir, 'disk.raw')
  const archive = join(dir, 'disk.vma')
  process.stderr.write(`generating a ${gib} GiB raw disk and its archive\n`)
  await writeBenchDisk(disk, size)
  await writeBenchArchive(archive, size, 'forward')
  await timed(`cat ${q(disk)} ${q(archive)} > /dev/null`) // warm the page cache

  // The archive leaves its zero blocks out: its fair peer is the raw image with those blocks as holes.
  const sparse = join(dir, 'sparse.raw')
  await timed(`cp --sparse=always ${q(disk)} ${q(sparse)}`)
  await startQemuNbd(servers, { socket: join(dir, 'qemu.sock') }, ['-r', '-f', 'raw', '-e', '8', disk])
  await startQemuNbd(servers, { socket: join(dir, 'sparse.sock') }, ['-r', '-f', 'raw', '-e', '8', sparse])
  const qemu = `nbd+unix:///?socket=${join(dir, 'qemu.sock')}`
  const qemuSparse = `nbd+unix:///?socket=${join(dir, 'sparse.sock')}`
  const oursServer = await startServe(servers, [disk, '--name', 'disk', '--socket', join(dir, 'ours.sock')])
  const ours = oursServer.uri('disk')
  const fromArchive = (await startServe(servers, [archive, '--socket', join(dir, 'archive.sock')])).uri('drive-scsi0')

  const peer = await best(3, `nbdcopy ${q(qemu)} null:`)
  table.add('nbdcopy from qemu-nbd -r (raw image) to null:', peer, size)
  const unloaded = await best(3, `nbdcopy ${q(ours)} null:`)
  table.add('nbdcopy from vma serve (raw image) to null:', unloaded, size, peer, 'qemu-nbd')
  // Eight clients that ask for 32 MiB reads and never read a reply (half structured, half simple) beside it.
  const flooders = await Promise.all(Array.from({ length: 8 }, async (_, i) => await flooder(join(dir, 'ours.sock'), 'disk', i % 2 === 0)))
  await new Promise(resolve => setTimeout(resolve, 1000))
  let peak = await rssKiB(oursServer.pid)
  const sampler = setInterval(() => { rssKiB(oursServer.pid).then(kib => { peak = Math.max(peak, kib) }, () => {}) }, 50)
  const loaded = await best(3, `nbdcopy ${q(ours)} null:`)
  clearInterval(sampler)
  for (const p of flooders) p.destroy()
  table.add(`  the same beside 8 clients not reading their replies (server peak RSS ${(peak / 1024).toFixed(0)} MiB)`, loaded, size, unloaded, 'unloaded')
  const sparsePeer = await best(3, `nbdcopy ${q(qemuSparse)} null:`)
  table.add('nbdcopy from qemu-nbd -r (raw image, zero blocks as holes)', sparsePeer, size)
  table.add('nbdcopy from vma serve (VMA archive) to null:', await best(3, `nbdcopy ${q(fromArchive)} null:`), size, sparsePeer, 'qemu-nbd, same holes')
  const convert = (uri: string): string => `qemu-img convert -f raw -O raw ${q(uri)} ${q(join(dir, 'out.raw'))}`
  const removeOut = (): void => rmSync(join(dir, 'out.raw'))
  const qemuConvert = await best(3, convert(qemuSparse), removeOut)
  table.add('qemu-img convert from qemu-nbd -r (holes as above) to a file', qemuConvert, size)
  table.add('qemu-img convert from vma serve (VMA archive) to a file',
    await best(3, convert(fromArchive), removeOut), size, qemuConvert, 'qemu-nbd, same holes')

  const local = await best(3, `${packVma} -q ${q(disk)} > /dev/null`)
  table.add('pack-vma disk.raw > /dev/null', local, size)
  table.add('pack-vma from qemu-nbd -r (raw image) > /dev/null', await best(3, `${packVma} -q ${q(qemu)} > /dev/null`), size, local, 'pack-vma of the file')

  // Restores into a blank qcow2 behind qemu-nbd: nbdcopy of the raw disk, then vma extract --to from the archive.
  const target = join(dir, 'target.qcow2')
  const restore = async (command: (uri: string) => string): Promise<Timed> => await best(3, async () => {
    rmSync(target, { force: true })
    await timed(`qemu-img create -q -f qcow2 ${q(target)} ${size}`)
    const socket = join(dir, 'target.sock')
    const server = await startQemuNbd(servers, { socket }, ['-f', 'qcow2', target])
    const t = await timed(command(`nbd+unix:///?socket=${socket}`))
    await server.stop()
    return t
  })
  const nbdcopy = await restore(uri => `nbdcopy ${q(disk)} ${q(uri)}`)
  table.add('restore: nbdcopy disk.raw into qemu-nbd (blank qcow2)', nbdcopy, size)
  table.add('restore: vma extract archive --to qemu-nbd (blank qcow2)',
    await restore(uri => `${vma} extract -q ${q(archive)} --to ${q(uri)}`), size, nbdcopy, 'nbdcopy')
  rmSync(target, { force: true })

  table.print(`NBD: ${gib} GiB disk, archive ${(statSync(archive).size / MB).toFixed(0)} MB (unix sockets, page cache warm)`)
}
