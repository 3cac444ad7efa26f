/** Exit status of the command-line tools, documented in the README and --help; the library knows nothing of them. */
import { VmapipeError, type ErrorFault } from '../errors.js'

export const EXIT = {
  OK: 0,
  /** The input is not a valid, complete archive or image. */
  INVALID: 1,
  /** Wrong arguments, or a call the library refuses (an option, a limit, a stream where a file is needed). */
  USAGE: 2,
  /** The system failed us: unreadable input, target exists, disk full, missing tool. */
  IO: 3,
  /** vma backup: nothing was done (another run of the job holds its lock). */
  NOTHING_DONE: 4,
  /** vma backup: the archive was written, but some old ones could not be pruned. */
  PARTLY_PRUNED: 5,
  /** Stopped by SIGINT (128 + 2, as shells report ^C); also E_INTERRUPTED, where the signal is not known. */
  INTERRUPTED: 130,
  /** Stopped by SIGTERM (128 + 15). */
  TERMINATED: 143,
} as const

const BY_FAULT: Record<ErrorFault, number> = {
  input: EXIT.INVALID,
  call: EXIT.USAGE,
  system: EXIT.IO,
  locked: EXIT.NOTHING_DONE,
  stopped: EXIT.INTERRUPTED,
}

/** The exit status for a library error: who is at fault decides. */
export function exitStatus (err: VmapipeError): number {
  return BY_FAULT[err.fault]
}
