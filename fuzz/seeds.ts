/**
 * Seeds made by real tools: qemu-img (qcow2 and Parallels, several layouts),
 * this project's `vma create`, `pack-vma`, `vma extract` (its own qcow2,
 * Parallels and .hdd writers), Proxmox's vma when $PVE_VMA names it, the
 * QEMU Parallels samples in test/fixtures, and NBD conversations recorded
 * between real peers (qemu-nbd, nbdkit, nbdinfo, nbdcopy, qemu-img) and the
 * library's client and server. Made once into a directory, then loaded by
 * every worker.
 */
import { execFileSync, spawn } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { connect } from 'node:net'
import { NbdClient, NbdServer } from '../lib/nbd/index.js'
import { ParallelsWriter, TOP_GUID, addSnapshotImage, parseDescriptor, topOf } from '../lib/parallels/index.js'
import { RawImage } from '../lib/raw/index.js'
import { clusterFromBytes } from '../lib/record.js'
import { Rng } from './rng.js'
import type { Seed } from './mutate.js'
import { nbdFields, parallelsSeed, qcow2Seed, vmaSeed } from './formats.js'
import { type Recording, flatten, record } from './nbd.js'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const VMA = join(root, 'dist/bin/vma.js')
const PACK_VMA = join(root, 'dist/bin/pack-vma.js')
const FIXTURES = join(root, 'test/fixtures')
/** Bump when the seeds change, so that an old seed directory is made again. */
const VERSION = 'v1'
export const DISK_SIZE = 1 << 20

export function pveVma (): string | undefined {
  return [process.env.PVE_VMA, resolve(root, '../shared/tools/pve-vma')].find(p => p !== undefined && p !== '' && existsSync(p))
}

const tool = (cmd: string, args: string[], cwd?: string): Buffer =>
  execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' }, ...(cwd !== undefined ? { cwd } : {}) })
const node = (script: string, args: string[]): Buffer => tool(process.execPath, [script, ...args])

/** A sparse disk: a few 4 KiB blocks of seeded bytes in a few clusters, the rest zeros. */
function makeDisk (seed: number, size: number): Buffer {
  const rng = new Rng(seed)
  const disk = Buffer.alloc(size)
  for (let i = 0; i < 6; i++) {
    const at = rng.below(Math.floor(size / 4096)) * 4096
    for (let j = 0; j < 4096; j += 4) disk.writeUInt32LE(rng.u32(), at + j)
  }
  disk.write('vmapipe fuzz seed', 0)
  return disk
}

async function sleep (ms: number): Promise<void> { await new Promise(resolve => setTimeout(resolve, ms)) }

async function waitSocket (path: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>(resolve => {
      const s = connect(path)
      s.once('connect', () => { s.destroy(); resolve(true) })
      s.once('error', () => resolve(false))
    })
    if (ok) return
    await sleep(25)
  }
  throw new Error(`nothing listens on ${path}`)
}

async function runPeer (cmd: string, args: string[]): Promise<void> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr}`)
}

/** What the library's client does in a fuzz case: handshake, two reads, block status, close. */
export async function clientSession (socket: string, handshakeTimeout: number): Promise<void> {
  const c = await NbdClient.connect({ socket, export: '' }, { contexts: ['base:allocation'], handshakeTimeout })
  try {
    await c.read(Buffer.alloc(Math.min(c.size, 256 * 1024)), 0)
    if (c.size >= 512 * 1024 + 65536) await c.read(Buffer.alloc(65536), 512 * 1024)
    if (c.contexts.has('base:allocation')) await c.blockStatus('base:allocation', 0, c.size)
  } finally {
    await c.close()
  }
}

function saveRecording (dir: string, name: string, rec: Recording): void {
  writeFileSync(join(dir, `${name}.json`), JSON.stringify({
    toClient: rec.toClient.map(s => ({ after: s.after, data: s.data.toString('base64') })),
    toServer: rec.toServer.map(s => ({ after: s.after, data: s.data.toString('base64') })),
  }))
}

async function recordNbd (dir: string, disk: string, q64: string): Promise<void> {
  const nbd = join(dir, 'nbd')
  mkdirSync(nbd, { recursive: true })
  const proxy = join(nbd, 'proxy.sock')
  const up = join(nbd, 'up.sock')
  // The library's client against three servers.
  const peers: Array<[string, string, string[]]> = [
    ['qemu-nbd', 'qemu-nbd', ['-r', '-f', 'qcow2', '-k', up, q64]],
    ['nbdkit', 'nbdkit', ['-f', '-r', '-U', up, 'file', disk]],
  ]
  for (const [name, cmd, args] of peers) {
    rmSync(up, { force: true })
    const child = spawn(cmd, args, { stdio: 'ignore' })
    // qemu-nbd leaves by itself after its one client.
    const closed = new Promise(resolve => child.once('close', resolve))
    try {
      await waitSocket(up)
      const rec = await record(proxy, () => connect(up), async () => { await clientSession(proxy, 10_000) })
      saveRecording(nbd, `client-${name}`, rec)
    } finally {
      child.kill()
      await closed
    }
  }
  rmSync(up, { force: true })
  const image = await RawImage.open(disk)
  const server = new NbdServer([{ name: 'disk', disk: image }])
  await server.listen({ socket: up })
  try {
    saveRecording(nbd, 'client-vmapipe', await record(proxy, () => connect(up), async () => { await clientSession(proxy, 10_000) }))
    // Real clients against the library's server.
    const uri = `nbd+unix:///?socket=${proxy}`
    const clients: Array<[string, string, string[]]> = [
      ['nbdinfo-map', 'nbdinfo', ['--map', uri]],
      ['nbdinfo-list', 'nbdinfo', ['--list', uri]],
      ['nbdcopy', 'nbdcopy', [uri, 'null:']],
      ['qemu-img', 'qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(nbd, 'copy.raw')]],
    ]
    for (const [name, cmd, args] of clients) {
      saveRecording(nbd, `server-${name}`, await record(proxy, () => connect(up), async () => { await runPeer(cmd, args) }))
    }
  } finally {
    await server.close()
    await image.close()
    rmSync(join(nbd, 'copy.raw'), { force: true })
  }
}

async function writeParallelsWithBitmap (path: string, data: Buffer): Promise<void> {
  const bits = Buffer.alloc(2)
  bits[0] = 0b10100101
  const bitmaps = [{ id: '5fbaabe3-6958-40ff-92a7-860e329aab41', granularity: 65536, bits }]
  const w = await ParallelsWriter.create(path, data.length, { clusterSize: 65536, bitmaps })
  for (let c = 0; c * 65536 < data.length; c++) await w.write(clusterFromBytes(0, c, data.subarray(c * 65536, (c + 1) * 65536)))
  await w.finish()
}

/** Makes every seed into `dir` (once: a finished directory is kept). */
export async function makeSeeds (dir: string): Promise<string> {
  const done = join(dir, VERSION)
  if (existsSync(join(done, 'ok'))) return done
  const work = `${done}.tmp-${process.pid}`
  // Left by runs that were stopped midway.
  for (const f of existsSync(dir) ? readdirSync(dir) : []) if (f.startsWith(`${VERSION}.tmp-`)) rmSync(join(dir, f), { recursive: true, force: true })
  for (const sub of ['vma', 'qcow2', 'parallels', 'bundle']) mkdirSync(join(work, sub), { recursive: true })
  const disk = join(work, 'disk.raw')
  writeFileSync(disk, makeDisk(1, DISK_SIZE))
  const disk2 = join(work, 'disk2.raw')
  writeFileSync(disk2, makeDisk(2, 3 * 65536 + 4096))
  const conf = join(work, 'qemu-server.conf')
  writeFileSync(conf, 'name: fuzz\nmemory: 512\nscsi0: local:vm-100-disk-0,size=1M\n')

  // VMA: the project's writers, and Proxmox's when present.
  const vma = (name: string): string => join(work, 'vma', name)
  node(VMA, ['create', vma('create-2dev.vma'), '-c', conf, '-d', `drive-scsi0=${disk}`, '-d', `drive-virtio1=${disk2}`])
  node(PACK_VMA, [disk2, '-c', conf, '-o', vma('pack.vma')])
  const pve = pveVma()
  if (pve !== undefined) tool(pve, ['create', vma('pve.vma'), '-c', conf, `drive-scsi0=${disk2}`])

  // qcow2: qemu-img in several layouts, the project's writer (tables last), zero clusters by qemu-io.
  const q = (name: string): string => join(work, 'qcow2', name)
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk, q('q64.qcow2')])
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', disk, q('q4k.qcow2')])
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', disk2, q('v2.qcow2')])
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=16384', disk2, q('ext.qcow2')])
  tool('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', disk2, q('deflate.qcow2')])
  tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', q('zero.qcow2'), '256K'])
  tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 4k', '-c', 'write -z 64k 64k', '-c', 'write -P 0x11 200k 8k', q('zero.qcow2')])
  node(VMA, ['extract', '--format', 'qcow2', vma('pack.vma'), join(work, 'x-qcow2')])
  for (const f of readdirSync(join(work, 'x-qcow2'))) renameSync(join(work, 'x-qcow2', f), q(`vmapipe-${f}`))

  // Parallels: qemu-img, QEMU's samples, the project's writer with a dirty bitmap (a Format Extension).
  const p = (name: string): string => join(work, 'parallels', name)
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'parallels', '-o', 'cluster_size=64K', disk, p('p64.hds')])
  tool('qemu-img', ['convert', '-f', 'raw', '-O', 'parallels', '-o', 'cluster_size=4K', disk2, p('p4k.hds')])
  for (const name of ['parallels-v1', 'parallels-v2']) writeFileSync(p(`${name}.hds`), tool('bzip2', ['-dc', join(FIXTURES, `${name}.hds.bz2`)]))
  await writeParallelsWithBitmap(p('bitmap.hds'), readFileSync(disk2))

  // A .hdd bundle from `vma extract --format parallels-bundle`, and one with a snapshot over it.
  node(VMA, ['extract', '--format', 'parallels-bundle', vma('pack.vma'), join(work, 'x-bundle')])
  const hdd = readdirSync(join(work, 'x-bundle'))[0]
  const bundle = join(work, 'bundle')
  for (const f of readdirSync(join(work, 'x-bundle', hdd))) copyFileSync(join(work, 'x-bundle', hdd, f), join(bundle, f))
  const xml = readFileSync(join(bundle, 'DiskDescriptor.xml'), 'utf8')
  writeFileSync(join(bundle, 'one.xml'), xml)
  const d = parseDescriptor(xml, 'DiskDescriptor.xml')
  const snap = 'snap.hds'
  tool('qemu-img', ['create', '-q', '-f', 'parallels', '-o', `cluster_size=${d.storages[0].blockSize * 512}`, join(bundle, snap), String(d.diskSize * 512)])
  const guid = topOf(d, 'x') === TOP_GUID ? '{0b6f1f52-7b40-4c6a-9c55-3b4f0e0c7a11}' : TOP_GUID
  writeFileSync(join(bundle, 'two.xml'), addSnapshotImage(xml, { guid, type: 'Compressed', file: snap }, 'DiskDescriptor.xml'))
  rmSync(join(bundle, 'DiskDescriptor.xml'))
  mkdirSync(join(bundle, 'subdir'))

  await recordNbd(work, disk, q('q64.qcow2'))
  rmSync(join(work, 'x-qcow2'), { recursive: true, force: true })
  rmSync(join(work, 'x-bundle'), { recursive: true, force: true })
  writeFileSync(join(work, 'ok'), new Date().toISOString())
  rmSync(done, { recursive: true, force: true })
  renameSync(work, done)
  return done
}

const files = (dir: string, ext: string): string[] => readdirSync(dir).filter(f => f.endsWith(ext)).sort()

export function loadSeeds (dir: string, parser: string): Seed[] {
  const read = (sub: string, ext: string, analyse: (name: string, b: Buffer) => Seed): Seed[] =>
    files(join(dir, sub), ext).map(f => analyse(f, readFileSync(join(dir, sub, f))))
  switch (parser) {
    case 'vma': return read('vma', '.vma', vmaSeed)
    case 'qcow2-image': case 'qcow2-stream': return read('qcow2', '.qcow2', qcow2Seed)
    case 'parallels-image': case 'parallels-stream': return read('parallels', '.hds', parallelsSeed)
    case 'descriptor': return read('bundle', '.xml', (name, bytes) => ({ name, bytes, fields: [], regions: [], cuts: [] }))
    case 'nbd-client': case 'nbd-server': {
      const prefix = parser === 'nbd-client' ? 'client-' : 'server-'
      return files(join(dir, 'nbd'), '.json').filter(f => f.startsWith(prefix)).map(f => {
        const rec = JSON.parse(readFileSync(join(dir, 'nbd', f), 'utf8')) as Record<'toClient' | 'toServer', Array<{ after: number, data: string }>>
        const flat = flatten((parser === 'nbd-client' ? rec.toClient : rec.toServer).map(s => ({ after: s.after, data: Buffer.from(s.data, 'base64') })))
        // Message boundaries are where structures begin: good places to cut and to aim at.
        const regions = flat.starts.map((s, i): [number, number] => [s, Math.min(s + 64, flat.starts[i + 1] ?? flat.bytes.length)])
        return { name: f, bytes: flat.bytes, fields: nbdFields(flat.bytes), regions, cuts: flat.starts, meta: { starts: flat.starts, afters: flat.afters } }
      })
    }
    case 'selftest': return [{ name: 'none', bytes: Buffer.alloc(16), fields: [], regions: [], cuts: [] }]
  }
  throw new Error(`unknown parser ${parser}`)
}
