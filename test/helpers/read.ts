/** Runs bytes through the library's VmaReader in-process. */
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { VmaReader, type VmaReaderOptions } from '../../lib/vma/stream.js'
import type { ArchiveInfo, ClusterRecord, StreamItem } from '../../lib/contracts.js'
import { VmapipeError } from '../../lib/errors.js'

export interface ReadResult {
  info?: ArchiveInfo
  records: ClusterRecord[]
  error?: VmapipeError
}

/** Feeds `bytes` in chunks of `chunk` bytes and collects what comes out. */
export async function readArchive (bytes: Buffer, options: VmaReaderOptions = {}, chunk = 1 << 20): Promise<ReadResult> {
  const chunks: Buffer[] = []
  for (let i = 0; i < bytes.length; i += chunk) chunks.push(bytes.subarray(i, i + chunk))
  const result: ReadResult = { records: [] }
  const sink = new Writable({
    objectMode: true,
    write (item: StreamItem, _enc, cb) {
      if (item.kind === 'archive') result.info = item
      else result.records.push({ ...item, data: Buffer.from(item.data) })
      cb()
    },
  })
  try {
    await pipeline(Readable.from(chunks, { objectMode: false }), new VmaReader(options), sink)
  } catch (err) {
    if (!(err instanceof VmapipeError)) throw err
    result.error = err
  }
  return result
}

/** Rebuilds each device's bytes from records. */
export function assemble (info: ArchiveInfo, records: ClusterRecord[]): Map<string, Buffer> {
  const disks = new Map<number, Buffer>()
  for (const d of info.devices) disks.set(d.id, Buffer.alloc(d.size))
  for (const r of records) {
    const disk = disks.get(r.device) as Buffer
    let at = 0
    for (let b = 0; b < 16; b++) {
      if (((r.mask >> b) & 1) === 0) continue
      const pos = r.cluster * 65536 + b * 4096
      r.data.copy(disk, pos, at, at + Math.min(4096, disk.length - pos))
      at += 4096
    }
  }
  return new Map(info.devices.map(d => [d.name, disks.get(d.id) as Buffer]))
}

/** What a reader made of an input: the disk's bytes, or the code of the typed error it refused it with. */
export type Verdict = { bytes: Buffer } | { code: string }

export async function verdict (read: () => Promise<Buffer>): Promise<Verdict> {
  try {
    return { bytes: await read() }
  } catch (err) {
    if (!(err instanceof VmapipeError)) throw err
    return { code: err.code }
  }
}
