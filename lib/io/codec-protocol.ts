/** What lib/io/compression.ts and its worker thread (compression-worker.ts) agree on. */

/** Output chunks the worker may send ahead of the reader. */
export const OUTPUT_CREDITS = 4
