import { once } from 'node:events'
import { VmapipeError } from '../errors.js'
import { EXIT, exitStatus } from './exit.js'
import type { ListenAddress } from '../nbd/server.js'
import { type Command, listOption, parseSeconds } from './command.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'
import { JOB_BUILTINS, capYoungGeneration } from './context.js'

export const serve: Command = {
  name: 'serve',
  help: `Usage: vma serve SOURCE... (--socket PATH | --listen HOST:PORT) [--name NAME]...
                 [--cache DIR | --keep DIR]

Serves disks read-only over NBD until SIGINT or SIGTERM, to any number of
clients at once. A SOURCE that is a VMA archive gives one export per disk,
named by its device (drive-scsi0, ...). An uncompressed archive file is
indexed once at start by reading only its extent headers. Any other archive
(.vma.zst, .vma.lzo, .vma.gz, a pipe, - for stdin) is served as soon as its
header is read (live restore): one pass reads it front to back, checking it
as vma verify does, into a sparse cache file per disk; a read of what the
pass has passed is answered from the cache, a read of what it has not
reached waits for it. Progress of the pass is logged. If the pass meets a
damaged or truncated archive, what it passed is still served, reads of the
rest fail (EIO) and the exit status at the end is that of the damage. Any
other SOURCE is an image (raw, or a format vmapipe reads), exported under
its file name or the next --name.

Clients choose the export by name; an empty name is the first export. Holes
(zero clusters) are reported by NBD_CMD_BLOCK_STATUS (base:allocation) and
sent as holes; qemu:allocation-depth and qemu:dirty-bitmap:NAME are offered
too. Writes are refused (EPERM).

Options:
  --socket PATH       listen on a Unix socket: nbd+unix:///EXPORT?socket=PATH
  --listen HOST:PORT  listen on TCP: nbd://HOST:PORT/EXPORT (port 0: any free
                      port, logged at start)
  --name NAME         export name of the next image SOURCE (repeatable)
  --max-connections N connections at once (default 1024); more are refused
                      with NBD_REP_ERR_POLICY and a warning in the log
  --idle-timeout SECS close a connection on which no request arrives and no
                      reply is taken for this long (default 600; 0: never,
                      e.g. for a kernel nbd device that may sit idle)
  --cache DIR         where a live restore keeps its cache files (default the
                      temporary directory); they are unlinked at once, so
                      nothing stays behind; they take at most the disks' data
  --keep DIR          restore while serving (one archive, even an
                      uncompressed one): the cache is staged in DIR (new or
                      empty) and, once the pass is complete, becomes the
                      restored disks and config blobs, named as vma extract
                      names them (sparse, synced); after a failed pass
                      nothing is kept

${S3_HELP}

A SOURCE s3://BUCKET/KEY that is an uncompressed archive is indexed by
ranged GETs and served from them (a cache of 64 MiB in 64 KiB blocks, 4 MiB
read ahead of reads in order); a compressed one is served live from one
streamed GET.

Examples:
  vma serve backup.vma --socket /run/vma.sock
  qemu-img convert -f raw 'nbd+unix:///drive-scsi0?socket=/run/vma.sock' scsi0.qcow2 -O qcow2
  zstd -dc backup.vma.zst | vma serve - --socket /run/vma.sock --keep restored
  vma serve disk.raw --name root --listen 127.0.0.1:10809
  nbdinfo --list nbd://127.0.0.1:10809
  vma serve s3://backups/pve1/vzdump-qemu-100-2024_01_31-02_00_01.vma --socket /run/vma.sock`,
  options: {
    socket: { type: 'string' },
    listen: { type: 'string' },
    name: { type: 'string', multiple: true },
    'max-connections': { type: 'string' },
    'idle-timeout': { type: 'string' },
    cache: { type: 'string' },
    keep: { type: 'string' },
    ...S3_OPTIONS,
  },
  capsYoungGeneration: true,
  async run (positionals, values, ctx) {
    if (positionals.length === 0) throw new VmapipeError('E_USAGE', 'missing SOURCE')
    // A server runs for hours, and V8 doubles its young generation (up to 32 MiB) as survivors add up over
    // collections: peak RSS 81-83 MiB after 6 copies, 71-73 held. Capped before the exports and the server are
    // loaded (loading them alone doubled it: 2 MiB more RSS), their built-in modules first (see capYoungGeneration).
    await capYoungGeneration(JOB_BUILTINS)
    const [{ openExports }, { NbdServer }] = await Promise.all([import('../jobs/exports.js'), import('../nbd/server.js')])
    const signal = ctx.signal // from here a signal closes the server and the exports
    const address = listenAddress(values.socket as string | undefined, values.listen as string | undefined)
    const max = values['max-connections'] as string | undefined
    const maxConnections = max === undefined ? undefined : Number(max)
    if (maxConnections !== undefined && (!/^\d+$/.test(max as string) || maxConnections < 1)) {
      throw new VmapipeError('E_USAGE', `--max-connections ${max}: expected a whole number, at least 1`)
    }
    const keepDir = values.keep as string | undefined
    const cacheDir = values.cache as string | undefined
    if (keepDir !== undefined && cacheDir !== undefined) throw new VmapipeError('E_USAGE', '--keep DIR holds the cache: give --cache or --keep')
    if (keepDir !== undefined && positionals.length > 1) throw new VmapipeError('E_USAGE', '--keep restores one archive: give one SOURCE')
    const s3 = s3Access(values, ctx, signal)
    const opened = await openExports(positionals, listOption(values.name) ?? [], {
      log: ctx.log,
      signal,
      ...(keepDir !== undefined ? { keepDir } : {}),
      ...(cacheDir !== undefined ? { cacheDir } : {}),
      // One bar for one source; with several the log lines tell each pass's progress.
      ...(positionals.length === 1 ? { progress: { start: (total?: number) => ctx.progress('pass', total), stop: () => ctx.stopProgress() } } : {}),
    }, s3)
    const idleTimeout = parseSeconds(values['idle-timeout'], '--idle-timeout')
    const server = new NbdServer(opened.exports, {
      log: ctx.log,
      ...(maxConnections !== undefined ? { maxConnections } : {}),
      ...(idleTimeout !== undefined ? { idleTimeout } : {}),
    })
    try {
      const bound = await server.listen(address)
      const stopCollecting = await collectOldGarbage()
      ctx.log.info({ ...bound, exports: opened.exports.map(e => ({ name: e.name, size: e.disk.size })) }, 'serving')
      if (!signal.aborted) await once(signal, 'abort')
      await server.close()
      stopCollecting()
    } finally {
      await opened.close()
    }
    // A pass that met a damaged archive says so in the exit status, once the serving is over; one stopped by the signal does not.
    const failed = (await Promise.all(opened.live.map(async a => await a.outcome))).find(o => !o.ok && o.error?.code !== 'E_INTERRUPTED')?.error
    if (failed !== undefined) return exitStatus(failed)
    ctx.done({ exports: opened.exports.length }, 'server stopped', 'server stopped')
    return EXIT.OK
  },
}

/** Bytes the old generation may gain since the last full collection before the server collects; how often it looks (ms). */
const OLD_GROWTH = 1024 * 1024
const OLD_CHECK = 250

/**
 * Collects the whole heap whenever the old generation has grown by OLD_GROWTH since the last collection, and
 * returns what stops it. Under load each scavenge promotes what requests in flight still hold (25-35 KB), and V8
 * lets the old generation grow by 8 MiB past what was live before it marks on its own: three nbdcopy of a 1 GiB
 * sparse image took the server's peak RSS to 65.2 MiB, 62.7 with this, at two collections of 3-5 ms a second.
 */
async function collectOldGarbage (): Promise<() => void> {
  const [{ getHeapSpaceStatistics }, { v8Collector }] = await Promise.all([import('node:v8'), import('../util/collector.js')])
  const gc = v8Collector()
  const old = (): number => getHeapSpaceStatistics().find(s => s.space_name === 'old_space')?.space_used_size ?? 0
  let base = old()
  const timer = setInterval(() => {
    const used = old()
    if (used < base) base = used
    else if (used > base + OLD_GROWTH) {
      gc()
      base = old()
    }
  }, OLD_CHECK)
  timer.unref()
  return () => clearInterval(timer)
}

/** --socket PATH or --listen HOST:PORT (IPv6 as [::1]:PORT), exactly one. */
export function listenAddress (socket: string | undefined, listen: string | undefined): ListenAddress {
  if ((socket === undefined) === (listen === undefined)) throw new VmapipeError('E_USAGE', 'give exactly one of --socket PATH and --listen HOST:PORT')
  if (socket !== undefined) return { socket }
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(listen as string)
  const port = m === null ? NaN : Number(m[3])
  if (m === null || port > 65535) throw new VmapipeError('E_USAGE', `--listen ${listen}: expected HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:0`)
  return { host: m[1] ?? (m[2] === '' ? '0.0.0.0' : m[2]), port }
}
