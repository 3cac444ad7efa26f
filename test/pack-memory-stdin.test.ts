/**
 * Stdin redirected from a regular file (pack-vma < disk.raw) is read into
 * slabs, as a pipe is: a file stream read into a fresh buffer each time,
 * garbage that V8 freed only some 32 MiB later (92 MiB peak for 1 GiB, 60
 * now).
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { openSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, cmp, exits, q, sh, tempDir } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'

const packCmd = `${q(process.execPath)} ${q(PACK_VMA)} --uuid 01234567-89ab-cdef-0123-456789abcdef --ctime 1700000000`

t.test('stdin from a file comes in slabs, each given back and reused', async t => {
  const dir = tempDir(t)
  const path = join(dir, 'data')
  const data = makeDisk(new Rng(3), 32 << 20)
  writeFileSync(path, data)
  const lib = new URL('../lib/', import.meta.url).href
  const script = `
    const { openInput } = await import('${lib}io/input.js')
    const { giveBack, inSlab } = await import('${lib}io/slabs.js')
    const { createHash } = await import('node:crypto')
    const hash = createHash('sha256')
    const buffers = new Set()
    let outside = 0
    for await (const chunk of openInput('-').stream) {
      hash.update(chunk)
      if (inSlab(chunk)) buffers.add(chunk.buffer); else outside++
      giveBack(chunk)
    }
    process.stdout.write(JSON.stringify({ hash: hash.digest('hex'), slabs: buffers.size, outside }))
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: [openSync(path, 'r'), 'pipe', 'inherit'] })
  let stdout = ''
  child.stdout?.setEncoding('utf8').on('data', (s: string) => { stdout += s })
  t.equal(await new Promise(resolve => child.on('close', resolve)), 0, 'reads to the end')
  const result = JSON.parse(stdout) as { hash: string, slabs: number, outside: number }
  t.equal(result.hash, (await import('node:crypto')).createHash('sha256').update(data).digest('hex'), 'the bytes of the file')
  t.equal(result.outside, 0, 'every chunk lay in a slab')
  t.ok(result.slabs <= 2, `${result.slabs} slabs carried 32 MiB`)
})

t.test('pack-vma < file: the bytes of the pipe', async t => {
  const dir = tempDir(t)
  const disk = join(dir, 'disk.raw')
  const size = 8 << 20
  writeFileSync(disk, makeDisk(new Rng(4), size))
  const piped = join(dir, 'piped.vma')
  exits(t, await sh(`cat ${q(disk)} | ${packCmd} --size ${size} > ${q(piped)}`), 0, 'packs from a pipe')
  const redirected = join(dir, 'redirected.vma')
  exits(t, await sh(`${packCmd} --size ${size} < ${q(disk)} > ${q(redirected)}`), 0, 'packs from a file on stdin')
  t.ok(cmp(redirected, piped), 'the same archive')
})
