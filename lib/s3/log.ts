/** Where the S3 transport reports what it did: pino's methods fit. */
export interface S3Log {
  debug?: (fields: Record<string, unknown>, message: string) => void
  info: (fields: Record<string, unknown>, message: string) => void
  warn: (fields: Record<string, unknown>, message: string) => void
}

/** Bytes per second over `ms` milliseconds, rounded. */
export function rate (bytes: number, ms: number): number {
  return Math.round(bytes / Math.max(ms, 1) * 1000)
}
