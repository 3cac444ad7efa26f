/**
 * Compressed archives with nothing but Node: the CLI run with a PATH that has
 * no zstd, lzop or gzip reads and writes .zst, .lzo and .gz exactly as it did
 * with the programs, and the programs (and Proxmox's vma) read what it writes.
 */
import t from 'tap'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PACK_VMA, PVE_VMA, VMA, cmp, exits, q, run, sh, tempDir } from './helpers/run.js'
import { multiDeviceSpec, writeFixture } from './helpers/fixtures.js'
import { EXTERNAL, KINDS, barePath } from './helpers/compression.js'

t.test('with no compression program on the PATH: list, verify and extract as with the programs', async t => {
  const dir = tempDir(t)
  const bare = { PATH: barePath(dir) }
  const fx = writeFixture(dir, multiDeviceSpec(31))
  for (const { kind, ext, pack } of KINDS) {
    const archive = join(dir, `a.vma${ext}`)
    exits(t, await sh(`${pack} ${q(fx.archive)} > ${q(archive)}`), 0, `${kind} compressed by the program`)
    const list = await run(process.execPath, [VMA, 'list', '--json', archive], { env: bare })
    exits(t, list, 0, `${kind}: list`)
    const before = await run(process.execPath, [VMA, 'list', '--json', archive], { env: EXTERNAL })
    t.equal(list.stdout.toString(), before.stdout.toString(), `${kind}: list says what it said with the program`)
    t.equal(JSON.parse(list.stdout.toString()).compression, kind)
    exits(t, await run(process.execPath, [VMA, 'verify', archive], { env: bare }), 0, `${kind}: verify`)
    const out = join(dir, `out-${kind}`)
    exits(t, await run(process.execPath, [VMA, 'extract', archive, out], { env: bare }), 0, `${kind}: extract to a directory`)
    for (const d of fx.spec.devices) {
      t.ok(cmp(join(out, d.name === 'vmstate' ? 'vmstate.bin' : `disk-${d.name}.raw`), fx.sources.get(d.name) as string), `${kind}: ${d.name}`)
    }
    const one = await run(process.execPath, [VMA, 'extract', archive, '-', '-d', 'drive-scsi1'], { env: bare })
    exits(t, one, 0, `${kind}: extract to stdout`)
    t.ok(one.stdout.equals(readFileSync(fx.sources.get('drive-scsi1') as string)), `${kind}: stdout holds the disk`)
  }
})

t.test('with no compression program on the PATH: create and pack-vma write what the programs and pve-vma read', async t => {
  const dir = tempDir(t)
  const bare = { PATH: barePath(dir) }
  const fx = writeFixture(dir, multiDeviceSpec(32))
  const disks = ['drive-scsi0', 'drive-scsi1'].map(name => ['-d', `${name}=${fx.sources.get(name) as string}`]).flat()
  const conf = join(dir, 'qemu-server.conf')
  writeFileSync(conf, 'scsi0: local:vm-100-disk-0\n')
  const fixed = ['--uuid', '0b7f1f1a-7d2c-4d2e-9a3c-0123456789ab', '--ctime', '1700000000', '-c', conf, ...disks]
  const plain = join(dir, 'plain.vma')
  exits(t, await run(process.execPath, [VMA, 'create', plain, ...fixed]), 0, 'uncompressed reference')
  for (const { kind, ext, unpack } of KINDS) {
    const ours = join(dir, `ours.vma${ext}`)
    exits(t, await run(process.execPath, [VMA, 'create', ours, ...fixed], { env: bare }), 0, `${kind}: create`)
    const unpacked = join(dir, `ours-${kind}.vma`)
    exits(t, await sh(`${unpack} ${q(ours)} > ${q(unpacked)}`), 0, `${kind}: the program reads it`)
    t.ok(cmp(unpacked, plain), `${kind}: the same archive as uncompressed`)
    if (kind !== 'gzip') {
      const theirs = join(dir, `theirs.vma${ext}`)
      exits(t, await run(process.execPath, [VMA, 'create', theirs, ...fixed], { env: EXTERNAL }), 0, `${kind}: create with the program`)
      exits(t, await sh(`${unpack} ${q(theirs)} | cmp - ${q(plain)}`), 0, `${kind}: the same archive as written with the program`)
    }

    const packed = join(dir, `packed.vma${ext}`)
    exits(t, await run(process.execPath, [PACK_VMA, fx.sources.get('drive-scsi0') as string, '-o', packed], { env: bare }), 0, `${kind}: pack-vma`)
    const packedPlain = join(dir, `packed-${kind}.vma`)
    exits(t, await sh(`${unpack} ${q(packed)} > ${q(packedPlain)}`), 0, `${kind}: the program reads pack-vma's output`)
    const back = await run(process.execPath, [VMA, 'extract', packed, '-'], { env: bare })
    exits(t, back, 0, `${kind}: pack-vma's output extracts`)
    t.ok(back.stdout.equals(readFileSync(fx.sources.get('drive-scsi0') as string)), `${kind}: pack-vma round trip`)
    if (PVE_VMA === undefined) t.comment('skip: pve-vma not found')
    else {
      for (const [what, archive, names] of [['create', unpacked, ['drive-scsi0', 'drive-scsi1']], ['pack-vma', packedPlain, ['drive-scsi0']]] as const) {
        exits(t, await run(PVE_VMA, ['verify', archive]), 0, `${kind}: pve-vma verifies ${what}'s archive`)
        const out = join(dir, `pve-${what}-${kind}`)
        exits(t, await run(PVE_VMA, ['extract', archive, out]), 0, `${kind}: pve-vma extracts ${what}'s archive`)
        for (const name of names) t.ok(cmp(join(out, `disk-${name}.raw`), fx.sources.get(name) as string), `${kind}: pve-vma, ${what}, ${name}`)
      }
    }
  }
})
