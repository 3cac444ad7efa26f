/**
 * Issue 13: the library speaks in library terms; flags and exit codes live in
 * lib/cli/ only. A scan of the sources outside lib/cli/, then the command
 * line: the same exit status as before, and a hint naming the flag of the
 * command that runs.
 */
import t from 'tap'
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import ts from 'typescript'
import { PACK_VMA, exits, run, tempDir, vma } from './helpers/run.js'
import { writeJob } from './helpers/fixtures.js'
import { failure } from './helpers/logged.js'
import { VmapipeError, type ErrorCode } from '../lib/errors.js'
import { exitStatus } from '../lib/cli/exit.js'
import { Qcow2Image } from '../lib/qcow2/image.js'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const LIB = join(root, 'lib')

/**
 * String literals outside lib/cli/ that may hold `--x`: none of them names a
 * flag of vma or pack-vma. Each entry is file and the literal's text.
 */
const FLAG_EXCEPTIONS: Array<[string, string, string]> = [
  // lzop's option named in the message about a stream written with it.
  ['lib/io/lzo.ts', 'lzop streams with a filter (lzop --filter) are not supported', 'a flag of lzop, not ours'],
  // V8's own flags, set for a moment to take hold of gc() (S3 downloads and vma serve collect their garbage early).
  ['lib/util/collector.ts', '--expose-gc', 'a flag of V8, not ours'],
  ['lib/util/collector.ts', '--no-expose-gc', 'a flag of V8, not ours'],
]

/** Every .ts file under lib/ outside lib/cli/. */
function librarySources (dir = LIB): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap(e => {
    const path = join(dir, e.name)
    if (e.isDirectory()) return path === join(LIB, 'cli') ? [] : librarySources(path)
    return e.name.endsWith('.ts') ? [path] : []
  })
}

interface Finding { where: string, what: string }

/** What in one source file speaks in command-line terms, as file:line. */
function commandLineTerms (path: string): Finding[] {
  const file = relative(root, path)
  const text = readFileSync(path, 'utf8')
  const source = ts.createSourceFile(path, text, ts.ScriptTarget.ES2022, true)
  const findings: Finding[] = []
  const at = (node: ts.Node): string => `${file}:${source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1}`
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier)) {
      const from = node.moduleSpecifier.text
      const names = node.importClause?.namedBindings
      const imported = names !== undefined && ts.isNamedImports(names) ? names.elements.map(e => (e.propertyName ?? e.name).text) : []
      if (imported.includes('EXIT')) findings.push({ where: at(node), what: `imports EXIT from ${from}` })
      if (/(^|\/)cli\//.test(from)) findings.push({ where: at(node), what: `imports ${from}: the library does not depend on the command line` })
    }
    if (ts.isStringLiteralLike(node) || ts.isTemplateHead(node) || ts.isTemplateMiddle(node) || ts.isTemplateTail(node)) {
      const literal = node.text
      // errors.ts declares every code, E_USAGE among them: lib/cli/ raises it through the one error class.
      if (literal === 'E_USAGE' && file !== 'lib/errors.ts') findings.push({ where: at(node), what: 'E_USAGE outside lib/cli/' })
      if (/--[a-z]/.test(literal) && !FLAG_EXCEPTIONS.some(([f, l]) => f === file && l === literal)) {
        findings.push({ where: at(node), what: `names a flag: ${JSON.stringify(literal)}` })
      }
    }
    ts.forEachChild(node, visit)
  }
  visit(source)
  return findings
}

t.test('outside lib/cli/: no E_USAGE, no EXIT, no flag in a string', async t => {
  const files = librarySources()
  t.ok(files.length > 30, `${files.length} library files scanned`)
  const findings = files.flatMap(commandLineTerms)
  t.same(findings.map(f => `${f.where}: ${f.what}`), [], 'nothing speaks in command-line terms')
  // The scan itself finds what it looks for: its exceptions are there to be found.
  for (const [file, literal] of FLAG_EXCEPTIONS) t.ok(readFileSync(join(root, file), 'utf8').includes(literal), `${file} still holds ${literal}`)
})

t.test('every code keeps its exit status; the codes that were E_USAGE outside lib/cli/ exit 2 as it did', async t => {
  const expected: Array<[number, ErrorCode[]]> = [
    [1, ['E_VMA_MAGIC', 'E_VMA_TRUNCATED', 'E_QCOW2_HEADER', 'E_PARALLELS_XML', 'E_INPUT_SIZE',
      'E_INPUT_FORMAT', 'E_RECORD', 'E_NAME_CLASH', 'E_NBD_PROTOCOL']],
    [2, ['E_USAGE', 'E_NOT_FOUND', 'E_LIMIT', 'E_JOB', 'E_OPTION', 'E_INPUT_SIZE_UNKNOWN', 'E_NOT_SEEKABLE', 'E_BACKING', 'E_TERMINAL']],
    [3, ['E_IO', 'E_TOOL_MISSING', 'E_TARGET_EXISTS', 'E_NBD_CONNECT', 'E_NBD_SERVER_ERROR']],
    [4, ['E_LOCKED']],
    [130, ['E_INTERRUPTED']],
  ]
  for (const [status, codes] of expected) for (const code of codes) t.equal(exitStatus(new VmapipeError(code, 'x')), status, `${code}: exit ${status}`)
})

t.test('the library names the option an error is about, in its own words', async t => {
  const dir = tempDir(t)
  const base = join(dir, 'base.qcow2')
  const top = join(dir, 'top.qcow2')
  exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']), 0)
  exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]), 0)
  const err = await Qcow2Image.open(top).then(() => undefined, (e: unknown) => e)
  t.ok(err instanceof VmapipeError)
  t.match(err, { code: 'E_BACKING', option: 'followBacking', fault: 'call' })
  t.notMatch((err as Error).message, /--/, 'no flag in the message')
  const chain = await Qcow2Image.open(top, { followBacking: true })
  t.equal(chain.size, 1 << 20, 'followBacking reads the chain')
  await chain.close()
})

t.test('the command line: the same exit status, and a hint naming the flag of the command that runs', async t => {
  const dir = tempDir(t)
  const raw = join(dir, 'disk.raw')
  writeFileSync(raw, Buffer.alloc(65536, 7))
  const packVma = async (args: string[], stdin?: Buffer): Promise<Awaited<ReturnType<typeof run>>> =>
    await run(process.execPath, [PACK_VMA, ...args], stdin !== undefined ? { stdin } : {})
  const logs = (r: Awaited<ReturnType<typeof run>>): { code?: string, hint?: string } => failure(r)

  await t.test('raw from stdin without a size', async t => {
    const pack = await packVma(['-o', join(dir, 'a.vma')], readFileSync(raw))
    exits(t, pack, 2)
    t.match(logs(pack), { code: 'E_INPUT_SIZE_UNKNOWN', hint: /--size BYTES/ })
    t.match(pack.stderr, /^pack-vma: hint: .*--size BYTES$/m, 'the plain lines below the JSON name it too')
    const create = await vma(['create', join(dir, 'b.vma'), '-d', 'drive-scsi0=-'], { stdin: readFileSync(raw) })
    exits(t, create, 2)
    t.match(logs(create), { code: 'E_INPUT_SIZE_UNKNOWN', hint: /-d size=BYTES:NAME=PATH/ })
    t.notMatch(logs(create).hint, /--size/, 'vma create has no --size')
  })

  await t.test('an image with a backing file, not followed', async t => {
    const base = join(dir, 'base.qcow2')
    const top = join(dir, 'top.qcow2')
    exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']), 0)
    exits(t, await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]), 0)
    const pack = await packVma([top, '-o', join(dir, 'c.vma')])
    exits(t, pack, 2)
    t.match(logs(pack), { code: 'E_BACKING', hint: /--follow-backing/ })
    const text = await vma(['create', join(dir, 'd.vma'), '-d', `drive-scsi0=${top}`, '--log-format', 'text'])
    exits(t, text, 2)
    t.match(text.stderr, /^vma: .*has the backing file base\.qcow2.* \(E_BACKING\)\nvma: hint: --follow-backing /m, 'one line, then the hint')
    exits(t, await vma(['create', join(dir, 'd.vma'), '-d', `drive-scsi0=${top}`, '--follow-backing']), 0, 'the flag the hint names works')
    const target = join(dir, 'dump')
    mkdirSync(target)
    const backup = await vma(['backup', writeJob(dir, { vmid: 100, disks: [{ name: 'drive-scsi0', path: top }], target })])
    exits(t, backup, 2)
    t.match(logs(backup), { code: 'E_BACKING', hint: /"followBacking": true/ }, 'vma backup names the job file\'s key')
  })

  await t.test('a target that exists, without --force', async t => {
    const archive = join(dir, 'e.vma')
    exits(t, await vma(['create', archive, '-d', `drive-scsi0=${raw}`]), 0)
    const again = await packVma([raw, '-o', archive])
    exits(t, again, 3)
    t.match(logs(again), { code: 'E_TARGET_EXISTS', hint: /--force in pack-vma --help/ })
    const empty = join(dir, 'empty')
    mkdirSync(empty)
    const extract = await vma(['extract', archive, empty])
    exits(t, extract, 3)
    t.match(logs(extract), { code: 'E_TARGET_EXISTS', hint: /--force in vma extract --help/ })
    exits(t, await vma(['extract', archive, empty, '--force']), 0, 'the flag the hint names works')
  })

  await t.test('an unknown format', async t => {
    const pack = await packVma([raw, '--format', 'vhd', '-o', join(dir, 'f.vma')])
    exits(t, pack, 2)
    t.match(logs(pack), { code: 'E_OPTION', hint: /--format FORMAT in pack-vma --help/ })
    const create = await vma(['create', join(dir, 'g.vma'), '-d', `format=vhd:drive-scsi0=${raw}`])
    exits(t, create, 2)
    t.match(logs(create), { code: 'E_USAGE' }, 'vma create refuses -d format= as it parses it')
    t.match(create.stderr, /-d format=vhd:drive-scsi0=\S+: unknown format vhd/)
  })
})
