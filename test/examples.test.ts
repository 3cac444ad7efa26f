import t from 'tap'
import { join } from 'node:path'
import { cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('../..', import.meta.url))
const demo = join(root, 'examples/demo.vma.zst')

t.test('the README quick start: the demo archive lists and verifies', async t => {
  const list = await vma(['list', demo])
  exits(t, list, 0)
  t.match(list.stdout.toString(), /drive-scsi0\s+4194304 bytes/)
  exits(t, await vma(['verify', demo]), 0)
})

t.test('examples/library-extract restores the same bytes as vma extract', async t => {
  const dir = tempDir(t)
  const viaLibrary = join(dir, 'lib.raw')
  exits(t, await run(process.execPath, [join(root, 'dist/examples/library-extract.js'), demo, 'drive-scsi0', viaLibrary]), 0)
  exits(t, await vma(['extract', demo, join(dir, 'out')]), 0)
  t.ok(cmp(viaLibrary, join(dir, 'out/disk-drive-scsi0.raw')))
})
