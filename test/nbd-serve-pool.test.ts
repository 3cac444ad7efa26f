/**
 * vma serve of an archive to clients whose reads change size on one server:
 * nbdcopy's 256 KiB requests, then qemu-img convert's larger ones (1 MiB
 * pieces), then nbdcopy's 64 KiB. The server keeps read buffers for reuse
 * and lets those of the old sizes go as the sizes change; every copy must
 * still be the disk's bytes.
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
  const copies: Array<[string, string[]]> = [
    ['nbdcopy', [uri, join(dir, 'a.raw')]],
    ['qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'b.raw')]],
    ['nbdcopy', ['--request-size=65536', uri, join(dir, 'c.raw')]],
    ['qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'd.raw')]],
  ]
  for (const [tool, args] of copies) {
    const out = args[args.length - 1]
    exits(t, await run(tool, args), 0, `${tool} ${args.slice(0, -2).join(' ')}`)
    t.ok(cmp(disk, out), `${tool} ${args.slice(0, -2).join(' ')}: the disk's bytes`)
  }
  t.equal(served.child.exitCode, null, 'the server is still serving')
})
