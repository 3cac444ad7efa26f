/**
 * npm run bench [-- extract|pack|qcow2|parallels|nbd|compression ...]: vmapipe against real peers, in the
 * same run, as ratios. BENCH_GIB sets the disk size (default 1), BENCH_DIR the
 * scratch directory (default the system's temporary directory).
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { benchExtract } from './extract.js'
import { benchPack } from './pack.js'
import { benchQcow2 } from './qcow2.js'
import { benchParallels } from './parallels.js'
import { benchNbd } from './nbd.js'
import { benchCompression } from './compression.js'

const SUITES: Record<string, (dir: string, gib: number) => Promise<void>> = {
  extract: benchExtract, pack: benchPack, qcow2: benchQcow2, parallels: benchParallels, nbd: benchNbd, compression: benchCompression,
}

const chosen = process.argv.slice(2)
for (const name of chosen) if (!(name in SUITES)) throw new Error(`no bench ${name} (have: ${Object.keys(SUITES).join(', ')})`)
const gib = Number(process.env.BENCH_GIB ?? 1)
process.stdout.write(`vmapipe bench, node ${process.version}, ${gib} GiB disks\n`)
for (const [name, suite] of Object.entries(SUITES)) {
  if (chosen.length > 0 && !chosen.includes(name)) continue
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), `vmapipe-bench-${name}-`))
  try {
    await suite(dir, gib)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
