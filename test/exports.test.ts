/**
 * No export without a user: every name a module of lib/ exports is imported
 * by another file (in lib/, bin/, test/, bench/, fuzz/ or examples/) or is
 * part of the public API (re-exported by lib/index.ts or a subpath entry,
 * lib/<folder>/index.ts, named in package.json's "exports").
 */
import t from 'tap'
import { readFileSync, readdirSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('../..', import.meta.url))
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: Record<string, { default: string }> }
/** The public entries, as .ts sources. */
const entries = new Set(Object.values(pkg.exports).map(e => join(root, e.default.replace(/^\.\/dist\//, '').replace(/\.js$/, '.ts'))))

function sources (dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap(e => {
    if (e.isDirectory()) return e.name === 'node_modules' ? [] : sources(join(dir, e.name))
    return e.name.endsWith('.ts') && !e.name.endsWith('.d.ts') ? [join(dir, e.name)] : []
  })
}

const DECLARED = /^export\s+(?:declare\s+)?(?:async\s+)?(?:function\*?|class|abstract\s+class|const|let|interface|type|enum)\s+([A-Za-z_$][\w$]*)/gm
const LISTED = /^export\s+(?:type\s+)?\{([^}]*)\}(?!\s*from)/gm

/** Names a file exports itself (not re-exports). */
function exportedNames (text: string): string[] {
  const listed = [...text.matchAll(LISTED)].flatMap(m => m[1].split(',').map(n => n.trim().replace(/^type\s+/, '').split(/\s+as\s+/).pop() ?? '').filter(Boolean))
  return [...[...text.matchAll(DECLARED)].map(m => m[1]), ...listed]
}

/** What a file takes from each module it names: the names, or '*' for all of them. */
function takenFrom (file: string, text: string): Array<{ module: string, names: string[] | '*' }> {
  const resolveSpec = (spec: string): string => {
    if (spec === 'vmapipe' || spec.startsWith('vmapipe/')) {
      const key = spec === 'vmapipe' ? '.' : `./${spec.slice('vmapipe/'.length)}`
      return join(root, pkg.exports[key].default.replace(/^\.\/dist\//, '').replace(/\.js$/, '.ts'))
    }
    return resolve(dirname(file), spec).replace(/\.js$/, '.ts')
  }
  const taken: Array<{ module: string, names: string[] | '*' }> = []
  for (const m of text.matchAll(/^(import|export)\s+(type\s+)?([^'";]*?)\s+from\s+'([^']+)'/gm)) {
    const [, , , clause, spec] = m
    if (!spec.startsWith('.') && !spec.startsWith('vmapipe')) continue
    const braces = /\{([^}]*)\}/.exec(clause)
    const names = braces === null ? '*' : braces[1].split(',').map(n => n.trim().replace(/^type\s+/, '').split(/\s+as\s+/)[0]).filter(Boolean)
    // A default import or a namespace (import * as x) takes what it likes: count it all.
    const all = braces === null || /^\s*[\w$]+\s*,/.test(clause)
    taken.push({ module: resolveSpec(spec), names: all ? '*' : names })
  }
  for (const m of text.matchAll(/import\('([^']+)'\)/g)) taken.push({ module: resolveSpec(m[1]), names: '*' })
  return taken
}

t.test('every export of lib/ has a user', async t => {
  const all = ['lib', 'bin', 'test', 'bench', 'fuzz', 'examples'].flatMap(d => sources(join(root, d)))
  const used = new Map<string, Set<string> | '*'>()
  for (const file of all) {
    for (const { module, names } of takenFrom(file, readFileSync(file, 'utf8'))) {
      if (module === file) continue
      const seen = used.get(module)
      if (names === '*' || seen === '*') used.set(module, '*')
      else used.set(module, new Set([...(seen ?? []), ...names]))
    }
  }
  const unused: string[] = []
  for (const file of sources(join(root, 'lib'))) {
    if (entries.has(file)) continue
    const seen = used.get(file)
    if (seen === '*') continue
    for (const name of exportedNames(readFileSync(file, 'utf8'))) {
      if (seen?.has(name) !== true) unused.push(`${relative(root, file)}: ${name}`)
    }
  }
  t.same(unused, [], 'exports nothing imports')
})

t.test('the check itself: it sees declarations, lists and re-exports', async t => {
  t.same(exportedNames('export const A = 1\nexport async function b () {}\nexport interface C {}\nconst d = 1\nexport { d as e }\n'), ['A', 'b', 'C', 'e'])
  const taken = takenFrom(join(root, 'lib/x.ts'), "import { type A, b as c } from './y.js'\nexport { D } from './z.js'\nimport * as n from './w.js'\n")
  t.same(taken.map(x => [relative(root, x.module), x.names]), [['lib/y.ts', ['A', 'b']], ['lib/z.ts', ['D']], ['lib/w.ts', '*']])
})

t.test('the option types of every public function and class are public too', async t => {
  const missing: string[] = []
  for (const entry of entries) {
    const text = readFileSync(entry, 'utf8')
    const reexports = [...text.matchAll(/^export\s+(?:type\s+)?\{([^}]*)\}\s+from\s+'([^']+)'/gm)]
    const offered = new Set(reexports.flatMap(m => m[1].split(',').map(n => n.trim().replace(/^type\s+/, '').split(/\s+as\s+/).pop() ?? '')))
    for (const [, names, spec] of reexports) {
      const source = readFileSync(resolve(dirname(entry), spec).replace(/\.js$/, '.ts'), 'utf8')
      for (const name of names.split(',').map(n => n.trim()).filter(n => n !== '' && !n.startsWith('type '))) {
        // The parameters of a function, or of a class's constructor and static factories.
        const fn = new RegExp(`function\\*?\\s+${name}\\s*(?:<[^>]*>)?\\s*\\(([\\s\\S]*?)\\)\\s*:`).exec(source)
        const cls = new RegExp(`class\\s+${name}\\b[\\s\\S]*?\\n}`).exec(source)
        const params = fn !== null ? fn[1] : cls === null ? '' : [...cls[0].matchAll(/(?:constructor|static (?:async )?\w+)\s*\(([^)]*)\)/g)].map(m => m[1]).join(',')
        for (const [type] of params.matchAll(/\b[A-Z]\w*Options\b/g)) {
          if (!offered.has(type)) missing.push(`${relative(root, entry)}: ${name} takes ${type}, which it does not export`)
        }
      }
    }
  }
  t.same([...new Set(missing)], [], 'option types to export')
})
