import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'

/** V8's collector as `gc(options)` would call it: a scavenge of the young generation (`minor`) or a full collection. */
export type Collector = (options?: { type: 'minor' | 'major' }) => void

/**
 * V8's gc(), taken without `--expose-gc` on node's command line: the flag is set only while a
 * fresh context is made, which then holds gc() for good, and unset at once so nothing else sees it.
 */
export function v8Collector (): Collector {
  setFlagsFromString('--expose-gc')
  try {
    return runInNewContext('gc') as Collector
  } finally {
    setFlagsFromString('--no-expose-gc')
  }
}
