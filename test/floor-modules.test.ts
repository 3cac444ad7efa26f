/**
 * What a local job loads. Every module a command loads lifts its memory
 * floor (Node 40 MiB, the AWS SDK alone 22 MiB more), so modules that serve
 * only some paths are imported on those paths: no job on local files loads
 * the S3 client, the NBD server, the backup jobs or the XML parser; a job on
 * an uncompressed archive loads no zstd; only packing a raw file loads the
 * holes addon; `vma --help` and `vma list` load no logger, and `pack-vma
 * --help` no job. Each run records what it loaded: ES modules through a
 * loader hook, CommonJS packages and addons from require's cache.
 */
import t, { type Test as Tap } from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, type RunResult, VMA, cmp, exits, run, tempDir } from './helpers/run.js'
import { Rng } from './helpers/random.js'

/** The holes addon (vmapipe-holes), which finds the data of a raw file. */
const HOLES = ['/holes/index.cjs', 'holes.node']

/** Loaded by no job on local files: modules of S3, the NBD server, backup jobs, Parallels bundles' XML. */
const NEVER_LOCAL = ['/@aws-sdk/', '/@smithy/', '/fast-xml-parser/', '/dist/lib/s3/client.js', '/dist/lib/nbd/server.js', '/dist/lib/backup/']

/** A preload that records every module the process loads into the file named by FLOOR_LOG. */
function recorder (dir: string): string {
  const preload = join(dir, 'record-modules.mjs')
  writeFileSync(preload, `import { appendFileSync } from 'node:fs'
import { createRequire, register } from 'node:module'
const log = process.env.FLOOR_LOG
const hook = 'import { appendFileSync } from "node:fs"\\n' +
  'export async function load (url, context, next) { appendFileSync(' + JSON.stringify(log) + ', url + "\\\\n"); return await next(url, context) }'
register('data:text/javascript,' + encodeURIComponent(hook))
process.on('exit', () => appendFileSync(log, Object.keys(createRequire(import.meta.url).cache).join('\\n') + '\\n'))
`)
  return preload
}

t.test('local jobs load only the modules of their path', async t => {
  const dir = tempDir(t)
  const preload = recorder(dir)
  const disk = join(dir, 'disk.raw')
  // Data, a zero MiB, data: holes and data blocks both.
  const bytes = Buffer.concat([new Rng(1).fill(Buffer.alloc(1 << 20)), Buffer.alloc(1 << 20), new Rng(2).fill(Buffer.alloc(1 << 20))])
  writeFileSync(disk, bytes)
  let runs = 0

  /** Runs a bin with the recorder; returns its result and what it loaded. */
  const traced = async (bin: string, args: string[], stdin?: { file: string }): Promise<RunResult & { loaded: string[] }> => {
    const log = join(dir, `loaded-${++runs}.txt`)
    writeFileSync(log, '')
    const r = await run(process.execPath, ['--import', preload, bin, ...args], { env: { FLOOR_LOG: log }, ...(stdin !== undefined ? { stdin } : {}) })
    return { ...r, loaded: readFileSync(log, 'utf8').split('\n').filter(l => l !== '') }
  }
  const refuses = (t: Tap, loaded: string[], parts: string[], what: string): void => {
    for (const part of parts) t.same(loaded.filter(m => m.includes(part)), [], `${what} loads nothing of ${part}`)
  }

  const archive = join(dir, 'a.vma')
  const pack = await traced(PACK_VMA, [disk, '-o', archive])
  exits(t, pack, 0, 'pack-vma disk.raw')
  refuses(t, pack.loaded, [...NEVER_LOCAL, 'zstd-napi'], 'pack-vma of a raw file to an uncompressed archive')
  t.ok(pack.loaded.some(m => m.includes('/pino/')), 'the recorder sees a CommonJS package (pino, for the closing log line)')

  const piped = await traced(PACK_VMA, ['-', '--size', String(bytes.length), '-o', join(dir, 'piped.vma')], { file: disk })
  exits(t, piped, 0, 'pack-vma - (stdin)')
  refuses(t, piped.loaded, [...NEVER_LOCAL, 'zstd-napi', ...HOLES], 'pack-vma from stdin')

  const zst = join(dir, 'b.vma.zst')
  const create = await traced(VMA, ['create', zst, '-d', `drive-scsi0=${disk}`])
  exits(t, create, 0, 'vma create .vma.zst')
  refuses(t, create.loaded, NEVER_LOCAL, 'vma create')

  for (const [name, path] of [['uncompressed', archive], ['zstd', zst]]) {
    const verify = await traced(VMA, ['verify', path])
    exits(t, verify, 0, `vma verify (${name})`)
    refuses(t, verify.loaded, [...NEVER_LOCAL, ...HOLES, ...(name === 'zstd' ? [] : ['zstd-napi'])], `vma verify (${name})`)
    t.ok(verify.loaded.some(m => m.endsWith('/dist/lib/vma/format.js')), 'the recorder sees our own ES modules')
  }

  const target = join(dir, 'out')
  const extract = await traced(VMA, ['extract', archive, target])
  exits(t, extract, 0, 'vma extract to a directory')
  t.ok(cmp(join(target, 'disk-drive-scsi0.raw'), disk), 'the disk comes back byte for byte')
  refuses(t, extract.loaded, [...NEVER_LOCAL, ...HOLES, 'zstd-napi'], 'vma extract to a directory')

  const stdout = await traced(VMA, ['extract', archive, '-'])
  exits(t, stdout, 0, 'vma extract to stdout')
  t.ok(stdout.stdout.equals(bytes), 'stdout is the disk')
  refuses(t, stdout.loaded, [...NEVER_LOCAL, ...HOLES, 'zstd-napi'], 'vma extract to stdout')

  const list = await traced(VMA, ['list', archive])
  exits(t, list, 0, 'vma list')
  refuses(t, list.loaded, [...NEVER_LOCAL, ...HOLES, 'zstd-napi', '/pino/'], 'vma list')

  const help = await traced(VMA, ['--help'])
  exits(t, help, 0, 'vma --help')
  refuses(t, help.loaded, [...NEVER_LOCAL, ...HOLES, 'zstd-napi', '/pino/', '/dist/lib/jobs/', '/dist/lib/io/'], 'vma --help')
  const packHelp = await traced(PACK_VMA, ['--help'])
  exits(t, packHelp, 0, 'pack-vma --help')
  refuses(t, packHelp.loaded, [...NEVER_LOCAL, ...HOLES, 'zstd-napi', '/pino/', '/dist/lib/jobs/pack.js', '/dist/lib/io/compression.js', '/dist/lib/vma/writer.js'],
    'pack-vma --help')
})

t.test('the recorder sees the AWS SDK where a job reads a bucket', async t => {
  const dir = tempDir(t)
  const log = join(dir, 'loaded.txt')
  writeFileSync(log, '')
  // Nothing listens on port 9: the job fails (no answer from the store) after it loaded the client.
  const r = await run(process.execPath, ['--import', recorder(dir), VMA, 'list', 's3://bucket/a.vma', '--s3-endpoint', 'http://127.0.0.1:9'], {
    env: { FLOOR_LOG: log, AWS_ACCESS_KEY_ID: 'x', AWS_SECRET_ACCESS_KEY: 'y', AWS_REGION: 'us-east-1' },
  })
  exits(t, r, 3, 'vma list s3://... with no store: a system failure')
  t.match(r.stderr, /E_S3_NETWORK/, 'no answer from the store')
  t.ok(readFileSync(log, 'utf8').split('\n').some(m => m.includes('/@aws-sdk/client-s3/')), 'the SDK was loaded, and seen')
})
