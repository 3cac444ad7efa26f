/** Running the command-line tools and the real peers from tests. */
import { spawn, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../../..')
export const VMA = join(root, 'dist/bin/vma.js')
export const PACK_VMA = join(root, 'dist/bin/pack-vma.js')
/** Samples kept in the repository (test/fixtures/README.md says where each comes from). */
export const FIXTURES = join(root, 'test/fixtures')
export const SAMPLE = join(FIXTURES, 'proxmox-sample.vma.gz')
/**
 * Proxmox's own vma, an optional peer: $PVE_VMA, else ../shared/tools/pve-vma
 * beside the checkout. Undefined where neither exists; tests that need it skip.
 */
export const PVE_VMA = [process.env.PVE_VMA, resolve(root, '../shared/tools/pve-vma')]
  .find(path => path !== undefined && path !== '' && existsSync(path))
/** tap's skip option for a test that needs pve-vma. */
export const needsPveVma = PVE_VMA === undefined ? { skip: 'pve-vma not found' } : {}

export interface RunResult { code: number | null, stdout: Buffer, stderr: string }

/** Runs a program; `stdin` is bytes to feed, or a shell-free file path via { file }. */
export async function run (command: string, args: string[], options: { stdin?: Buffer | { file: string }, env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  // tap puts its process-info hooks into NODE_OPTIONS; the tools under test run without them.
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: '', ...options.env } })
  const out: Buffer[] = []
  const err: Buffer[] = []
  child.stdout.on('data', (b: Buffer) => out.push(b))
  child.stderr.on('data', (b: Buffer) => err.push(b))
  child.stdin.on('error', () => {})
  const stdin = options.stdin
  if (stdin === undefined) child.stdin.end()
  else if (Buffer.isBuffer(stdin)) child.stdin.end(stdin)
  else createReadStream(stdin.file).on('error', () => child.stdin.end()).pipe(child.stdin)
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  return { code, stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8') }
}

export async function vma (args: string[], options: Parameters<typeof run>[2] = {}): Promise<RunResult> {
  return await run(process.execPath, [VMA, ...args], options)
}

/** Runs a shell pipeline (for real pipes between processes). */
export async function sh (script: string): Promise<RunResult> {
  return await run('sh', ['-c', script])
}

export const q = (s: string): string => `'${s.replace(/'/g, "'\\''")}'`
export const vmaCmd = `${q(process.execPath)} ${q(VMA)}`

export function tempDir (t: { teardown: (fn: () => void) => void }, prefix = 'vmapipe-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

export function sha256 (data: Buffer | string): string {
  return createHash('sha256').update(typeof data === 'string' ? readFileSync(data) : data).digest('hex')
}

/** Bytes actually allocated on disk for a file. */
export function allocated (path: string): number {
  return statSync(path).blocks * 512
}

export function cmp (a: string, b: string): boolean {
  return spawnSync('cmp', ['-s', a, b]).status === 0
}

export function have (tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0
}

/** Asserts an exit code, showing the tool's stderr only when it is wrong. */
export function exits (t: Test, r: RunResult, code: number, message = `exits ${code}`): void {
  t.equal(r.code, code, message, { stderr: r.stderr })
}

/**
 * A small tmpfs at `dir/small`, unmounted at teardown, to fill up on purpose;
 * undefined (with a comment) where mounting is not allowed (not root).
 */
export function smallFileSystem (t: Test, dir: string, size: string): string | undefined {
  const mnt = join(dir, 'small')
  mkdirSync(mnt)
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt]).status !== 0) {
    t.comment('skipped: cannot mount a small tmpfs here (needs root)')
    return undefined
  }
  t.teardown(() => { spawnSync('umount', [mnt]) })
  return mnt
}

const BENCH_ARCHIVES = new URL('../../bench/archives.js', import.meta.url).href

/**
 * In a new temporary directory, the bench's archive of a `size`-byte disk (clusters in order), a.vma, and that
 * disk, disk.raw, made in another process: a test that measures its own memory must not count their making.
 */
export async function benchFilesApart (t: Test, size: number): Promise<{ dir: string, archive: string, disk: string }> {
  const dir = tempDir(t)
  const archive = join(dir, 'a.vma')
  const disk = join(dir, 'disk.raw')
  exits(t, await run(process.execPath, ['--input-type=module', '-e', `const m = await import(${JSON.stringify(BENCH_ARCHIVES)})
await m.writeBenchArchive(${JSON.stringify(archive)}, ${size}, 'forward'); await m.writeBenchDisk(${JSON.stringify(disk)}, ${size})`]), 0, 'bench files made')
  return { dir, archive, disk }
}
