/**
 * NBD: nbdcopy from `vma serve` of a raw image against nbdcopy from
 * `qemu-nbd -r` of the same image (and against itself beside eight clients
 * that never read their replies), and from `vma serve` of a VMA archive
 * against qemu-nbd of the image with the same holes (also with qemu-img
 * convert), and of that sparse image from both servers; then our client: pack-vma from qemu-nbd against pack-vma of the
 * file, and a restore into qemu-nbd against nbdcopy of the raw disk into it.
 */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive, writeBenchDisk } from './archives.js'
import { GIB, MB, type Run, Table, measure, pair, packVma, q, shell, vma } from './lib.js'
import { type Teardown, flooder, startQemuNbd, startServe } from '../test/helpers/nbd.js'

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
  const table = new Table('nbd', 'disk')
  const size = gib * GIB
  const disk = join(dir, 'disk.raw')
  const archive = join(dir, 'disk.vma')
  process.stderr.write(`generating a ${gib} GiB raw disk and its archive\n`)
  await writeBenchDisk(disk, size)
  await writeBenchArchive(archive, size, 'forward')
  await shell(`cat ${q(disk)} ${q(archive)} > /dev/null`) // warm the page cache

  // The archive leaves its zero blocks out: its fair peer is the raw image with those blocks as holes.
  // Each side's CPU and peak RSS include its server's.
  const sparse = join(dir, 'sparse.raw')
  await shell(`cp --sparse=always ${q(disk)} ${q(sparse)}`)
  const qemuPid = (await startQemuNbd(servers, { socket: join(dir, 'qemu.sock') }, ['-r', '-f', 'raw', '-e', '8', disk])).child.pid as number
  const sparsePid = (await startQemuNbd(servers, { socket: join(dir, 'sparse.sock') }, ['-r', '-f', 'raw', '-e', '8', sparse])).child.pid as number
  const qemu = `nbd+unix:///?socket=${join(dir, 'qemu.sock')}`
  const qemuSparse = `nbd+unix:///?socket=${join(dir, 'sparse.sock')}`
  const oursServer = await startServe(servers, [disk, '--name', 'disk', '--socket', join(dir, 'ours.sock')])
  const ours = oursServer.uri('disk')
  const sparseServer = await startServe(servers, [sparse, '--name', 'sparse', '--socket', join(dir, 'ours-sparse.sock')])
  const archiveServer = await startServe(servers, [archive, '--socket', join(dir, 'archive.sock')])
  const fromArchive = archiveServer.uri('drive-scsi0')

  const copyOurs = `nbdcopy ${q(ours)} null:`
  table.add('nbdcopy from vma serve (raw image) to null:', size,
    await pair(copyOurs, `nbdcopy ${q(qemu)} null:`, { oursServers: [oursServer.pid], peerServers: [qemuPid] }), 'nbdcopy from qemu-nbd -r')
  // Eight clients that ask for 32 MiB reads and never read a reply (half structured, half simple) beside it.
  const flooded = async (): Promise<Run> => {
    const flooders = await Promise.all(Array.from({ length: 8 }, async (_, i) => await flooder(join(dir, 'ours.sock'), 'disk', i % 2 === 0)))
    await new Promise(resolve => setTimeout(resolve, 1000))
    try {
      return await measure(copyOurs, [oursServer.pid])
    } finally {
      for (const p of flooders) p.destroy()
    }
  }
  table.add('the same beside 8 clients not reading their replies (RSS: the server\'s peak so far)', size,
    await pair(flooded, copyOurs, { oursServers: [oursServer.pid], peerServers: [oursServer.pid] }), 'alone')
  // A raw file's holes come from SEEK_DATA/SEEK_HOLE on both sides, so that neither reads them.
  table.add('nbdcopy from vma serve (sparse raw image) to null:', size,
    await pair(`nbdcopy ${q(sparseServer.uri('sparse'))} null:`, `nbdcopy ${q(qemuSparse)} null:`,
      { oursServers: [sparseServer.pid], peerServers: [sparsePid] }),
    'the same from qemu-nbd -r')
  table.add('nbdcopy from vma serve (VMA archive) to null:', size,
    await pair(`nbdcopy ${q(fromArchive)} null:`, `nbdcopy ${q(qemuSparse)} null:`, { oursServers: [archiveServer.pid], peerServers: [sparsePid] }),
    'qemu-nbd -r, raw with the same holes')
  const convert = (uri: string): string => `qemu-img convert -f raw -O raw ${q(uri)} ${q(join(dir, 'out.raw'))}`
  const removeOut = (): void => rmSync(join(dir, 'out.raw'), { force: true })
  table.add('qemu-img convert from vma serve (VMA archive) to a file', size,
    await pair(convert(fromArchive), convert(qemuSparse), { after: removeOut, oursServers: [archiveServer.pid], peerServers: [sparsePid] }),
    'the same from qemu-nbd, same holes')

  const packs = [`${packVma} -q ${q(qemu)} > /dev/null`, `${packVma} -q ${q(disk)} > /dev/null`] as const
  table.add('pack-vma from qemu-nbd -r (raw image) > /dev/null', size, await pair(...packs, { oursServers: [qemuPid] }), 'pack-vma of the file')
  // The same without qemu-nbd's CPU and RSS: what our client costs beside reading the file itself.
  table.add('the same, pack-vma\'s own CPU and RSS (qemu-nbd\'s left out)', size, await pair(...packs), 'pack-vma of the file')

  // Restores into a blank qcow2 behind qemu-nbd (its CPU counted): nbdcopy of the raw disk, then vma extract --to from the archive.
  const target = join(dir, 'target.qcow2')
  const restore = (command: (uri: string) => string) => async (): Promise<Run> => {
    rmSync(target, { force: true })
    await shell(`qemu-img create -q -f qcow2 ${q(target)} ${size}`)
    const socket = join(dir, 'target.sock')
    const server = await startQemuNbd(servers, { socket }, ['-f', 'qcow2', target])
    const r = await measure(command(`nbd+unix:///?socket=${socket}`), [server.child.pid as number])
    await server.stop()
    return r
  }
  table.add('restore: vma extract archive --to qemu-nbd (blank qcow2)', size,
    await pair(restore(uri => `${vma} extract -q ${q(archive)} --to ${q(uri)}`), restore(uri => `nbdcopy ${q(disk)} ${q(uri)}`)), 'nbdcopy disk.raw into it')
  rmSync(target, { force: true })

  table.print(`NBD: ${gib} GiB disk, archive ${(statSync(archive).size / MB).toFixed(0)} MB (unix sockets, page cache warm)`)
}
