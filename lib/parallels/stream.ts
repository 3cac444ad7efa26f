/**
 * A Parallels image (.hds) arriving on a pipe, read once front to back
 * without a temporary copy: header and BAT first, then each data cluster as
 * it passes, as records in the order the BAT's offsets put them.
 */
import { Readable } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { ClusterRecord, StreamedImage } from '../contracts.js'
import { CLUSTER_SIZE, clusterCount, clusterFromBytes, clusterRecord } from '../record.js'
import { peek } from '../io/input.js'
import { chain } from '../io/chain.js'
import { counter } from '../io/progress.js'
import { ByteQueue } from '../util/byte-queue.js'
import { giveBack, lend } from '../io/slabs.js'
import {
  type ParallelsHeader, HEADER_SIZE, SECTOR_SIZE,
  batEnd, batEntryAt, checkHostCluster, clusterSize, entryOffset, parseBat, parseHeader, visibleBat,
} from './format.js'

/**
 * Reads the header and BAT from the front of `input` and returns what the
 * rest will give, or undefined (nothing taken from `input`) when the image's
 * clusters are not whole multiples of 64 KiB: a record could then need
 * clusters far apart in the file, so such an image must be copied first.
 */
export async function streamParallels (input: Readable, where: string): Promise<StreamedImage | undefined> {
  const header = parseHeader(await peek(input, HEADER_SIZE), where)
  if (clusterSize(header) % CLUSTER_SIZE !== 0) return undefined
  const head = await peek(input, batEnd(header))
  if (head.length < batEnd(header)) {
    throw new VmapipeError(
      'E_PARALLELS_HEADER',
      `${where}: the input ended at byte ${head.length}, inside the BAT (which ends at byte ${batEnd(header)})`,
      { offset: head.length }
    )
  }
  const bat = visibleBat(header, parseBat(header, head.subarray(HEADER_SIZE), where).bat)
  const order = Uint32Array.from(bat.keys()).filter(i => bat[i] !== 0).sort((a, b) => bat[a] - bat[b])
  return {
    size: header.sectors * SECTOR_SIZE,
    records: async (device, progress) => {
      const bytes = progress === undefined ? input : chain(input, await counter(progress))
      return Readable.from(streamRecords(bytes, header, bat, order, device, where), { objectMode: true, highWaterMark: 16 })
    },
  }
}

async function * streamRecords (
  input: Readable, h: ParallelsHeader, bat: Uint32Array, order: Uint32Array, device: number, where: string
): AsyncGenerator<ClusterRecord> {
  const size = h.sectors * SECTOR_SIZE
  const perCluster = clusterSize(h) / CLUSTER_SIZE
  // Chunks lent from slabs (a pipe's, io/slabs.ts) are given back once cut up; a record's data is a loan of its own.
  const queue = new ByteQueue({ done: giveBack })
  let next = 0
  let piece = 0
  for await (const chunk of input) {
    queue.push(chunk as Buffer)
    while (next < order.length) {
      const index = order[next]
      const cluster = index * perCluster + piece
      const length = Math.min(CLUSTER_SIZE, size - cluster * CLUSTER_SIZE)
      if (length <= 0) {
        // The rest of the image's last cluster lies past the disk's end.
        next++
        piece = 0
        continue
      }
      const at = entryOffset(h, bat[index]) + piece * CLUSTER_SIZE
      if (queue.consumed < at) queue.skip(Math.min(queue.length, at - queue.consumed))
      const bytes = queue.consumed === at ? queue.peek(length) : null
      if (bytes === null) break
      const rec = clusterFromBytes(device, cluster, bytes)
      // Lent before the queue moves on, which may give the last loan of its slab back.
      const data = lend(rec.data)
      queue.skip(length)
      yield clusterRecord(device, cluster, rec.mask, data)
      if (++piece === perCluster) {
        next++
        piece = 0
      }
    }
    // What follows the last data cluster is only counted, not kept.
    if (next === order.length) queue.skip(queue.length)
  }
  const end = queue.consumed + queue.length
  if (next < order.length) {
    const entry = order[next]
    throw new VmapipeError('E_PARALLELS_BAT',
      `${where}: BAT entry ${entry} points to byte ${entryOffset(h, bat[entry])}, past the end of the input (${end} bytes)`, { offset: batEntryAt(entry) })
  }
  // Every cluster whole in the input, the last one's part past the disk's end included: the file reader's rule (parseBat).
  const last = order[order.length - 1]
  if (last !== undefined) checkHostCluster(h, entryOffset(h, bat[last]), end, `BAT entry ${last}`, where, 'E_PARALLELS_BAT', batEntryAt(last))
  const empty = Buffer.alloc(0)
  for (let c = 0; c < clusterCount(size); c++) {
    if (bat[Math.floor(c / perCluster)] === 0) yield clusterRecord(device, c, 0, empty)
  }
}
