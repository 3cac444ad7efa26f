/** Large archives for benchmarks, streamed to disk with the test encoder. */
import { createWriteStream } from 'node:fs'
import { once } from 'node:events'
import { type BuildDevice, type Slot, buildExtent, buildHeader } from '../test/helpers/vma-builder.js'
import { Rng } from '../test/helpers/random.js'

export interface BenchArchive { path: string, diskBytes: number, device: string }

/**
 * One disk of `size` bytes: most clusters full of incompressible data, some
 * partly zero, some all zero, like a used filesystem. `order` says whether
 * clusters come front to back or back to front.
 */
export async function writeBenchArchive (path: string, size: number, order: 'forward' | 'reverse', seed = 1): Promise<BenchArchive> {
  const rng = new Rng(seed)
  const pool = rng.fill(Buffer.alloc(32 << 20))
  for (let i = 0; i < pool.length; i += 4096) pool[i] |= 1 // no block of the pool is all zero
  const device: BuildDevice = { id: 1, name: 'drive-scsi0', size, data: Buffer.alloc(0) }
  const spec = { configs: [{ name: 'qemu-server.conf', data: Buffer.from('scsi0: local:vm-100-disk-0,size=1G\n') }], devices: [device] }
  const out = createWriteStream(path, { highWaterMark: 8 << 20 })
  const write = async (b: Buffer): Promise<void> => { if (!out.write(b)) await once(out, 'drain') }
  await write(buildHeader(spec))
  const clusters = Math.ceil(size / 65536)
  let slots: Slot[] = []
  for (let i = 0; i < clusters; i++) {
    const cluster = order === 'forward' ? i : clusters - 1 - i
    const kind = rng.int(20)
    const mask = kind < 3 ? 0 : kind < 5 ? rng.int(0x10000) : 0xffff
    const at = rng.int((pool.length - 65536) / 4096) * 4096
    slots.push({ dev: 1, cluster, mask, data: pool.subarray(at, at + 65536) })
    if (slots.length === 58 || i === clusters - 1) {
      await write(buildExtent(spec, slots))
      slots = []
    }
  }
  out.end()
  await once(out, 'finish')
  return { path, diskBytes: size, device: device.name }
}
