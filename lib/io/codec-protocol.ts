/** What lib/io/compression.ts and its worker thread (compression-worker.ts) agree on. */

/** Output chunks the worker may send ahead of the reader. */
export const OUTPUT_CREDITS = 4
/** zstd's default limit (and the `zstd` program's): frames asking for a larger window are refused, not allocated. */
export const ZSTD_WINDOW_LOG_MAX = 27
