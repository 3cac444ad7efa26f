/**
 * Where a backup job's files live: a local directory or an S3 bucket under a
 * prefix. runBackupJob and pruning work through this one face, so both
 * targets take the same path: list a VM's files, write an archive that
 * appears under its name only when complete, write small sidecars, delete,
 * hold the lock per VM, clean up what a killed run left.
 */
import { createReadStream } from 'node:fs'
import { readdir, stat, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import type { Readable, Writable } from 'node:stream'
import { VmapipeError, ioError } from '../errors.js'
import { openOutput, removeStalePartials, writeFileAtomically } from '../io/output.js'
import { acquireLock, type Lock } from './lock.js'

export interface StoredFile {
  name: string
  size: number
  modified: Date
}

/** An archive being written: nothing is seen under its name until commit. */
export interface ArchiveOutput {
  stream: Writable
  /** The descriptor behind `stream`, where there is one (compressors may write to it themselves). */
  fd?: number
  /** After the stream has finished: the bytes written, read back. */
  readBack: () => Promise<Readable>
  /** After the stream has finished: give the archive its name. */
  commit: () => Promise<void>
  /** Drop what was written (before or after the stream finished, before commit). */
  abort: () => Promise<void>
  /** What the transfer did, for the job's log (bytes, parts, retries...). */
  report: () => Record<string, number>
}

export interface BackupStore {
  /** `directory` or `s3`. */
  readonly kind: string
  /** The target as the user named it, for messages. */
  readonly location: string
  /** A file's full name (path or s3:// URL), for messages and results. */
  locate: (name: string) => string
  /** The files whose names start with `prefix` (never the lock, nor temporary ones). */
  list: (prefix: string) => Promise<StoredFile[]>
  openArchive: (name: string) => Promise<ArchiveOutput>
  /** Writes a small file whole, under its name only once complete. */
  writeFile: (name: string, data: string) => Promise<void>
  remove: (name: string) => Promise<void>
  /** Takes the lock of VM `vmid`; E_LOCKED while another live run holds it. */
  lock: (vmid: number, what: string) => Promise<Lock>
  /**
   * Removes what killed runs of VM `vmid` left (temporary files, unfinished
   * uploads), telling `report` what it did. `locked`: the caller holds the
   * VM's lock, so nothing of the VM's can be another run's work in progress.
   */
  removeLeftovers: (vmid: number, report: LeftoverReport, locked: boolean) => Promise<void>
  close: () => void
}

/** `found`: something was left (a warning); else a note that nothing was. */
export type LeftoverReport = (message: string, fields: Record<string, unknown>, found: boolean) => void

/** The files of VM `vmid`'s backups start with this (the dash keeps VM 10 from matching VM 100). */
export const vmPrefix = (vmid: number): string => `vzdump-qemu-${vmid}-`

/** A local directory (or a mounted share): the archive under an owner's temporary name, renamed when complete. */
export class DirectoryStore implements BackupStore {
  readonly kind = 'directory'
  private constructor (readonly location: string) {}

  static async open (dir: string): Promise<DirectoryStore> {
    const st = await stat(dir).catch(err => { throw ioError(err, `the target ${dir} is not there`) })
    if (!st.isDirectory()) throw new VmapipeError('E_JOB', `the target ${dir} is not a directory`)
    return new DirectoryStore(dir)
  }

  locate (name: string): string {
    return join(this.location, name)
  }

  async list (prefix: string): Promise<StoredFile[]> {
    const names = (await readdir(this.location).catch(err => { throw ioError(err, `cannot list ${this.location}`) })).filter(n => n.startsWith(prefix))
    const files = await Promise.all(names.map(async name => {
      const st = await stat(join(this.location, name)).catch(() => undefined)
      return st?.isFile() === true ? [{ name, size: st.size, modified: st.mtime }] : []
    }))
    return files.flat()
  }

  async openArchive (name: string): Promise<ArchiveOutput> {
    const path = this.locate(name)
    const output = await openOutput(path)
    const partial = output.partial as string
    let bytes = 0
    return {
      stream: output.stream,
      fd: output.fd,
      ...(output.fileOffset !== undefined ? { fileOffset: output.fileOffset } : {}),
      readBack: async () => createReadStream(partial, { highWaterMark: 1 << 20 }),
      commit: async () => {
        bytes = (await stat(partial)).size
        await output.commit()
      },
      abort: async () => { await output.abort() },
      report: () => ({ bytes }),
    }
  }

  async writeFile (name: string, data: string): Promise<void> {
    await writeFileAtomically(this.locate(name), data)
  }

  async remove (name: string): Promise<void> {
    await unlink(this.locate(name)).catch(err => { throw ioError(err, `cannot remove ${this.locate(name)}`) })
  }

  async lock (vmid: number, what: string): Promise<Lock> {
    return await acquireLock(join(this.location, `.vzdump-qemu-${vmid}.lock`), what)
  }

  async removeLeftovers (vmid: number, report: LeftoverReport, locked: boolean): Promise<void> {
    // Under the lock a temporary file without an owner in its name (an older version's) is a leftover too.
    for (const file of await removeStalePartials(this.location, name => name.startsWith(vmPrefix(vmid)), locked)) {
      report(`removed ${file}, left by a run that did not finish`, { file }, true)
    }
  }

  close (): void {}
}
