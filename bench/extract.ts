/** Reading archives: verify and extract against cat, cp, dd and zstd; memory of out-of-order extraction. */
import { rmSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { writeBenchArchive } from './archives.js'
import { GIB, MB, Table, best, logs, peakMiB, q, timed, vma } from './lib.js'

export async function benchExtract (dir: string, gib: number): Promise<void> {
  const table = new Table('archive')
  const archive = join(dir, 'a.vma')
  process.stderr.write(`generating a ${gib} GiB disk archive\n`)
  await writeBenchArchive(archive, gib * GIB, 'forward')
  const bytes = statSync(archive).size
  const out = join(dir, 'out')
  const clean = (): void => rmSync(out, { recursive: true, force: true })

  await timed(`cat ${q(archive)} > /dev/null`) // warm the page cache
  const cat = await best(3, `cat ${q(archive)} > /dev/null`)
  const cp = await best(3, `cp ${q(archive)} ${q(out)}`, clean)
  // cp copies inside the kernel; dd moves the bytes through user space and fsyncs, as we do.
  const dd = await best(3, `dd if=${q(archive)} of=${q(out)} bs=1M conv=fsync status=none`, clean)
  table.add('cat archive > /dev/null', cat, bytes)
  table.add('cp archive', cp, bytes)
  table.add('dd bs=1M conv=fsync', dd, bytes)
  table.add('vma verify', await best(3, `${vma} verify -q ${q(archive)}`), bytes, cat, 'cat')
  table.add('vma extract to a directory', await best(3, `${vma} extract -q ${q(archive)} ${q(out)}`, clean), bytes, dd, 'dd')
  table.add('vma extract - > /dev/null', await best(3, `${vma} extract -q ${q(archive)} - > /dev/null`), bytes, cat, 'cat')
  table.add('cat archive | vma extract - - | cat > /dev/null', await best(3, `cat ${q(archive)} | ${vma} extract -q - - | cat > /dev/null`), bytes, cat, 'cat')

  const zst = join(dir, 'a.vma.zst')
  await timed(`zstd -q -T0 -3 -c ${q(archive)} > ${q(zst)}`)
  const unzstd = await best(3, `zstd -q -d -c ${q(zst)} | cat > /dev/null`)
  table.add('zstd -d archive.zst | cat > /dev/null', unzstd, bytes)
  // Built-in zstd, then the zstd program (the path of earlier versions) for comparison.
  for (const [how, env] of [['', ''], [', zstd program', 'VMAPIPE_EXTERNAL_COMPRESSION=1 ']]) {
    table.add(`vma verify archive.zst${how}`, await best(3, `${env}${vma} verify -q ${q(zst)}`), bytes, unzstd, 'zstd -d | cat')
    table.add(`vma extract archive.zst to a directory${how}`,
      await best(3, `${env}${vma} extract -q ${q(zst)} ${q(out)}`, clean), bytes, unzstd, 'zstd -d | cat')
  }
  rmSync(zst)

  // Memory: node itself streaming the file is the floor; then clusters in order and reversed, to stdout.
  const drain = "const s=require('fs').createReadStream(process.argv[1],{highWaterMark:1<<20});s.on('data',()=>{});" +
    "s.on('end',()=>console.error(JSON.stringify({maxRssKiB:process.resourceUsage().maxRSS})))"
  const floor = await timed(`${q(process.execPath)} -e "${drain}" ${q(archive)}`)
  const forward = await timed(`${vma} extract ${q(archive)} - > /dev/null`)
  rmSync(archive)
  process.stderr.write('generating a 2 GiB disk archive in reverse cluster order\n')
  const reversed = join(dir, 'r.vma')
  await writeBenchArchive(reversed, 2 * GIB, 'reverse', 2)
  const rev = await timed(`${vma} extract --tmpdir ${q(dir)} ${q(reversed)} - > /dev/null`)
  table.add('vma extract - of a reversed 2 GiB disk', rev, statSync(reversed).size)
  rmSync(reversed)

  table.print(`Reading: ${gib} GiB disk, archive ${(bytes / MB).toFixed(0)} MB`)
  const spilled = Number(logs(rev.stderr).pop()?.spilledBytes ?? 0)
  process.stdout.write(`\npeak RSS, MiB: node reading the archive and nothing else ${peakMiB(floor)}; vma extract - in order ${peakMiB(forward)}; ` +
    `reversed 2 GiB disk ${peakMiB(rev)} (target < 100), ${(spilled / MB).toFixed(0)} MB of it through the spill file\n`)
}
