/**
 * The README's quick start and its library snippets. Each snippet is a file in
 * examples/, compiled with strict tsc in a project of its own that has only the
 * installed package (npm pack, then npm install of the tarball), and run there.
 */
import t from 'tap'
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('../..', import.meta.url))
const demo = join(root, 'examples/demo.vma.zst')
const examples = readdirSync(join(root, 'examples')).filter(f => f.endsWith('.ts'))

t.test('the README quick start: the demo archive lists and verifies', async t => {
  const list = await vma(['list', demo])
  exits(t, list, 0)
  t.match(list.stdout.toString(), /drive-scsi0\s+4194304 bytes/)
  exits(t, await vma(['verify', demo]), 0)
})

t.test('each TypeScript block of the README\'s Library section is an example file, as it is', async t => {
  const readme = readFileSync(join(root, 'README.md'), 'utf8')
  const library = readme.slice(readme.indexOf('\n## Library'), readme.indexOf('\n## ', readme.indexOf('\n## Library') + 1))
  const blocks = [...library.matchAll(/```ts\n([\s\S]*?)```/g)].map(m => m[1])
  t.ok(blocks.length > 0, 'the Library section has snippets')
  const files = examples.map(f => readFileSync(join(root, 'examples', f), 'utf8'))
  for (const block of blocks) t.ok(files.includes(block), `snippet is an example file: ${block.split('\n').find(l => l.startsWith('//')) ?? ''}`)
  t.equal(files.length, blocks.length, 'and every example file is in the README')
})

t.test('the examples import only node: modules and vmapipe', async t => {
  for (const f of examples) {
    const imports = [...readFileSync(join(root, 'examples', f), 'utf8').matchAll(/^import .* from '([^']+)'/gm)].map(m => m[1])
    t.same(imports.filter(i => !i.startsWith('node:') && i !== 'vmapipe'), [], `${f} imports ${imports.join(', ')}`)
  }
})

t.test('the examples compile against the installed package and run', async t => {
  const dir = tempDir(t)
  const npm = async (args: string[], cwd: string): ReturnType<typeof run> => await run('sh', ['-c', 'cd "$1" && shift && npm "$@"', 'sh', cwd, ...args])
  // dist is built already (the tests run from it): pack it as it is.
  const packed = await npm(['pack', '--ignore-scripts', '--silent', '--pack-destination', dir], root)
  exits(t, packed, 0, 'npm pack')
  const tarball = join(dir, packed.stdout.toString().trim().split('\n').pop() ?? '')
  const project = join(dir, 'project')
  mkdirSync(project)
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'user', private: true, type: 'module' }))
  // The package's dependencies come from npm's cache where it has them.
  exits(t, await npm(['install', '--prefer-offline', '--no-audit', '--no-fund', '--ignore-scripts', tarball], project), 0, 'npm install of the tarball')
  // Without install scripts zstd-napi is not built: the repository's own build (made by its npm ci) stands in for it.
  const zstdBuild = join(root, 'node_modules/zstd-napi/build')
  if (existsSync(zstdBuild)) cpSync(zstdBuild, join(project, 'node_modules/zstd-napi/build'), { recursive: true })
  writeFileSync(join(project, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      // As `tsc --init` writes it, skipLibCheck included (the package's declarations come from the checked build).
      target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, skipLibCheck: true, noEmitOnError: true,
      // The user's @types/node; the repository's copy stands in for it.
      typeRoots: [join(root, 'node_modules/@types')], types: ['node'],
    },
  }))
  for (const f of examples) copyFileSync(join(root, 'examples', f), join(project, f))
  const tsc = await run(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', project])
  exits(t, tsc, 0, 'strict tsc compiles every example')
  t.equal(tsc.stdout.toString(), '', 'without a diagnostic')

  copyFileSync(demo, join(project, 'backup.vma.zst'))
  const node = async (script: string): ReturnType<typeof run> => await run('sh', ['-c', 'cd "$1" && "$2" "$3"', 'sh', project, process.execPath, script])
  exits(t, await node('library-extract.js'), 0, 'library-extract runs')
  exits(t, await vma(['extract', demo, join(dir, 'out')]), 0)
  t.ok(cmp(join(project, 'scsi0.raw'), join(dir, 'out/disk-drive-scsi0.raw')), 'it restores what vma extract restores')

  copyFileSync(join(project, 'scsi0.raw'), join(project, 'disk.raw'))
  exits(t, await node('library-pack.js'), 0, 'library-pack runs')
  exits(t, await vma(['verify', join(project, 'disk.vma.zst')]), 0, 'its archive verifies')
  exits(t, await vma(['extract', join(project, 'disk.vma.zst'), join(dir, 'packed')]), 0)
  t.ok(cmp(join(project, 'disk.raw'), join(dir, 'packed/disk-drive-scsi0.raw')), 'and holds the disk it packed')
})
