/**
 * VMA's descriptor, apart from the folder's public entry (index.ts) so that
 * the registry can list it without loading the reader, the writer and the index.
 */
import type { FormatDescriptor } from '../contracts.js'
import { VMA_MAGIC } from './format.js'

export const vma: FormatDescriptor<'vma'> = {
  name: 'vma',
  kind: 'archive',
  detect: head => head.subarray(0, VMA_MAGIC.length).equals(VMA_MAGIC),
}
