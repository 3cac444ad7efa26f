/**
 * runBackupJob: one scheduled backup, start to finish. Under a lock per
 * target and VM: clean up what a crashed run left, pack the disks into a
 * vzdump-named archive that the store shows under its name only when
 * complete (a local temporary file renamed, or an S3 multipart upload),
 * optionally read it back, write its sidecars, then prune by the retention
 * policy. One code path for every store (store.ts).
 */
import { readdir, stat } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { pino, type Logger } from 'pino'
import { VmapipeError } from '../errors.js'
import type { ProgressSink } from '../contracts.js'
import { type DiskSpec, closeDisks, openDisk, openDisks } from '../jobs/sources.js'
import { writeImage, writeOverlay } from '../jobs/incremental.js'
import { Qcow2Image } from '../qcow2/image.js'
import { diskRecords } from '../io/disk-records.js'
import { CLUSTER_SIZE } from '../record.js'
import { packArchive, readConfigFiles } from '../jobs/pack.js'
import { verifyArchive } from '../jobs/archive.js'
import { type BackupJob, type JobDisk, jobId } from './job.js'
import type { Lock } from './lock.js'
import { archiveName, backupBase, chainOf, imageName, runLogName, sidecars } from './naming.js'
import { pruneBackups } from './prune.js'
import { type ArchiveOutput, type BackupStore, vmPrefix } from './store.js'
import { openStore } from './stores.js'

export interface BackupOptions {
  /** Where the job logs (JSON); default silent. */
  log?: Logger
  signal?: AbortSignal
  /** The backup's time (names the archive); default now. */
  now?: Date
  /** Receives the count of disk bytes read. */
  progress?: ProgressSink
  /**
   * When the run was asked for, in ms since the epoch (the command line gives
   * its process's start). When given, a run of the job that finished after
   * that (or less than JOB_WINDOW_MS before) was started together with this
   * one, and this one does nothing (E_LOCKED). Without it only the lock
   * keeps runs apart.
   */
  startedAt?: number
  /** An s3:// target's lock: how long it holds unless renewed (renewed every third of it); default 10 minutes. */
  lockTtlMs?: number
}

/** Runs of one job that finish less than this before another starts count as started together with it. */
const JOB_WINDOW_MS = 1000

export interface BackupResult {
  job: string
  /** Path of the new archive (or, incremental, of the first new image). */
  archive: string
  /** Every file written: the archive, or one image per disk. */
  files: string[]
  /** Bytes of the archive file. */
  bytes: number
  /** Bytes of the disks. */
  diskBytes: number
  seconds: number
  /** Archives removed by the retention policy. */
  pruned: string[]
  /** Archives the policy would remove but that could not be. */
  pruneFailures: Array<{ archive: string, error: string }>
}

/** A log that also keeps Proxmox-style text lines for the archive's `.log` sidecar. */
class TaskLog {
  readonly lines: string[] = []
  constructor (readonly log: Logger) {}

  info (fields: Record<string, unknown>, message: string): void { this.add('INFO', message); this.log.info(fields, message) }
  /** Only in the `.log` sidecar (the JSON log has it from elsewhere). */
  note (message: string): void { this.add('INFO', message) }
  warn (fields: Record<string, unknown>, message: string): void { this.add('WARN', message); this.log.warn(fields, message) }

  private add (level: string, message: string): void {
    const t = new Date()
    const p = (n: number): string => String(n).padStart(2, '0')
    const stamp = `${t.getFullYear()}-${p(t.getMonth() + 1)}-${p(t.getDate())} ${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}`
    this.lines.push(`${stamp} ${level}: ${message}`)
  }
}

export async function runBackupJob (job: BackupJob, options: BackupOptions = {}): Promise<BackupResult> {
  const started = Date.now()
  const id = jobId(job)
  const task = new TaskLog((options.log ?? pino({ level: 'silent' })).child({ job: id, vmid: job.vmid }))
  // The transport logs each upload's bytes, parts, retries and rate (and each retry) to the job's log.
  const store = await openStore(job.target, { ...job.s3, log: task.log, ...(options.lockTtlMs !== undefined ? { lockTtlMs: options.lockTtlMs } : {}) })
  try {
    if (job.incremental === true && store.kind !== 'directory') {
      throw new VmapipeError('E_JOB', `job.target: an incremental chain needs a local directory (overlays read the images before them), not ${job.target}`)
    }
    const lock = job.lock === 'none' ? NO_LOCK : await store.lock(job.vmid, `the backup of VM ${job.vmid} into ${store.location}`)
    try {
      if (lock.tookOverFrom !== undefined) {
        const { pid, host, started } = lock.tookOverFrom
        const where = host !== '' ? ` on ${host}` : ''
        task.warn({ stalePid: pid, staleHost: host }, `took over the lock of a run that is gone (pid ${pid}${where}, started ${started})`)
      }
      const signal = anySignal(options.signal, lock.lost)
      if (options.startedAt !== undefined) await checkOverlap(store, job.vmid, options.startedAt)
      await store.removeLeftovers(job.vmid, (message, fields, found) => { if (found) task.warn(fields, message); else task.info(fields, message) },
        lock !== NO_LOCK)
      const now = await freeTime(store, job.vmid, options.now)
      const writing = { ...options, ...(signal !== undefined ? { signal } : {}) }
      const written = await (job.incremental === true ? writeChains(job, now, task, writing) : writeArchive(store, job, now, task, writing))
        .catch(err => { throw lock.lost?.aborted === true ? lock.lost.reason as Error : err }) // stopped because the lock was lost: say so
      const seconds = (Date.now() - started) / 1000
      task.info({ bytes: written.bytes, diskBytes: written.diskBytes, seconds, rate: Math.round(written.diskBytes / Math.max(seconds, 0.001)) },
        `${written.files.join(', ')} written: ${written.bytes} bytes from ${written.diskBytes} bytes of disk in ${seconds.toFixed(1)} s`)
      const { pruned, failures } = job.retention === undefined
        ? { pruned: [], failures: [] }
        : await pruneBackups(store, job.vmid, job.retention, {
          onRemoved: (name, err) => {
            if (err === undefined) task.info({ pruned: name }, `pruned ${name}`)
            else task.warn({ archive: name, error: err.message }, `could not prune ${name}: ${err.message}`)
          },
        })
      task.info({ result: failures.length > 0 ? 'partly-pruned' : 'ok' }, `finished backup of VM ${job.vmid}`)
      await store.writeFile(written.log, task.lines.join('\n') + '\n')
      return {
        job: id,
        archive: store.locate(written.files[0]),
        files: written.files.map(f => store.locate(f)),
        bytes: written.bytes,
        diskBytes: written.diskBytes,
        seconds: (Date.now() - started) / 1000,
        pruned,
        pruneFailures: failures,
      }
    } finally {
      await lock.release()
    }
  } finally {
    store.close()
  }
}

/** A job with "lock": "none" (a store without conditional creates, and one writer per VM by arrangement). */
const NO_LOCK: Lock = { release: async () => {} }

function anySignal (...signals: Array<AbortSignal | undefined>): AbortSignal | undefined {
  const present = signals.filter(s => s !== undefined)
  return present.length > 1 ? AbortSignal.any(present) : present[0]
}

interface Written {
  /** Names in the target, the archive (or the images) first. */
  files: string[]
  /** Where the run's task log goes. */
  log: string
  bytes: number
  diskBytes: number
}

function diskSpec (job: BackupJob, d: JobDisk, dirtyBitmap?: string): DiskSpec {
  return {
    name: d.name,
    path: d.path,
    ...(d.format !== undefined ? { format: d.format } : {}),
    ...(d.size !== undefined ? { size: d.size } : {}),
    ...(d.followBacking === true ? { followBacking: true } : {}),
    ...(job.tmpDir !== undefined ? { tmpDir: job.tmpDir } : {}),
    ...(dirtyBitmap !== undefined ? { dirtyBitmap } : {}),
  }
}

/** The archive: every disk and config into one vzdump-named VMA, streamed into the store. */
async function writeArchive (store: BackupStore, job: BackupJob, now: Date, task: TaskLog, options: BackupOptions): Promise<Written> {
  const compression = job.compression ?? 'zstd'
  const name = archiveName(job.vmid, now, compression)
  task.info({ archive: store.locate(name), disks: job.disks.map(d => d.name) }, `starting backup of VM ${job.vmid} to ${store.locate(name)}`)
  const configs = await readConfigFiles(job.configs ?? [])
  const disks = await openDisks(job.disks.map(d => diskSpec(job, d)))
  for (const d of disks) task.info({ device: d.name, path: d.path, format: d.format, size: d.size }, `disk ${d.name}: ${d.path} (${d.format}, ${d.size} bytes)`)
  const output = await store.openArchive(name).catch(err => {
    closeDisks(disks)
    throw err
  })
  const began = Date.now()
  try {
    await packArchive(disks, output, {
      configs,
      compression,
      ctime: Math.floor(now.getTime() / 1000),
      ...(job.interleave === true ? { interleave: true } : {}),
      ...(options.signal !== undefined ? { signal: options.signal } : {}),
      ...(options.progress !== undefined ? { progress: options.progress } : {}),
    })
    if (job.verify === true) await verifyWritten(output, task)
    await output.commit()
  } catch (err) {
    await output.abort()
    throw err
  }
  const report = output.report()
  const seconds = (Date.now() - began) / 1000
  if (store.kind !== 'directory') {
    task.note(`uploaded ${report.bytes} bytes in ${report.parts} parts (${report.retries} retried) in ${seconds.toFixed(1)} s, ` +
      `${Math.round(report.bytes / Math.max(seconds, 0.001))} bytes/s`)
  }
  if (job.notes !== undefined) await store.writeFile(sidecars(name).notes, job.notes)
  if (job.protected === true) await store.writeFile(sidecars(name).protected, '')
  return { files: [name], log: sidecars(name).log, bytes: report.bytes, diskBytes: disks.reduce((n, d) => n + d.size, 0) }
}

/**
 * Incremental: per disk, the whole disk as the base of a qcow2 chain the first
 * time, later an overlay of what the disk's dirty bitmap marks on the newest
 * image of its chain.
 */
async function writeChains (job: BackupJob, now: Date, task: TaskLog, options: BackupOptions): Promise<Written> {
  const files = await readdir(job.target)
  const written: Written = { files: [], log: runLogName(job.vmid, now), bytes: 0, diskBytes: 0 }
  for (const d of job.disks) {
    const out = join(job.target, imageName(job.vmid, now, d.name))
    const previous = chainOf(files, job.vmid, d.name).pop()
    const source = await openDisk(diskSpec(job, d, previous === undefined ? undefined : d.dirtyBitmap))
    task.info({ device: d.name, path: d.path, size: source.size, previous }, previous === undefined
      ? `disk ${d.name}: ${d.path}, the whole disk (the chain starts here)`
      : `disk ${d.name}: ${d.path}, what dirty bitmap ${d.dirtyBitmap ?? ''} marks, over ${previous}`)
    const progress = options.progress !== undefined ? { progress: options.progress } : {}
    const result = await (previous === undefined
      ? writeImage(source, out, progress)
      : writeOverlay(source, join(job.target, previous), { output: out, ...progress })
    ).finally(() => source.close())
    if (job.verify === true) await verifyImage(out, task)
    written.files.push(basename(out))
    written.bytes += (await stat(out)).size
    written.diskBytes += result.clusters * CLUSTER_SIZE
  }
  return written
}

/** Reads a new image back with its whole chain: every table checked, every cluster read. */
async function verifyImage (path: string, task: TaskLog): Promise<void> {
  const image = await Qcow2Image.open(path, { followBacking: true })
  const reader = diskRecords(image, 1)
  let clusters = 0
  for await (const _ of reader) clusters++
  task.info({ image: path, clusters }, `${basename(path)} reads back whole with its chain`)
}

/**
 * Refuses (E_LOCKED: nothing done) when a run of this job finished after this
 * one was started: the two were started together, and the other's backup
 * counts for both. A run's task log is the last file it writes, so the
 * newest log of the VM tells when its last successful run finished.
 */
async function checkOverlap (store: BackupStore, vmid: number, startedAt: number): Promise<void> {
  for (const log of (await store.list(vmPrefix(vmid))).filter(f => f.name.endsWith('.log'))) {
    const finished = log.modified.getTime()
    if (finished >= startedAt - JOB_WINDOW_MS) {
      throw new VmapipeError('E_LOCKED', `another run of the backup of VM ${vmid} finished at ${log.modified.toISOString()} (${log.name}), after this one ` +
        `was started at ${new Date(startedAt).toISOString()} or less than ${JOB_WINDOW_MS} ms before: ` +
        'the two were started together, its backup counts for both')
    }
  }
}

/**
 * The backup's time: `given`, or now; moved on by whole seconds while files
 * of a backup of that second are there (vzdump names have one-second
 * resolution). With the clock, it waits for that second to come, so the
 * name stays the time the backup was made.
 */
async function freeTime (store: BackupStore, vmid: number, given: Date | undefined): Promise<Date> {
  const files = (await store.list(vmPrefix(vmid))).map(f => f.name)
  let when = given ?? new Date()
  for (let tries = 0; tries < 60; tries++) {
    const base = backupBase(vmid, when)
    if (!files.some(f => f.startsWith(`${base}.`) || f.startsWith(`${base}-`))) return when
    const next = (Math.floor(when.getTime() / 1000) + 1) * 1000
    if (given === undefined) await new Promise(resolve => setTimeout(resolve, Math.max(0, next - Date.now())))
    when = given === undefined ? new Date(Math.max(next, Date.now())) : new Date(next)
  }
  throw new VmapipeError('E_TARGET_EXISTS', `backups of VM ${vmid} are there for every second from ${backupBase(vmid, given ?? new Date())} on`)
}

/** Reads the archive just written back and checks it whole, before it gets its name (S3: before it is kept). */
async function verifyWritten (output: ArchiveOutput, task: TaskLog): Promise<void> {
  const report = await verifyArchive(await output.readBack())
  if (!report.ok) throw report.error as VmapipeError
  task.info({ extents: report.extents, archiveBytes: report.archiveBytes }, 'the archive reads back complete and consistent')
}
