/**
 * One backup of a VM into a target at a time: a lock file created with
 * O_EXCL holding the owner's pid, host and start time. A lock whose process
 * is gone (same host) is stale and taken over; a live one makes the second
 * run give up cleanly.
 */
import { hostname } from 'node:os'
import { open, readFile, stat, unlink } from 'node:fs/promises'
import { VmapipeError, ioError } from '../errors.js'

interface Owner { pid: number, host: string, started: string }

export interface Lock {
  /** Set when a dead run's lock was taken over. */
  tookOverFrom?: Owner
  release: () => Promise<void>
}

/** How long a lock file without readable content may be another run in its first instant. */
const UNWRITTEN_GRACE_MS = 10_000

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

export async function acquireLock (path: string, what: string): Promise<Lock> {
  let tookOverFrom: Owner | undefined
  for (let attempt = 0; attempt < 3; attempt++) {
    const me: Owner = { pid: process.pid, host: hostname(), started: new Date().toISOString() }
    try {
      const handle = await open(path, 'wx', 0o644)
      try {
        await handle.writeFile(JSON.stringify(me) + '\n')
        await handle.sync()
      } finally {
        await handle.close()
      }
      return {
        ...(tookOverFrom !== undefined ? { tookOverFrom } : {}),
        release: async () => {
          // Only our own lock: never remove one that a later run took over.
          const current = await readFile(path, 'utf8').catch(() => '')
          if (current.trim() === JSON.stringify(me)) await unlink(path).catch(() => {})
        },
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(err, `cannot create the lock ${path}`)
    }
    const before = await stat(path).catch(() => undefined)
    if (before === undefined) continue // released meanwhile: try again
    const owner = parseOwner(await readFile(path, 'utf8').catch(() => ''))
    if (owner === undefined) {
      if (Date.now() - before.mtimeMs < UNWRITTEN_GRACE_MS) throw new VmapipeError('E_LOCKED', `${what} is starting in another process (lock ${path})`)
    } else if (owner.host !== hostname()) {
      throw new VmapipeError('E_LOCKED', `${what} is locked by pid ${owner.pid} on host ${owner.host} since ${owner.started} (lock ${path}); remove the lock if that run is gone`)
    } else if (alive(owner.pid)) {
      throw new VmapipeError('E_LOCKED', `${what} is already running: pid ${owner.pid} since ${owner.started} (lock ${path})`)
    }
    // Stale: remove it, unless it changed under us (then look again).
    const now = await stat(path).catch(() => undefined)
    if (now !== undefined && now.ino === before.ino && now.mtimeMs === before.mtimeMs) {
      await unlink(path).catch(() => {})
      tookOverFrom = owner ?? { pid: 0, host: '', started: new Date(before.mtimeMs).toISOString() }
    }
  }
  throw new VmapipeError('E_LOCKED', `could not take the lock ${path}: other runs keep changing it`)
}

function parseOwner (text: string): Owner | undefined {
  try {
    const o = JSON.parse(text) as Partial<Owner>
    if (typeof o.pid === 'number' && typeof o.host === 'string' && typeof o.started === 'string') return { pid: o.pid, host: o.host, started: o.started }
  } catch {}
  return undefined
}
