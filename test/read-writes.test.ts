/** The write queue of the read side: pieces merged both ways, and the synchronous mode extract to a directory uses. */
import t from 'tap'
import fs from 'node:fs'
import { syncBuiltinESMExports } from 'node:module'
import { join } from 'node:path'
import { WriteQueue } from '../lib/io/write-queue.js'
import { VmapipeError } from '../lib/errors.js'
import { tempDir } from './helpers/run.js'

/** Counts the writes the queue makes through fs.writev and fs.writevSync. */
function countWrites (t: { teardown: (fn: () => void) => void }): { calls: () => number } {
  const writev = fs.writev
  const writevSync = fs.writevSync
  let calls = 0
  fs.writev = ((...args: Parameters<typeof fs.writev>) => { calls++; (writev as (...a: unknown[]) => void)(...args) }) as typeof fs.writev
  fs.writevSync = ((...args: Parameters<typeof fs.writevSync>) => { calls++; return writevSync(...args) }) as typeof fs.writevSync
  syncBuiltinESMExports()
  t.teardown(() => { fs.writev = writev; fs.writevSync = writevSync; syncBuiltinESMExports() })
  return { calls: () => calls }
}

for (const sync of [false, true]) {
  t.test(`WriteQueue${sync ? ' (sync)' : ''}: pieces that come back to front merge as pieces that come in order do`, async t => {
    const dir = tempDir(t)
    const counted = countWrites(t)
    const path = join(dir, 'f')
    const fd = fs.openSync(path, 'w')
    const queue = new WriteQueue({ maxRun: 16 * 4096, sync })
    const piece = (i: number): Buffer => Buffer.alloc(4096, i + 1)
    // 64 pieces back to front, then 64 front to back after them: 4 runs of 16 each way.
    for (let i = 63; i >= 0; i--) await queue.write(fd, piece(i), i * 4096, 'f')
    for (let i = 64; i < 128; i++) await queue.write(fd, piece(i), i * 4096, 'f')
    await queue.drain()
    fs.closeSync(fd)
    t.equal(counted.calls(), 8, 'one write per 16 pieces')
    const bytes = fs.readFileSync(path)
    let wrong = 0
    for (let i = 0; i < 128; i++) if (!bytes.subarray(i * 4096, (i + 1) * 4096).equals(piece(i))) wrong++
    t.equal(wrong, 0, 'every piece where it belongs')
  })
}

t.test('WriteQueue (sync): a failed write is a VmapipeError naming what was written, and stays the answer', async t => {
  const dir = tempDir(t)
  const path = join(dir, 'f')
  fs.writeFileSync(path, '')
  const fd = fs.openSync(path, 'r')
  const queue = new WriteQueue({ sync: true })
  t.equal(queue.write(fd, Buffer.alloc(4096, 1), 0, 'writing f'), undefined, 'queued')
  // Not adjacent: the first run is written now, and fails there.
  const thrown = ((): unknown => { try { return queue.write(fd, Buffer.alloc(4096, 2), 8192, 'writing f') } catch (e) { return e } })()
  t.ok(thrown instanceof VmapipeError && thrown.code === 'E_IO', `the write that started it throws: ${String(thrown)}`)
  const err = await queue.drain().catch((e: unknown) => e)
  t.equal(err, thrown, 'drain gives the same failure')
  fs.closeSync(fd)
  t.ok(err instanceof VmapipeError && err.code === 'E_IO' && err.message.includes('writing f'), String(err))
})
