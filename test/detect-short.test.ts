/**
 * Inputs shorter than what format detection looks at (512 bytes) keep every
 * byte, from a path and from a pipe; short images on a pipe get their format's
 * typed error (exit 1), never a stream failure (exit 3).
 */
import t, { type Test } from 'tap'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, exits, q, run, sh, tempDir, vma, vmaCmd } from './helpers/run.js'
import { sameDisk } from './helpers/disk.js'

const pack = async (args: string[], options: Parameters<typeof run>[2] = {}): ReturnType<typeof run> => await run(process.execPath, [PACK_VMA, ...args], options)
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
  const cases: Array<[string, number, RegExp]> = [
    [qcow2, 10, /"code":"E_QCOW2_HEADER"/],
    [qcow2, 100, /"code":"E_QCOW2_HEADER"/],
    [qcow2, 300, /"code":"E_QCOW2_HEADER"/],
    [qcow2, 70000, /"code":"E_QCOW2_/],
    [hds, 16, /"code":"E_PARALLELS_HEADER"/],
    [hds, 64, /"code":"E_PARALLELS_HEADER"/],
    [hds, 100, /"code":"E_PARALLELS_BAT"/],
    [hds, 4096, /"code":"E_PARALLELS_BAT"/],
  ]
  for (const [image, length, code] of cases) {
    const r = await pack(['-', '-o', join(dir, 'out.vma')], { stdin: readFileSync(image).subarray(0, length) })
    exits(t, r, 1, `${image.slice(-4)} cut at ${length}`)
    t.match(r.stderr, code)
    t.notMatch(r.stderr, /ERR_STREAM/)
  }
})

t.test('a 16-byte .hds on stdin is reported with its real length', async t => {
  const r = await pack(['-'], { stdin: Buffer.from('WithoutFreeSpace', 'latin1') })
  exits(t, r, 1)
  t.match(r.stderr, /"code":"E_PARALLELS_HEADER"/)
  t.match(r.stderr, /16 bytes/)
})
