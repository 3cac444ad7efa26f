/**
 * RawReader: a Transform from a raw disk's bytes, front to back, to one
 * ClusterRecord per 64 KiB cluster (zero 4 KiB blocks left out). The disk's
 * size is declared up front, as a VMA header needs it before any data; an
 * input shorter or longer than declared is an error, not a silent pad or cut.
 */
import { Transform, type TransformCallback } from 'node:stream'
import { VmapipeError } from '../errors.js'
import type { DeviceInfo } from '../contracts.js'
import { CLUSTER_SIZE, clusterCount, clusterFromBytes, clusterRecord } from '../record.js'
import { ByteQueue } from '../util/byte-queue.js'
import { giveBack, lend } from '../io/slabs.js'

export class RawReader extends Transform {
  /** Chunks lent from slabs (a pipe's, io/slabs.ts) are given back once cut up; a record's data is a loan of its own. */
  private readonly queue = new ByteQueue({ done: giveBack })
  private cluster = 0
  private readonly clusters: number

  constructor (private readonly device: DeviceInfo) {
    // Little queued on either side: the archive writer holds an extent of 58 clusters anyway, and what waits here are slabs
    // held (pack-vma from a pipe to a pipe: 1-2 MiB less at the peak with 4 records and 64 KiB than with 16 and 1 MiB).
    super({ readableObjectMode: true, readableHighWaterMark: 4, writableHighWaterMark: 1 << 16 })
    this.clusters = clusterCount(device.size)
  }

  override _transform (chunk: Buffer, _enc: BufferEncoding, callback: TransformCallback): void {
    this.queue.push(chunk)
    if (this.queue.consumed + this.queue.length > this.device.size) {
      callback(new VmapipeError('E_INPUT_SIZE', `the input is longer than the ${this.device.size} bytes declared`,
        { device: this.device.name, offset: this.device.size }))
      return
    }
    for (;;) {
      const wanted = this.wanted()
      const bytes = this.queue.peek(wanted)
      if (bytes === null) break
      const rec = clusterFromBytes(this.device.id, this.cluster++, bytes)
      // Lent before the queue moves on, which may give the last loan of its slab back.
      this.push(clusterRecord(rec.device, rec.cluster, rec.mask, lend(rec.data)))
      this.queue.skip(wanted)
    }
    callback()
  }

  override _flush (callback: TransformCallback): void {
    if (this.cluster < this.clusters) {
      callback(new VmapipeError('E_INPUT_SIZE', `the input ended after ${this.queue.consumed + this.queue.length} bytes; ${this.device.size} were declared`,
        { device: this.device.name, offset: this.queue.consumed + this.queue.length }))
      return
    }
    callback()
  }

  /** Bytes of the next cluster: 64 KiB, or what is left of the device. */
  private wanted (): number {
    return this.cluster >= this.clusters ? Infinity : Math.min(CLUSTER_SIZE, this.device.size - this.cluster * CLUSTER_SIZE)
  }
}
