/**
 * vzdump's names: `vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo]`
 * in local time, with sidecars `<base>.log`, `<archive>.notes` and
 * `<archive>.protected` (VMA-NOTES.md).
 */
import type { Compression } from '../io/compression.js'

const EXTENSION: Record<Compression, string> = { none: '', zstd: '.zst', gzip: '.gz', lzo: '.lzo' }

const pad = (n: number): string => String(n).padStart(2, '0')

/** vzdump's time stamp: local time, YYYY_MM_DD-HH_MM_SS. */
function stamp (when: Date): string {
  return `${when.getFullYear()}_${pad(when.getMonth() + 1)}_${pad(when.getDate())}-${pad(when.getHours())}_${pad(when.getMinutes())}_${pad(when.getSeconds())}`
}

/** What every file of one backup of VM `vmid` at `when` starts with: `vzdump-qemu-100-2024_01_31-02_00_01`. */
export function backupBase (vmid: number, when: Date): string {
  return `vzdump-qemu-${vmid}-${stamp(when)}`
}

export function archiveName (vmid: number, when: Date, compression: Compression): string {
  return `vzdump-qemu-${vmid}-${stamp(when)}.vma${EXTENSION[compression]}`
}

/** An incremental job's qcow2 image of one disk: the chain's base, or an overlay on the image before it. */
export function imageName (vmid: number, when: Date, disk: string): string {
  return `vzdump-qemu-${vmid}-${stamp(when)}-${disk}.qcow2`
}

/** The run's log of an incremental job (no archive names it). */
export function runLogName (vmid: number, when: Date): string {
  return `vzdump-qemu-${vmid}-${stamp(when)}.log`
}

/** The images of `disk` of VM `vmid` among `files`, oldest first. */
export function chainOf (files: string[], vmid: number, disk: string): string[] {
  const suffix = `-${disk}.qcow2`
  return files.filter(f => f.endsWith(suffix) && parseArchiveName(`${f.slice(0, -suffix.length)}.vma`)?.vmid === vmid).sort()
}

export interface ArchiveFile {
  name: string
  vmid: number
  /** From the name, local time. */
  time: Date
}

const PATTERN = /^vzdump-qemu-(\d+)-(\d{4})_(\d{2})_(\d{2})-(\d{2})_(\d{2})_(\d{2})\.vma(?:\.zst|\.gz|\.lzo)?$/

/** The archive a file name stands for, or undefined for anything else. */
export function parseArchiveName (name: string): ArchiveFile | undefined {
  const m = PATTERN.exec(name)
  if (m === null) return undefined
  const [, vmid, y, mo, d, h, mi, s] = m.map(Number)
  const time = new Date(y, mo - 1, d, h, mi, s)
  if (time.getMonth() !== mo - 1 || time.getDate() !== d) return undefined
  return { name, vmid, time }
}

/** `vzdump-qemu-100-2024_01_31-02_00_01` for any of its archives. */
function baseName (archive: string): string {
  return archive.replace(/\.vma(?:\.zst|\.gz|\.lzo)?$/, '')
}

/** The sidecar files that belong to an archive. */
export function sidecars (archive: string): { log: string, notes: string, protected: string } {
  return { log: `${baseName(archive)}.log`, notes: `${archive}.notes`, protected: `${archive}.protected` }
}
