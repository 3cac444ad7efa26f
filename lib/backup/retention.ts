/**
 * Which archives a retention policy keeps, as Proxmox prunes: the rules run
 * in order (last, hourly, daily, weekly, monthly, yearly) over the archives
 * newest first. keep-last N keeps the N newest. keep-daily N keeps the newest
 * archive of each of the N newest days not already covered by a kept
 * archive, and so on for hours, ISO weeks, months and years. Protected archives are never removed and do not
 * count; when no rule is given, everything is kept.
 */
export interface Retention {
  'keep-last'?: number
  'keep-hourly'?: number
  'keep-daily'?: number
  'keep-weekly'?: number
  'keep-monthly'?: number
  'keep-yearly'?: number
}

/** The rules, in the order they apply. */
export const RETENTION_KEYS = ['keep-last', 'keep-hourly', 'keep-daily', 'keep-weekly', 'keep-monthly', 'keep-yearly'] as const

export interface PruneItem {
  name: string
  time: Date
  protected: boolean
}

export type PruneMark = 'keep' | 'remove' | 'protected'

const pad = (n: number): string => String(n).padStart(2, '0')

/** ISO 8601 week-numbering year and week of the local calendar date (UTC arithmetic: no DST steps). */
function isoWeek (time: Date): string {
  const d = new Date(Date.UTC(time.getFullYear(), time.getMonth(), time.getDate()))
  d.setUTCDate(d.getUTCDate() + 4 - (d.getUTCDay() || 7)) // the Thursday of the week decides the year
  const week = Math.ceil(((d.getTime() - Date.UTC(d.getUTCFullYear(), 0, 1)) / 86400000 + 1) / 7)
  return `${d.getUTCFullYear()}/${pad(week)}`
}

const RULES: Array<[keyof Retention, (item: PruneItem) => string]> = [
  ['keep-last', item => item.name],
  ['keep-hourly', item => `${item.time.getFullYear()}/${pad(item.time.getMonth() + 1)}/${pad(item.time.getDate())} ${pad(item.time.getHours())}`],
  ['keep-daily', item => `${item.time.getFullYear()}/${pad(item.time.getMonth() + 1)}/${pad(item.time.getDate())}`],
  ['keep-weekly', item => isoWeek(item.time)],
  ['keep-monthly', item => `${item.time.getFullYear()}/${pad(item.time.getMonth() + 1)}`],
  ['keep-yearly', item => String(item.time.getFullYear())],
]

export function planPrune (items: PruneItem[], policy: Retention): Map<string, PruneMark> {
  const marks = new Map<string, PruneMark>()
  const newestFirst = [...items].sort((a, b) => b.time.getTime() - a.time.getTime() || (a.name < b.name ? 1 : -1))
  for (const item of newestFirst) if (item.protected) marks.set(item.name, 'protected')
  const any = RULES.some(([key]) => (policy[key] ?? 0) > 0)
  for (const [key, period] of RULES) {
    const keep = policy[key] ?? 0
    if (keep <= 0) continue
    const covered = new Set(newestFirst.filter(i => marks.get(i.name) === 'keep').map(period))
    const chosen = new Set<string>()
    for (const item of newestFirst) {
      if (marks.has(item.name)) continue
      const id = period(item)
      if (covered.has(id)) continue
      if (chosen.has(id)) {
        marks.set(item.name, 'remove')
        continue
      }
      if (chosen.size >= keep) break
      chosen.add(id)
      marks.set(item.name, 'keep')
    }
  }
  for (const item of newestFirst) if (!marks.has(item.name)) marks.set(item.name, any ? 'remove' : 'keep')
  return marks
}
