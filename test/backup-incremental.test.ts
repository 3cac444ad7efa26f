import t from 'tap'
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { exits, run, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { startQemuNbd } from './helpers/nbd.js'
import { writeJob } from './helpers/fixtures.js'

t.test('an incremental job: the whole disk first, then overlays of what the dirty bitmap marks', async t => {
  const dir = tempDir(t)
  const target = join(dir, 'dump')
  await run('mkdir', [target])
  const img = join(dir, 'vm.qcow2')
  exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '6M']), 0)
  exits(t, await run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 1 0 2M', '-c', 'write -q -P 2 4M 64k', img]), 0)
  // The bitmap starts empty with the first backup and records what changes after it.
  exits(t, await run('qemu-img', ['bitmap', '--add', img, 'bm0']), 0)
  const socket = join(dir, 'sock')
  const serve = async (): Promise<() => void> => {
    const peer = await startQemuNbd(t, { socket }, ['-r', '-f', 'qcow2', '-B', 'bm0', img])
    return () => { peer.child.kill() }
  }
  const job = writeJob(dir, { vmid: 100, incremental: true, verify: true, target, disks: [{ name: 'drive-scsi0', path: `nbd+unix:///?socket=${socket}`, dirtyBitmap: 'bm0' }] })

  let stop = await serve()
  const first = await vma(['backup', job])
  exits(t, first, 0, 'the first run')
  stop()
  const base = readdirSync(target).filter(f => f.endsWith('.qcow2'))
  t.equal(base.length, 1)
  t.match(base[0], /^vzdump-qemu-100-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}-drive-scsi0\.qcow2$/)
  const atFirst = join(dir, 'first.raw')
  exits(t, await run('qemu-img', ['convert', '-O', 'raw', img, atFirst]), 0)
  exits(t, await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', atFirst, join(target, base[0])]), 0, 'the base is the whole disk')

  exits(t, await run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 3 64k 8k', '-c', 'write -q -z 1M 64k', '-c', 'write -q -P 4 5M 128k', img]), 0)
  await new Promise(resolve => setTimeout(resolve, 1100)) // a new second, a new name
  stop = await serve()
  const second = await vma(['backup', job])
  exits(t, second, 0, 'the second run')
  stop()
  const images = readdirSync(target).filter(f => f.endsWith('.qcow2')).sort()
  t.equal(images.length, 2)
  const done = JSON.parse(second.stderr.trim().split('\n').pop() as string) as { diskBytes: number, files: undefined }
  t.equal(done.diskBytes, 4 * 65536, 'only the 4 dirty clusters were written')
  const overlay = join(target, images[1])
  exits(t, await run('qemu-img', ['check', '-q', overlay]), 0)
  t.match((await run('qemu-img', ['info', overlay])).stdout.toString(), `backing file: ${images[0]}`)
  exits(t, await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', img, overlay]), 0, 'the chain equals the disk now')
  const log = readFileSync(join(target, images[1].replace(/-drive-scsi0\.qcow2$/, '.log')), 'utf8')
  t.match(log, /what dirty bitmap bm0 marks, over vzdump-qemu-100-/)
  t.match(log, /reads back whole with its chain/)
})

t.test('incremental jobs refuse what applies to archives only', async t => {
  const dir = tempDir(t)
  const nbd = 'nbd+unix:///?socket=/nonexistent'
  for (const [job, key] of [
    [{ vmid: 1, incremental: true, target: dir, disks: [{ name: 'a', path: nbd, dirtyBitmap: 'b' }], retention: { 'keep-last': 1 } }, 'job.retention'],
    [{ vmid: 1, incremental: true, target: dir, disks: [{ name: 'a', path: nbd }] }, 'job.disks[0].dirtyBitmap'],
    [{ vmid: 1, target: dir, disks: [{ name: 'a', path: nbd, dirtyBitmap: 'b' }] }, 'job.disks[0].dirtyBitmap'],
  ] as Array<[Record<string, unknown>, string]>) {
    const r = await vma(['backup', writeJob(dir, job)])
    exits(t, r, 2)
    t.equal(failure(r).code, 'E_JOB', `${key}: E_JOB`)
    t.ok(failure(r).msg?.startsWith(`${key}:`), `the error names ${key}`)
  }
})
