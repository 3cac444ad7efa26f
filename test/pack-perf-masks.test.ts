/**
 * Packing tells zero blocks by their first 16 bytes where it can, moves the
 * data blocks of a partly zero cluster together inside the read batch, and
 * joins data lying end to end into one chunk. A disk whose zero and data
 * blocks fall on every side of those lines (block heads, clusters, 1 MiB
 * batches, 58-cluster extents, a last cluster ending inside a block) must
 * pack to exactly the extents an independent builder makes, and read back
 * through Proxmox's vma.
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, PVE_VMA, cmp, exits, have, needsPveVma, run, tempDir } from './helpers/run.js'
import { Rng } from './helpers/random.js'
import { type Slot, buildExtent } from './helpers/vma-builder.js'

const CLUSTER = 65536
const BLOCK = 4096
const UUID = '6e51303b-e166-46c9-a269-63ed8b57f811'
const UUID_BYTES = Buffer.from(UUID.replace(/-/g, ''), 'hex')
/** 70 clusters (two extents, five batches) and 1.5 KiB more: the last cluster ends inside a block. */
const SIZE = 70 * CLUSTER + 1536

/** One block of each kind the zero test tells apart; `kind` picks it. */
function fillBlock (rng: Rng, block: Buffer, kind: number): void {
  switch (kind) {
    case 0: return // zeros
    case 1: rng.fill(block); block[0] = 1 + rng.int(255); return // data from its first byte
    case 2: block[15] = 1; return // data in the first 16 bytes only, at their end
    case 3: block[16] = 1; return // 16 zero bytes, then data: the native compare decides
    default: block[block.length - 1] = 0xff // data in the very last byte
  }
}

/** The disk: clusters of every pattern, with runs of full clusters across batch (16-cluster) and extent (58-cluster) lines. */
function makeDisk (): Buffer {
  const rng = new Rng(1414)
  const disk = Buffer.alloc(SIZE)
  const full = new Set([0, 1, 14, 15, 16, 17, 31, 32, 56, 57, 58, 59, 64])
  for (let c = 0; c * CLUSTER < SIZE; c++) {
    for (let b = 0; b < 16; b++) {
      const start = c * CLUSTER + b * BLOCK
      if (start >= SIZE) break
      const block = disk.subarray(start, Math.min(SIZE, start + BLOCK))
      // Full clusters; every fourth cluster all zero; the others a block pattern that cycles with the cluster.
      const kind = full.has(c) ? 1 : c % 4 === 2 ? 0 : (b * 7 + c) % 5
      fillBlock(rng, block, kind)
    }
  }
  return disk
}

t.test('a disk with zero and data blocks across every line packs to the extents a builder makes, and pve-vma reads it back', async t => {
  const dir = tempDir(t)
  const disk = makeDisk()
  const raw = join(dir, 'disk.raw')
  writeFileSync(raw, disk)
  // The device as the archive records it: whole sectors, its end padded with zeros.
  const device = { id: 1, name: 'drive-scsi0', size: SIZE, data: disk }
  const slots: Slot[] = Array.from({ length: Math.ceil(SIZE / CLUSTER) }, (_, c) => ({ dev: 1, cluster: c }))
  const extents = [slots.slice(0, 58), slots.slice(58)].map(s => buildExtent({ uuid: UUID_BYTES, devices: [device] }, s))
  const expected = Buffer.concat(extents)

  const sources = [{ name: 'raw', path: raw }]
  if (have('qemu-img')) {
    for (const [name, extra] of [['qcow2', []], ['compressed qcow2', ['-c']]] as Array<[string, string[]]>) {
      const path = join(dir, `${name.replace(' ', '-')}.qcow2`)
      exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...extra, raw, path]), 0, `qemu-img makes the ${name} image`)
      sources.push({ name, path })
    }
  }
  for (const source of sources) {
    const archive = join(dir, `${source.name.replace(' ', '-')}.vma`)
    exits(t, await run(process.execPath, [PACK_VMA, '-q', source.path, '-o', archive, '--uuid', UUID, '--ctime', '1700000000']), 0, `pack-vma ${source.name}`)
    const bytes = readFileSync(archive)
    const headerSize = bytes.readUInt32BE(56)
    t.ok(bytes.subarray(headerSize).equals(expected), `${source.name}: the extents are byte for byte the builder's`)
    await t.test(`${source.name}: pve-vma verifies and extracts it`, needsPveVma, async t => {
      exits(t, await run(PVE_VMA as string, ['verify', archive]), 0, 'pve-vma verify')
      const out = join(dir, `out-${source.name.replace(' ', '-')}`)
      exits(t, await run(PVE_VMA as string, ['extract', archive, out]), 0, 'pve-vma extract')
      t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), raw), 'the disk as it was')
    })
  }
})
