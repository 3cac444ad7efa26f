/**
 * Pruning a VM's archives in a store by a retention policy: the archives of
 * the listing (by their vzdump names), each with a `.protected` sidecar
 * never removed, marked by planPrune; a removed archive takes its `.notes`
 * and `.log` with it. Backup jobs and `vma prune` both use this.
 */
import { parseArchiveName, sidecars } from './naming.js'
import { type PruneItem, type PruneMark, type Retention, planPrune } from './retention.js'
import { type BackupStore, vmPrefix } from './store.js'

export interface PruneEntry {
  name: string
  /** From the name, local time. */
  time: Date
  mark: PruneMark
}

export interface PruneResult {
  /** Every archive of the VM, newest first, with what the policy says of it. */
  archives: PruneEntry[]
  /** Archives removed (with dryRun: that would be). */
  pruned: string[]
  /** Archives the policy would remove but that could not be. */
  failures: Array<{ archive: string, error: string }>
}

export interface PruneOptions {
  /** Only say what would be removed. */
  dryRun?: boolean
  /** Told of each archive removed, or that could not be. */
  onRemoved?: (archive: string, error?: Error) => void
}

export async function pruneBackups (store: BackupStore, vmid: number, policy: Retention, options: PruneOptions = {}): Promise<PruneResult> {
  const files = await store.list(vmPrefix(vmid))
  const present = new Set(files.map(f => f.name))
  const items: PruneItem[] = files.flatMap(file => {
    const a = parseArchiveName(file.name)
    return a?.vmid === vmid ? [{ name: a.name, time: a.time, protected: present.has(sidecars(a.name).protected) }] : []
  })
  const marks = planPrune(items, policy)
  const archives = items.map(i => ({ name: i.name, time: i.time, mark: marks.get(i.name) as PruneMark }))
    .sort((a, b) => b.time.getTime() - a.time.getTime() || (a.name < b.name ? 1 : -1))
  const result: PruneResult = { archives, pruned: [], failures: [] }
  for (const { name, mark } of archives) {
    if (mark !== 'remove') continue
    if (options.dryRun === true) {
      result.pruned.push(name)
      continue
    }
    try {
      await store.remove(name)
    } catch (err) {
      result.failures.push({ archive: name, error: (err as Error).message })
      options.onRemoved?.(name, err as Error)
      continue
    }
    // The log is shared by a backup's files; another archive of the same second (another compression) keeps it.
    const others = archives.some(a => a.name !== name && a.mark !== 'remove' && sidecars(a.name).log === sidecars(name).log)
    for (const side of [sidecars(name).notes, ...(others ? [] : [sidecars(name).log])]) {
      if (present.has(side)) await store.remove(side).catch(() => {})
    }
    result.pruned.push(name)
    options.onRemoved?.(name)
  }
  return result
}
