import t from 'tap'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, q, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'

const tools: Array<[string, string, string]> = [
  ['zstd', 'zstd -q -c', '.zst'],
  ['gzip', 'gzip -c', '.gz'],
  ['lzo', 'lzop -c', '.lzo'],
]

t.test('compressed archives extract identically, from a file and from stdin', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(21))
  for (const [kind, command, ext] of tools) {
    // The names lie on purpose: compression is told by magic bytes, not by name.
    const archive = join(dir, `archive-${kind}${ext === '.gz' ? '.vma' : '.bin'}`)
    exits(t, await sh(`${command} ${q(fx.archive)} > ${q(archive)}`), 0, `${kind} compressed`)
    const list = await vma(['list', archive, '--json'])
    t.equal(JSON.parse(list.stdout.toString()).compression, kind, `${kind} recognised by its magic`)
    for (const [how, cmd] of [['file', `${vmaCmd} extract ${q(archive)}`], ['stdin', `cat ${q(archive)} | ${vmaCmd} extract -`]]) {
      const out = join(dir, `out-${kind}-${how}`)
      exits(t, await sh(`${cmd} ${q(out)}`), 0, `${kind} from ${how}`)
      for (const d of fx.spec.devices) {
        t.ok(cmp(join(out, d.name === 'vmstate' ? 'vmstate.bin' : `disk-${d.name}.raw`), fx.sources.get(d.name) as string), `${kind} from ${how}: ${d.name}`)
      }
    }
    const single = join(dir, `single-${kind}.raw`)
    exits(t, await sh(`cat ${q(archive)} | ${vmaCmd} extract - - -d drive-scsi1 > ${q(single)}`), 0)
    t.ok(cmp(single, fx.sources.get('drive-scsi1') as string), `${kind}: stdin to stdout`)
    const verify = await vma(['verify', archive])
    exits(t, verify, 0, `${kind}: verify passes`)
  }
})

t.test('damaged compressed data is an invalid archive, and nothing is left behind', async t => {
  const dir = tempDir(t)
  const fx = writeFixture(dir, multiDeviceSpec(22))
  for (const [kind, command] of tools) {
    const archive = join(dir, `cut-${kind}`)
    // Cut the compressed stream in the middle.
    exits(t, await sh(`${command} ${q(fx.archive)} | head -c 300000 > ${q(archive)}`), 0)
    const r = await vma(['extract', archive, join(dir, 'out')])
    exits(t, r, 1, `${kind}: a cut stream is an invalid archive`)
    t.match(r.stderr, /E_COMPRESSED_DATA|E_VMA_TRUNCATED/, `${kind}: says why`)
    t.notOk(readdirSync(dir).includes('out'), `${kind}: no target left`)
  }
})
