/**
 * qcow2 and Parallels from an uncompressed archive file are copied by
 * position (runs of data clusters, up to 1 MiB at a time, two buffers
 * written by the thread pool, a background sync every 64 MiB) instead of
 * streamed as records. Each image must check clean, equal its source, and
 * allocate what the record path allocates; a damaged archive must fail with
 * the record path's error and leave nothing behind.
 */
import t, { type Test } from 'tap'
import { existsSync, readFileSync, readdirSync, statSync, truncateSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { type RunResult, exits, q, sh, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { type BuildDevice, type BuildSpec, Rng, buildArchive, scatter } from './helpers/vma-builder.js'
import { qemuCheck, qemuCompare, readImage } from './helpers/parallels.js'

const C = 65536
const MIB = 1 << 20

/**
 * A disk whose data runs straddle what the copy cuts at: 16-cluster (1 MiB)
 * pieces, 192 KiB and 1 MiB image clusters. Runs of 1, 15, 16, 17 and 33
 * data clusters between all-zero ones, partly zero clusters at their edges,
 * and a last cluster cut short (the size is no multiple of 4 KiB).
 */
function boundaryDisk (rng: Rng): Buffer {
  const runs = [1, 15, 16, 17, 33, 2, 40]
  const clusters = runs.reduce((n, r) => n + r + 1, 2)
  const disk = Buffer.alloc(clusters * C - C + 3 * 4096 + 1536)
  let c = 1
  for (const r of runs) {
    for (let i = 0; i < r; i++, c++) {
      const at = c * C
      rng.fill(disk.subarray(at, Math.min(disk.length, at + C)))
      // The first and last cluster of each run partly zero: holes inside the copied bytes.
      if (i === 0 || i === r - 1) disk.fill(0, at + 4096 * (1 + rng.int(4)), at + 4096 * (8 + rng.int(4)))
    }
    c++ // an all-zero cluster between runs
  }
  rng.fill(disk.subarray(c * C))
  return disk
}

/** A 65 MiB disk of data (cheap non-zero bytes): more than the 64 MiB after which a copy syncs in the background. */
function largeDisk (): Buffer {
  const disk = Buffer.alloc(65 * MIB + 3 * C)
  for (let at = 0; at < disk.length; at += 4096) disk.writeUInt32LE(at / 4096 + 1, at)
  disk.fill(0, 20 * MIB, 20 * MIB + 2 * C) // two zero clusters in the middle
  return disk
}

function spec (seed: number): BuildSpec {
  const rng = new Rng(seed)
  const devices: BuildDevice[] = [
    { id: 1, name: 'drive-scsi0', size: 0, data: boundaryDisk(rng) },
    { id: 2, name: 'drive-scsi1', size: 0, data: largeDisk() },
  ]
  for (const d of devices) d.size = d.data.length
  return { configs: [{ name: 'qemu-server.conf', data: Buffer.from('scsi0: x\n') }], devices, extents: scatter(rng, devices) }
}

const dataClusters = (disk: Buffer): number => {
  let n = 0
  for (let at = 0; at < disk.length; at += C) if (disk.subarray(at, at + C).some(b => b !== 0)) n++
  return n
}

/** qemu-img in the image's directory: a qcow2 names its data file relative to itself, qemu-img finds it relative to where it runs. */
const qemuImgBeside = async (image: string, args: string[]): Promise<RunResult> => await sh(`cd ${q(dirname(image))} && qemu-img ${args.map(q).join(' ')}`)

/** qemu-img check of a qcow2 finds nothing wrong; the data clusters it counts. */
async function qcow2Allocated (t: Test, image: string): Promise<number> {
  const r = await qemuImgBeside(image, ['check', '--output=json', '-f', 'qcow2', image])
  exits(t, r, 0, `qemu-img check ${image}`)
  const report = JSON.parse(r.stdout.toString()) as { 'check-errors': number, leaks?: number, corruptions?: number, 'allocated-clusters': number }
  t.equal(report['check-errors'], 0, 'no check errors')
  t.notOk(report.leaks ?? report.corruptions, 'no leaks, no corruptions')
  return report['allocated-clusters']
}

/** Each writer and cluster size; the large disk (slow to check) only where `large` says. */
const FORMATS: Array<{ name: string, args: string[], file: (device: string) => string, large?: boolean }> = [
  { name: 'qcow2', args: ['--format', 'qcow2'], file: d => `disk-${d}.qcow2`, large: true },
  { name: 'qcow2 --data-file', args: ['--format', 'qcow2', '--data-file'], file: d => `disk-${d}.qcow2` },
  { name: 'parallels', args: ['--format', 'parallels'], file: d => `disk-${d}.hds`, large: true },
  { name: 'parallels 192K', args: ['--format', 'parallels', '--cluster-size', '192K'], file: d => `disk-${d}.hds` },
  { name: 'parallels-bundle 64K', args: ['--format', 'parallels-bundle', '--cluster-size', '64K'], file: d => `disk-${d}.hdd` },
]

/** The .hds of an image path (a bundle holds one). */
const hdsOf = (path: string): string => path.endsWith('.hdd') ? join(path, readdirSync(path).find(n => n.endsWith('.hds')) as string) : path

t.test('from an archive file: every image checks clean, equals its source and allocates what the record path allocates', async t => {
  const dir = tempDir(t)
  const s = spec(11)
  const archive = join(dir, 'a.vma')
  writeFileSync(archive, buildArchive(s))
  const sources = new Map(s.devices.map(d => {
    const path = join(dir, `${d.name}.raw`)
    writeFileSync(path, d.data)
    return [d.name, { path, data: d.data }]
  }))
  for (const f of FORMATS) {
    const byPosition = join(dir, `file-${f.name}`)
    const byRecords = join(dir, `pipe-${f.name}`)
    const args = [...f.args, ...(f.large === true ? [] : ['-d', 'scsi0'])]
    exits(t, await vma(['extract', '-q', archive, byPosition, ...args]), 0, `${f.name}: from the file`)
    exits(t, await vma(['extract', '-q', '-', byRecords, ...args], { stdin: { file: archive } }), 0, `${f.name}: from a pipe`)
    for (const [name, src] of sources) {
      if (f.large !== true && name !== 'drive-scsi0') continue
      const ours = join(byPosition, f.file(name))
      const theirs = join(byRecords, f.file(name))
      if (f.name.startsWith('qcow2')) {
        const allocated = await qcow2Allocated(t, ours)
        exits(t, await qemuImgBeside(ours, ['compare', '-f', 'qcow2', '-F', 'raw', ours, src.path]), 0, `${f.name} ${name}: qemu-img compare`)
        if (f.args.includes('--data-file')) {
          t.same(readFileSync(join(byPosition, `disk-${name}.raw`)), src.data, `${f.name} ${name}: the data file is the disk`)
        } else {
          t.equal(allocated, dataClusters(src.data), `${f.name} ${name}: one cluster per cluster with data`)
          t.equal(allocated, await qcow2Allocated(t, theirs), `${f.name} ${name}: as many as from records`)
          t.equal(statSync(ours).size, statSync(theirs).size, `${f.name} ${name}: the same file size as from records`)
        }
      } else {
        const hds = hdsOf(ours)
        await qemuCheck(t, hds)
        await qemuCompare(t, hds, src.path)
        const a = readImage(hds)
        const b = readImage(hdsOf(theirs))
        t.equal(a.bat.filter(e => e !== 0).length, b.bat.filter(e => e !== 0).length, `${f.name} ${name}: as many image clusters as from records`)
        t.equal(statSync(hds).size, statSync(hdsOf(theirs)).size, `${f.name} ${name}: the same file size as from records`)
        // Guest order: the copy allocates image clusters front to back.
        const used = a.bat.filter(e => e !== 0)
        t.same(used, [...used].sort((x, y) => x - y), `${f.name} ${name}: image clusters in guest order`)
      }
    }
  }
})

t.test('a damaged archive file: the record path\'s error, and no target left', async t => {
  const dir = tempDir(t)
  const s = spec(12)
  s.devices.pop()
  s.extents = scatter(new Rng(3), s.devices)
  const whole = buildArchive(s)
  const cut = join(dir, 'cut.vma')
  writeFileSync(cut, whole)
  truncateSync(cut, whole.length - 1000)
  const missing = join(dir, 'missing.vma')
  writeFileSync(missing, buildArchive({ ...s, extents: s.extents.slice(1) }))
  for (const [archive, code] of [[cut, 'E_VMA_TRUNCATED'], [missing, 'E_VMA_MISSING']]) {
    for (const f of FORMATS) {
      const fromFile = await vma(['extract', '-q', archive, join(dir, 'out'), ...f.args])
      const fromPipe = await vma(['extract', '-q', '-', join(dir, 'out'), ...f.args], { stdin: { file: archive } })
      t.equal(failure(fromFile).code, code, `${f.name}, ${code}: from the file`)
      t.equal(failure(fromPipe).code, code, `${f.name}, ${code}: from a pipe`)
      t.equal(fromFile.code, fromPipe.code, `${f.name}, ${code}: the same exit code`)
      t.notOk(existsSync(join(dir, 'out')), `${f.name}, ${code}: no target left`)
    }
  }
})
