/** The archives most tests share, built from seeded data with the test encoder. */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { type BuildConfig, type BuildDevice, type BuildSpec, Rng, buildArchive, scatter } from './vma-builder.js'
import { makeDisk } from './random.js'

export interface Fixture {
  archive: string
  spec: BuildSpec
  /** Source bytes per device name, written next to the archive as <name>.src */
  sources: Map<string, string>
}

/**
 * Several devices: sizes that are not multiples of 64 KiB (540672, one not
 * even of 4 KiB), an all-zero disk, a vmstate device, a gap in the dev_ids;
 * clusters shuffled and mixed across devices in extents of 1..59 slots.
 */
export function multiDeviceSpec (seed = 1): BuildSpec {
  const rng = new Rng(seed)
  const sizes: Array<[number, string, number]> = [
    [1, 'drive-scsi0', 3 * 1048576 + 12288],
    [2, 'drive-efidisk0', 540672],
    [3, 'drive-virtio1', 1048576],
    [4, 'vmstate', 1056768],
    [7, 'drive-scsi1', 2 * 1048576 + 1536],
  ]
  const devices: BuildDevice[] = sizes.map(([id, name, size]) => ({
    id, name, size, data: name === 'drive-virtio1' ? Buffer.alloc(size) : makeDisk(rng, size),
  }))
  const configs: BuildConfig[] = [
    { name: 'qemu-server.conf', data: Buffer.from('boot: order=scsi0\ncores: 2\nmemory: 2048\nscsi0: local-lvm:vm-100-disk-0,size=3M\n#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n') },
    { name: 'qemu-server.fw', data: Buffer.from('[OPTIONS]\nenable: 1\n') },
  ]
  return { configs, devices, extents: scatter(rng, devices) }
}

export function writeFixture (dir: string, spec: BuildSpec, name = 'test.vma'): Fixture {
  const archive = join(dir, name)
  writeFileSync(archive, buildArchive(spec))
  const sources = new Map<string, string>()
  for (const d of spec.devices) {
    const path = join(dir, `${d.name}.src`)
    writeFileSync(path, d.data)
    sources.set(d.name, path)
  }
  return { archive, spec, sources }
}

/** A backup job file in `dir`, under a name of its own. */
export function writeJob (dir: string, job: Record<string, unknown>): string {
  const path = join(dir, `job-${Math.random().toString(16).slice(2)}.json`)
  writeFileSync(path, JSON.stringify(job))
  return path
}
