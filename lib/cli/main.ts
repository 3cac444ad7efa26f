/** `vma COMMAND ...`: dispatch, help, and the exit code. */
import { readFileSync } from 'node:fs'
import { VmapipeError } from '../errors.js'
import { EXIT } from './exit.js'
import { COMMON_HELP, type Command, parseCommandLine, usageOf } from './command.js'
import { COMMANDS } from './commands.js'
import type { CliContext, CommonOptions } from './context.js'

const EXIT_HELP = `Exit codes:
  0    success
  1    the archive or image is invalid, damaged or incomplete
  2    wrong arguments, binary output to a terminal, or a device or blob
       that does not exist
  3    system failure: unreadable input, target exists, disk full, missing tool
  4    vma backup: nothing done, another run holds the job's lock
  5    vma backup: archive written, but some old archives could not be pruned
  130  interrupted by SIGINT (Ctrl-C); partial output was removed
  143  stopped by SIGTERM; partial output was removed`

function usage (): string {
  const width = Math.max(...COMMANDS.map(c => c.name.length))
  return `Usage: vma COMMAND [options]

Streams Proxmox VMA backups: .vma, .vma.zst, .vma.gz, .vma.lzo, from a file, stdin (-) or a bucket (s3://BUCKET/KEY).

Commands:
${COMMANDS.map(c => `  ${c.name.padEnd(width)}  ${c.summary}`).join('\n')}

Run vma COMMAND --help for its options and examples.

${COMMON_HELP}

${EXIT_HELP}
`
}

function version (): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }
  return pkg.version
}

export async function main (argv: string[]): Promise<number> {
  const [name, ...args] = argv
  if (name === undefined || name === '-h' || name === '--help' || name === 'help') {
    process.stdout.write(usage())
    return name === undefined ? EXIT.USAGE : EXIT.OK
  }
  if (name === '--version' || name === '-V') {
    process.stdout.write(`vmapipe ${version()}\n`)
    return EXIT.OK
  }
  const entry = COMMANDS.find(c => c.name === name)
  if (entry === undefined) {
    process.stderr.write(`vma: unknown command ${name}\n\n${usage()}`)
    return EXIT.USAGE
  }
  return await runCommand(await entry.load(), args, 'vma')
}

/** Runs one command with its own argument list; also the entry of pack-vma. */
export async function runCommand (command: Command, args: string[], program: string): Promise<number> {
  const invocation = program === 'vma' ? `vma ${command.name}` : program
  let parsed
  try {
    parsed = parseCommandLine(command, args)
  } catch (err) {
    process.stderr.write(`${program}: ${(err as Error).message}\n${usageOf(command)}\nTry '${invocation} --help' for more.\n`)
    return EXIT.USAGE
  }
  if (parsed.values.help === true) {
    process.stdout.write(`${command.help}\n\n${COMMON_HELP}\n\n${EXIT_HELP}\n`)
    return EXIT.OK
  }
  if (parsed.values.version === true) {
    process.stdout.write(`vmapipe ${version()}\n`)
    return EXIT.OK
  }
  // The logger (pino) is loaded only for a command that runs, not for its --help.
  const { CliContext, capYoungGeneration } = await import('./context.js')
  let ctx: CliContext
  try {
    ctx = new CliContext(command.name, parsed.values as CommonOptions, program)
  } catch (err) {
    process.stderr.write(`${program}: ${(err as Error).message}\n`)
    return EXIT.USAGE
  }
  if (ctx.debugging) ctx.log.debug({ args }, 'starting')
  if (command.capsYoungGeneration !== true) await capYoungGeneration()
  try {
    return await command.run(parsed.positionals, parsed.values, ctx)
  } catch (err) {
    const code = ctx.fail(err)
    // Below the JSON line, the mistake in a sentence and what to do (the flag, or where to read the usage); a terminal already has it as text.
    if (err instanceof VmapipeError && code === EXIT.USAGE && !ctx.text) {
      const hint = ctx.flagHint(err)
      process.stderr.write(`${program}: ${err.message}\n${hint !== undefined ? `${program}: hint: ${hint}\n` : ''}Try '${invocation} --help'.\n`)
    }
    return code
  }
}
