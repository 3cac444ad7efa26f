/**
 * Buffers the NBD jobs make, with real peers. vma serve: every read buffer is
 * one piece long and goes back to the pool, so serving disks whose holes cut
 * reads into pieces of every length makes no more buffers than the
 * connections hold at once (two each); buffers by power of two of the length
 * missed the pool at each change of length (13-14 per nbdcopy at 64 MiB,
 * 100-200 at 1 GiB), garbage that V8 frees only once 32 MiB of it has piled up.
 * A restore of an uncompressed archive file into an export copies by position
 * into a few reused buffers instead of taking the input's slabs (at 64 MiB
 * the array buffers peaked 3.3 MiB above where they were, 8.2 from records).
 * Every copy is checked to be the disk's bytes.
 */
import t from 'tap'
import { statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { benchFilesApart, cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { startNbdkit, startQemuNbd } from './helpers/nbd.js'
import { openExports } from '../lib/jobs/exports.js'
import { extractToNbd } from '../lib/jobs/extract.js'
import { openInput } from '../lib/io/input.js'
import { NbdServer } from '../lib/nbd/server.js'

const SIZE = 64 * 1048576
const MIB = 1048576

t.test('serving an archive and a sparse raw image to nbdcopy and qemu-img makes at most two buffers per connection', async t => {
  const { dir, archive, disk } = await benchFilesApart(t, SIZE)
  const sparse = join(dir, 'sparse.raw')
  exits(t, await run('cp', ['--sparse=always', disk, sparse]), 0, 'a sparse copy of the disk')
  const opened = await openExports([archive, sparse])
  const server = new NbdServer(opened.exports)
  const socket = join(dir, 'serve.sock')
  await server.listen({ socket })
  t.teardown(async () => { await server.close(); await opened.close() })

  for (const name of ['drive-scsi0', 'sparse.raw']) {
    const uri = `nbd+unix:///${name}?socket=${socket}`
    const copies: Array<[string, string, string[]]> = [
      ['nbdcopy', 'nbdcopy', [uri, join(dir, 'a.raw')]],
      ['nbdcopy 1M', 'nbdcopy', ['--request-size=1048576', uri, join(dir, 'b.raw')]],
      ['qemu-img convert', 'qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'c.raw')]],
    ]
    for (const [label, tool, args] of copies) {
      exits(t, await run(tool, args), 0, `${name}: ${label}`)
      t.ok(cmp(disk, args[args.length - 1]), `${name}: ${label}: the disk's bytes`)
    }
  }
  // nbdcopy's four connections hold two pieces each at most; each later copy takes them from the pool.
  t.ok(server.buffers.made <= 8, `${server.buffers.made} read buffers made for six copies (at most 8)`)
})

t.test('a restore of an archive file into qemu-nbd holds a few buffers, not slabs', async t => {
  const { dir, archive, disk } = await benchFilesApart(t, SIZE)
  const target = join(dir, 'target.qcow2')
  exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(SIZE)]), 0, 'qemu-img create')
  const socket = join(dir, 'target.sock')
  const peer = await startQemuNbd(t, { socket }, ['-f', 'qcow2', target])

  const before = process.memoryUsage().arrayBuffers
  let peak = before
  const sample = setInterval(() => { peak = Math.max(peak, process.memoryUsage().arrayBuffers) }, 2)
  let result
  try {
    result = await extractToNbd(openInput(archive).stream, `nbd+unix:///?socket=${socket}`)
  } finally {
    clearInterval(sample)
  }
  await peer.stop()
  t.equal(result.device.name, 'drive-scsi0')
  t.equal(result.archiveBytes, statSync(archive).size, 'the whole archive counted')
  exits(t, await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', target, disk]), 0, 'qemu-img compare')
  const grew = (peak - before) / MIB
  // Three buffers of 1 MiB and the client's 128 KiB (3.3 measured); from records, 8.2.
  t.ok(grew < 5, `array buffers peaked ${grew.toFixed(1)} MiB above the ${(before / MIB).toFixed(1)} MiB before (under 5)`)
})

t.test('a copy by position writes holes longer than a WRITE as zeros into an export without WRITE_ZEROES', async t => {
  const dir = tempDir(t)
  // Data, a 5 MiB hole, data: the hole is one extent of the archive's map.
  const disk = join(dir, 'disk.raw')
  const bytes = Buffer.alloc(8 * MIB)
  bytes.fill(0x5a, 0, MIB)
  bytes.fill(0xa5, 6 * MIB)
  writeFileSync(disk, bytes)
  const archive = join(dir, 'a.vma')
  exits(t, await vma(['create', archive, '-d', `drive-scsi0=${disk}`]), 0, 'vma create')
  const socket = join(dir, 'k.sock')
  await startNbdkit(t, socket, ['--filter=nozero', 'memory', `size=${8 * MIB}`, 'zeromode=none'])
  const uri = `nbd+unix:///?socket=${socket}`
  const junk = join(dir, 'junk.raw')
  writeFileSync(junk, Buffer.alloc(8 * MIB, 0xff))
  exits(t, await run('nbdcopy', [junk, uri]), 0, 'old data first')
  const result = await extractToNbd(openInput(archive).stream, uri)
  t.equal(result.written.prezeroed, false, 'the export cannot zero fast')
  const back = join(dir, 'back.raw')
  exits(t, await run('nbdcopy', [uri, back]), 0)
  t.ok(cmp(back, disk), 'the export holds the disk, the hole as zeros')
})
