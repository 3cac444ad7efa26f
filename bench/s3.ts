/**
 * S3: archives uploaded to and downloaded from a real store on loopback (Ceph
 * RGW: the shared one of VMAPIPE_TEST_S3_ENDPOINT, else one started here),
 * beside the same jobs on local files and a plain copy of the same bytes
 * (cp, cat). Peak RSS is the largest process's. The store keeps every upload
 * in memory (memstore) until its garbage collection, hours later, so each job
 * runs once (BENCH_S3_PAIRS for more) and each object has its own key.
 */
import { statSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { CreateBucketCommand } from '@aws-sdk/client-s3'
import type { Test } from 'tap'
import { writeBenchDisk } from './archives.js'
import { GIB, MB, type Pair, type Run, Table, logs, measure, packVma, q, shell, vma } from './lib.js'
import { needsS3, s3Store } from '../test/helpers/s3.js'

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'

export async function benchS3 (dir: string, gib: number): Promise<void> {
  if ('skip' in needsS3) {
    process.stdout.write(`\ns3: skipped, ${needsS3.skip}\n`)
    return
  }
  const cleanups: Array<() => void | Promise<void>> = []
  const store = await s3Store({ teardown: (fn: () => void) => { cleanups.push(fn) } } as unknown as Test)
  try {
    Object.assign(process.env, store.env)
    const bucket = `bench-${process.pid}`
    await store.client.send(new CreateBucketCommand({ Bucket: bucket }))
    const size = Math.round(gib * GIB / 65536) * 65536
    const disk = join(dir, 'disk.raw')
    process.stderr.write(`generating a ${(size / MB).toFixed(0)} MB disk\n`)
    await writeBenchDisk(disk, size)
    await shell(`cat ${q(disk)} > /dev/null`) // warm the page cache
    const pairs = Math.max(1, Number(process.env.BENCH_S3_PAIRS ?? 1) || 1)
    const local = join(dir, 'a.vma')
    const out = join(dir, 'out')
    const clean = (...paths: string[]): void => { for (const p of paths) rmSync(p, { recursive: true, force: true }) }
    const runs = async (script: (i: number) => string, after: () => void = () => {}): Promise<Run[]> => {
      const done: Run[] = []
      for (let i = 0; i < pairs; i++) {
        done.push(await measure(script(i)))
        after()
      }
      return done
    }
    const json = '--log-format json'

    // Upload: vma create into the bucket, against the same into a file, and a copy of that file.
    const uploads = await runs(i => `${vma} create ${json} s3://${bucket}/a-${i}.vma -d drive-scsi0=${q(disk)}`)
    const localCreate = await runs(() => `${vma} create -q ${q(local)} -d drive-scsi0=${q(disk)} --force`)
    const bytes = statSync(local).size
    const copies = await runs(() => `cp ${q(local)} ${q(join(dir, 'copy.vma'))}`, () => clean(join(dir, 'copy.vma')))
    // Download: vma extract from the bucket, against the same from the file, and cat of the file.
    const downloads = await runs(() => `${vma} extract ${json} s3://${bucket}/a-0.vma ${q(out)}`, () => clean(out))
    const localExtract = await runs(() => `${vma} extract -q ${q(local)} ${q(out)}`, () => clean(out))
    const cats = await runs(() => `cat ${q(local)} > ${q(join(dir, 'copy.vma'))}`, () => clean(join(dir, 'copy.vma')))
    // pack-vma -o s3:// with zstd.
    const packs = await runs(i => `${packVma} ${q(disk)} ${json} -o s3://${bucket}/p-${i}.vma.zst`)
    const localPacks = await runs(() => `${packVma} -q ${q(disk)} -o ${q(join(dir, 'p.vma.zst'))} --force`)

    const table = new Table('s3', 'archive')
    const row = (job: string, ours: Run[], peer: Run[], peerName: string): void => { table.add(job, bytes, { ours, peer } satisfies Pair, peerName) }
    row('vma create s3://B/a.vma (upload)', uploads, localCreate, 'vma create a.vma (a local file)')
    row('vma create s3://B/a.vma (upload)', uploads, copies, 'cp a.vma copy.vma')
    row('vma extract s3://B/a.vma DIR (download)', downloads, localExtract, 'vma extract a.vma DIR')
    row('vma extract s3://B/a.vma DIR (download)', downloads, cats, 'cat a.vma > copy.vma')
    row('pack-vma disk.raw -o s3://B/p.vma.zst', packs, localPacks, 'pack-vma disk.raw -o p.vma.zst')
    table.print(`S3 on loopback (Ceph RGW, memstore): a ${(bytes / MB).toFixed(0)} MB archive of a ${(size / MB).toFixed(0)} MB disk`)
    const uploaded = logs(uploads[0].stderr).find(l => l.msg === 'uploaded')
    const downloaded = logs(downloads[0].stderr).find(l => l.msg === 'downloaded')
    process.stdout.write(`\nupload: ${uploaded?.parts} parts, ${uploaded?.retries} retries, ${((Number(uploaded?.rate) || 0) / MB).toFixed(0)} MB/s; ` +
      `download: ${downloaded?.resumes} resumes, ${((Number(downloaded?.rate) || 0) / MB).toFixed(0)} MB/s; ` +
      `peak RSS: vma create ${(Math.max(...uploads.map(r => r.rssKiB)) / 1024).toFixed(0)} MiB, ` +
      `vma extract ${(Math.max(...downloads.map(r => r.rssKiB)) / 1024).toFixed(0)} MiB\n`)
  } finally {
    for (const fn of cleanups.reverse()) await fn()
  }
}
