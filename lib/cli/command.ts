/** The shape of a command module, and argument parsing shared by all of them. */
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { VmapipeError } from '../errors.js'
import type { CliContext } from './context.js'

type OptionSpec = NonNullable<ParseArgsConfig['options']>

export interface Command {
  name: string
  /** The full --help text. */
  help: string
  options: OptionSpec
  run: (positionals: string[], values: Record<string, unknown>, ctx: CliContext) => Promise<number>
  /** run() calls capYoungGeneration() (context.ts) itself, before it imports its jobs; otherwise the runner calls it before run(). */
  capsYoungGeneration?: boolean
}

/** Options every command takes (here, not in context.ts, so that parsing and help load no logger). */
const COMMON_OPTIONS = {
  'log-level': { type: 'string' },
  'log-format': { type: 'string' },
  quiet: { type: 'boolean', short: 'q' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'V' },
} as const

export const COMMON_HELP = `Common options:
  --log-level LEVEL   trace, debug, info (default), warn, error, fatal or silent
  --log-format FMT    text (plain lines, the default when stderr is a terminal)
                      or json (JSON lines, pino; the default otherwise)
  -q, --quiet         no progress bar and no info lines; warnings and errors
                      are still shown
  -h, --help          this text
  -V, --version       the version of vmapipe`

/** The Usage: lines at the top of a command's help. */
export function usageOf (command: Command): string {
  return command.help.split('\n\n')[0]
}

export function parseCommandLine (command: Command, args: string[]): { positionals: string[], values: Record<string, unknown> } {
  try {
    const { positionals, values } = parseArgs({ args, options: { ...COMMON_OPTIONS, ...command.options }, allowPositionals: true, strict: true })
    return { positionals, values }
  } catch (err) {
    throw new VmapipeError('E_USAGE', parseErrorText(err as Error & { code?: string }))
  }
}

/** Our own words for what node:util's parseArgs refused (its text tells about JavaScript, not about us). */
function parseErrorText (err: Error & { code?: string }): string {
  const option = (/'([^']*)'/.exec(err.message)?.[1] ?? '').replace(/ <value>$/, '')
  if (err.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') return `unknown option ${option}`
  if (err.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    if (/does not take an argument/.test(err.message)) return `option ${option} takes no value`
    if (/ambiguous/.test(err.message)) return `option ${option} needs a value; for one that starts with -, write it as --name=VALUE`
    return `option ${option} needs a value`
  }
  return err.message.split('\n')[0]
}

/** Checks the number of positional arguments. */
export function expectPositionals (positionals: string[], min: number, max: number, what: string): void {
  if (positionals.length < min || positionals.length > max) {
    throw new VmapipeError('E_USAGE', positionals.length < min ? `missing ${what}` : `unexpected argument ${positionals[max]}`)
  }
}

/** `-d a,b -d c` -> [a, b, c] */
export function listOption (value: unknown): string[] | undefined {
  if (value === undefined) return undefined
  const items = (Array.isArray(value) ? value : [value]).flatMap(v => String(v).split(',')).filter(v => v !== '')
  return items.length > 0 ? items : undefined
}

/** `60`, `0.5` (seconds, 0 for none) -> milliseconds. */
export function parseSeconds (value: unknown, what: string): number | undefined {
  if (value === undefined) return undefined
  const seconds = /^\d+(\.\d+)?$/.test(String(value).trim()) ? Number(value) : NaN
  if (!Number.isFinite(seconds)) throw new VmapipeError('E_USAGE', `${what}: ${String(value)} is not a number of seconds (e.g. 60, 0.5)`)
  return Math.round(seconds * 1000)
}

const SIZE_UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }

/** `540672`, `64K`, `10G`, `1.5M` (binary units) -> bytes. */
export function parseSize (value: unknown, what: string): number | undefined {
  if (value === undefined) return undefined
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i.exec(String(value).trim())
  const bytes = m === null ? NaN : Math.round(Number(m[1]) * SIZE_UNITS[m[2].toUpperCase()])
  if (!Number.isSafeInteger(bytes)) throw new VmapipeError('E_USAGE', `${what}: ${String(value)} is not a size (e.g. 540672, 64K, 10G)`)
  return bytes
}
