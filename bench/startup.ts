/**
 * Startup: `vma --help`, `vma list` of the example archive and `pack-vma --help` against `node -e 0`
 * (and against the same commands of BENCH_BASELINE, a built checkout, where given): what loading costs.
 */
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Table, binCommand, pair, packVma, q, vma } from './lib.js'

const RUNS = 10
const demo = fileURLToPath(new URL('../../examples/demo.vma.zst', import.meta.url))

export async function benchStartup (): Promise<void> {
  const table = new Table('startup', '')
  const base = process.env.BENCH_BASELINE
  const node = `${q(process.execPath)} -e 0`
  const baseline = (bin: string): string => binCommand(join(base ?? '', 'dist/bin', bin))
  const jobs: Array<[string, (vmaCmd: string, packCmd: string) => string]> = [
    ['vma --help', v => `${v} --help > /dev/null`],
    ['vma list examples/demo.vma.zst', v => `${v} list ${q(demo)} > /dev/null`],
    ['pack-vma --help', (_, p) => `${p} --help > /dev/null`],
  ]
  for (const [job, script] of jobs) {
    table.add(job, 0, await pair(script(vma, packVma), node, { pairs: RUNS }), 'node -e 0')
    if (base !== undefined) {
      table.add(job, 0, await pair(script(vma, packVma), script(baseline('vma.js'), baseline('pack-vma.js')), { pairs: RUNS }), `baseline ${base}`)
    }
  }
  table.print('Startup')
}
