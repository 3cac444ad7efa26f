/**
 * npm run bench [-- startup|extract|pack|qcow2|parallels|nbd|compression|live|baseline|scaling ...]: vmapipe against real peers, in
 * interleaved pairs of the same run, as ratios. BENCH_GIB sets the disk size (default 1), BENCH_DIR the
 * scratch directory (default the system's temporary directory), BENCH_PAIRS the pairs per job (at least 5),
 * BENCH_JSON the file every run is written to as well (default bench-results.json here; `--print FILE` shows one again).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { benchExtract } from './extract.js'
import { benchPack } from './pack.js'
import { benchQcow2 } from './qcow2.js'
import { benchParallels } from './parallels.js'
import { benchNbd } from './nbd.js'
import { benchCompression } from './compression.js'
import { benchLive } from './live.js'
import { benchBaseline } from './baseline.js'
import { benchStartup } from './startup.js'
import { benchScaling, formatScaling } from './scaling.js'
import { PAIRS, PVE_VMA, RESULTS, SCALING, type ScalingRow, formatTable } from './lib.js'

const SUITES: Record<string, (dir: string, gib: number) => Promise<void>> = {
  startup: benchStartup, extract: benchExtract, pack: benchPack, qcow2: benchQcow2, parallels: benchParallels, nbd: benchNbd, compression: benchCompression,
  live: benchLive, baseline: benchBaseline, scaling: benchScaling,
  s3: async (dir, gib) => { await (await import('./s3.js')).benchS3(dir, gib) },
}
/** Not run unless named: its archives go up to 8 GiB. */
const ON_REQUEST = new Set(['scaling'])

if (process.argv[2] === '--print') {
  // A saved run's tables again: `node dist/bench/run.js --print bench-results.json`.
  const saved = JSON.parse(readFileSync(process.argv[3] ?? 'bench-results.json', 'utf8')) as { suites: typeof RESULTS, scaling?: ScalingRow[] }
  for (const s of saved.suites) process.stdout.write(formatTable(s.title, s.unit, s.rows))
  process.stdout.write(formatScaling(saved.scaling ?? []))
  process.exit(0)
}
const chosen = process.argv.slice(2)
for (const name of chosen) if (!(name in SUITES)) throw new Error(`no bench ${name} (have: ${Object.keys(SUITES).join(', ')})`)
// Whole clusters of 64 KiB (1/16384 GiB), so that any BENCH_GIB makes disks of whole bytes and clusters.
const gib = Math.max(1, Math.round(Number(process.env.BENCH_GIB ?? 1) * 16384)) / 16384
const json = resolve(process.env.BENCH_JSON ?? 'bench-results.json')
const started = new Date().toISOString()
process.stdout.write(`vmapipe bench, node ${process.version}, ${gib} GiB disks, ${PAIRS} pairs a job, pve-vma: ${PVE_VMA ?? 'not found'}\n`)
for (const [name, suite] of Object.entries(SUITES)) {
  if (chosen.length > 0 ? !chosen.includes(name) : ON_REQUEST.has(name)) continue
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), `vmapipe-bench-${name}-`))
  try {
    await suite(dir, gib)
  } finally {
    rmSync(dir, { recursive: true, force: true })
    // After every suite, so that what was measured survives a later failure.
    const saved = { started, node: process.version, gib, pairs: PAIRS, pveVma: PVE_VMA ?? null, suites: RESULTS, scaling: SCALING }
    writeFileSync(json, JSON.stringify(saved, null, 2) + '\n')
  }
}
process.stdout.write(`\nall rows in ${json}\n`)
