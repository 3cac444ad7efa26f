/**
 * One backup of a VM into a target at a time: a lock file created with
 * O_EXCL holding the owner's pid, its start time, host and start date. A
 * lock whose process is gone (same host; a pid now running another program
 * counts as gone) is stale and taken over; a live one makes the second run
 * give up cleanly.
 *
 * Taking over happens holding a second file, LOCK.takeover, also made with
 * O_EXCL: of two runs that find the same stale lock only one removes it.
 * Without it the slower could remove the lock the faster had just made, and
 * both would run.
 */
import { hostname } from 'node:os'
import { open, readFile, stat, unlink } from 'node:fs/promises'
import type { Stats } from 'node:fs'
import { VmapipeError, ioError } from '../errors.js'
import { ME, processRuns } from '../io/output.js'

interface Owner {
  pid: number
  host: string
  started: string
  /** The process's start time (clock ticks after boot), to tell a reused pid; absent in locks of older versions. */
  start?: number
}

export interface Lock {
  /** Set when a dead run's lock was taken over. */
  tookOverFrom?: Owner
  /** Aborted when the lock was lost (another run took it over): the run must stop. */
  lost?: AbortSignal
  release: () => Promise<void>
}

/** How long a lock file without readable content may be another run in its first instant. */
const UNWRITTEN_GRACE_MS = 10_000

/** Creates `path` with O_EXCL holding `me`; false when it exists. */
async function create (path: string, me: Owner): Promise<boolean> {
  let handle
  try {
    handle = await open(path, 'wx', 0o644)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw ioError(err, `cannot create the lock ${path}`)
  }
  try {
    await handle.writeFile(JSON.stringify(me) + '\n')
    await handle.sync()
  } finally {
    await handle.close()
  }
  return true
}

/** The file's owner as read now, with the file's identity; undefined when it is gone. */
async function holder (path: string): Promise<{ owner?: Owner, st: Stats } | undefined> {
  const st = await stat(path).catch(() => undefined)
  if (st === undefined) return undefined
  const owner = parseOwner(await readFile(path, 'utf8').catch(() => ''))
  return owner === undefined ? { st } : { owner, st }
}

/** Throws E_LOCKED, saying who holds the lock, unless its holder is gone. */
function checkStale (path: string, what: string, h: { owner?: Owner, st: Stats }): void {
  const { owner, st } = h
  if (owner === undefined) {
    if (Date.now() - st.mtimeMs < UNWRITTEN_GRACE_MS) throw new VmapipeError('E_LOCKED', `${what} is starting in another process (lock ${path})`)
    return
  }
  if (owner.host !== hostname()) {
    throw new VmapipeError('E_LOCKED',
      `${what} is locked by pid ${owner.pid} on host ${owner.host} since ${owner.started} (lock ${path}); remove the lock if that run is gone`)
  }
  if (processRuns(owner.pid, owner.start ?? 0)) {
    throw new VmapipeError('E_LOCKED', `${what} is already running: pid ${owner.pid} since ${owner.started} (lock ${path})`)
  }
}

/** Removes `path` if it is still the file `h` describes. */
async function removeIfSame (path: string, h: { st: Stats }): Promise<boolean> {
  const now = await stat(path).catch(() => undefined)
  if (now === undefined || now.ino !== h.st.ino || now.mtimeMs !== h.st.mtimeMs) return false
  await unlink(path).catch(() => {})
  return true
}

/**
 * Removes a stale lock holding LOCK.takeover. Returns the dead owner when it
 * removed the lock, undefined when the caller should simply try again; throws
 * E_LOCKED when another run is taking over right now or the lock came alive.
 */
async function takeOver (path: string, what: string, me: Owner): Promise<Owner | undefined> {
  const marker = `${path}.takeover`
  if (!await create(marker, me)) {
    const other = await holder(marker)
    if (other === undefined) return undefined
    // A taker that died holding the marker (it holds it for milliseconds) leaves it stale like a lock.
    try {
      checkStale(marker, `taking over the lock of ${what}`, other)
    } catch {
      throw new VmapipeError('E_LOCKED', `${what}: another run is taking over the stale lock ${path} right now`)
    }
    await removeIfSame(marker, other)
    return undefined
  }
  try {
    // Look again: the lock may have been taken over, and even released, since it was found stale.
    const h = await holder(path)
    if (h === undefined) return undefined
    checkStale(path, what, h)
    if (!await removeIfSame(path, h)) return undefined
    return h.owner ?? { pid: 0, host: '', started: new Date(h.st.mtimeMs).toISOString() }
  } finally {
    await unlink(marker).catch(() => {})
  }
}

export async function acquireLock (path: string, what: string): Promise<Lock> {
  let tookOverFrom: Owner | undefined
  for (let attempt = 0; attempt < 5; attempt++) {
    const me: Owner = { pid: process.pid, host: hostname(), started: new Date().toISOString(), start: ME.start }
    if (await create(path, me)) {
      return {
        ...(tookOverFrom !== undefined ? { tookOverFrom } : {}),
        release: async () => {
          // Only our own lock: never remove one that a later run took over.
          const current = await readFile(path, 'utf8').catch(() => '')
          if (current.trim() === JSON.stringify(me)) await unlink(path).catch(() => {})
        },
      }
    }
    const h = await holder(path)
    if (h === undefined) continue // released meanwhile: try again
    checkStale(path, what, h)
    tookOverFrom = await takeOver(path, what, me) ?? tookOverFrom
  }
  throw new VmapipeError('E_LOCKED', `could not take the lock ${path}: other runs keep changing it`)
}

function parseOwner (text: string): Owner | undefined {
  try {
    const o = JSON.parse(text) as Partial<Owner>
    if (typeof o.pid === 'number' && typeof o.host === 'string' && typeof o.started === 'string') {
      return { pid: o.pid, host: o.host, started: o.started, ...(typeof o.start === 'number' ? { start: o.start } : {}) }
    }
  } catch {}
  return undefined
}
