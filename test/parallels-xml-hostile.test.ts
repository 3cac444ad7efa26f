import t, { type Test } from 'tap'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { PACK_VMA, VMA, exits, run, tempDir } from './helpers/run.js'
import { failure } from './helpers/logged.js'
import { randomDisk, toParallels } from './helpers/parallels.js'

const A = '{aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa}'
const Z = '{00000000-0000-0000-0000-000000000000}'
const descriptor = (o: { file?: string, top?: string, extra?: string } = {}): string =>
  '<?xml version="1.0"?><Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>2048</Disk_size><Cylinders>4</Cylinders><Heads>16</Heads>' +
  `<Sectors>32</Sectors><Padding>0</Padding>${o.extra ?? ''}</Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End><Blocksize>128</Blocksize>` +
  `<Image><GUID>${A}</GUID><Type>Compressed</Type><File>${o.file ?? 'root.hds'}</File></Image></Storage></StorageData>` +
  `<Snapshots><TopGUID>${o.top ?? A}</TopGUID><Shot><GUID>${A}</GUID><ParentGUID>${Z}</ParentGUID></Shot></Snapshots></Parallels_disk_image>`
/** `depth` vendor elements nested inside Disk_Parameters (itself two deep). */
const nested = (depth: number): string => '<Vendor>'.repeat(depth) + '</Vendor>'.repeat(depth)

/** Runs a tool with a time bound, so that a hang fails the test (exit 124) rather than stalling it. */
async function bounded (args: string[]): ReturnType<typeof run> {
  return await run('timeout', ['60', process.execPath, ...args])
}

/** `vma info` of the bundle and pack-vma of its descriptor both exit 1 with E_PARALLELS_XML naming the problem, without a stack. */
async function refused (t: Test, bundle: string, mention: RegExp): Promise<void> {
  for (const args of [[VMA, 'info', bundle], [PACK_VMA, join(bundle, 'DiskDescriptor.xml'), '-o', '/dev/null', '--force']]) {
    const r = await bounded(args)
    exits(t, r, 1, `${args[1]}: exit 1`)
    const f = failure(r)
    t.equal(f.code, 'E_PARALLELS_XML')
    t.match(f.msg, mention, `the message names the element: ${f.msg?.slice(0, 300)}`)
    t.ok((f.msg ?? '').length < 1000, 'the message is a line, not the input')
    t.notMatch(r.stderr, /at .*\.js:\d+/, 'no stack trace')
  }
}

t.test('descriptors that used to crash, hang or leak a raw error are refused by the element', async t => {
  const dir = tempDir(t)
  const root = join(dir, 'root.hds')
  await toParallels(t, randomDisk(dir, 'src.raw', 94, 1048576).path, root, '64K')
  mkdirSync(join(dir, 'subdir'))
  t.equal(spawnSync('mkfifo', [join(dir, 'fifo')]).status, 0, 'mkfifo')
  let n = 0
  const bundle = (xml: string | undefined, setup?: (path: string) => void): string => {
    const path = join(dir, `case-${n++}.hdd`)
    mkdirSync(path)
    writeFileSync(join(path, 'root.hds'), readFileSync(root))
    if (xml !== undefined) writeFileSync(join(path, 'DiskDescriptor.xml'), xml)
    setup?.(path)
    return path
  }
  const cases: Array<[string, string, RegExp]> = [
    ['101 levels of nesting', bundle(descriptor({ extra: nested(101) })), /<Vendor> at line 1 is nested 65 elements deep, more than the 64 allowed/],
    ['half a million unclosed levels', bundle(descriptor({ extra: '<Vendor>'.repeat(500000) })), /<Vendor> at line 1 is nested 65 elements deep/],
    ['an unclosed element (the validator lists every open tag)', bundle(descriptor().replace(/<Disk_Parameters>.*/, '<Vendor>'.repeat(40))),
      /not well-formed XML at line 1: .{0,210}\.\.\./],
    ['a TopGUID of all zeros', bundle(descriptor({ top: Z })), /<TopGUID> is \{00000000-0000-0000-0000-000000000000\}, which marks the root's parent/],
    ['a File that is a directory', bundle(descriptor({ file: join(dir, 'subdir') })), /<File> \S+subdir of Image \{aaaaaaaa\S+ is a directory, not an image/],
    ['a File that is a relative directory', bundle(descriptor({ file: 'sub' }), p => mkdirSync(join(p, 'sub'))), /<File> sub of Image \{aaaaaaaa\S+ is a directory/],
    ['a File of /proc/self/mem', bundle(descriptor({ file: '/proc/self/mem' })), /<File> \/proc\/self\/mem of Image \{aaaaaaaa\S+ is empty \(0 bytes\), not an image/],
    ['a File of /dev/zero', bundle(descriptor({ file: '/dev/zero' })), /<File> \/dev\/zero of Image \S+ is a character device/],
    ['a File that is a named pipe (reading it would block)', bundle(descriptor({ file: join(dir, 'fifo') })), /<File> \S+fifo of Image \S+ is a named pipe/],
    ['a File longer than a path', bundle(descriptor({ file: 'x'.repeat(5000) })), /<File> in Storage 1 Image 1 is 5000 bytes, longer than a path can be \(4096\)/],
    ['a relative File that is not there', bundle(descriptor({ file: 'gone.hds' })), /File gone\.hds does not exist/],
    ['an absolute File that is not there', bundle(descriptor({ file: join(dir, 'gone.hds') })), /<File> \S+gone\.hds of Image \S+ does not exist/],
    ['a GUID of a megabyte', bundle(descriptor({ top: 'g'.repeat(1 << 20) })), /<TopGUID> in Snapshots is "g{200}\.\.\.", not a GUID/],
  ]
  for (const [name, path, mention] of cases) await t.test(name, async t => { await refused(t, path, mention) })

  await t.test('a DiskDescriptor.xml that is a directory or a named pipe', async t => {
    const directory = bundle(undefined, p => mkdirSync(join(p, 'DiskDescriptor.xml')))
    const pipe = bundle(undefined, p => spawnSync('mkfifo', [join(p, 'DiskDescriptor.xml')]))
    for (const [path, kind] of [[directory, 'a directory'], [pipe, 'a named pipe']]) {
      const r = await bounded([VMA, 'info', path])
      exits(t, r, 1, `exit 1 for ${kind}`)
      t.equal(failure(r).code, 'E_PARALLELS_XML')
      t.match(failure(r).msg, new RegExp(`DiskDescriptor\\.xml: ${kind}, not a descriptor file`))
    }
  })

  await t.test('nesting up to the limit is read (vendors add elements of their own)', async t => {
    const r = await bounded([VMA, 'info', bundle(descriptor({ extra: nested(62) })), '--json'])
    exits(t, r, 0)
    t.equal(JSON.parse(r.stdout.toString()).size, 1048576)
  })
})
