/**
 * DeviceRouter: the sink end of a record pipeline. It hands each record to the
 * DiskWriter of its device and takes the next record, of any device, only
 * when that writer says so. Devices therefore share one queue: a slow device
 * slows them all, but every wait is for a write that finishes on its own
 * (positional files, a pipe that drains), so nothing deadlocks and nothing is
 * buffered without bound; there are no per-device child streams that would
 * all have to be drained.
 */
import { Writable } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { DiskWriter, StreamItem, WriterFactory } from '../contracts.js'

export class DeviceRouter extends Writable {
  private readonly writers = new Map<number, DiskWriter>()
  private opening?: Promise<void>
  private opened = false

  constructor (private readonly open: WriterFactory) {
    super({ objectMode: true, highWaterMark: 4 })
  }

  override _write (item: StreamItem, _enc: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (item.kind === 'archive') {
      this.opening = this.open(item, (device, writer) => this.writers.set(device, writer))
      this.opening.then(() => {
        this.opened = true
        callback()
      }, callback)
      return
    }
    const writer = this.writers.get(item.device)
    if (writer === undefined) { callback(); return }
    let wait: Promise<void> | undefined
    try {
      wait = writer.write(item)
    } catch (err) {
      callback(err as Error)
      return
    }
    if (wait === undefined) callback()
    else wait.then(() => callback(), callback)
  }

  override _final (callback: (err?: Error | null) => void): void {
    if (!this.opened) { callback(new VmapipeError('E_RECORD', 'the record stream ended before its ArchiveInfo')); return }
    Promise.all([...this.writers.values()].map(async w => await w.finish())).then(() => callback(), callback)
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    const abortAll = async (): Promise<void> => {
      await this.opening?.catch(() => {})
      await Promise.allSettled([...this.writers.values()].map(async w => await w.abort()))
    }
    abortAll().then(() => callback(err), () => callback(err))
  }
}
