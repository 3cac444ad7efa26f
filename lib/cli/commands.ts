/**
 * vma's commands by name, with the line `vma --help` shows for each. A
 * command's module (and the jobs and formats behind it) is imported only once
 * that command is chosen: `vma --help` and `vma list` load what they use,
 * not the whole library.
 */
import type { Command } from './command.js'

interface CommandEntry {
  name: string
  /** One line for the command list. */
  summary: string
  load: () => Promise<Command>
}

export const COMMANDS: readonly CommandEntry[] = [
  { name: 'list', summary: 'show the uuid, creation time, devices and config blobs of an archive', load: async () => (await import('./list.js')).list },
  { name: 'config', summary: 'print one config blob (default qemu-server.conf) to stdout', load: async () => (await import('./config.js')).config },
  { name: 'verify', summary: 'read a whole archive and check every checksum, rule and cluster', load: async () => (await import('./verify.js')).verify },
  {
    name: 'extract',
    summary: 'restore disks and config blobs into a new directory, or one disk to stdout',
    load: async () => (await import('./extract.js')).extract,
  },
  { name: 'create', summary: 'pack disks and config blobs into a new archive', load: async () => (await import('./create.js')).create },
  { name: 'backup', summary: 'run a backup job file: vzdump-named archive, retention, lock, logs', load: async () => (await import('./backup.js')).backup },
  { name: 'prune', summary: 'remove old backups of a VM by a retention policy (directory or s3://)', load: async () => (await import('./prune.js')).prune },
  { name: 'serve', summary: 'serve archives and images read-only over NBD (qemu, nbdcopy, the kernel)', load: async () => (await import('./serve.js')).serve },
  {
    name: 'incremental',
    summary: 'write what a dirty bitmap marks as an overlay on the previous backup',
    load: async () => (await import('./incremental.js')).incremental,
  },
  { name: 'info', summary: 'show the format, size, allocation and dirty bitmaps of a disk image', load: async () => (await import('./info.js')).info },
]
