/**
 * `vma list` reads a file's header in the main thread where it can
 * (uncompressed or zstd); what it prints is what the streaming path prints,
 * and a file that path cannot read is left to the streaming path, whose
 * errors are unchanged.
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { exits, run, tempDir, vma } from './helpers/run.js'
import { failure } from './helpers/logged.js'

const demo = fileURLToPath(new URL('../../examples/demo.vma.zst', import.meta.url))

t.test('a zstd file and an uncompressed one list as the same archive through stdin (the streaming path)', async t => {
  const dir = tempDir(t)
  const plain = join(dir, 'demo.vma')
  exits(t, await run('zstd', ['-q', '-d', demo, '-o', plain]), 0, 'zstd -d')
  const byStream = await vma(['list', '-', '--json'], { stdin: { file: plain } })
  exits(t, byStream, 0, 'vma list - (stdin)')
  const expected = JSON.parse(byStream.stdout.toString()) as Record<string, unknown>
  for (const [path, compression] of [[demo, 'zstd'], [plain, 'none']]) {
    const r = await vma(['list', path, '--json'])
    exits(t, r, 0, `vma list ${path}`)
    t.same(JSON.parse(r.stdout.toString()), { ...expected, compression }, `${compression}: the same uuid, time, devices and configs`)
  }
  const text = await vma(['list', demo])
  exits(t, text, 0, 'vma list (text)')
  t.match(text.stdout.toString(), new RegExp(`^archive  ${demo.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} \\(zstd\\)\\n`), 'named by its path')
})

t.test('files the main-thread path cannot read fail as the streaming path makes them fail', async t => {
  const dir = tempDir(t)
  const whole = readFileSync(demo)
  const cases: Array<[string, Buffer, string]> = [
    ['cut inside the zstd frame', whole.subarray(0, 300), 'E_COMPRESSED_DATA'],
    ['garbage after the zstd magic', Buffer.concat([whole.subarray(0, 8), Buffer.alloc(4096, 0x5a)]), 'E_COMPRESSED_DATA'],
    ['an uncompressed header cut short', Buffer.from([0x56, 0x4d, 0x41, 0, 0, 0, 0, 1]), 'E_VMA_TRUNCATED'],
  ]
  for (const [what, bytes, code] of cases) {
    const path = join(dir, `${what.replace(/ /g, '-')}.vma`)
    writeFileSync(path, bytes)
    const r = await vma(['list', path])
    t.not(r.code, 0, `${what}: fails`)
    t.equal(failure(r).code, code, `${what}: ${code}`)
    const piped = await vma(['list', '-'], { stdin: { file: path } })
    t.equal(r.code, piped.code, `${what}: the exit status of the same bytes on stdin`)
  }
})
