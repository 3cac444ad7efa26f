/**
 * A real S3 store for the tests: Ceph's RADOS Gateway on loopback. .ci/run
 * starts one for the whole suite and passes its endpoint in
 * VMAPIPE_TEST_S3_ENDPOINT; without it, each test file that needs a store
 * starts its own (about 12 s) where Debian's radosgw is installed, and skips
 * where it is not.
 */
import { type SpawnSyncReturns, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3'
import type { Readable } from 'node:stream'
import type { Test } from 'tap'
import { s3Client } from '../../lib/s3/index.js'

const script = resolve(dirname(fileURLToPath(import.meta.url)), '../../../test/helpers/ceph-rgw.sh')
const shared = process.env.VMAPIPE_TEST_S3_ENDPOINT
const haveRgw = spawnSync('sh', ['-c', 'command -v radosgw && command -v ceph-mon && command -v ceph-osd'], { stdio: 'ignore' }).status === 0

/** tap's skip option for a test that needs an S3 store. */
export const needsS3 = shared !== undefined || haveRgw ? {} : { skip: 'no S3 store (install radosgw, ceph-mon, ceph-osd)' }

export interface S3Store {
  endpoint: string
  /** The environment the CLI needs to reach the store (credentials, endpoint, region). */
  env: NodeJS.ProcessEnv
  client: S3Client
  /** Creates a fresh bucket for one test and returns its name. */
  bucket: () => Promise<string>
}

export const S3_CREDENTIALS = { accessKeyId: 'vmapipe-test', secretAccessKey: 'vmapipe-test-secret' }

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address !== null ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

/** The shared store, or one started for this test file and stopped at its end. */
export async function s3Store (t: Test): Promise<S3Store> {
  let endpoint = shared
  if (endpoint === undefined) {
    const dir = mkdtempSync(join(tmpdir(), 'vmapipe-rgw-'))
    // Now and then the OSD's first contact with a new monitor fails ('wrong fsid'): what started is stopped, and the
    // store started again on other ports.
    let started: SpawnSyncReturns<string> | undefined
    for (let attempt = 0; attempt < 3 && started?.status !== 0; attempt++) {
      if (started !== undefined) spawnSync(script, ['stop', dir])
      // The monitor takes the port after the gateway's; ask until both are free.
      let port = await freePort()
      while (port > 65000) port = await freePort()
      started = spawnSync(script, ['start', dir, String(port)], { encoding: 'utf8', timeout: 120_000 })
    }
    if (started === undefined || started.status !== 0) {
      spawnSync(script, ['stop', dir])
      throw new Error(`radosgw did not start: ${String(started?.stderr)}`)
    }
    endpoint = started.stdout.trim()
    t.teardown(() => { spawnSync(script, ['stop', dir]) })
  }
  // The SDK's notice that later releases need Node 22 is no test's concern.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'
  const client = new S3Client({ endpoint, region: 'us-east-1', forcePathStyle: true, credentials: S3_CREDENTIALS })
  t.teardown(() => client.destroy())
  const env: NodeJS.ProcessEnv = {
    AWS_ACCESS_KEY_ID: S3_CREDENTIALS.accessKeyId,
    AWS_SECRET_ACCESS_KEY: S3_CREDENTIALS.secretAccessKey,
    AWS_REGION: 'us-east-1',
    AWS_PROFILE: '',
    AWS_CONFIG_FILE: '/dev/null',
    AWS_SHARED_CREDENTIALS_FILE: '/dev/null',
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
    VMAPIPE_S3_ENDPOINT: endpoint
  }
  const bucket = async (): Promise<string> => {
    const name = `t-${randomBytes(6).toString('hex')}`
    await client.send(new CreateBucketCommand({ Bucket: name }))
    return name
  }
  return { endpoint, env, client, bucket }
}

/**
 * A test's way into the store as vmapipe goes in: the store's environment set for this process, a client of
 * vmapipe's own (`s3Client`, destroyed at teardown) and a fresh bucket.
 */
export async function s3Session (t: Test): Promise<{ store: S3Store, client: S3Client, bucket: string }> {
  const store = await s3Store(t)
  Object.assign(process.env, store.env)
  const client = s3Client()
  t.teardown(() => client.destroy())
  return { store, client, bucket: await store.bucket() }
}

/** A byte stream's whole content. */
export async function collectBytes (stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}
