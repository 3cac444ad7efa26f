/**
 * A one-line progress display (bytes, rate, ETA) for terminals, and a counting
 * pass-through that feeds it.
 */
import type { Transform } from 'node:stream'
import type { ProgressSink } from '../contracts.js'

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']

export function formatBytes (n: number): string {
  let i = 0
  while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++ }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${UNITS[i]}`
}

function formatDuration (seconds: number): string {
  const s = Math.round(seconds)
  const h = Math.floor(s / 3600)
  const m = Math.floor((s % 3600) / 60)
  return `${h > 0 ? `${h}:` : ''}${String(m).padStart(h > 0 ? 2 : 1, '0')}:${String(s % 60).padStart(2, '0')}`
}

/**
 * Counts the bytes that flow through. Loaded only when a progress bar is
 * shown: through2 brings readable-stream, which costs memory on every run.
 */
export async function counter (sink: ProgressSink): Promise<Transform> {
  const { default: through2 } = await import('through2')
  return through2({ highWaterMark: 1 << 20 }, function (chunk: Buffer, _enc, callback) {
    sink.add(chunk.length)
    callback(null, chunk)
  })
}

export class ProgressBar implements ProgressSink {
  private done = 0
  private readonly started = Date.now()
  private timer?: NodeJS.Timeout
  private shown = false

  constructor (private readonly out: NodeJS.WriteStream, private readonly label: string, private readonly total?: number) {
    this.timer = setInterval(() => this.draw(), 250)
    this.timer.unref()
    this.draw()
  }

  add (bytes: number): void { this.done += bytes }

  /** Wipes the line so that something else can be printed. */
  clear (): void {
    if (this.shown) this.out.write('\r\x1b[K')
    this.shown = false
  }

  stop (): void {
    clearInterval(this.timer)
    this.timer = undefined
    this.clear()
  }

  private draw (): void {
    const elapsed = (Date.now() - this.started) / 1000
    const rate = elapsed > 0 ? this.done / elapsed : 0
    let line = `${this.label} ${formatBytes(this.done)}`
    if (this.total !== undefined && this.total > 0) {
      const fraction = Math.min(1, this.done / this.total)
      const width = 24
      const filled = Math.round(fraction * width)
      const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`
      line = `${this.label} ${bar} ${(fraction * 100).toFixed(0).padStart(3)}% ${formatBytes(this.done)}/${formatBytes(this.total)}`
      line += `  ETA ${rate > 0 ? formatDuration((this.total - this.done) / rate) : '--:--'}`
    }
    line += `  ${formatBytes(rate)}/s`
    this.out.write(`\r\x1b[K${line.slice(0, Math.max(20, (this.out.columns || 80) - 1))}`)
    this.shown = true
  }
}
