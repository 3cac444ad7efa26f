/** An independent look at an archive's layout: the header fields and each extent's slots. */
import { createHash } from 'node:crypto'

export interface WalkedSlot { mask: number, dev: number, cluster: number }
export interface Walked { headerSize: number, headerMd5Ok: boolean, uuid: string, extents: Array<{ slots: WalkedSlot[], md5Ok: boolean, blockCount: number }> }

function md5Ok (buf: Buffer, field: number): boolean {
  const copy = Buffer.from(buf)
  copy.fill(0, field, field + 16)
  return createHash('md5').update(copy).digest().equals(buf.subarray(field, field + 16))
}

export function walk (archive: Buffer): Walked {
  const headerSize = archive.readUInt32BE(56)
  const result: Walked = { headerSize, headerMd5Ok: md5Ok(archive.subarray(0, headerSize), 32), uuid: archive.subarray(8, 24).toString('hex'), extents: [] }
  for (let at = headerSize; at < archive.length;) {
    const head = archive.subarray(at, at + 512)
    const slots: WalkedSlot[] = []
    for (let i = 0; i < 59; i++) {
      const info = head.readBigUInt64BE(40 + 8 * i)
      if (info === 0n) continue
      slots.push({ mask: Number(info >> 48n), dev: Number((info >> 32n) & 0xffn), cluster: Number(info & 0xffffffffn) })
    }
    const blockCount = head.readUInt16BE(6)
    result.extents.push({ slots, md5Ok: md5Ok(head, 24) && head.subarray(8, 24).toString('hex') === result.uuid, blockCount })
    at += 512 + blockCount * 4096
  }
  return result
}
