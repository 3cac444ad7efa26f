// Counts leaf test points in a TAP 14 stream (nested subtests), and counts a
// failed subtest or file that failed without a failed leaf (a crash) as one.
import { createInterface } from 'node:readline'

let passed = 0
let failed = 0
const open = [] // indents of subtests still open, each with its failed-leaf count at opening
for await (const raw of createInterface({ input: process.stdin })) {
  const line = raw.replace(/\r$/, '')
  const sub = /^(\s*)# Subtest/.exec(line)
  if (sub) { open.push({ indent: sub[1].length, failedAtOpen: failed }); continue }
  const point = /^(\s*)(not ok|ok)\b(.*)$/.exec(line)
  if (!point) continue
  const indent = point[1].length
  const ok = point[2] === 'ok' || /#\s*(TODO|SKIP)/i.test(point[3])
  const top = open[open.length - 1]
  if (top && top.indent === indent) {
    open.pop()
    if (!ok && failed === top.failedAtOpen) failed++
    continue
  }
  if (ok) passed++; else failed++
}
console.log(`${passed} passed, ${failed} failed`)
