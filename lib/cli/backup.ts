import { createWriteStream, mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { pino, type LevelWithSilent } from 'pino'
import { jobId, readJob } from '../backup/job.js'
import { runBackupJob } from '../backup/run.js'
import { EXIT, VmapipeError } from '../errors.js'
import { type Command, expectPositionals } from './command.js'
import { createLogger } from './context.js'

export const backup: Command = {
  name: 'backup',
  summary: 'run a backup job file: vzdump-named archive, retention, lock, logs',
  help: `Usage: vma backup JOBFILE

Runs the backup job described by JOBFILE (JSON; examples/backup-job.json
shows every key, examples/backup-job-incremental.json an incremental job):
packs the VM's disks and config files into
<target>/vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo] as vzdump
names them, under a temporary name until it is complete (and, with
"verify": true, read back and checked), with a .log sidecar, then prunes old
archives of the VM by "retention" (keep-last, keep-daily, keep-weekly,
keep-monthly; .protected archives are never pruned, .notes and .log go with
their archive). An incremental job ("incremental": true) keeps a qcow2
chain per disk instead: the whole disk the first time, then overlays of what
each disk's dirty bitmap (dirtyBitmap, on an NBD export) marks.

A lock per target and VM keeps a second run from starting while the first is
alive; a lock left by a dead run is taken over and the dead run's temporary
files removed. Logs are JSON lines (job id, bytes, rate, duration, result) to
stderr and/or the file the job names.

Exit codes: 0 done; 4 nothing done (another run holds the lock); 5 the
archive was written but some old ones could not be pruned; 1, 2, 3 failed
(invalid input, bad job file, system failure such as a full disk), with no
archive kept.

Examples:
  vma backup /etc/vmapipe/vm100.json
  15 2 * * *  root  vma backup -q /etc/vmapipe/vm100.json   (crontab, see examples/)`,
  options: {},
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'JOBFILE')
    const job = await readJob(positionals[0])
    const level = (values['log-level'] as string | undefined) ?? job.log?.level ?? (values.quiet === true ? 'error' : 'info')
    const streams: pino.StreamEntry[] = []
    if (job.log?.stderr ?? job.log?.file === undefined) streams.push({ level: level as pino.Level, stream: ctx.stderr })
    if (job.log?.file !== undefined) {
      mkdirSync(dirname(job.log.file), { recursive: true })
      streams.push({ level: level as pino.Level, stream: createWriteStream(job.log.file, { flags: 'a' }) })
    }
    const log = createLogger('backup', level as LevelWithSilent, pino.multistream(streams))
    const progress = ctx.progress('backup')
    try {
      const result = await runBackupJob(job, { log, signal: ctx.signal, startedAt: performance.timeOrigin, ...(progress ? { progress } : {}) })
      ctx.stopProgress()
      const partly = result.pruneFailures.length > 0
      log.info({ job: result.job, result: partly ? 'partly-pruned' : 'ok', archive: result.archive, files: result.files, bytes: result.bytes, diskBytes: result.diskBytes, seconds: result.seconds, rate: Math.round(result.diskBytes / Math.max(result.seconds, 0.001)), pruned: result.pruned, maxRssKiB: process.resourceUsage().maxRSS }, 'backup job done')
      return partly ? EXIT.PARTLY_PRUNED : EXIT.OK
    } catch (err) {
      ctx.stopProgress()
      const e = err instanceof VmapipeError ? err : new VmapipeError('E_IO', (err as Error).message, { cause: err })
      const nothing = e.exitCode === EXIT.NOTHING_DONE
      log[nothing ? 'warn' : 'error']({ job: jobId(job), result: nothing ? 'nothing-done' : 'failed', code: e.code, offset: e.offset, device: e.device }, e.message)
      return e.exitCode
    } finally {
      await new Promise<void>(resolve => log.flush(() => resolve()))
    }
  },
}
