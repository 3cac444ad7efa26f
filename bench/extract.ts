/** Reading archives: verify and extract against Proxmox's vma, cat, cp, dd and zstd; clusters in reverse order against in order. */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive } from './archives.js'
import { GIB, PVE_VMA, Table, logs, pair, q, shell, vma } from './lib.js'

export async function benchExtract (dir: string, gib: number): Promise<void> {
  const table = new Table('extract', 'archive')
  const archive = join(dir, 'a.vma')
  process.stderr.write(`generating a ${gib} GiB disk archive\n`)
  await writeBenchArchive(archive, gib * GIB, 'forward')
  const bytes = statSync(archive).size
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })
  const pve = PVE_VMA === undefined ? undefined : q(PVE_VMA)
  await shell(`cat ${q(archive)} > /dev/null`) // warm the page cache

  const cat = `cat ${q(archive)} > /dev/null`
  const verify = `${vma} verify -q ${q(archive)}`
  if (pve !== undefined) table.add('vma verify', bytes, await pair(verify, `${pve} verify ${q(archive)}`), 'pve-vma verify')
  table.add('vma verify', bytes, await pair(verify, cat), 'cat > /dev/null')
  // Both sides make the files durable: vma fsyncs, pve-vma fdatasyncs, cp and dd get a sync.
  const extract = `${vma} extract -q ${q(archive)} ${q(out)}`
  if (pve !== undefined) {
    table.add('vma extract to a directory', bytes, await pair(extract, `${pve} extract ${q(archive)} ${q(out)}`, { after: clean }), 'pve-vma extract')
  }
  table.add('vma extract to a directory', bytes, await pair(extract, `cp ${q(archive)} ${q(out)} && sync ${q(out)}`, { after: clean }), 'cp + sync')
  table.add('vma extract to a directory', bytes, await pair(extract, `dd if=${q(archive)} of=${q(out)} bs=1M conv=fsync status=none`, { after: clean }),
    'dd bs=1M conv=fsync')
  const toStdout = `${vma} extract -q ${q(archive)} - > /dev/null`
  table.add('vma extract - > /dev/null', bytes, await pair(toStdout, cat), 'cat > /dev/null')
  // Node itself streaming the file: the floor of memory (and of time) for a Node tool.
  const floor = `${q(process.execPath)} -e "const s=require('fs').createReadStream(process.argv[1],{highWaterMark:1<<20});s.on('data',()=>{})" ${q(archive)}`
  table.add('vma extract - > /dev/null', bytes, await pair(toStdout, floor), 'node reading the file')
  table.add('cat archive | vma extract - - | cat > /dev/null', bytes, await pair(`cat ${q(archive)} | ${vma} extract -q - - | cat > /dev/null`, cat),
    'cat > /dev/null')

  const zst = join(dir, 'a.vma.zst')
  await shell(`zstd -q -T0 -3 -c ${q(archive)} > ${q(zst)}`)
  const unzstd = `zstd -q -d -c ${q(zst)} | cat > /dev/null`
  table.add('vma extract archive.zst to a directory', bytes, await pair(`${vma} extract -q ${q(zst)} ${q(out)}`, `zstd -q -d -c ${q(zst)} > /dev/null`,
    { after: clean }), 'zstd -d > /dev/null (alone)')
  // Built-in zstd, then the zstd program (the path of earlier versions).
  for (const [how, env] of [['', ''], [', zstd program', 'VMAPIPE_EXTERNAL_COMPRESSION=1 ']]) {
    table.add(`vma verify archive.zst${how}`, bytes, await pair(`${env}${vma} verify -q ${q(zst)}`, unzstd), 'zstd -d | cat')
    const extractZst = `${env}${vma} extract -q ${q(zst)} ${q(out)}`
    table.add(`vma extract archive.zst to a directory${how}`, bytes, await pair(extractZst, unzstd, { after: clean }), 'zstd -d | cat')
    if (pve !== undefined && how === '') {
      table.add(`vma extract archive.zst to a directory${how}`, bytes,
        await pair(extractZst, `zstd -q -d -c ${q(zst)} | ${pve} extract - ${q(out)}`, { after: clean }),
        'zstd -d | pve-vma extract -')
    }
  }
  rmSync(zst)

  // The same disk's clusters back to front. From the file, the disk is read by position (no spill); through a pipe, what
  // comes early waits in the spill file (in --tmpdir).
  process.stderr.write(`generating a ${gib} GiB disk archive in reverse cluster order\n`)
  const reversed = join(dir, 'r.vma')
  await writeBenchArchive(reversed, gib * GIB, 'reverse')
  await shell(`cat ${q(reversed)} > /dev/null`)
  const rev = await pair(`${vma} extract ${q(reversed)} - > /dev/null`, `${vma} extract ${q(archive)} - > /dev/null`)
  table.add('vma extract - of the disk in reverse cluster order', bytes, rev, 'vma extract - in order')
  const piped = await pair(`cat ${q(reversed)} | ${vma} extract --tmpdir ${q(dir)} - - > /dev/null`, `cat ${q(archive)} | ${vma} extract - - > /dev/null`)
  table.add('cat archive | vma extract - - (spill), reverse cluster order', bytes, piped, 'the same in order')
  rmSync(reversed)
  rmSync(archive)

  table.print(`Reading: ${gib} GiB disk, archive ${(bytes / 1e6).toFixed(0)} MB`)
  const spilled = Number(logs(piped.ours[0].stderr).pop()?.spilledBytes ?? 0)
  process.stdout.write(`\nreverse order: ${(spilled / 1e6).toFixed(0)} MB of the archive went through the spill file\n`)
}
