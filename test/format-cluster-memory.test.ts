/**
 * Issue 12, defect 1: the cluster tracker's memory follows the clusters an
 * archive holds, not the size its devices claim. A few KB of mask-0 slots
 * spread over a 256 TiB device once cost a 128 KiB bitmap page each.
 */
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { ClusterSet } from '../lib/util/cluster-set.js'
import { type Slot, buildArchive } from './helpers/vma-builder.js'
import { Rng } from './helpers/random.js'
import { VMA, run, tempDir } from './helpers/run.js'

const SPREAD = 4096 // clusters, one every 2^20: each in its own old-style page
const DEVICE_SIZE = 2 ** 32 * 65536 // 2^32 clusters, the most a blockinfo slot can name

function spreadArchive (last?: Slot): Buffer {
  const slots: Slot[] = []
  for (let i = 0; i < SPREAD; i++) slots.push({ dev: 1, cluster: i * 2 ** 20 + (i % 997), mask: 0, data: Buffer.alloc(0) })
  if (last !== undefined) slots.push(last)
  const extents: Slot[][] = []
  for (let i = 0; i < slots.length; i += 59) extents.push(slots.slice(i, i + 59))
  const devices = [{ id: 1, name: 'drive-scsi0', size: DEVICE_SIZE, data: Buffer.alloc(0) }]
  return buildArchive({ configs: [{ name: 'qemu-server.conf', data: Buffer.from('memory: 512\n') }], devices, extents })
}

/** Runs `vma verify --json` under /usr/bin/time; the report and peak RSS in KiB. */
async function verifyRss (path: string): Promise<{ code: number | null, report: any, rssKiB: number }> {
  const r = await run('/usr/bin/time', ['-f', 'RSS=%M', process.execPath, VMA, 'verify', '--json', '-q', path])
  const rss = /RSS=(\d+)/.exec(r.stderr)
  return { code: r.code, report: JSON.parse(r.stdout.toString()), rssKiB: Number(rss?.[1]) }
}

t.test('mask-0 clusters spread over a 256 TiB device: small RSS, right verdict', async t => {
  const dir = tempDir(t)
  const archive = join(dir, 'spread.vma')
  const bytes = spreadArchive()
  t.ok(bytes.length < 64 * 1024, `the archive is small (${bytes.length} bytes)`)
  writeFileSync(archive, bytes)
  const { code, report, rssKiB } = await verifyRss(archive)
  t.equal(code, 1, 'incomplete: exit 1')
  t.equal(report.error.code, 'E_VMA_MISSING')
  t.equal(report.devices[0].clusters, SPREAD, 'every slot counted')
  t.equal(report.devices[0].firstMissing, 1, 'first missing cluster')
  t.ok(rssKiB > 0 && rssKiB < 160 * 1024, `peak RSS ${rssKiB} KiB stays under 160 MiB`)

  const dup = join(dir, 'dup.vma')
  writeFileSync(dup, spreadArchive({ dev: 1, cluster: 4000 * 2 ** 20 + 4000 % 997, mask: 0, data: Buffer.alloc(0) }))
  const d = await verifyRss(dup)
  t.equal(d.code, 1)
  t.equal(d.report.error.code, 'E_VMA_DUPLICATE', 'a repeat far out is still found')
  t.equal(d.report.error.cluster, 4000 * 2 ** 20 + 4000 % 997)
})

t.test('ClusterSet agrees with a plain Set under random adds and deletes, sparse and dense', async t => {
  const rng = new Rng(12)
  for (const span of [300, 70000, 2 ** 32]) {
    const s = new ClusterSet()
    const ref = new Set<number>()
    let wrongAdds = 0
    for (let i = 0; i < 20000; i++) {
      const c = span === 70000 && i < 10000 ? i : rng.int(span)
      if (rng.int(5) === 0) {
        s.delete(c)
        ref.delete(c)
      } else {
        if (s.add(c) === ref.has(c)) wrongAdds++
        ref.add(c)
      }
    }
    t.equal(wrongAdds, 0, `add says whether it was new (span ${span})`)
    t.equal(s.size, ref.size, `size (span ${span})`)
    let bad = 0
    for (let c = 0; c < Math.min(span, 80000); c++) if (s.has(c) !== ref.has(c)) bad++
    for (const c of ref) if (!s.has(c)) bad++
    t.equal(bad, 0, `membership (span ${span})`)
    let first = 0
    while (ref.has(first)) first++
    t.equal(s.firstMissing(span), first < span ? first : -1, `first missing (span ${span})`)
  }
  const dense = new ClusterSet()
  for (let c = 0; c < 200000; c++) dense.add(c)
  t.equal(dense.firstMissing(200000), -1)
  dense.delete(131072 + 5)
  t.equal(dense.firstMissing(200000), 131077, 'a gap inside a bitmap chunk')
})
