/**
 * The README's quick start and its library snippets. Each snippet is a file in
 * examples/, compiled with strict tsc in a project of its own that has only the
 * installed package (npm pack, then npm install of the tarball), and run there
 * on the demo archive or a disk restored from it; what each writes or prints is
 * checked with vma, cmp and qemu-img (and Proxmox's vma where it is found).
 */
import t from 'tap'
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PVE_VMA, cmp, exits, run, tempDir, vma } from './helpers/run.js'
import { fileURLToPath } from 'node:url'
import { CreateBucketCommand } from '@aws-sdk/client-s3'
import { needsS3, s3Store } from './helpers/s3.js'

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

t.test('the examples import only node: modules, vmapipe and its subpath exports', async t => {
  const exported = Object.keys(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).exports as Record<string, unknown>)
  const allowed = new Set(exported.map(e => e === '.' ? 'vmapipe' : `vmapipe/${e.slice(2)}`))
  for (const f of examples) {
    const imports = [...readFileSync(join(root, 'examples', f), 'utf8').matchAll(/^import .* from '([^']+)'/gm)].map(m => m[1])
    t.same(imports.filter(i => !i.startsWith('node:') && !allowed.has(i)), [], `${f} imports ${imports.join(', ')}`)
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

  exits(t, await node('library-qcow2.js'), 0, 'library-qcow2 runs')
  const qcow2 = join(project, 'disk.qcow2')
  exits(t, await run('qemu-img', ['check', '-f', 'qcow2', qcow2]), 0, 'its qcow2 passes qemu-img check')
  exits(t, await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', join(project, 'disk.raw'), qcow2]), 0, 'and qemu-img reads the disk it converted')

  const hds = join(project, 'disk.hds')
  exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'parallels', join(project, 'disk.raw'), hds]), 0, 'qemu-img makes disk.hds')
  const parallels = await node('library-parallels.js')
  exits(t, parallels, 0, 'library-parallels runs')
  const extents = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'parallels', hds])).stdout.toString()) as Array<{ length: number, data: boolean }>
  const allocated = extents.filter(e => e.data).reduce((sum, e) => sum + e.length, 0)
  const size = statSync(join(project, 'disk.raw')).size
  t.ok(allocated > 0 && allocated < size, `the disk is partly allocated (${allocated} of ${size} bytes)`)
  t.equal(parallels.stdout.toString(), `${size} bytes, ${allocated} allocated, 0 dirty bitmaps\n`, 'it sums what qemu-img map reports as data')

  exits(t, await run('zstd', ['-dq', demo, '-o', join(project, 'backup.vma')]), 0, 'zstd -d makes backup.vma')
  const indexed = await node('library-vma.js')
  exits(t, indexed, 0, 'library-vma runs')
  const listed = JSON.parse((await vma(['list', '--json', demo])).stdout.toString()) as { devices: Array<{ name: string, size: number }> }
  t.equal(indexed.stdout.toString(), listed.devices.map(d => `${d.name} ${d.size}\n`).join(''), 'it lists the devices vma list shows')
  const head = readFileSync(join(project, 'head.bin'))
  t.ok(head.some(b => b !== 0), 'the first 64 KiB of drive-scsi0 hold data')
  t.same(head, readFileSync(join(project, 'scsi0.raw')).subarray(0, 64 * 1024), 'and it reads them as vma extract restores them')

  exits(t, await node('library-nbd.js'), 0, 'library-nbd runs and exits once its server and client are closed')
  t.ok(cmp(join(project, 'disk.raw'), join(project, 'copy.raw')), 'what it read over NBD is the disk it served')
  t.notOk(existsSync(join(project, 'nbd.sock')), 'and the socket is gone')

  await t.test('library-s3 uploads and verifies through a real store', needsS3, async t => {
    const store = await s3Store(t)
    await store.client.send(new CreateBucketCommand({ Bucket: 'backups' })).catch(() => {})
    const uploaded = await run('sh', ['-c', 'cd "$1" && "$2" "$3"', 'sh', project, process.execPath, 'library-s3.js'], { env: store.env })
    exits(t, uploaded, 0, 'library-s3 runs')
    t.match(uploaded.stdout.toString(), `${statSync(demo).size} bytes in 1 part(s): verified`)
    const back = await vma(['extract', 's3://backups/pve1/backup.vma.zst', join(dir, 'from-s3')], { env: store.env })
    exits(t, back, 0, 'and vma extracts the object')
    t.ok(cmp(join(dir, 'from-s3/disk-drive-scsi0.raw'), join(dir, 'out/disk-drive-scsi0.raw')), 'as it extracts the file')
  })

  // Two older archives of VM 100 (empty: retention goes by name only); keep-last 2 removes the oldest.
  const dump = join(project, 'dump')
  const [oldest, older] = ['2020_01_01-00_00_00', '2020_01_02-00_00_00'].map(d => `vzdump-qemu-100-${d}.vma.zst`)
  mkdirSync(dump)
  for (const name of [oldest, older]) writeFileSync(join(dump, name), '')
  const backup = await node('library-backup.js')
  exits(t, backup, 0, 'library-backup runs')
  const archive = readdirSync(dump).find(f => f.endsWith('.vma.zst') && f !== older)
  t.ok(archive !== undefined && /^vzdump-qemu-100-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d\.vma\.zst$/.test(archive), `it writes a vzdump-named archive (${archive})`)
  t.match(backup.stdout.toString(), `pruned [${oldest}]`, 'and reports the one it pruned')
  t.same(readdirSync(dump).filter(f => f.endsWith('.vma.zst')).sort(), [older, archive].sort(), 'keep-last 2 keeps it and the newer old one')
  exits(t, await vma(['verify', join(dump, archive ?? '')]), 0, 'its archive verifies')
  if (PVE_VMA !== undefined) {
    exits(t, await run('zstd', ['-dq', join(dump, archive ?? ''), '-o', join(dir, 'backup.vma')]), 0)
    exits(t, await run(PVE_VMA, ['verify', join(dir, 'backup.vma')]), 0, 'and Proxmox\'s vma verifies it')
  }
  exits(t, await vma(['extract', join(dump, archive ?? ''), join(dir, 'backup')]), 0)
  t.ok(cmp(join(project, 'disk.raw'), join(dir, 'backup/disk-drive-scsi0.raw')), 'and holds the disk it backed up')
})
