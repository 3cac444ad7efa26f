/**
 * The import rule of ARCHITECTURE.md, checked on the sources: each file of
 * lib/ imports only from its own layer or the layers below it (formats may
 * build on raw, the base format, but not on each other), and no two folders
 * import each other, directly or around a loop.
 */
import t from 'tap'
import { readFileSync, readdirSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('../..', import.meta.url))
const lib = join(root, 'lib')

const LAYERS = ['contracts', 'io', 'formats', 'jobs', 'cli'] as const
type Layer = typeof LAYERS[number]
const FORMAT_FOLDERS = ['raw', 'qcow2', 'parallels', 'vma', 'nbd', 's3']
/** Transports carry bytes and import no format, not even raw. */
const TRANSPORTS = ['nbd', 's3']

const CONTRACTS = ['contracts.ts', 'errors.ts', 'record.ts']

/** The folder of a file under lib/; the files at its top are the contracts, and the root (index.ts) of the public API. */
function folderOf (file: string): string {
  const path = relative(lib, file)
  if (!path.includes('/')) return CONTRACTS.includes(path) ? 'contracts' : 'index'
  return path.split('/')[0]
}

function layerOf (file: string): Layer {
  const folder = folderOf(file)
  if (folder === 'contracts') return 'contracts'
  if (folder === 'index') return 'jobs'
  if (folder === 'io' || folder === 'util') return 'io'
  if (FORMAT_FOLDERS.includes(folder)) return 'formats'
  if (folder === 'jobs' || folder === 'backup') return 'jobs'
  if (folder === 'cli') return 'cli'
  throw new Error(`${relative(root, file)}: a folder ARCHITECTURE.md does not place in a layer`)
}

/** Whether `from` may import `to` under the rule. */
function allowed (from: string, to: string): boolean {
  const a = layerOf(from)
  const b = layerOf(to)
  if (LAYERS.indexOf(b) > LAYERS.indexOf(a)) return false
  if (a === 'formats' && b === 'formats') return folderOf(from) === folderOf(to) || (folderOf(to) === 'raw' && !TRANSPORTS.includes(folderOf(from)))
  return true
}

function sources (dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap(e => e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [])
}

/** Relative imports of a file (static, re-exports and dynamic), resolved to .ts paths. */
function importsOf (file: string): string[] {
  const text = readFileSync(file, 'utf8')
  const specs = [...text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^'"]*?from\s+'(\.[^']+)'|import\('(\.[^']+)'\)/g)].map(m => m[1] ?? m[2])
  return specs.map(s => resolve(dirname(file), s).replace(/\.js$/, '.ts'))
}

const files = sources(lib)

t.test('every file imports only from its own layer or below', async t => {
  const broken: string[] = []
  for (const file of files) {
    for (const target of importsOf(file)) {
      if (!allowed(file, target)) broken.push(`${relative(root, file)} (${layerOf(file)}) imports ${relative(root, target)} (${layerOf(target)})`)
    }
  }
  t.same(broken, [], 'imports that break the rule')
  t.ok(files.length > 50, `${files.length} files checked`)
})

t.test('no folder-level cycles', async t => {
  const edges = new Map<string, Set<string>>()
  for (const file of files) {
    for (const target of importsOf(file)) {
      const [a, b] = [folderOf(file), folderOf(target)]
      if (a !== b) (edges.get(a) ?? edges.set(a, new Set()).get(a))?.add(b)
    }
  }
  const cycles: string[] = []
  const done = new Set<string>()
  const visit = (node: string, path: string[]): void => {
    if (path.includes(node)) { cycles.push([...path.slice(path.indexOf(node)), node].join(' -> ')); return }
    if (done.has(node)) return
    for (const next of edges.get(node) ?? []) visit(next, [...path, node])
    done.add(node)
  }
  for (const node of edges.keys()) visit(node, [])
  t.same(cycles, [], 'folders that import each other')
})

t.test('the rule itself: a broken import is caught', async t => {
  t.notOk(allowed(join(lib, 'qcow2/image.ts'), join(lib, 'jobs/sources.ts')), 'a format importing a job')
  t.notOk(allowed(join(lib, 'qcow2/image.ts'), join(lib, 'parallels/image.ts')), 'a format importing another format')
  t.notOk(allowed(join(lib, 'io/input.ts'), join(lib, 'vma/format.ts')), 'io importing a format')
  t.notOk(allowed(join(lib, 'jobs/extract.ts'), join(lib, 'cli/main.ts')), 'a job importing the CLI')
  t.notOk(allowed(join(lib, 'nbd/server.ts'), join(lib, 'raw/image.ts')), 'the NBD transport importing a format')
  t.notOk(allowed(join(lib, 's3/read.ts'), join(lib, 'raw/image.ts')), 'the S3 transport importing a format')
  t.notOk(allowed(join(lib, 's3/read.ts'), join(lib, 'nbd/client.ts')), 'one transport importing another')
  t.ok(allowed(join(lib, 'qcow2/writer.ts'), join(lib, 'raw/writer.ts')), 'a format building on raw')
})
