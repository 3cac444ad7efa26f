/**
 * zstd decoded in this thread into slabs (lib/io/compression.ts): the output
 * buffers go round once their loans are back and are never reused while one
 * is out, whatever the consumer does; a frame damaged in the middle of an
 * archive still fails with E_COMPRESSED_DATA, where it is, and leaves nothing.
 */
import t from 'tap'
import { createHash } from 'node:crypto'
import { readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { giveBack } from '../lib/io/slabs.js'
import { exits, q, sh, tempDir, vma } from './helpers/run.js'
import { compressible, decode, decodeGivingBack, lastLog } from './helpers/compression.js'
import { writeFixture } from './helpers/fixtures.js'
import { Rng } from './helpers/random.js'
import { scatter } from './helpers/vma-builder.js'

t.test('slabs go round when loans come back, and are never reused while one is out', async t => {
  const dir = tempDir(t)
  // 48 MiB, many slabs' worth of zstd output.
  const data = compressible(48, 41)
  const raw = join(dir, 'data')
  writeFileSync(raw, data)
  exits(t, await sh(`zstd -q -c ${q(raw)} > ${q(raw)}.zst`), 0)
  const zst = readFileSync(`${raw}.zst`)
  const want = createHash('sha256').update(data).digest('hex')

  // A consumer that hashes each chunk and gives it back at once: a few buffers carry all 48 MiB.
  const once = await decodeGivingBack([zst])
  t.equal(once.sha, want, 'given back at once: the bytes are the original')
  t.ok(once.chunks > 48, `${once.chunks} chunks`)
  t.ok(once.buffers <= 8, `given back at once: ${once.buffers} buffers carried 48 MiB`)

  // A consumer that keeps every chunk and gives back none: nothing it holds is overwritten.
  const kept: Buffer[] = []
  await decode([zst], chunk => { kept.push(chunk) })
  t.equal(createHash('sha256').update(Buffer.concat(kept)).digest('hex'), want, 'kept: every chunk still holds its bytes')

  // Loans given back late, in bursts, out of order: still the original.
  const held: Buffer[] = []
  const late = createHash('sha256')
  await decode([zst], chunk => {
    late.update(chunk)
    held.push(chunk)
    if (held.length === 7) for (const b of held.splice(0).reverse()) giveBack(b)
  })
  t.equal(late.digest('hex'), want, 'given back late: the bytes are the original')
})

t.test('a zstd frame damaged mid-archive: E_COMPRESSED_DATA with the archive offset, nothing left', async t => {
  const dir = tempDir(t)
  const rng = new Rng(42)
  // 8 MiB of words from a small vocabulary: blocks of matches and literals, whose damage the decoder sees where it is.
  const words = Array.from({ length: 512 }, () => Buffer.from(Array.from({ length: 3 + rng.int(9) }, () => 97 + rng.int(26))))
  const disk = Buffer.alloc(8 << 20)
  for (let at = 0; at < disk.length;) at += words[rng.int(words.length)].copy(disk, at) + 1
  const devices = [{ id: 1, name: 'drive-scsi0', size: disk.length, data: disk }]
  const fx = writeFixture(dir, { configs: [{ name: 'qemu-server.conf', data: Buffer.from('memory: 512\n') }], devices, extents: scatter(rng, devices) })
  const whole = join(dir, 'whole.vma.zst')
  exits(t, await sh(`zstd -q -c ${q(fx.archive)} > ${q(whole)}`), 0)
  const bytes = readFileSync(whole)
  const damaged = Buffer.from(bytes)
  const at = Math.floor(bytes.length / 2)
  damaged.fill(0xff, at, at + 4096)
  const bad = join(dir, 'bad.vma.zst')
  writeFileSync(bad, damaged)
  for (const [how, args] of [['verify', ['verify', bad]], ['extract', ['extract', bad, join(dir, 'out')]]] as const) {
    const r = await vma([...args])
    exits(t, r, 1, `${how} exits 1`)
    const log = lastLog(r.stderr)
    t.equal(log.code, 'E_COMPRESSED_DATA', `${how}: E_COMPRESSED_DATA`)
    // The archive bytes parsed before the damage showed: some, and not all (the frame's checksum at its end would be).
    t.ok(typeof log.offset === 'number' && log.offset > 0 && log.offset < disk.length * 3 / 4, `${how}: at archive byte ${String(log.offset)}`)
  }
  t.notOk(readdirSync(dir).includes('out'), 'extract left no target')
  // The undamaged archive reads back whole, through the same decoder.
  const out = join(dir, 'good')
  exits(t, await vma(['extract', whole, out]), 0)
  t.ok(readFileSync(join(out, 'disk-drive-scsi0.raw')).equals(disk), 'the undamaged archive extracts the disk')
})
