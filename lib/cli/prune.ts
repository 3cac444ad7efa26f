import { pruneBackups } from '../backup/prune.js'
import { RETENTION_KEYS, type Retention } from '../backup/retention.js'
import { openStore } from '../backup/stores.js'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { type Command, expectPositionals } from './command.js'
import { writeOut } from './context.js'
import { S3_HELP, S3_OPTIONS, s3Access } from './s3-flags.js'

function count (value: unknown, option: string): number | undefined {
  if (value === undefined) return undefined
  if (!/^\d+$/.test(String(value))) throw new VmapipeError('E_USAGE', `--${option}: ${String(value)} is not a whole number`)
  return Number(value)
}

export const prune: Command = {
  name: 'prune',
  help: `Usage: vma prune TARGET --vmid N [--keep-last N] [--keep-hourly N] [--keep-daily N]
                 [--keep-weekly N] [--keep-monthly N] [--keep-yearly N] [--dry-run] [--json]

Removes old backups of VM N from TARGET, a directory or s3://BUCKET/PREFIX/,
by the same retention rules as backup jobs ("retention" in a job file), as
Proxmox prunes: the rules apply in order over the VM's vzdump-named archives,
newest first. --keep-last N keeps the N newest; --keep-daily N keeps the
newest archive of each of the N newest days not covered by an archive kept
already, and likewise for hours, ISO weeks, months and years. An archive
with a .protected sidecar is never removed and does not count; a removed
archive takes its .notes and .log with it. With no --keep option nothing is
removed.

It takes the VM's backup lock (as a backup job does) unless --dry-run or
--no-lock is given: it never prunes under a running job.

Options:
  --vmid N         the VM whose backups are pruned (required)
  --keep-last N, --keep-hourly N, --keep-daily N, --keep-weekly N,
  --keep-monthly N, --keep-yearly N
                   the retention policy
  --dry-run        only show what would be removed
  --no-lock        do not take the VM's lock (a store without conditional creates)
  --json           print one JSON object instead of text

${S3_HELP}

Exit codes: 0 done; 4 nothing done (a backup of the VM is running); 5 some
archives could not be removed; 2, 3 failed.

Examples:
  vma prune /mnt/backup --vmid 100 --keep-daily 7 --keep-weekly 4 --dry-run
  vma prune s3://backups/pve1/ --vmid 100 --keep-last 3 --keep-monthly 12`,
  options: {
    vmid: { type: 'string' },
    ...Object.fromEntries(RETENTION_KEYS.map(key => [key, { type: 'string' as const }])),
    'dry-run': { type: 'boolean' },
    'no-lock': { type: 'boolean' },
    json: { type: 'boolean' },
    ...S3_OPTIONS,
  },
  async run (positionals, values, ctx) {
    expectPositionals(positionals, 1, 1, 'TARGET')
    const vmid = count(values.vmid, 'vmid')
    if (vmid === undefined || vmid < 1) throw new VmapipeError('E_USAGE', '--vmid N is required (the VM whose backups are pruned)')
    const policy: Retention = {}
    for (const key of RETENTION_KEYS) {
      const n = count(values[key], key)
      if (n !== undefined) policy[key] = n
    }
    const dryRun = values['dry-run'] === true
    const { s3, log } = s3Access(values, ctx)
    const store = await openStore(positionals[0], { ...s3, ...(log !== undefined ? { log } : {}) })
    try {
      const lock = dryRun || values['no-lock'] === true ? undefined : await store.lock(vmid, `the backups of VM ${vmid} in ${store.location}`)
      try {
        const result = await pruneBackups(store, vmid, policy, {
          dryRun,
          onRemoved: (name, err) => {
            if (err !== undefined) ctx.log.warn({ archive: name, error: err.message }, `could not remove ${store.locate(name)}: ${err.message}`)
          },
        })
        if (values.json === true) {
          await writeOut(JSON.stringify({
            target: store.location,
            vmid,
            dryRun,
            policy,
            archives: result.archives.map(a => ({ name: a.name, time: a.time.toISOString(), mark: a.mark })),
            pruned: result.pruned,
            failures: result.failures,
          }, null, 2) + '\n')
        } else {
          const word = { keep: 'keep', protected: 'protected', remove: dryRun ? 'would remove' : 'removed' }
          const failed = new Set(result.failures.map(f => f.archive))
          const lines = result.archives.map(a => `${(failed.has(a.name) ? 'failed' : word[a.mark]).padEnd(12)}  ${a.name}`)
          await writeOut(lines.length > 0 ? lines.join('\n') + '\n' : '')
          ctx.log.info({ pruned: result.pruned.length, kept: result.archives.length - result.pruned.length },
            `${result.pruned.length} of ${result.archives.length} archives of VM ${vmid} ${dryRun ? 'would be removed' : 'removed'}`)
        }
        return result.failures.length > 0 ? EXIT.PARTLY_PRUNED : EXIT.OK
      } finally {
        await lock?.release()
      }
    } finally {
      store.close()
    }
  },
}
