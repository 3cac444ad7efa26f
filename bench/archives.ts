/** Large disks and archives for benchmarks, streamed to disk. */
import { createWriteStream } from 'node:fs'
import { once } from 'node:events'
import { type BuildDevice, type Slot, buildExtent, buildHeader } from '../test/helpers/vma-builder.js'
import { Rng } from '../test/helpers/random.js'

/**
 * Cluster contents like a used filesystem's: most clusters full of
 * incompressible data, some partly zero, some all zero. Calls `emit` with the
 * mask and 64 KiB of data (zero where the mask is clear) for each cluster.
 */
async function clusters (size: number, seed: number, emit: (index: number, mask: number, data: Buffer) => Promise<void>): Promise<void> {
  const rng = new Rng(seed)
  const pool = rng.fill(Buffer.alloc(32 << 20))
  for (let i = 0; i < pool.length; i += 4096) pool[i] |= 1 // no block of the pool is all zero
  const scratch = Buffer.alloc(65536)
  for (let i = 0; i * 65536 < size; i++) {
    const kind = rng.int(20)
    const mask = kind < 3 ? 0 : kind < 5 ? rng.int(0x10000) : 0xffff
    const at = rng.int((pool.length - 65536) / 4096) * 4096
    let data = pool.subarray(at, at + 65536)
    if (mask !== 0xffff) {
      data = scratch
      for (let b = 0; b < 16; b++) {
        if ((mask >> b) & 1) pool.copy(data, b * 4096, at + b * 4096, at + b * 4096 + 4096)
        else data.fill(0, b * 4096, b * 4096 + 4096)
      }
    }
    await emit(i, mask, data)
  }
}

function sink (path: string): { write: (b: Buffer) => Promise<void>, close: () => Promise<void> } {
  const out = createWriteStream(path, { highWaterMark: 8 << 20 })
  return {
    write: async b => { if (!out.write(Buffer.from(b))) await once(out, 'drain') },
    close: async () => { out.end(); await once(out, 'finish') },
  }
}

/** A raw disk image of `size` bytes. */
export async function writeBenchDisk (path: string, size: number, seed = 1): Promise<void> {
  const out = sink(path)
  await clusters(size, seed, async (i, _mask, data) => { await out.write(data.subarray(0, Math.min(65536, size - i * 65536))) })
  await out.close()
}

/** An archive of one such disk, clusters front to back or back to front. */
export async function writeBenchArchive (path: string, size: number, order: 'forward' | 'reverse', seed = 1): Promise<void> {
  const device: BuildDevice = { id: 1, name: 'drive-scsi0', size, data: Buffer.alloc(0) }
  const spec = { configs: [{ name: 'qemu-server.conf', data: Buffer.from('scsi0: local:vm-100-disk-0\n') }], devices: [device] }
  const out = sink(path)
  await out.write(buildHeader(spec))
  const count = Math.ceil(size / 65536)
  let slots: Slot[] = []
  await clusters(size, seed, async (i, mask, data) => {
    slots.push({ dev: 1, cluster: order === 'forward' ? i : count - 1 - i, mask, data: Buffer.from(data) })
    if (slots.length === 58 || i === count - 1) {
      await out.write(buildExtent(spec, slots))
      slots = []
    }
  })
  await out.close()
}
