/**
 * The per-device rules of a VMA record stream, shared by the reader (which
 * finds them broken in an archive) and the writer (which refuses to break
 * them): clusters inside the device, no data past its end, vmstate in order,
 * every cluster once, and at the end every cluster present.
 */
import { VmapipeError } from '../errors.js'
import type { DeviceInfo } from '../contracts.js'
import { VMSTATE_NAME, blocksInside, clusterCount, popcount16 } from '../record.js'
import { ClusterSet } from '../util/cluster-set.js'
import { type ExtentHeader, blockInfoOffset } from './format.js'

type RuleBroken = 'CLUSTER_RANGE' | 'VMSTATE_ORDER' | 'DUPLICATE'

export interface TrackedDevice {
  info: DeviceInfo
  /** Clusters the device has. */
  clusters: number
  seen: ClusterSet
  /** Next vmstate cluster, or -1 for ordinary disks. */
  nextInOrder: number
  zeroClusters: number
  dataBlocks: number
}

export function trackDevice (info: DeviceInfo): TrackedDevice {
  return { info, clusters: clusterCount(info.size), seen: new ClusterSet(), nextInOrder: info.name === VMSTATE_NAME ? 0 : -1, zeroClusters: 0, dataBlocks: 0 }
}

/** Records one cluster of `dev`; returns the rule it breaks, if any, with a message. */
export function trackCluster (dev: TrackedDevice, cluster: number, mask: number): { rule: RuleBroken, message: string } | undefined {
  if (!Number.isInteger(cluster) || cluster < 0 || cluster >= dev.clusters) {
    return { rule: 'CLUSTER_RANGE', message: `cluster is past the end of the device (${dev.clusters} clusters, ${dev.info.size} bytes)` }
  }
  if ((mask & ~blocksInside(dev.info.size, cluster)) !== 0) {
    return { rule: 'CLUSTER_RANGE', message: `mask 0x${mask.toString(16)} has blocks past the end of the device (${dev.info.size} bytes)` }
  }
  if (dev.nextInOrder >= 0) {
    if (cluster !== dev.nextInOrder) return { rule: 'VMSTATE_ORDER', message: `vmstate cluster out of order: expected cluster ${dev.nextInOrder}` }
    dev.nextInOrder++
  }
  if (!dev.seen.add(cluster)) return { rule: 'DUPLICATE', message: 'cluster appears twice' }
  if (mask === 0) dev.zeroClusters++
  dev.dataBlocks += popcount16(mask)
  return undefined
}

/**
 * Records the slots of an extent that starts at archive byte `extentOffset`,
 * for `devices` indexed by dev_id; throws at the first slot that names an
 * undeclared device or breaks a rule, with the slot's offset.
 */
export function trackExtent (devices: ReadonlyArray<TrackedDevice | undefined>, extent: ExtentHeader, extentOffset: number): void {
  for (const e of extent.entries) {
    const offset = extentOffset + blockInfoOffset(e.slot)
    const dev = devices[e.devId]
    if (dev === undefined) {
      throw new VmapipeError('E_VMA_DEVICE', `blockinfo slot ${e.slot} names dev_id ${e.devId}, which the header does not declare`, { offset })
    }
    const broken = trackCluster(dev, e.cluster, e.mask)
    if (broken !== undefined) throw new VmapipeError(`E_VMA_${broken.rule}`, broken.message, { offset, device: dev.info.name, cluster: e.cluster })
  }
}

/** The first device (of those given) that misses clusters, with a message; undefined if all are complete. */
export function firstIncomplete (devices: Iterable<TrackedDevice>): { dev: TrackedDevice, message: string } | undefined {
  for (const dev of devices) {
    if (dev.seen.size === dev.clusters) continue
    return {
      dev,
      message: `${dev.clusters - dev.seen.size} of ${dev.clusters} clusters are missing (first missing: cluster ${dev.seen.firstMissing(dev.clusters)})`,
    }
  }
  return undefined
}
