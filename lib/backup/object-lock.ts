/**
 * The lock per VM in an object store, across hosts: an object created only
 * where none is (`If-None-Match: *` on PUT), holding its owner (host, pid,
 * process start), when it started and when it expires. The holder renews the
 * expiry while it runs, so a lock whose expiry has passed belongs to a run
 * that is gone (or cut off from the store for longer than the time to live:
 * it notices when renewing and stops). On the holder's own host its process
 * decides instead: a dead pid frees the lock at once, a live one keeps it.
 *
 * Taking over a stale lock happens holding a second object, LOCK.takeover,
 * made the same way: of two runs that find the same stale lock only one
 * deletes it, after reading it again and finding the same lock (each holds a
 * random token, so the same body is the same object). Without it
 * the slower could delete the lock the faster had just made, and both would
 * run. Object stores delete unconditionally (If-Match on DELETE is not
 * general), so the marker is what makes the delete safe.
 */
import { randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import { VmapipeError } from '../errors.js'
import { ME, processRuns } from '../io/output.js'
import type { Lock } from './lock.js'

/** What the lock needs of a store. */
export interface LockObjects {
  /** Creates `key` only where no object is; false when one is. */
  create: (key: string, body: string) => Promise<boolean>
  /** The object's body, or undefined when there is none. */
  read: (key: string) => Promise<string | undefined>
  /** Replaces the object (renewal). */
  put: (key: string, body: string) => Promise<void>
  remove: (key: string) => Promise<void>
  /** The key as the user would name it, for messages. */
  locate: (key: string) => string
}

interface ObjectOwner {
  host: string
  pid: number
  /** The process's start time (clock ticks after boot), to tell a reused pid on the same host. */
  start: number
  started: string
  expires: string
  /** Tells this run's lock from a later one of the same process. */
  token: string
}

export interface ObjectLockOptions {
  /** How long the lock holds without renewal; renewed every third of it. Default 10 minutes. */
  ttlMs?: number
}

const DEFAULT_LOCK_TTL_MS = 10 * 60_000
/** A taker holds the marker for a few requests; one older than this was left by a taker that died. */
const TAKEOVER_TTL_MS = 60_000

function parse (body: string): ObjectOwner | undefined {
  try {
    const o = JSON.parse(body) as Partial<ObjectOwner>
    if (typeof o.host === 'string' && typeof o.pid === 'number' && typeof o.started === 'string' && typeof o.expires === 'string') {
      return { host: o.host, pid: o.pid, start: typeof o.start === 'number' ? o.start : 0, started: o.started, expires: o.expires, token: String(o.token) }
    }
  } catch {}
  return undefined
}

/**
 * Throws E_LOCKED, saying who holds the lock, unless it is stale: on this
 * host, its holder's process is gone (a live one keeps it, whatever its
 * expiry says); on another, its expiry has passed. An object that is not a
 * lock at all (no run writes one) is stale.
 */
function checkStale (where: string, what: string, owner: ObjectOwner | undefined): void {
  if (owner === undefined) return
  const stale = owner.host === hostname() ? !processRuns(owner.pid, owner.start) : Date.parse(owner.expires) <= Date.now()
  if (stale) return
  throw new VmapipeError('E_LOCKED',
    `${what} is locked by pid ${owner.pid} on host ${owner.host} since ${owner.started}, until ${owner.expires} unless renewed (lock ${where})`)
}

type Holder = Pick<ObjectOwner, 'host' | 'pid' | 'started'>

/**
 * Deletes the stale lock read as `seen` holding LOCK.takeover. Returns the
 * dead owner when it deleted it, undefined when the caller should simply try
 * again; throws E_LOCKED when another run is taking over right now or the
 * lock came alive.
 */
async function takeOver (objects: LockObjects, key: string, what: string, seen: string): Promise<Holder | undefined> {
  const marker = `${key}.takeover`
  const mine = JSON.stringify(owner(TAKEOVER_TTL_MS))
  if (!await objects.create(marker, mine)) {
    const other = await objects.read(marker)
    if (other === undefined) return undefined
    const o = parse(other)
    if (o !== undefined && Date.parse(o.expires) > Date.now()) {
      throw new VmapipeError('E_LOCKED', `${what}: another run (pid ${o.pid} on ${o.host}) is taking over the stale lock ${objects.locate(key)} right now`)
    }
    // A taker that died holding the marker leaves it; after its short expiry it goes.
    const again = await objects.read(marker)
    if (again === other) await objects.remove(marker)
    return undefined
  }
  try {
    // Read again under the marker: the lock may have been taken over, and even released, since it was found stale.
    const now = await objects.read(key)
    if (now === undefined) return undefined
    const o = parse(now)
    checkStale(objects.locate(key), what, o)
    if (now !== seen) return undefined
    await objects.remove(key)
    return o ?? { host: '', pid: 0, started: 'unknown' }
  } finally {
    // Only our own marker: a slow taker past the marker's expiry must not delete the next one's.
    const m = await objects.read(marker).catch(() => undefined)
    if (m === mine) await objects.remove(marker).catch(() => {})
  }
}

function owner (ttlMs: number): ObjectOwner {
  const now = Date.now()
  return {
    host: hostname(),
    pid: process.pid,
    start: ME.start,
    started: new Date(now).toISOString(),
    expires: new Date(now + ttlMs).toISOString(),
    token: randomBytes(8).toString('hex'),
  }
}

/**
 * A store that ignores If-None-Match (older MinIO, some gateways) creates the
 * object again where it exists: every run would think it held the lock. The
 * same create once more, which must be refused, tells; it writes the same
 * bytes, so it harms nothing where it is not refused.
 */
async function checkHonoured (objects: LockObjects, key: string, what: string, body: string): Promise<void> {
  if (!await objects.create(key, body)) return
  await objects.remove(key)
  throw new VmapipeError('E_S3_UNSUPPORTED', `${what}: the store ignores conditional creates (If-None-Match: * on PUT): ` +
    `${objects.locate(key)} was created twice, so it cannot keep runs of one VM apart`, { option: 'lock' })
}

/** Takes the lock `key`, or throws E_LOCKED while a live run holds it. */
export async function acquireObjectLock (objects: LockObjects, key: string, what: string, options: ObjectLockOptions = {}): Promise<Lock> {
  const ttl = options.ttlMs ?? DEFAULT_LOCK_TTL_MS
  let tookOverFrom: Lock['tookOverFrom']
  for (let attempt = 0; attempt < 5; attempt++) {
    const me = owner(ttl)
    if (await objects.create(key, JSON.stringify(me))) {
      await checkHonoured(objects, key, what, JSON.stringify(me))
      return held(objects, key, what, me, ttl, tookOverFrom)
    }
    const seen = await objects.read(key)
    if (seen === undefined) continue // released meanwhile: try again
    checkStale(objects.locate(key), what, parse(seen))
    const dead = await takeOver(objects, key, what, seen)
    if (dead !== undefined) tookOverFrom = { pid: dead.pid, host: dead.host, started: dead.started }
  }
  throw new VmapipeError('E_LOCKED', `could not take the lock ${objects.locate(key)}: other runs keep changing it`)
}

/**
 * The lock held: renewed every third of its time to live. Renewal reads the
 * lock first; when it is no longer ours (another run took it over while this
 * one could not reach the store), or it could not be renewed before it
 * expired, `lost` aborts and the run stops.
 */
function held (objects: LockObjects, key: string, what: string, first: ObjectOwner, ttl: number, tookOverFrom: Lock['tookOverFrom']): Lock {
  const lost = new AbortController()
  let me = first
  let renewing: Promise<void> = Promise.resolve()
  const renew = async (): Promise<void> => {
    if (lost.signal.aborted) return
    try {
      const now = await objects.read(key)
      if (parse(now ?? '')?.token !== me.token) {
        lost.abort(new VmapipeError('E_LOCKED', `${what}: the lock ${objects.locate(key)} was taken over by another run; this one stops`))
        return
      }
      const next = { ...me, expires: new Date(Date.now() + ttl).toISOString() }
      await objects.put(key, JSON.stringify(next))
      me = next
    } catch (err) {
      if (Date.parse(me.expires) <= Date.now()) {
        lost.abort(new VmapipeError('E_LOCKED', `${what}: the lock ${objects.locate(key)} could not be renewed before it expired: ${(err as Error).message}`,
          { cause: err }))
      }
    }
  }
  const timer = setInterval(() => { renewing = renewing.then(renew) }, Math.max(1000, Math.floor(ttl / 3)))
  timer.unref()
  lost.signal.addEventListener('abort', () => clearInterval(timer), { once: true })
  return {
    ...(tookOverFrom !== undefined ? { tookOverFrom } : {}),
    lost: lost.signal,
    release: async () => {
      clearInterval(timer)
      await renewing
      // Only our own lock: never delete one that a later run took over.
      const now = await objects.read(key).catch(() => undefined)
      if (now !== undefined && parse(now)?.token === me.token) await objects.remove(key).catch(() => {})
    },
  }
}
