/**
 * RecordMerger: one record stream from the ArchiveInfo and the record streams
 * of several disks. Records are taken from whichever disk has them ready, so
 * disks are read concurrently and interleave in extents as they would in a
 * live backup; each source keeps its own order (vmstate stays in order).
 * With `sequential`, each disk is read to its end before the next starts.
 * Memory is bounded by the sources' own buffers and this stream's.
 */
import { Readable } from 'node:stream'
import type { ArchiveInfo, ClusterRecord } from '../contracts.js'

export class RecordMerger extends Readable {
  private started = false
  private readonly done: boolean[]
  private ended = 0
  private wanting = false
  private next = 0

  constructor (private readonly info: ArchiveInfo, private readonly sources: Readable[], private readonly sequential = false) {
    super({ objectMode: true, highWaterMark: 16 })
    this.done = sources.map(() => false)
    // Sequential: a disk is listened to (and so starts filling its buffers) only once the one before it has ended.
    const listen = (i: number): void => { sources[i]?.on('readable', () => this.fill()) }
    sources.forEach((source, i) => {
      if (!sequential || i === 0) listen(i)
      source.on('end', () => {
        this.done[i] = true
        if (sequential) listen(i + 1)
        if (++this.ended === this.sources.length) this.push(null)
        else this.fill()
      })
      source.on('error', (err: Error) => this.destroy(err))
    })
  }

  override _read (): void {
    if (!this.started) {
      this.started = true
      this.push(this.info)
      if (this.sources.length === 0) this.push(null)
    }
    this.wanting = true
    this.fill()
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    for (const source of this.sources) source.destroy()
    callback(err)
  }

  /** Takes records round-robin (or from the current source) while there is room downstream. */
  private fill (): void {
    if (!this.started) return
    let idle = 0
    while (this.wanting && idle < this.sources.length) {
      const i = this.next
      const rec = this.done[i] ? null : this.sources[i].read() as ClusterRecord | null
      if (rec === null) {
        // Sequential: wait for more of the current disk until it has ended.
        if (this.sequential && !this.done[i]) return
        this.next = (i + 1) % this.sources.length
        idle++
        continue
      }
      if (!this.sequential) this.next = (i + 1) % this.sources.length
      idle = 0
      this.wanting = this.push(rec)
    }
  }
}
