/**
 * What every command shares: parsed common options, the pino logger on
 * stderr, the progress bar on a terminal, Ctrl-C handling and the mapping of
 * errors to exit codes.
 */
import { pino, type Logger, type LevelWithSilent } from 'pino'
import { EXIT, VmapipeError } from '../errors.js'
import { ProgressBar, type ProgressSink } from '../io/progress.js'

export interface CommonOptions {
  'log-level'?: string
  quiet?: boolean
}

export const COMMON_OPTIONS = {
  'log-level': { type: 'string' },
  quiet: { type: 'boolean', short: 'q' },
  help: { type: 'boolean', short: 'h' },
} as const

export const COMMON_HELP = `Common options:
  --log-level LEVEL   trace, debug, info (default), warn, error, fatal or silent;
                      logs are JSON lines (pino) on stderr
  -q, --quiet         only errors in the log, no progress bar
  -h, --help          this text`

const LEVELS = new Set(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'])

/** A command's logger: JSON lines with the command's name and ISO times. */
export function createLogger (command: string, level: LevelWithSilent, destination: pino.DestinationStream): Logger {
  return pino({ name: 'vma', level, base: { cmd: command }, timestamp: pino.stdTimeFunctions.isoTime }, destination)
}

export class CliContext {
  readonly log: Logger
  /** stderr for log lines: the progress bar is cleared before each. */
  readonly stderr = { write: (line: string): void => { this.bar?.clear(); process.stderr.write(line) } }
  readonly signal: AbortSignal
  private bar?: ProgressBar
  private readonly quiet: boolean
  private interrupted = false
  private readonly started = Date.now()

  constructor (readonly command: string, options: CommonOptions) {
    const level = options['log-level'] ?? (options.quiet === true ? 'error' : 'info')
    if (!LEVELS.has(level)) throw new VmapipeError('E_USAGE', `unknown log level ${level}`)
    this.quiet = options.quiet === true
    this.log = createLogger(command, level as LevelWithSilent, this.stderr)
    const controller = new AbortController()
    this.signal = controller.signal
    const onSignal = (name: NodeJS.Signals): void => {
      if (this.interrupted) process.exit(EXIT.INTERRUPTED)
      this.interrupted = true
      this.log.warn({ signal: name }, 'interrupted, cleaning up')
      controller.abort()
    }
    process.on('SIGINT', onSignal)
    process.on('SIGTERM', onSignal)
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

  /** Logs a job's outcome with its duration and peak memory. */
  done (fields: Record<string, unknown>, message: string): void {
    this.stopProgress()
    this.log.info({ ...fields, seconds: (Date.now() - this.started) / 1000, maxRssKiB: process.resourceUsage().maxRSS }, message)
  }

  /** Logs the error and returns the exit code it stands for. */
  fail (err: unknown): number {
    this.stopProgress()
    if (err instanceof VmapipeError) {
      const { code, offset, device, cluster } = err
      this.log.error({ code, offset, device, cluster }, err.message)
      return err.exitCode
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
