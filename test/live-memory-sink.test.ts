/**
 * Live restore's memory, issue 14: the sink holds few records while their
 * writes to the cache are on their way. Each record's data is a loan of a
 * 1 MiB slab (io/slabs.ts), filled again only once every record cut from it
 * is written, so records held by the sink pin slabs; when the cache writes
 * lag, 2 x 64 of them left the decompressor no free slab, and it took a fresh
 * 1 MiB buffer per output slab (18 in all for `vma serve` of /tmp's 1 GiB
 * bench archive, 81-85 MiB peak), where 2 x 16 go round in 8-11 (74-78 MiB).
 * Whether the queue fills depends on the machine's speed, so this small case
 * bounds the count (a slab not reused shows) rather than telling the two apart.
 * `vma serve` runs as users run it, with a preload that counts the 1 MiB
 * buffers made; the disk served equals the original.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { VMA, benchFilesApart, cmp, q, sh } from './helpers/run.js'
import { SLAB_SIZE } from '../lib/io/slabs.js'

const SIZE = 256 * 1048576

t.test('vma serve of a zstd archive: the pass goes round in few slabs, and serves the disk', async t => {
  const { dir, archive, disk: original } = await benchFilesApart(t, SIZE)
  t.equal((await sh(`zstd -q -1 --rm ${q(archive)}`)).code, 0, 'compressed')
  const preload = join(dir, 'count.mjs')
  writeFileSync(preload, `let n = 0
const slow = Buffer.allocUnsafeSlow
Buffer.allocUnsafeSlow = size => { if (size === ${SLAB_SIZE}) n++; return slow(size) }
process.on('SIGTERM', () => { process.stderr.write('SLABS ' + n + '\\n'); process.exit(0) })
`)
  const socket = join(dir, 's.sock')
  const child = spawn(process.execPath, ['--import', preload, VMA, 'serve', `${archive}.zst`, '--socket', socket, '--log-format', 'json'],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString() })
  const exited = new Promise<number | null>(resolve => child.on('exit', resolve))
  t.teardown(() => { child.kill('SIGKILL') })
  while (!stderr.includes('pass complete')) {
    if (child.exitCode !== null) throw new Error(`vma serve exited: ${stderr}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  const served = join(dir, 'served.raw')
  t.equal((await sh(`qemu-img convert -f raw -O raw ${q(`nbd+unix:///drive-scsi0?socket=${socket}`)} ${q(served)}`)).code, 0, 'read over NBD')
  t.ok(cmp(served, original), 'the served disk equals the original')
  child.kill('SIGTERM')
  t.equal(await exited, 0, 'stopped')
  const slabs = Number(/SLABS (\d+)/.exec(stderr)?.[1])
  // About 5 for reading, decompressing and parsing, 2 or 3 for the sink's queue.
  t.ok(slabs <= 12, `${slabs} 1 MiB buffers made for the pass`)
})
