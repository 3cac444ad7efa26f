/** What the command-line tools logged: their JSON lines on stderr (not a terminal). */
import type { RunResult } from './run.js'

export interface Logged { level: number, code?: string, msg?: string, hint?: string, [field: string]: unknown }

/** Every JSON line the run logged (a run's result, or just what it wrote to stderr). */
export function logged (r: Pick<RunResult, 'stderr'>): Logged[] {
  return r.stderr.split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Logged)
}

/** The error the run logged (level error or worse), or {} when there is none. */
export function failure (r: Pick<RunResult, 'stderr'>): Partial<Logged> {
  return logged(r).find(l => l.level >= 50) ?? {}
}
