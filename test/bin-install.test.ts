/**
 * The bins as users run them: installed by npm into a project (its
 * node_modules/.bin links), run through npx, and executed straight from
 * dist/bin (the build makes them executable; the benchmarks run them so).
 * A real pack, verify and extract through the links, exit codes passed through.
 */
import t from 'tap'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, VMA, cmp, exits, run, tempDir } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'

const root = join(VMA, '../../..')

/** A project with this checkout installed by npm, offline: the bins are linked as for any user. */
async function installed (dir: string): Promise<string> {
  const project = join(dir, 'project')
  mkdirSync(project)
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'uses-vmapipe', version: '1.0.0', private: true }))
  const npm = await run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts', '--prefix', project, root])
  if (npm.code !== 0) throw new Error(`npm install failed: ${npm.stderr}`)
  return join(project, 'node_modules/.bin')
}

t.test('the installed bins pack, verify and extract, and pass exit codes through', async t => {
  const dir = tempDir(t)
  const bin = await installed(dir)
  const disk = join(dir, 'disk.raw')
  writeFileSync(disk, makeDisk(new Rng(14), 3 * 1024 * 1024 + 4096))
  const archive = join(dir, 'a.vma')
  // pack-vma from stdin, its stdout to the archive, as `cat disk | pack-vma -` is used.
  const packed = await run('sh', ['-c', `cat '${disk}' | '${join(bin, 'pack-vma')}' -q --size ${3 * 1024 * 1024 + 4096} - > '${archive}'`])
  exits(t, packed, 0)
  exits(t, await run(join(bin, 'vma'), ['verify', '-q', archive]), 0)
  const out = await run(join(bin, 'vma'), ['extract', '-q', archive, '-'])
  exits(t, out, 0)
  writeFileSync(join(dir, 'out.raw'), out.stdout)
  t.ok(cmp(disk, join(dir, 'out.raw')), 'extracted through the link: the same bytes as the disk packed')

  const damaged = join(dir, 'damaged.vma')
  writeFileSync(damaged, readFileSync(archive).subarray(0, 700 * 1024))
  exits(t, await run(join(bin, 'vma'), ['verify', '-q', damaged]), 1, 'a truncated archive: exit 1 (invalid input)')
  exits(t, await run(join(bin, 'vma'), ['verify']), 2, 'no archive named: exit 2 (usage)')
  exits(t, await run(join(bin, 'pack-vma'), ['--no-such-flag']), 2, 'pack-vma passes its usage error through')

  const npx = await run('npx', ['--offline', '--prefix', join(bin, '../..'), 'vma', 'verify', '-q', archive])
  exits(t, npx, 0, 'npx vma verify')
  exits(t, await run(VMA, ['verify', '-q', archive]), 0, 'dist/bin/vma.js executed directly')
  exits(t, await run(process.execPath, [PACK_VMA, '--help']), 0, 'node dist/bin/pack-vma.js still runs (without the flags)')
})
