/**
 * vma serve of an archive to clients whose reads change size on one server:
 * four nbdcopy at once with 256 KiB requests (pieces cut at holes fill the
 * pool of read buffers with 64-256 KiB ones), then four at once with 1 MiB
 * requests (sent in pieces of 256 KiB), then qemu-img convert and nbdcopy
 * of 64 KiB requests (the pool lets the 256 KiB ones go to keep 64 KiB ones). Every copy must still be
 * the disk's bytes: a buffer kept or let go is never one still being sent.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, run, sh, q, tempDir, PACK_VMA } from './helpers/run.js'
import { startServe } from './helpers/nbd.js'
import { Rng, makeDisk } from './helpers/random.js'

t.test('copies of different request sizes from one server are byte-identical to the disk', async t => {
  const dir = tempDir(t)
  const size = 40 * 1024 * 1024
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, makeDisk(new Rng(1414), size))
  const archive = join(dir, 'disk.vma')
  exits(t, await sh(`cat ${q(disk)} | ${q(PACK_VMA)} -q --size ${size} - > ${q(archive)}`), 0, 'packed')
  const served = await startServe(t, [archive, '--socket', join(dir, 'serve.sock')])
  const uri = served.uri('drive-scsi0')
  const copies = async (label: string, tool: string, args: (out: string) => string[], n: number): Promise<void> => {
    const outs = Array.from({ length: n }, (_, i) => join(dir, `${label}-${i}.raw`))
    const results = await Promise.all(outs.map(async out => await run(tool, args(out))))
    for (const [i, r] of results.entries()) {
      exits(t, r, 0, `${label} ${i}`)
      t.ok(cmp(disk, outs[i]), `${label} ${i}: the disk's bytes`)
    }
  }
  await copies('nbdcopy 256k', 'nbdcopy', out => ['-C', '4', '-T', '4', uri, out], 4)
  await copies('nbdcopy 1M', 'nbdcopy', out => ['-C', '4', '-T', '4', '--request-size=1048576', uri, out], 4)
  await copies('qemu-img convert', 'qemu-img', out => ['convert', '-f', 'raw', '-O', 'raw', uri, out], 1)
  await copies('nbdcopy 64k', 'nbdcopy', out => ['--request-size=65536', uri, out], 1)
  t.equal(served.child.exitCode, null, 'the server is still serving')
})
