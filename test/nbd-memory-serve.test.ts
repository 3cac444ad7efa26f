/**
 * The server's read buffers: READs go out in pieces of 256 KiB, a connection
 * holds at most two of them (one being sent while the next is read) and 2 MiB
 * are kept for reuse. Served in this process to nbdcopy (four connections,
 * 256 KiB and 1 MiB requests) and qemu-img convert (2 MiB requests), the
 * buffers alive stay under 4 MiB above what the process had before (1.5 MiB
 * measured); with 1 MiB pieces, 2 MiB per connection and 8 MiB pooled they
 * reached 6.5 MiB above.
 * Every copy is the disk's bytes.
 */
import t from 'tap'
import { join } from 'node:path'
import { benchFilesApart, cmp, exits, run } from './helpers/run.js'
import { openExports } from '../lib/jobs/exports.js'
import { NbdServer } from '../lib/nbd/server.js'

const SIZE = 64 * 1048576
const MIB = 1048576

t.test('serving an archive to nbdcopy and qemu-img convert holds under 4 MiB of read buffers', async t => {
  const { dir, archive, disk: original } = await benchFilesApart(t, SIZE)

  const opened = await openExports([archive])
  const server = new NbdServer(opened.exports)
  const socket = join(dir, 'serve.sock')
  await server.listen({ socket })
  t.teardown(async () => { await server.close(); await opened.close() })
  const uri = `nbd+unix:///drive-scsi0?socket=${socket}`

  const before = process.memoryUsage().arrayBuffers
  let peak = before
  const sample = setInterval(() => { peak = Math.max(peak, process.memoryUsage().arrayBuffers) }, 2)
  const copies: Array<[string, string, string[]]> = [
    ['nbdcopy 256k', 'nbdcopy', [uri, join(dir, 'a.raw')]],
    ['nbdcopy 1M', 'nbdcopy', ['--request-size=1048576', uri, join(dir, 'b.raw')]],
    ['qemu-img convert', 'qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'c.raw')]],
  ]
  try {
    for (const [label, tool, args] of copies) {
      exits(t, await run(tool, args), 0, label)
      t.ok(cmp(original, args[args.length - 1]), `${label}: the disk's bytes`)
    }
  } finally {
    clearInterval(sample)
  }
  const grew = (peak - before) / MIB
  t.ok(grew < 4, `array buffers peaked ${grew.toFixed(1)} MiB above the ${(before / MIB).toFixed(1)} MiB before (under 4)`)
})
