/**
 * Packing into a regular file (vma create's temporary file, pack-vma's stdout
 * redirected to one) writes each cluster's data as it comes and the extent's
 * header afterwards into the room left for it: no extent of up to 58
 * clusters waits in memory for its header. The archive's bytes are the same
 * as through a stream, and a stdout file keeps what was before and after.
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Transform, Writable } from 'node:stream'
import type { ClusterRecord } from '../lib/contracts.js'
import { inSlab } from '../lib/io/slabs.js'
import { openOutput } from '../lib/io/output.js'
import { packArchive } from '../lib/jobs/pack.js'
import { openDisks } from '../lib/jobs/sources.js'
import { PACK_VMA, PVE_VMA, cmp, exits, needsPveVma, q, sh, tempDir } from './helpers/run.js'
import { Rng, makeDisk } from './helpers/random.js'

const options = { uuid: '01234567-89ab-cdef-0123-456789abcdef', ctime: 1700000000 }
const packCmd = `${q(process.execPath)} ${q(PACK_VMA)} --uuid ${options.uuid} --ctime ${options.ctime}`

/** 24 MiB, mostly data with runs of zero blocks and whole zero clusters between: many extents, some of them short of data. */
function testDisk (dir: string): string {
  const path = join(dir, 'disk.raw')
  writeFileSync(path, makeDisk(new Rng(14), 24 << 20))
  return path
}

t.test('into a file: the bytes of the streamed archive, with fewer slabs in flight', async t => {
  const dir = tempDir(t)
  const disk = testDisk(dir)
  // The same disk packed through a stream (no file to write by position): the bytes as they always were.
  const streamed: Buffer[] = []
  const sink = new Writable({ write (chunk: Buffer, _e, cb) { streamed.push(Buffer.from(chunk)); cb() } })
  const [first] = await openDisks([{ name: 'drive-scsi0', path: disk }])
  await packArchive([first], { stream: sink }, options)

  // Into a file, counting the slabs the records' data came in: a slab is made only when every one made before is still held.
  const [source] = await openDisks([{ name: 'drive-scsi0', path: disk }])
  const slabs = new Set<ArrayBufferLike>()
  let outside = 0
  const batches = async (device: number): Promise<Transform> => {
    const records = await (source.batches as NonNullable<typeof source.batches>)(device)
    return records.pipe(new Transform({
      objectMode: true,
      readableHighWaterMark: 1,
      writableHighWaterMark: 1,
      transform (batch: ClusterRecord[], _e, cb) {
        for (const r of batch) if (r.data.length > 0) { if (inSlab(r.data)) slabs.add(r.data.buffer); else outside++ }
        cb(null, batch)
      },
    }))
  }
  const path = join(dir, 'a.vma')
  const output = await openOutput(path)
  t.equal(output.fileOffset, 0, 'a new file is written by position from its start')
  const result = await packArchive([{ ...source, batches }], output, options)
  await output.commit()
  const written = readFileSync(path)
  t.ok(written.equals(Buffer.concat(streamed)), `the same ${written.length} bytes as through a stream`)
  t.equal(result.stats.bytes, written.length, 'the bytes counted are the bytes written')
  t.ok(result.stats.extents > 5, `${result.stats.extents} extents`)
  t.equal(outside, 0, 'every record\'s data lay in a slab')
  // Holding each extent until its header was written took 8-9 slabs here; now one goes round (each batch written before the next is read).
  t.ok(slabs.size <= 2, `${slabs.size} slabs carried 24 MiB`)
})

t.test('stdout redirected to a file: written by position after what the file held, and what follows goes after the archive', needsPveVma, async t => {
  const dir = tempDir(t)
  const disk = testDisk(dir)
  const piped = join(dir, 'piped.vma')
  exits(t, await sh(`${packCmd} ${q(disk)} | cat > ${q(piped)}`), 0, 'packs through a pipe')
  const archive = readFileSync(piped)

  const direct = join(dir, 'direct.vma')
  exits(t, await sh(`${packCmd} ${q(disk)} > ${q(direct)}`), 0, 'packs to a file')
  t.ok(cmp(direct, piped), 'the same bytes as through a pipe')
  exits(t, await sh(`${PVE_VMA} verify ${q(direct)}`), 0, 'pve-vma verifies it')

  const framed = join(dir, 'framed')
  exits(t, await sh(`{ printf before; ${packCmd} ${q(disk)}; printf after; } > ${q(framed)}`), 0, 'packs between two other writers')
  t.ok(readFileSync(framed).equals(Buffer.concat([Buffer.from('before'), archive, Buffer.from('after')])), 'the archive lies between their bytes')

  // Opened to append, a write by position would go to the end: the stream is used.
  const appended = join(dir, 'appended')
  writeFileSync(appended, 'head')
  exits(t, await sh(`${packCmd} ${q(disk)} >> ${q(appended)}`), 0, 'packs to a file opened to append')
  t.ok(readFileSync(appended).equals(Buffer.concat([Buffer.from('head'), archive])), 'the archive follows what the file held')
})
