/**
 * What every command shares: parsed common options, the pino logger on
 * stderr (JSON lines, or plain lines for a person at a terminal), the
 * progress bar on a terminal, Ctrl-C handling and the mapping of errors to
 * exit codes.
 */
import { createRequire } from 'node:module'
import type { DestinationStream, Logger, LevelWithSilent, pino as Pino } from 'pino'
import { VmapipeError, describePlace } from '../errors.js'
import { EXIT, exitStatus } from './exit.js'
import { ProgressBar } from '../io/progress.js'
import type { ProgressSink } from '../contracts.js'

export interface CommonOptions {
  'log-level'?: string
  'log-format'?: string
  quiet?: boolean
}

const LEVELS = new Set(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'])
const LEVEL_NAMES: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warning', 50: 'error', 60: 'fatal' }
/** Fields every log line has; a plain line leaves them out. */
const STANDARD_FIELDS = new Set(['level', 'time', 'cmd', 'name', 'msg', 'pid', 'hostname'])
/** Signal numbers for the exit code 128 + n, as shells report a killed job. */
const SIGNAL_EXIT: Partial<Record<NodeJS.Signals, number>> = { SIGINT: EXIT.INTERRUPTED, SIGTERM: EXIT.TERMINATED }

/** What a person can do about an error with this code. */
const HINTS: Partial<Record<string, string>> = {
  E_VMA_MAGIC: 'is it a VMA archive (.vma, .vma.zst, .vma.gz, .vma.lzo)?',
  E_VMA_TRUNCATED: 'the archive ends early: was it copied or written completely?',
  E_VMA_HEADER_MD5: 'the archive is damaged; vma verify reports the first problem',
  E_VMA_EXTENT_MD5: 'the archive is damaged; vma verify reports the first problem',
  E_TARGET_EXISTS: 'name a path that does not exist yet',
  E_TOOL_MISSING: 'install the program named above (e.g. apt-get install zstd lzop)',
  E_JOB: 'examples/backup-job.json shows every key of a job file',
  E_LOCKED: 'another run of this job is still working; nothing was done',
  E_S3_ACCESS: 'check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket\'s policy',
  E_S3_NETWORK: 'is the store up, and --s3-endpoint (or VMAPIPE_S3_ENDPOINT) its URL?',
  E_S3_REQUEST: 'a store that rejects a checksum takes --s3-checksum md5 or none; one that wants the bucket in the host name, --s3-virtual-host',
  E_S3_UNSUPPORTED: 'this store does not do what was asked (see Object storage in the README)',
}

/**
 * The flag (or job file key) that sets a library option, per command: the
 * library names the option an error is about, the command tells its user how
 * to give it. pack-vma's flags differ from vma create's.
 */
const FLAGS: Partial<Record<string, Partial<Record<string, string>>>> = {
  followBacking: { create: '--follow-backing', 'pack-vma': '--follow-backing', backup: '"followBacking": true on the disk in the job file' },
  size: { create: '-d size=BYTES:NAME=PATH', 'pack-vma': '--size BYTES', backup: '"size" on the disk in the job file' },
  format: {
    create: '-d format=FMT:NAME=PATH',
    'pack-vma': '--format FORMAT',
    extract: '--format FORMAT',
    info: '--format FORMAT',
    backup: '"format" on the disk in the job file',
  },
  force: { create: '--force', 'pack-vma': '--force', extract: '--force' },
  devices: { extract: '-d DRIVE' },
  dataFile: { extract: '--data-file' },
  clusterSize: { extract: '--cluster-size' },
  uuid: { create: '--uuid', 'pack-vma': '--uuid' },
  names: { serve: '--name' },
  maxConnections: { serve: '--max-connections' },
  dirtyBitmap: { create: '-d dirty-bitmap=NAME:NAME=PATH', 'pack-vma': '--dirty-bitmap', incremental: '--dirty-bitmap' },
  lock: { backup: '"lock": "none" in the job file', prune: '--no-lock' },
}

/** Codes of a call the library refused, where the command's usage is what to read when no flag is named. */
const USAGE_HINTED = new Set(['E_USAGE', 'E_OPTION', 'E_INPUT_SIZE_UNKNOWN', 'E_NOT_SEEKABLE', 'E_BACKING', 'E_TERMINAL'])

/** A command's logger: JSON lines with the command's name and ISO times. */
export function createLogger (command: string, level: LevelWithSilent, destination: DestinationStream): Logger {
  // Required here, on first use: a command that logs nothing (vma list, config) does not load pino's thirty modules.
  const { pino } = createRequire(import.meta.url)('pino') as { pino: typeof Pino }
  return pino({ name: 'vma', level, base: { cmd: command }, timestamp: pino.stdTimeFunctions.isoTime }, destination)
}

/** The built-in modules the extract and pack jobs import, for capYoungGeneration. */
export const JOB_BUILTINS = ['node:child_process', 'node:zlib', 'node:os', 'node:fs', 'node:fs/promises', 'node:crypto', 'node:net',
  'node:tty', 'node:stream', 'node:stream/promises']

/**
 * Keeps V8's young generation at the size it has once a command's modules are loaded (the runner calls this
 * before run(), or a command that imports its jobs when it runs, before it does): V8 doubles it, up to 16 MiB
 * a semi-space, whenever survivors add up over collections, as loading modules and a job's records and buffers
 * do, and keeps it. At 1 GiB this took 2-3 MiB off peak RSS (verify, pack-vma). Only the growth factor works at
 * run time (V8 reads --max-semi-space-size once, as it sets up the heap), and any V8 flag set makes node compile
 * the built-in modules it loads after without their code cache (+20 ms at start when on node's command line),
 * so `builtins` a command's jobs are about to import are loaded first; one left out only loads slower.
 * node:v8 is imported here, not at load: it brings the stream modules, which --help does not use.
 */
export async function capYoungGeneration (builtins: readonly string[] = []): Promise<void> {
  await Promise.all(builtins.map(async name => await import(name)))
  const { setFlagsFromString } = await import('node:v8')
  setFlagsFromString('--semi-space-growth-factor=1')
}

function fieldText (value: unknown): string {
  if (Array.isArray(value)) return value.map(fieldText).join(',')
  return typeof value === 'object' && value !== null ? JSON.stringify(value) : String(value)
}

/**
 * One pino JSON line as a person reads it: `vma: what went wrong (CODE,
 * device D, cluster C, byte N)` and the hint for an error; `vma: warning:
 * ...`; info with its other fields as key=value. Anything not JSON passes
 * as is.
 */
function plainLine (line: string, program: string): string {
  let record: Record<string, unknown>
  try {
    record = JSON.parse(line) as Record<string, unknown>
  } catch {
    return line
  }
  const level = Number(record.level)
  const msg = String(record.msg ?? '')
  if (level >= 50) {
    const { code, offset, device, cluster, hint } = record as { code?: string, offset?: number, device?: string, cluster?: number, hint?: string }
    const place = describePlace({ offset, device, cluster })
    const what = place !== '' && msg.endsWith(place) ? msg.slice(0, -place.length) : msg
    const parts = [code, device !== undefined ? `device ${device}` : undefined, cluster !== undefined ? `cluster ${cluster}` : undefined,
      offset !== undefined ? `byte ${offset}` : undefined].filter(p => p !== undefined)
    return `${program}: ${what}${parts.length > 0 ? ` (${parts.join(', ')})` : ''}\n${hint !== undefined ? `${program}: hint: ${hint}\n` : ''}`
  }
  // Fields the sentence already says (a path, a name) are left out, and empty ones.
  const fields = Object.entries(record).map(([k, v]) => [k, fieldText(v)]).filter(([k, v]) => !STANDARD_FIELDS.has(k) && v !== 'undefined' && v !== '' &&
    !(v.length >= 4 && msg.includes(v))).map(([k, v]) => `${k}=${v}`)
  const prefix = level === 30 ? '' : `${LEVEL_NAMES[level] ?? 'log'}: `
  return `${program}: ${prefix}${msg}${fields.length > 0 ? ` (${fields.join(' ')})` : ''}\n`
}

export class CliContext {
  private logger?: Logger
  private readonly level: LevelWithSilent
  /** stderr for log lines: the progress bar is cleared before each; plain text for a person. */
  readonly stderr = { write: (line: string): void => { this.bar?.clear(); process.stderr.write(this.text ? plainLine(line, this.program) : line) } }
  /** Log lines are plain text (a terminal, or --log-format text) rather than JSON. */
  readonly text: boolean
  private readonly controller = new AbortController()
  /** A command took the signal, promising to stop and clean up when it aborts. */
  private abortable = false
  private bar?: ProgressBar
  private readonly quiet: boolean
  /** The signal that stopped us, once one came. */
  private interrupted?: NodeJS.Signals
  private readonly started = Date.now()

  constructor (readonly command: string, options: CommonOptions, readonly program = 'vma') {
    const level = options['log-level'] ?? (options.quiet === true ? 'warn' : 'info')
    if (!LEVELS.has(level)) throw new VmapipeError('E_USAGE', `unknown log level ${level} (trace, debug, info, warn, error, fatal or silent)`)
    const format = options['log-format']
    if (format !== undefined && format !== 'json' && format !== 'text') throw new VmapipeError('E_USAGE', `--log-format ${format}: choose json or text`)
    this.text = format === 'text' || (format === undefined && process.stderr.isTTY === true)
    this.quiet = options.quiet === true
    this.level = level as LevelWithSilent
    const onSignal = (name: NodeJS.Signals): void => {
      // A second signal (the user insists), or a command that has nothing to clean up: stop now.
      if (this.interrupted !== undefined || !this.abortable) {
        this.log.error({ code: 'E_INTERRUPTED', signal: name }, `interrupted by ${name}`)
        process.exit(SIGNAL_EXIT[name] ?? EXIT.INTERRUPTED)
      }
      this.interrupted = name
      this.log.warn({ signal: name }, 'interrupted, cleaning up')
      this.controller.abort()
    }
    process.on('SIGINT', onSignal)
    process.on('SIGTERM', onSignal)
  }

  /** The command's logger, made when first used. */
  get log (): Logger {
    this.logger ??= createLogger(this.command, this.level, this.stderr)
    return this.logger
  }

  /** Whether debug lines are logged, asked without making the logger. */
  get debugging (): boolean {
    return this.level === 'debug' || this.level === 'trace'
  }

  /**
   * Aborts on SIGINT or SIGTERM. A command that takes it stops through it and
   * cleans up; until one does, a signal ends the process at once.
   */
  get signal (): AbortSignal {
    this.abortable = true
    return this.controller.signal
  }

  /** A progress bar when stderr is a terminal and not quiet; otherwise nothing. */
  progress (label: string, total?: number): ProgressSink | undefined {
    if (this.quiet || process.stderr.isTTY !== true) return undefined
    this.bar = new ProgressBar(process.stderr, label, total)
    return this.bar
  }

  stopProgress (): void {
    this.bar?.stop()
    this.bar = undefined
  }

  /**
   * Logs a job's outcome with its duration and peak memory: a JSON line, or
   * on a terminal the `summary` a person reads, with the time it took.
   */
  done (fields: Record<string, unknown>, message: string, summary: string): void {
    this.stopProgress()
    const seconds = (Date.now() - this.started) / 1000
    if (!this.text) this.log.info({ ...fields, seconds, maxRssKiB: process.resourceUsage().maxRSS }, message)
    else if (this.log.isLevelEnabled('info')) process.stderr.write(`${this.program}: ${summary} in ${seconds.toFixed(1)} s\n`)
  }

  /** 130 after SIGINT, 143 after SIGTERM; undefined while no signal came. */
  get signalExit (): number | undefined {
    return this.interrupted === undefined ? undefined : SIGNAL_EXIT[this.interrupted] ?? EXIT.INTERRUPTED
  }

  private get invocation (): string {
    return this.program === 'vma' ? `vma ${this.command}` : this.program
  }

  /** The hint that names this command's flag for the option an error is about; undefined when it names none or the command has no such flag. */
  flagHint ({ code, option }: { code: string, option?: string }): string | undefined {
    const flag = option === undefined ? undefined : FLAGS[option]?.[this.command]
    if (flag === undefined) return undefined
    if (code === 'E_BACKING') return `${flag} reads the whole chain (each file in its image's directory)`
    if (code === 'E_INPUT_SIZE_UNKNOWN') return `give the size with ${flag}`
    if (code === 'E_TARGET_EXISTS') return `name a path that does not exist yet, or see ${flag} in ${this.invocation} --help`
    return `see ${flag} in ${this.invocation} --help`
  }

  /** What a person can do about an error, if we know: the flag for the option it is about, else a hint for its code. */
  hint (err: { code: string, option?: string }): string | undefined {
    const { code } = err
    const flag = this.flagHint(err)
    if (flag !== undefined) return flag
    if (USAGE_HINTED.has(code)) return `${this.invocation} --help shows the usage`
    if (code === 'E_NOT_FOUND' && (this.command === 'extract' || this.command === 'config')) {
      return 'vma list ARCHIVE shows the devices and config blobs it holds'
    }
    if (code === 'E_INPUT_FORMAT') {
      const flag = this.program === 'vma' && this.command !== 'info' ? '-d format=raw:NAME=PATH' : '--format raw'
      return `to pack the bytes as they are: ${flag}`
    }
    return HINTS[code]
  }

  /** Logs the error and returns the exit code it stands for. */
  fail (err: unknown): number {
    this.stopProgress()
    // After a signal the cause is the signal, whatever a helper or stream said as it was torn down.
    if (this.signalExit !== undefined) {
      this.log.error({ code: 'E_INTERRUPTED', signal: this.interrupted }, `interrupted by ${this.interrupted}`)
      return this.signalExit
    }
    if (err instanceof VmapipeError) {
      const { code, offset, device, cluster } = err
      this.log.error({ code, offset, device, cluster, hint: this.hint(err) }, err.message)
      return exitStatus(err)
    }
    const e = err as NodeJS.ErrnoException
    this.log.error({ code: e?.code, err: e }, e?.message ?? String(err))
    return EXIT.IO
  }
}

/** Writes text to stdout; a reader that went away (EPIPE) is not our failure. */
export async function writeOut (text: string | Buffer): Promise<void> {
  await new Promise<void>(resolve => {
    process.stdout.once('error', () => resolve())
    process.stdout.write(text, () => resolve())
  })
}

/**
 * Refuses to write binary data to a terminal, as gzip and zstd do: it would
 * garble the screen and be lost. A pipe or a file is fine.
 */
export function refuseTerminal (what: string, remedy: string): void {
  if (process.stdout.isTTY === true) throw new VmapipeError('E_USAGE', `${what} not written to a terminal; ${remedy}`)
}
