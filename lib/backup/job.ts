/**
 * Backup job files: JSON, checked strictly (an unknown key is an error, as a
 * typo in a backup job should never pass silently). See examples/backup-job.json.
 */
import { readFile } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'
import { COMPRESSIONS, type Compression } from '../io/compression.js'
import { RETENTION_KEYS, type Retention } from './retention.js'

export interface JobDisk {
  /** Device name in the archive, e.g. drive-scsi0. */
  name: string
  /** A file, block device or NBD URI. */
  path: string
  format?: string
  /** Bytes, for raw input whose size cannot be seen. */
  size?: number
  followBacking?: boolean
  /** Incremental jobs: the dirty bitmap of this NBD export to read after the first run. */
  dirtyBitmap?: string
}

export interface JobConfig {
  /** Name in the archive (default the file's base name); Proxmox restores `qemu-server.conf`. */
  name?: string
  path: string
}

export interface JobLog {
  /** Append JSON log lines to this file. */
  file?: string
  /** Log to stderr too (default: true unless a file is given). */
  stderr?: boolean
  level?: string
}

export interface JobS3 {
  /** The store's URL, for MinIO, Ceph RGW, Wasabi, B2, R2... */
  endpoint?: string
  region?: string
  /** The bucket in the path rather than the host name (default with an endpoint). */
  forcePathStyle?: boolean
  /** What uploads send: crc32 (default), md5 (Content-MD5) or none. */
  checksum?: 'crc32' | 'md5' | 'none'
}

/** The job's name in logs. */
export function jobId (job: BackupJob): string {
  return job.id ?? `vzdump-qemu-${job.vmid}`
}

export interface BackupJob {
  /** Names the job in logs (default vzdump-qemu-<vmid>). */
  id?: string
  vmid: number
  disks: JobDisk[]
  configs?: Array<string | JobConfig>
  /** Directory the archives go to (must exist), or s3://BUCKET/PREFIX/. */
  target: string
  /**
   * `none`: no lock per VM. Only for a store that refuses conditional creates
   * (If-None-Match on PUT), where jobs of one VM never overlap by arrangement.
   */
  lock?: 'exclusive' | 'none'
  /** How to reach an s3:// target (default: VMAPIPE_S3_ENDPOINT and the AWS chain). */
  s3?: JobS3
  compression?: Compression
  retention?: Retention
  /** Read the new archive back and check it before it gets its name. */
  verify?: boolean
  /** Text for the `.notes` sidecar. */
  notes?: string
  /** Mark the new archive protected (never pruned). */
  protected?: boolean
  /** Read the disks together instead of one after another. */
  interleave?: boolean
  /** Directory for temporary copies of images read from stdin-like sources. */
  tmpDir?: string
  /**
   * Instead of archives, a qcow2 chain per disk in the target: the first run
   * writes the whole disk, each later run an overlay with the clusters the
   * disk's dirty bitmap marks, on the newest image before it.
   */
  incremental?: boolean
  log?: JobLog
}

type Check = (value: unknown, where: string) => void

const fail = (where: string, what: string): VmapipeError => new VmapipeError('E_JOB', `${where}: ${what}`)
const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v)
const string: Check = (v, where) => { if (typeof v !== 'string' || v === '') throw fail(where, 'must be a non-empty string') }
const boolean: Check = (v, where) => { if (typeof v !== 'boolean') throw fail(where, 'must be true or false') }
const count: Check = (v, where) => { if (!Number.isSafeInteger(v) || (v as number) < 0) throw fail(where, 'must be a whole number, 0 or more') }
const oneOf = (...values: string[]): Check => (v, where) => { if (!values.includes(v as string)) throw fail(where, `must be one of ${values.join(', ')}`) }

function object (fields: Record<string, Check>, required: string[] = []): Check {
  return (v, where) => {
    if (!isObject(v)) throw fail(where, 'must be an object')
    for (const key of Object.keys(v)) {
      const check = fields[key]
      if (check === undefined) throw fail(`${where}.${key}`, `unknown key (known: ${Object.keys(fields).join(', ')})`)
      check(v[key], `${where}.${key}`)
    }
    for (const key of required) if (!(key in v)) throw fail(`${where}.${key}`, 'is required')
  }
}

function list (item: Check, min = 0): Check {
  return (v, where) => {
    if (!Array.isArray(v) || v.length < min) throw fail(where, min > 0 ? `must be a list of at least ${min}` : 'must be a list')
    v.forEach((x, i) => item(x, `${where}[${i}]`))
  }
}

const JOB: Check = object({
  id: string,
  vmid: (v, where) => { if (!Number.isSafeInteger(v) || (v as number) < 1) throw fail(where, 'must be a positive whole number') },
  disks: list(object({ name: string, path: string, format: string, size: count, followBacking: boolean, dirtyBitmap: string }, ['name', 'path']), 1),
  configs: list((v, where) => { if (typeof v === 'string') string(v, where); else object({ name: string, path: string }, ['path'])(v, where) }),
  target: string,
  lock: oneOf('exclusive', 'none'),
  s3: object({ endpoint: string, region: string, forcePathStyle: boolean, checksum: oneOf('crc32', 'md5', 'none') }),
  compression: oneOf(...COMPRESSIONS),
  retention: object(Object.fromEntries(RETENTION_KEYS.map(key => [key, count]))),
  verify: boolean,
  notes: (v, where) => { if (typeof v !== 'string') throw fail(where, 'must be a string') },
  protected: boolean,
  interleave: boolean,
  tmpDir: string,
  incremental: boolean,
  log: object({ file: string, stderr: boolean, level: oneOf('trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent') }),
}, ['vmid', 'disks', 'target'])

/** Checks a parsed job; throws E_JOB naming the first problem. */
export function checkJob (value: unknown): BackupJob {
  JOB(value, 'job')
  const job = value as BackupJob
  if (job.s3 !== undefined && !/^s3:\/\//i.test(job.target)) throw fail('job.s3', 'applies to an s3:// target')
  if (job.incremental === true) {
    // An incremental chain is one whole: no retention prunes part of it, and qcow2 images are not compressed as archives are.
    for (const key of ['retention', 'compression', 'configs', 'notes', 'protected', 'interleave'] as const) {
      if (job[key] !== undefined) throw fail(`job.${key}`, 'applies to archives, not to an incremental chain')
    }
    job.disks.forEach((d, i) => { if (d.dirtyBitmap === undefined) throw fail(`job.disks[${i}].dirtyBitmap`, 'is required in an incremental job') })
  } else {
    job.disks.forEach((d, i) => { if (d.dirtyBitmap !== undefined) throw fail(`job.disks[${i}].dirtyBitmap`, 'needs "incremental": true') })
  }
  return job
}

export async function readJob (path: string): Promise<BackupJob> {
  const text = await readFile(path, 'utf8').catch(err => { throw ioError(err, `cannot read the job file ${path}`) })
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (err) {
    throw new VmapipeError('E_JOB', `${path} is not JSON: ${(err as Error).message}`)
  }
  return checkJob(value)
}
