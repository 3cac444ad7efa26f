/**
 * Inputs shorter than what format detection looks at (512 bytes) keep every
 * byte, from a path and from a pipe; short images on a pipe get their format's
 * typed error (exit 1), never a stream failure (exit 3).
 */
import t, { type Test } from 'tap'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { peek } from '../lib/io/input.js'
import { Rng } from './helpers/random.js'
import { PACK_VMA, exits, q, run, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { sameDisk } from './helpers/disk.js'

const pack = async (args: string[], options: Parameters<typeof run>[2] = {}): ReturnType<typeof run> =>
  await run(process.execPath, [PACK_VMA, ...args], options)
const packCmd = `${q(process.execPath)} ${q(PACK_VMA)}`

for (const size of [1, 5, 511]) {
  t.test(`a ${size}-byte raw disk round-trips`, async t => {
    const dir = tempDir(t)
    const disk = join(dir, 'tiny.raw')
    const bytes = randomBytes(size)
    writeFileSync(disk, bytes)
    const archive = join(dir, 'tiny.vma')
    exits(t, await pack([disk, '-o', archive]), 0, 'packed from a path')
    const fromPath = await vma(['extract', archive, '-'])
    exits(t, fromPath, 0)
    sameDisk(t, fromPath.stdout, bytes, 'from a path')
    // Real pipes on both sides: a pipe ends differently from a file.
    const piped = await sh(`cat ${q(disk)} | ${packCmd} - --size ${size} | ${vmaCmd} extract - -`)
    exits(t, piped, 0, 'packed from a pipe and extracted')
    sameDisk(t, piped.stdout, bytes, 'from a pipe')
  })
}

/** Builds a test image with QEMU's tools. */
async function qemu (t: Test, script: string): Promise<void> {
  exits(t, await sh(script), 0, script)
}

t.test('truncated images on stdin give their format\'s typed error, exit 1', async t => {
  const dir = tempDir(t)
  const qcow2 = join(dir, 'disk.qcow2')
  const hds = join(dir, 'disk.hds')
  await qemu(t, `qemu-img create -q -f qcow2 ${q(qcow2)} 4M && qemu-io -c 'write -q -P 7 0 1M' ${q(qcow2)} >/dev/null`)
  await qemu(t, `qemu-img create -q -f parallels ${q(hds)} 4M && qemu-io -f parallels -c 'write -q -P 7 0 1M' ${q(hds)} >/dev/null`)
  const cases: Array<[string, number, string]> = [
    [qcow2, 10, 'E_QCOW2_HEADER'],
    [qcow2, 100, 'E_QCOW2_HEADER'],
    [qcow2, 300, 'E_QCOW2_HEADER'],
    [qcow2, 70000, 'E_QCOW2_HEADER'],
    [hds, 16, 'E_PARALLELS_HEADER'],
    [hds, 64, 'E_PARALLELS_HEADER'],
    [hds, 100, 'E_PARALLELS_BAT'],
    [hds, 4096, 'E_PARALLELS_BAT'],
  ]
  for (const [image, length, code] of cases) {
    const r = await pack(['-', '-o', join(dir, 'out.vma')], { stdin: readFileSync(image).subarray(0, length) })
    exits(t, r, 1, `${image.slice(-4)} cut at ${length}`)
    t.equal(failure(r).code, code, `${image.slice(-4)} cut at ${length}: ${code}`)
    t.notMatch(r.stderr, /ERR_STREAM/)
  }
})

t.test('a 16-byte .hds on stdin is reported with its real length', async t => {
  const r = await pack(['-'], { stdin: Buffer.from('WithoutFreeSpace', 'latin1') })
  exits(t, r, 1)
  t.equal(failure(r).code, 'E_PARALLELS_HEADER')
  t.match(failure(r).msg, /16 bytes/, 'its real length')
})

t.test('peek hands every byte on, whatever the chunks and the stream kind', async t => {
  const rng = new Rng(5)
  const bytes = rng.fill(Buffer.alloc(40000))
  const kinds: Array<[string, (parts: Buffer[]) => Readable]> = [
    // Readable.from has a high-water mark of 1: a buffer of one byte (or chunk) asks for nothing more.
    ['Readable.from, bytes', parts => Readable.from(parts, { objectMode: false })],
    ['Readable.from, chunks', parts => Readable.from(parts)],
    ['PassThrough', parts => { const p = new PassThrough(); for (const b of parts) p.write(b); p.end(); return p }],
  ]
  let failures = 0
  for (let trial = 0; trial < 300; trial++) {
    const parts: Buffer[] = []
    for (let at = 0; at < bytes.length;) {
      const n = 1 + rng.int(rng.int(2) === 0 ? 16 : 20000)
      parts.push(bytes.subarray(at, at + n))
      at += n
    }
    const [, make] = kinds[trial % kinds.length]
    const stream = make(parts)
    const wants = [1 + rng.int(600), 1 + rng.int(50000)]
    const timer = new Promise<'hang'>(resolve => setTimeout(() => resolve('hang'), 2000).unref())
    const heads = await Promise.race([(async () => [await peek(stream, wants[0]), await peek(stream, wants[1])])(), timer])
    if (heads === 'hang') { failures++; continue }
    const rest: Buffer[] = []
    for await (const chunk of stream) rest.push(chunk as Buffer)
    const ok = heads.every((h, i) => h.equals(bytes.subarray(0, wants[i]))) && Buffer.concat(rest).equals(bytes)
    if (!ok) failures++
  }
  t.equal(failures, 0, 'every peek returns its head, then the stream gives every byte, in 300 splits')
})
