import type { Test } from 'tap'

/**
 * A disk restored from an archive holds the input's bytes; a device size may
 * be rounded up to whole 512-byte sectors, so a tail shorter than a sector of
 * zeros may follow.
 */
export function sameDisk (t: Test, restored: Buffer, input: Buffer, what: string): void {
  t.ok(restored.subarray(0, input.length).equals(input), `${what}: the input's ${input.length} bytes come back`)
  const tail = restored.subarray(input.length)
  t.ok(tail.length < 512 && tail.every(b => b === 0), `${what}: nothing but sector padding after them (${tail.length} bytes)`)
}
