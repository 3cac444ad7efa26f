/**
 * Every format vmapipe knows, one descriptor per format folder. Input
 * detection, choosing a format by name (disk specs, extract's output, `vma
 * info`) and the lists in help texts all come from here: adding a format is
 * its folder and one line in FORMATS.
 */
import { VmapipeError } from '../errors.js'
import type { FormatDescriptor } from '../contracts.js'
import { raw } from '../raw/descriptor.js'
import { qcow2 } from '../qcow2/descriptor.js'
import { parallels, parallelsBundle } from '../parallels/descriptor.js'
import { vma } from '../vma/descriptor.js'

export const FORMATS = [raw, qcow2, parallels, parallelsBundle, vma] as const

export type FormatName = typeof FORMATS[number]['name']

/** Formats a disk can be read from. */
export const INPUT_FORMATS: readonly FormatName[] = FORMATS.filter(f => f.kind === 'image' && f.open !== undefined).map(f => f.name)
/** Formats a disk can be written in. */
export const OUTPUT_FORMATS: readonly FormatName[] = FORMATS.filter(f => f.writer !== undefined).map(f => f.name)

/** The format a file's first bytes announce; raw (the format without magic) when none does. */
export function detectFormat (head: Buffer): FormatDescriptor {
  return FORMATS.find(f => f.detect(head)) ?? raw
}

/** The format named `name`, one of `among` (E_OPTION otherwise). */
export function formatNamed (name: string, among: readonly FormatName[] = INPUT_FORMATS): FormatDescriptor {
  const found = FORMATS.find(f => f.name === name)
  if (found === undefined || !among.includes(found.name)) {
    throw new VmapipeError('E_OPTION', `unknown format ${name} (known: ${among.join(', ')})`, { option: 'format' })
  }
  return found
}
