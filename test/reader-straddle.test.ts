/**
 * The archive reader copies cluster data that straddles two input chunks
 * into scratch slab room (lib/vma/stream.ts, io/slabs.ts scratch) instead of
 * a fresh buffer each time: the room is reused once the consumer gives the
 * data back, and never while it holds it.
 */
import t from 'tap'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { VmaReader } from '../lib/vma/stream.js'
import type { ArchiveInfo, ClusterRecord, StreamItem } from '../lib/contracts.js'
import { giveBack } from '../lib/io/slabs.js'
import { assemble } from './helpers/read.js'
import { multiDeviceSpec } from './helpers/fixtures.js'
import { buildArchive } from './helpers/vma-builder.js'

/** `bytes` in chunks of `size`, each in memory of its own, so that none joins the next. */
function chunked (bytes: Buffer, size: number): Buffer[] {
  const chunks: Buffer[] = []
  for (let at = 0; at < bytes.length; at += size) chunks.push(Buffer.from(bytes.subarray(at, at + size)))
  return chunks
}

/** Reads `chunks` with the archive reader; `take` gets each cluster record. */
async function read (chunks: Buffer[], take: (r: ClusterRecord) => void): Promise<ArchiveInfo> {
  let info: ArchiveInfo | undefined
  const sink = new Writable({
    objectMode: true,
    write (item: StreamItem, _enc, cb) {
      if (item.kind === 'archive') info = item
      else take(item)
      cb()
    },
  })
  await pipeline(Readable.from(chunks, { objectMode: false }), new VmaReader(), sink)
  return info as ArchiveInfo
}

t.test('straddling cluster data: right bytes, a few buffers when given back, untouched while held', async t => {
  const spec = multiDeviceSpec(61)
  const bytes = buildArchive(spec)
  const size = 100003

  const chunks = chunked(bytes, size)
  const inputs = new Set(chunks.map(c => c.buffer))
  const copies: ClusterRecord[] = []
  const room = new Set<ArrayBufferLike>()
  let straddled = 0
  const info = await read(chunks, r => {
    copies.push({ ...r, data: Buffer.from(r.data) })
    if (!inputs.has(r.data.buffer)) { straddled++; room.add(r.data.buffer) }
    giveBack(r.data)
  })
  const disks = assemble(info, copies)
  for (const d of spec.devices) t.ok(disks.get(d.name)?.equals(d.data), `given back at once: ${d.name}`)
  t.ok(straddled >= 10, `${straddled} clusters straddled two chunks`)
  t.ok(room.size <= 4, `given back at once: ${room.size} buffers held all ${straddled} copies`)

  const held: ClusterRecord[] = []
  const again = assemble(await read(chunked(bytes, size), r => { held.push(r) }), held)
  for (const d of spec.devices) t.ok(again.get(d.name)?.equals(d.data), `held, none given back: ${d.name}`)
})
