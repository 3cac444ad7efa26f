/**
 * vma serve of archives that cannot be indexed (live restore): compressed
 * files and stdin served to qemu-img, nbdcopy and nbdinfo as vma extract
 * restores them; reads while the archive is still arriving through a pipe;
 * --keep; a truncated archive; QEMU booting from an export mid-pass.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { allocated, cmp, exits, have, run, sh, q, tempDir, vma, vmaCmd } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { Feeder, orderedArchive, qemuIoRead, spawnServe } from './helpers/live.js'
import { Rng, makeDisk } from './helpers/random.js'
import { buildArchive } from './helpers/vma-builder.js'
import { openNbdDisk } from '../lib/nbd/client.js'

interface MapEntry { offset: number, length: number, type: number }

/** The bytes' 4 KiB blocks as nbdinfo --map reports them (0 data, 3 hole and zero), adjacent ones merged. */
function expectedMap (bytes: Buffer): MapEntry[] {
  const zero = Buffer.alloc(4096)
  const out: MapEntry[] = []
  for (let at = 0; at < bytes.length; at += 4096) {
    const block = bytes.subarray(at, at + 4096)
    const type = block.equals(zero.subarray(0, block.length)) ? 3 : 0
    const last = out[out.length - 1]
    if (last !== undefined && last.type === type) last.length += block.length
    else out.push({ offset: at, length: block.length, type })
  }
  return out
}

async function nbdinfoMap (uri: string): Promise<MapEntry[]> {
  const r = await run('nbdinfo', ['--map', '--json', uri])
  if (r.code !== 0) throw new Error(`nbdinfo --map failed: ${r.stderr}`)
  const out: MapEntry[] = []
  for (const e of JSON.parse(r.stdout.toString()) as MapEntry[]) {
    const last = out[out.length - 1]
    if (last !== undefined && last.type === e.type) last.length += e.length
    else out.push({ offset: e.offset, length: e.length, type: e.type })
  }
  return out
}

const uriOf = (socket: string, name: string): string => `nbd+unix:///${name}?socket=${socket}`
const passComplete = (l: Record<string, unknown>): boolean => typeof l.msg === 'string' && l.msg.includes('pass complete')

const KINDS = [
  { ext: '.zst', pack: 'zstd -q -c' },
  { ext: '.lzo', pack: 'lzop -c' },
  { ext: '.gz', pack: 'gzip -c' },
]

t.test('compressed archives and stdin: qemu-img convert, nbdcopy and nbdinfo --map agree with vma extract, several clients at once', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(161))
  const disks = fx.spec.devices.filter(d => d.name !== 'vmstate')
  for (const { ext, pack } of KINDS) {
    const archive = `${fx.archive}${ext}`
    exits(t, await sh(`${pack} ${q(fx.archive)} > ${q(archive)}`), 0, `${pack}`)
    const extracted = join(dir, `extracted${ext}`)
    exits(t, await vma(['extract', archive, extracted]), 0, `vma extract ${ext}`)
    const socket = join(dir, `sock${ext}`)
    const server = spawnServe(t, [archive, '--socket', socket])
    await server.waitLog(l => l.msg === 'serving')
    // All disks at once, two clients each: the pass may still be running.
    const copies = await Promise.all(disks.flatMap(d => [
      run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uriOf(socket, d.name), join(dir, `${d.name}${ext}.qemu`)]),
      run('nbdcopy', [uriOf(socket, d.name), join(dir, `${d.name}${ext}.nbdcopy`)]),
    ]))
    copies.forEach(r => exits(t, r, 0, `${ext}: a client exits 0`))
    for (const d of disks) {
      const want = join(extracted, `disk-${d.name}.raw`)
      t.ok(cmp(join(dir, `${d.name}${ext}.qemu`), want), `${ext}: qemu-img convert of ${d.name} equals vma extract's`)
      t.ok(cmp(join(dir, `${d.name}${ext}.nbdcopy`), want), `${ext}: nbdcopy of ${d.name} equals vma extract's`)
    }
    await server.waitLog(passComplete)
    for (const d of disks) {
      const want = expectedMap(readFileSync(join(extracted, `disk-${d.name}.raw`)))
      t.same(await nbdinfoMap(uriOf(socket, d.name)), want, `${ext}: nbdinfo --map of ${d.name}`)
    }
    t.equal(await server.stop(), 0, `${ext}: SIGTERM ends the server with 0`)
  }

  // stdin, through a shell pipe: zstd -dc | vma serve -
  const socket = join(dir, 'sock-stdin')
  const server = spawnServe(t, ['-', '--socket', socket])
  server.stdin.end(readFileSync(`${fx.archive}.zst`))
  await server.waitLog(l => l.msg === 'serving')
  for (const d of disks) {
    const out = join(dir, `${d.name}.stdin`)
    exits(t, await run('nbdcopy', [uriOf(socket, d.name), out]), 0, `stdin: nbdcopy ${d.name}`)
    t.ok(cmp(out, join(dir, 'extracted.zst', `disk-${d.name}.raw`)), `stdin: ${d.name} equals vma extract's`)
  }
  const done = await server.waitLog(passComplete)
  t.equal(done.inputBytes, statSync(`${fx.archive}.zst`).size, 'the pass counted every input byte')
  t.equal(await server.stop(), 0)
})

t.test('live: the first cluster is served long before the archive is in, the last right after it arrives', async t => {
  const dir = tempDir(t)
  const device = { id: 1, name: 'drive-virtio0', size: 10 * 1048576, data: makeDisk(new Rng(162), 10 * 1048576) }
  const { archive, lastExtent } = orderedArchive(device)
  const socket = join(dir, 'sock')
  // A read that waits for the pass longer than the idle timeout does not make its client idle.
  const server = spawnServe(t, ['-', '--socket', socket, '--idle-timeout', '1'])
  const feeder = new Feeder(server.stdin, 256 << 10, 4096)
  const fed = feeder.feed(archive, 0, lastExtent)
  await server.waitLog(l => l.msg === 'serving')
  const uri = uriOf(socket, device.name)
  // An NBD client in this process, so that the time a client program takes to start does not count.
  const disk = await openNbdDisk(uri)
  const first = Buffer.alloc(65536)
  await disk.read(first, 0)
  const writtenThen = feeder.written
  await disk.close()
  t.same(first, device.data.subarray(0, 65536), 'the first cluster is correct')
  t.ok(writtenThen < archive.length / 10, `and it came before 10% of the archive was written (${writtenThen} of ${archive.length} bytes)`)
  feeder.rate = 8 << 20
  await fed
  const lastAt = device.size - 65536
  const last = qemuIoRead(uri, lastAt, 65536)
  await new Promise(resolve => setTimeout(resolve, 2500))
  t.notOk(last.exited(), 'a read of the last cluster waits while it has not arrived, longer than the idle timeout')
  const sent = Date.now()
  server.stdin.end(archive.subarray(lastExtent))
  const got = await last.result
  const waited = Date.now() - sent
  t.same(got.bytes, device.data.subarray(lastAt), 'the last cluster is correct')
  t.ok(waited < 3000, `and it came right after it arrived (${waited} ms)`)
  await server.waitLog(passComplete)
  t.equal(await server.stop(), 0)
})

t.test('--keep: the restored disks equal vma extract\'s and are sparse; a truncated archive keeps nothing and a waiting read gets EIO', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(163))
  // A disk mostly of holes, to see them kept as holes.
  const sparse = Buffer.alloc(4 * 1048576)
  new Rng(164).fill(sparse.subarray(1048576, 1048576 + 262144))
  fx.spec.devices.push({ id: 9, name: 'drive-sata0', size: sparse.length, data: sparse })
  fx.spec.extents.push(...Array.from({ length: 64 }, (_, c) => [{ dev: 9, cluster: c }]))
  writeFileSync(fx.archive, buildArchive(fx.spec))
  exits(t, await sh(`zstd -q ${q(fx.archive)}`), 0)
  const extracted = join(dir, 'extracted')
  exits(t, await vma(['extract', `${fx.archive}.zst`, extracted]), 0)

  const kept = join(dir, 'kept')
  const server = spawnServe(t, [`${fx.archive}.zst`, '--socket', join(dir, 'sock'), '--keep', kept])
  const done = await server.waitLog(passComplete)
  t.same(readdirSync(kept).sort(), readdirSync(extracted).sort(), 'the same files as vma extract')
  for (const name of readdirSync(extracted)) t.ok(cmp(join(kept, name), join(extracted, name)), `${name} is byte-identical`)
  t.same((done.kept as string[]).map(p => p.slice(kept.length + 1)).sort(), readdirSync(extracted).sort(), 'the log names them')
  const restored = join(kept, 'disk-drive-sata0.raw')
  t.ok(allocated(restored) <= 262144 + 65536, `sparse: ${allocated(restored)} bytes allocated of ${statSync(restored).size}`)
  t.equal(allocated(join(kept, 'disk-drive-virtio1.raw')), 0, 'an all-zero disk allocates nothing')
  const copy = join(dir, 'sata0.served')
  exits(t, await run('nbdcopy', [uriOf(join(dir, 'sock'), 'drive-sata0'), copy]), 0)
  t.ok(cmp(copy, restored), 'served after the pass from the kept files')
  t.equal(await server.stop(), 0)

  // Truncated inside the last extent, fed through a pipe: the read that waits for what never comes fails.
  const device = { id: 1, name: 'drive-virtio0', size: 4 * 1048576, data: makeDisk(new Rng(165), 4 * 1048576) }
  const { archive, lastExtent } = orderedArchive(device)
  const keep2 = join(dir, 'kept2')
  const socket = join(dir, 'sock2')
  const cut = spawnServe(t, ['-', '--socket', socket, '--keep', keep2])
  await new Feeder(cut.stdin, 64 << 20).feed(archive, 0, lastExtent + 4096)
  await cut.waitLog(l => l.msg === 'serving')
  const uri = uriOf(socket, device.name)
  const waiting = qemuIoRead(uri, device.size - 65536, 65536)
  await new Promise(resolve => setTimeout(resolve, 500))
  t.notOk(waiting.exited(), 'the read of the last cluster waits')
  cut.stdin.end()
  const failed = await waiting.result
  t.match(failed.error, /Input\/output error/, 'and fails with EIO once the archive ends short')
  const error = await cut.waitLog(l => l.level === 50)
  t.equal(error.code, 'E_VMA_TRUNCATED', 'the log says the archive is truncated')
  t.type(error.offset, 'number', 'and where')
  const early = await qemuIoRead(uri, 0, 65536).result
  t.same(early.bytes, device.data.subarray(0, 65536), 'what the pass passed is still served')
  t.notOk(existsSync(keep2) && readdirSync(keep2).length > 0, 'nothing is kept')
  t.equal(await cut.stop(), 1, 'the exit status says the archive was damaged')
})

/**
 * A boot sector (GNU as, .code16, linked at 0x7c00) that writes VMAPIPE-BOOT
 * to COM1, reads one sector by int 13h AH=42h (its LBA, a u64 at DAP_LBA,
 * is patched in), writes that sector's string to COM1, then halts.
 */
const MBR = Buffer.from('31c08ed88ec08ed0bc007cfcbe4b7ce81d00be3b7cb442b280cd137208be0080e80c00eb06be5a7ce80400faf4ebfcbaf803ac84c07403eeebf8c3' +
  '10000100008000000000000000000000564d41504950452d424f4f540d0a00564d41504950452d524541442d4641494c45440d0a00', 'hex')
const DAP_LBA = 0x43

const needsQemu = have('qemu-system-x86_64') ? {} : { skip: 'qemu-system-x86_64 not installed (Debian: qemu-system-x86)' }

t.test('QEMU boots from the export mid-pass: SeaBIOS reads the boot sector, the boot sector a sector not yet arrived', needsQemu, async t => {
  const dir = tempDir(t)
  const size = 4 * 1048576
  const data = makeDisk(new Rng(166), size)
  const lba = (size - 65536) / 512 + 5
  const mbr = Buffer.alloc(512)
  MBR.copy(mbr)
  mbr.writeBigUInt64LE(BigInt(lba), DAP_LBA)
  mbr.writeUInt16LE(0xaa55, 510)
  mbr.copy(data)
  data.fill(0, lba * 512, lba * 512 + 512)
  data.write('VMAPIPE-TAIL-OK\r\n\0', lba * 512, 'latin1')
  const device = { id: 1, name: 'drive-virtio0', size, data }
  const { archive, lastExtent } = orderedArchive(device)
  const socket = join(dir, 'sock')
  const server = spawnServe(t, ['-', '--socket', socket])
  await new Feeder(server.stdin, 64 << 20).feed(archive, 0, lastExtent)
  await server.waitLog(l => l.msg === 'serving')

  const qemu = spawn('qemu-system-x86_64', ['-display', 'none', '-nodefaults', '-no-reboot', '-m', '32', '-serial', 'stdio', '-monitor', 'none',
    '-drive', `file=${uriOf(socket, device.name)},format=raw,if=virtio,readonly=on`], { stdio: ['ignore', 'pipe', 'pipe'] })
  let console = ''
  qemu.stdout.on('data', (b: Buffer) => { console += b.toString('latin1') })
  qemu.stderr.on('data', (b: Buffer) => { console += b.toString('latin1') })
  const timer = setTimeout(() => qemu.kill('SIGKILL'), 60_000)
  t.teardown(() => { clearTimeout(timer); qemu.kill('SIGKILL') })
  const waitFor = async (text: string): Promise<boolean> => {
    while (!console.includes(text)) {
      if (qemu.exitCode !== null || qemu.signalCode !== null) return false
      await new Promise(resolve => setTimeout(resolve, 50))
    }
    return true
  }
  t.ok(await waitFor('VMAPIPE-BOOT'), 'SeaBIOS booted the boot sector served mid-pass', { console })
  await new Promise(resolve => setTimeout(resolve, 500))
  t.notOk(console.includes('VMAPIPE-TAIL'), 'the sector in the last cluster is still awaited')
  t.equal(server.logs().filter(passComplete).length, 0, 'the pass is still running')
  server.stdin.end(archive.subarray(lastExtent))
  t.ok(await waitFor('VMAPIPE-TAIL-OK'), 'and read correctly once it arrived', { console })
  t.notOk(console.includes('READ-FAILED'), 'no read failed')
  qemu.kill('SIGKILL')
  await server.waitLog(passComplete)
  t.equal(await server.stop(), 0)
})

t.test('the cache leaves nothing behind; --cache and --keep together are refused', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(167))
  exits(t, await sh(`gzip -k ${q(fx.archive)}`), 0)
  const cache = join(dir, 'cache')
  mkdirSync(cache)
  const server = spawnServe(t, [`${fx.archive}.gz`, '--socket', join(dir, 'sock'), '--cache', cache])
  await server.waitLog(passComplete)
  t.same(readdirSync(cache), [], 'the cache files are unlinked once open')
  exits(t, await run('nbdcopy', [uriOf(join(dir, 'sock'), 'drive-scsi0'), join(dir, 'scsi0')]), 0)
  t.ok(cmp(join(dir, 'scsi0'), fx.sources.get('drive-scsi0') as string), 'and still served')
  t.equal(await server.stop(), 0)
  const both = await sh(`${vmaCmd} serve ${q(fx.archive)}.gz --socket ${q(join(dir, 's2'))} --cache ${q(cache)} --keep ${q(join(dir, 'k'))}`)
  exits(t, both, 2, '--cache with --keep is a usage error')
})

t.test('a .vma.zst cut short, read in one burst: the clusters that came before the cut are served, the rest fail', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(168))
  const cut = join(dir, 'cut.vma.zst')
  exits(t, await sh(`zstd -q -c ${q(fx.archive)} | head -c ${Math.floor(statSync(fx.archive).size * 0.7)} > ${q(cut)}`), 0)
  const socket = join(dir, 'sock')
  const server = spawnServe(t, [cut, '--socket', socket])
  const error = await server.waitLog(l => l.level === 50)
  t.equal(error.code, 'E_COMPRESSED_DATA', 'the log says the compressed stream is cut off')
  const disk = await openNbdDisk(uriOf(socket, 'drive-scsi0'))
  const source = readFileSync(fx.sources.get('drive-scsi0') as string)
  const seen = { served: 0, failed: 0, wrong: 0 }
  for (let at = 0; at < disk.size; at += 65536) {
    const buf = Buffer.alloc(Math.min(65536, disk.size - at))
    const ok = await disk.read(buf, at).then(() => true, () => false)
    if (!ok) seen.failed++
    else if (buf.equals(source.subarray(at, at + buf.length))) seen.served++
    else seen.wrong++
  }
  await disk.close()
  t.ok(seen.served > 0 && seen.failed > 0 && seen.wrong === 0, `some clusters served correctly, the others refused, none wrong (${JSON.stringify(seen)})`)
  t.equal(await server.stop(), 1, 'the exit status says the archive was damaged')
})

t.test('a named pipe is served like stdin', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(169))
  const fifo = join(dir, 'fifo')
  exits(t, await run('mkfifo', [fifo]), 0)
  const socket = join(dir, 'sock')
  const server = spawnServe(t, [fifo, '--socket', socket])
  const writer = sh(`gzip -c ${q(fx.archive)} > ${q(fifo)}`)
  await server.waitLog(passComplete)
  exits(t, await writer, 0)
  const out = join(dir, 'scsi1')
  exits(t, await run('nbdcopy', [uriOf(socket, 'drive-scsi1'), out]), 0)
  t.ok(cmp(out, fx.sources.get('drive-scsi1') as string), 'the disk is served from the pipe')
  t.equal(await server.stop(), 0)
})
