import { createWriteStream, mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { pino, type LevelWithSilent } from 'pino'
import { jobId, readJob } from '../backup/job.js'
import { runBackupJob } from '../backup/run.js'
import { VmapipeError } from '../errors.js'
import { EXIT, exitStatus } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { createLogger } from './context.js'
import { formatBytes } from '../io/progress.js'

export const backup: Command = {
  name: 'backup',
  help: `Usage: vma backup JOBFILE

Runs the backup job described by JOBFILE (JSON; examples/backup-job.json
shows every key, examples/backup-job-incremental.json an incremental job):
packs the VM's disks and config files into
<target>/vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo] as vzdump
names them, under a temporary name until it is complete (and, with
"verify": true, read back and checked), with a .log sidecar, then prunes old
archives of the VM by "retention" (keep-last, keep-hourly, keep-daily,
keep-weekly, keep-monthly, keep-yearly, as vma prune does; .protected archives
are never pruned, .notes and .log go with their archive). An incremental job ("incremental": true) keeps a qcow2
chain per disk instead: the whole disk the first time, then overlays of what
each disk's dirty bitmap (dirtyBitmap, on an NBD export) marks.

A lock per target and VM keeps a second run from starting while the first is
alive; a lock left by a dead run is taken over and the dead run's temporary
files removed.

"target": "s3://BUCKET/PREFIX/" streams the archive into the bucket (a
multipart upload: the object appears only when complete), with the
sidecars as objects and retention over the listing; "s3" in the job file
(endpoint, region, forcePathStyle, checksum) or VMAPIPE_S3_ENDPOINT and the
AWS chain say how to reach it. The lock is then an object made with
If-None-Match: * that expires unless renewed, so it holds across hosts;
unfinished uploads of killed runs are aborted. On a store that refuses
conditional creates the job fails (exit 3) unless the job says
"lock": "none". Logs (job id, bytes, rate, duration, result) go to stderr
and/or the file the job names; an error always reaches stderr as well, even
with -q or "stderr": false, so cron's mail and the journal show a failure.

Exit codes: 0 done; 4 nothing done (another run holds the lock); 5 the
archive was written but some old ones could not be pruned; 1, 2, 3 failed
(invalid input, bad job file, system failure such as a full disk), with no
archive kept.

Examples:
  vma backup /etc/vmapipe/vm100.json
  vma backup /etc/vmapipe/vm100-s3.json   ("target": "s3://backups/pve1/")
  15 2 * * *  root  vma backup -q /etc/vmapipe/vm100.json   (crontab, see examples/)`,
  options: {},
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'JOBFILE')
    const job = await readJob(positionals[0])
    const level = ((values['log-level'] as string | undefined) ?? job.log?.level ?? (values.quiet === true ? 'warn' : 'info')) as LevelWithSilent
    // A failure always reaches stderr, whatever the job's log settings or -q say: cron mails it, the journal keeps it.
    const belowError = pino.levels.values[level] < pino.levels.values.error
    const toStderr = (job.log?.stderr ?? job.log?.file === undefined) && belowError
    const streams: pino.StreamEntry[] = [{ level: toStderr ? level as pino.Level : 'error', stream: ctx.stderr }]
    const path = level !== 'silent' ? job.log?.file : undefined
    if (path !== undefined) mkdirSync(dirname(path), { recursive: true })
    const file = path !== undefined ? createWriteStream(path, { flags: 'a' }) : undefined
    if (file !== undefined) streams.push({ level: level as pino.Level, stream: file })
    const log = createLogger('backup', belowError ? level : 'error', pino.multistream(streams))
    const progress = ctx.progress('backup')
    try {
      const result = await runBackupJob(job, { log, signal: ctx.signal, startedAt: performance.timeOrigin, ...(progress ? { progress } : {}) })
      ctx.stopProgress()
      const partly = result.pruneFailures.length > 0
      const fields = {
        job: result.job, result: partly ? 'partly-pruned' : 'ok', archive: result.archive,
        files: result.files, bytes: result.bytes, diskBytes: result.diskBytes,
        seconds: result.seconds, rate: Math.round(result.diskBytes / Math.max(result.seconds, 0.001)),
        pruned: result.pruned, maxRssKiB: process.resourceUsage().maxRSS,
      }
      if (toStderr && ctx.text) {
        // A person at the terminal reads a sentence; the log file keeps the JSON line.
        if (file !== undefined) createLogger('backup', level, file).info(fields, 'backup job done')
        ctx.done({}, 'backup job done', `${result.archive} written, ${formatBytes(result.bytes)} from ${formatBytes(result.diskBytes)} of disk` +
          (result.pruned.length > 0 ? `, ${result.pruned.length} old archive${result.pruned.length === 1 ? '' : 's'} pruned` : ''))
      } else log.info(fields, 'backup job done')
      return partly ? EXIT.PARTLY_PRUNED : EXIT.OK
    } catch (err) {
      ctx.stopProgress()
      const e = ctx.signalExit !== undefined
        ? new VmapipeError('E_INTERRUPTED', 'interrupted, no archive kept', { cause: err })
        : err instanceof VmapipeError ? err : new VmapipeError('E_IO', (err as Error).message, { cause: err })
      const nothing = e.fault === 'locked'
      const fields = { job: jobId(job), result: nothing ? 'nothing-done' : 'failed', code: e.code, offset: e.offset, device: e.device, hint: ctx.hint(e) }
      log[nothing ? 'warn' : 'error'](fields, e.message)
      return ctx.signalExit ?? exitStatus(e)
    } finally {
      await new Promise<void>(resolve => log.flush(() => resolve()))
      // The process exits right after: the file's last lines (the failure) must be on disk first.
      if (file !== undefined) await new Promise<void>(resolve => file.end(() => resolve()))
    }
  },
}
