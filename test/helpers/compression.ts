/** Shared by the compression tests: the kinds with their programs, and a PATH without any of them. */
import { mkdirSync, symlinkSync } from 'node:fs'
import { join } from 'node:path'

export const KINDS: Array<{ kind: string, ext: string, pack: string, unpack: string }> = [
  { kind: 'zstd', ext: '.zst', pack: 'zstd -q -c', unpack: 'zstd -q -d -c' },
  { kind: 'lzo', ext: '.lzo', pack: 'lzop -c', unpack: 'lzop -d -c' },
  { kind: 'gzip', ext: '.gz', pack: 'gzip -c', unpack: 'gzip -d -c' },
]

/** A directory holding only a link to node: the PATH of a machine without any compression program. */
export function barePath (dir: string): string {
  const bin = join(dir, 'bare-bin')
  mkdirSync(bin)
  symlinkSync(process.execPath, join(bin, 'node'))
  return bin
}

/** The environment that runs the `zstd` and `lzop` programs, as earlier versions did. */
export const EXTERNAL = { VMAPIPE_EXTERNAL_COMPRESSION: '1' }

/** The last JSON log line of a run. */
export function lastLog (stderr: string): Record<string, unknown> {
  const lines = stderr.trim().split('\n').filter(l => l.startsWith('{'))
  return JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>
}
