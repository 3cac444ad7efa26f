// vma and pack-vma with archives in a bucket of a real store (Ceph RGW on
// loopback): create (plain and .zst) and extract byte-identical to local,
// verify, list, config, pack-vma -o s3://, qcow2 to stdout by ranged reads,
// vma serve read by nbdcopy and qemu-img; Ctrl-C and kill -9 during an upload
// leave nothing under the key; errors by code and exit status.
import t from 'tap'
import { spawn } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { GetObjectCommand, ListMultipartUploadsCommand } from '@aws-sdk/client-s3'
import { abortStaleUploads, headObject } from '../lib/s3/index.js'
import { needsS3, s3Store } from './helpers/s3.js'
import { startServe } from './helpers/nbd.js'
import { Rng, makeDisk } from './helpers/random.js'
import { PACK_VMA, VMA, cmp, exits, have, run, sha256, tempDir, vma } from './helpers/run.js'

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'
const MiB = 1024 * 1024

/** The code of the error line a command logged (JSON lines on a pipe). */
function errorCode (stderr: string): string | undefined {
  for (const line of stderr.split('\n')) {
    if (!line.startsWith('{')) continue
    const parsed = JSON.parse(line) as { level?: number, code?: string }
    if ((parsed.level ?? 0) >= 50 && parsed.code !== undefined) return parsed.code
  }
  return undefined
}

t.test('archives in a bucket, through the CLI', needsS3, async t => {
  const store = await s3Store(t)
  Object.assign(process.env, store.env)
  const bucket = await store.bucket()
  const dir = tempDir(t)
  const rng = new Rng(15)
  const d0 = join(dir, 'd0.raw')
  const d1 = join(dir, 'd1.raw')
  writeFileSync(d0, makeDisk(rng, 12 * MiB + 4096))
  writeFileSync(d1, makeDisk(rng, 3 * MiB))
  writeFileSync(join(dir, '100.conf'), 'memory: 2048\nscsi0: local:100/vm-100-disk-0.raw\n')
  const fixed = ['--uuid', '0b7c6e44-1a2b-4c3d-8e9f-001122334455', '--ctime', '1700000000', '-c', join(dir, '100.conf'),
    '-d', `drive-scsi0=${d0}`, '-d', `drive-scsi1=${d1}`]
  const object = async (key: string): Promise<Buffer> => {
    const got = await store.client.send(new GetObjectCommand({ Bucket: bucket, Key: key }))
    return Buffer.from(await got.Body?.transformToByteArray() ?? [])
  }

  for (const name of ['plain.vma', 'packed.vma.zst']) {
    await t.test(`vma create s3://.../${name}, then list, config, verify, extract`, async t => {
      const url = `s3://${bucket}/pve1/${name}`
      exits(t, await vma(['create', url, ...fixed]), 0, 'create to the bucket')
      const local = join(dir, name)
      exits(t, await vma(['create', local, ...fixed]), 0, 'the same archive as a file')
      t.equal(sha256(await object(`pve1/${name}`)), sha256(local), 'the object holds the bytes of the local archive')
      const listed = await vma(['list', url, '--json'])
      exits(t, listed, 0, 'list')
      t.same((JSON.parse(listed.stdout.toString()) as { devices: Array<{ name: string }> }).devices.map(d => d.name), ['drive-scsi0', 'drive-scsi1'])
      const config = await vma(['config', url])
      t.equal(config.stdout.toString(), 'memory: 2048\nscsi0: local:100/vm-100-disk-0.raw\n', 'config')
      const verified = await vma(['verify', url, '--json'])
      exits(t, verified, 0, 'verify')
      t.equal((JSON.parse(verified.stdout.toString()) as { ok: boolean }).ok, true)
      const out = join(dir, `out-${name}`)
      exits(t, await vma(['extract', url, out]), 0, 'extract from the bucket')
      t.ok(cmp(join(out, 'disk-drive-scsi0.raw'), d0), 'scsi0 identical')
      t.ok(cmp(join(out, 'disk-drive-scsi1.raw'), d1), 'scsi1 identical')
      const logged = (await vma(['extract', url, '-', '-d', 'scsi1', '--log-level', 'info'])).stderr
      t.match(logged, /"msg":"downloaded"/, 'the download is logged')
      t.match(logged, /"bytes":\d+/, 'with its bytes')
      t.match(logged, /"rate":\d+/, 'and rate')
    })
  }

  await t.test('pack-vma -o s3://, extract to stdout', async t => {
    const url = `s3://${bucket}/pack/one.vma.zst`
    const packed = await run(process.execPath, [PACK_VMA, d0, '-o', url, '--s3-checksum', 'md5'])
    exits(t, packed, 0, 'pack-vma to the bucket')
    t.match(packed.stderr, /"parts":\d+,"retries":0,.*"msg":"uploaded"/, 'the upload is logged with parts and retries')
    const restored = await vma(['extract', url, '-'])
    exits(t, restored, 0)
    t.equal(sha256(restored.stdout), sha256(d0), 'identical')
    exits(t, await run(process.execPath, [PACK_VMA, d0, '-o', url]), 3, 'an existing object is not replaced')
    exits(t, await run(process.execPath, [PACK_VMA, d1, '-o', url, '--force', '--s3-checksum', 'none']), 0, 'but is with --force')
    t.equal(sha256((await vma(['extract', url, '-'])).stdout), sha256(d1), 'replaced')
  })

  await t.test('qcow2 to stdout from an uncompressed archive in the bucket: ranged reads, tables first', { skip: !have('qemu-img') }, async t => {
    const image = join(dir, 'scsi0.qcow2')
    const r = await run('sh', ['-c', `'${process.execPath}' '${VMA}' extract s3://${bucket}/pve1/plain.vma - -d scsi0 --format qcow2 > '${image}'`])
    exits(t, r, 0)
    exits(t, await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, d0]), 0, 'qemu-img compare: identical')
  })

  await t.test('vma serve s3://: nbdcopy and qemu-img convert read identical disks', { skip: !have('nbdcopy') || !have('qemu-img') }, async t => {
    for (const name of ['plain.vma', 'packed.vma.zst']) {
      const served = await startServe(t, [`s3://${bucket}/pve1/${name}`, '--socket', join(dir, `${name}.sock`)])
      const copied = join(dir, `nbdcopy-${name}.raw`)
      exits(t, await run('nbdcopy', [served.uri('drive-scsi0'), copied]), 0, `nbdcopy from ${name}`)
      t.ok(cmp(copied, d0), `nbdcopy: scsi0 of ${name} identical`)
      const converted = join(dir, `convert-${name}.raw`)
      exits(t, await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', served.uri('drive-scsi1'), converted]), 0, `qemu-img convert from ${name}`)
      t.ok(cmp(converted, d1), `qemu-img convert: scsi1 of ${name} identical`)
      served.child.kill('SIGTERM')
      await new Promise(resolve => served.child.once('close', resolve))
    }
  })

  /** `vma create` of 64 MiB fed slowly through stdin, once its multipart upload has begun. */
  const uploading = async (key: string): Promise<{ child: ReturnType<typeof spawn>, stderr: () => string }> => {
    const child = spawn(process.execPath, [VMA, 'create', `s3://${bucket}/${key}`, '-d', 'size=64M:drive-scsi0=-'], {
      stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' },
    })
    let stderr = ''
    child.stderr?.on('data', (b: Buffer) => { stderr += b.toString() })
    child.stdin?.on('error', () => {})
    child.stdin?.write(makeDisk(new Rng(7), 24 * MiB))
    for (let i = 0; i < 200; i++) {
      const open = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: key }))
      if ((open.Uploads?.length ?? 0) > 0) return { child, stderr: () => stderr }
      await sleep(50)
    }
    throw new Error(`the upload did not begin: ${stderr}`)
  }

  await t.test('Ctrl-C or SIGTERM during an upload: exit 130 or 143, the upload aborted, nothing under the key', async t => {
    for (const [signal, status] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
      const key = `stopped-${signal}.vma`
      const { child, stderr } = await uploading(key)
      child.kill(signal)
      const code = await new Promise(resolve => child.once('close', resolve))
      t.equal(code, status, `exit status of ${signal}`, { stderr: stderr() })
      t.match(stderr(), /"msg":"upload aborted"/, 'the abort is logged')
      await t.rejects(headObject(store.client, bucket, key), { code: 'E_S3_NOT_FOUND' })
      const open = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: key }))
      t.equal(open.Uploads?.length ?? 0, 0, 'no upload left open')
    }
  })

  await t.test('kill -9 during an upload: nothing under the key; the stale upload is found and aborted', async t => {
    const { child } = await uploading('killed.vma')
    child.kill('SIGKILL')
    await new Promise(resolve => child.once('close', resolve))
    await t.rejects(headObject(store.client, bucket, 'killed.vma'), { code: 'E_S3_NOT_FOUND' })
    t.equal(await abortStaleUploads(store.client, bucket, 'killed'), 1, 'one stale upload, aborted')
    const open = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: 'killed' }))
    t.equal(open.Uploads?.length ?? 0, 0, 'none left')
  })

  await t.test('errors: codes and exit statuses', async t => {
    const cases: Array<[string[], number, string]> = [
      [['list', 's3://'], 2, 'E_S3_URL'],
      [['list', `s3://${bucket}/pve1/`], 2, 'E_S3_URL'],
      [['verify', `s3://${bucket}/no-such.vma`], 2, 'E_S3_NOT_FOUND'],
      [['extract', 's3://vmapipe-no-such-bucket/x.vma', join(dir, 'nothing')], 2, 'E_S3_NOT_FOUND'],
      [['create', 's3://vmapipe-no-such-bucket/x.vma', '-d', `drive-scsi0=${d1}`], 2, 'E_S3_NOT_FOUND'],
      [['create', `s3://${bucket}/pve1/plain.vma`, '-d', `drive-scsi0=${d1}`], 3, 'E_TARGET_EXISTS'],
      [['list', `s3://${bucket}/pve1/plain.vma`, '--s3-checksum', 'sha1'], 2, 'E_USAGE'],
      [['list', `s3://${bucket}/pve1/plain.vma`, '--s3-endpoint', 'http://127.0.0.1:1'], 3, 'E_S3_NETWORK'],
    ]
    for (const [args, status, code] of cases) {
      const r = await vma(args)
      exits(t, r, status, `vma ${args.join(' ')}: exit ${status}`)
      if (code !== 'E_USAGE') t.equal(errorCode(r.stderr), code, `vma ${args.join(' ')}: ${code}`)
    }
    const denied = await vma(['list', `s3://${bucket}/pve1/plain.vma`], { env: { AWS_SECRET_ACCESS_KEY: 'wrong' } })
    exits(t, denied, 3, 'wrong credentials: exit 3')
    t.equal(errorCode(denied.stderr), 'E_S3_ACCESS')
    t.notOk(/NodeVersionSupportWarning/.test(denied.stderr), 'no SDK notice about Node versions')
  })
})
