/**
 * Reading a compressed archive to stdout held every slab of a burst: the
 * decoder ran through all the input queued before it in one turn, and the
 * writer gave each record's loan back from stdout's callback, which comes on
 * the next tick even where the bytes went out at once (io/slabs.ts). Once
 * its own slabs were out, the decoder went on in fresh buffers: garbage, and
 * 90 MiB peak for `vma extract a.vma.zst -`. A decoder now lets the event
 * loop turn once per slab (io/compression.ts, pace), and the raw stream
 * writer gives a loan back as soon as the stream has written it.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { openSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { giveBack, inSlab } from '../lib/io/slabs.js'
import { exits, q, sh, tempDir } from './helpers/run.js'
import { decode, sha256 } from './helpers/compression.js'
import { Rng } from './helpers/random.js'

/**
 * `mib` MiB of 4 KiB blocks drawn from four, each a random 64 bytes over and
 * over: every codec shrinks it many times, so one compressed write is many slabs of output.
 */
function repetitive (mib: number, seed: number): Buffer {
  const rng = new Rng(seed)
  const blocks = Array.from({ length: 4 }, () => Buffer.alloc(4096, rng.fill(Buffer.alloc(64))))
  const data = Buffer.alloc(mib << 20)
  for (let at = 0; at < data.length; at += 4096) blocks[rng.int(blocks.length)].copy(data, at)
  return data
}

t.test('a decoder whose output is given back on the next tick (as stdout calls back) reuses its slabs, makes no garbage', async t => {
  const dir = tempDir(t)
  const data = repetitive(48, 7)
  const raw = join(dir, 'data')
  writeFileSync(raw, data)
  for (const [kind, command] of [['zstd', 'zstd -q -c'], ['gzip', 'gzip -c'], ['lzop', 'lzop -c']]) {
    exits(t, await sh(`${command} ${q(raw)} > ${q(raw)}.${kind}`), 0, `${kind} compresses`)
    const packed = readFileSync(`${raw}.${kind}`)
    t.ok(packed.length < data.length / 8, `${kind}: ${packed.length} bytes, one compressed write is many slabs of output`)
    const hash = createHash('sha256')
    const buffers = new Set<ArrayBufferLike>()
    let outside = 0
    await decode([packed], chunk => {
      hash.update(chunk)
      buffers.add(chunk.buffer)
      if (!inSlab(chunk)) outside++
      process.nextTick(() => { giveBack(chunk) })
    })
    t.equal(hash.digest('hex'), sha256(data), `${kind}: the bytes are the original`)
    t.equal(outside, 0, `${kind}: no output in buffers of its own`)
    t.ok(buffers.size <= 4, `${kind}: ${buffers.size} buffers carried 48 MiB`)
  }
})

t.test('the raw stream writer gives a record back as soon as stdout (a file) has written it, not a tick later', async t => {
  const dir = tempDir(t)
  const lib = new URL('../lib/', import.meta.url).href
  // Sixteen records lent from one slab, written in one turn; the slab is free again before the turn ends.
  const script = `
    const { RawStreamWriter } = await import('${lib}raw/writer.js')
    const { giveBack, lend, takeSlab } = await import('${lib}io/slabs.js')
    const { clusterRecord } = await import('${lib}record.js')
    const writer = new RawStreamWriter(process.stdout, { id: 1, name: 'drive-scsi0', size: 16 << 16 })
    const slab = takeSlab()
    for (let c = 0; c < 16; c++) slab.fill(c + 1, c << 16, (c + 1) << 16)
    for (let c = 0; c < 16; c++) void writer.write(clusterRecord(1, c, 0xffff, lend(slab.subarray(c << 16, (c + 1) << 16))))
    giveBack(slab)
    const again = takeSlab(true)
    process.stderr.write(JSON.stringify({ reused: again !== undefined && again.buffer === slab.buffer }))
    if (again !== undefined) giveBack(again)
    await writer.finish()
  `
  const out = join(dir, 'disk.raw')
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', openSync(out, 'w'), 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  child.stderr?.setEncoding('utf8').on('data', (s: string) => { stderr += s })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  t.equal(code, 0, `the writer finishes ${stderr}`)
  t.same(JSON.parse(stderr), { reused: true }, 'the slab is free again in the same turn')
  const written = readFileSync(out)
  const want = Buffer.alloc(16 << 16)
  for (let c = 0; c < 16; c++) want.fill(c + 1, c << 16, (c + 1) << 16)
  t.ok(written.equals(want), 'the disk went out whole, in order')
})
