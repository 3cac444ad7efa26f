/**
 * Live restore in tests: `vma serve` fed through its stdin at a chosen rate,
 * archives whose clusters come in order (so that the test knows which bytes
 * bring which cluster), and qemu-io as the client that reads a range.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import type { Writable } from 'node:stream'
import { VMA } from './run.js'
import type { Teardown } from './nbd.js'
import { type BuildDevice, type Slot, buildExtent, buildHeader } from './vma-builder.js'

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

export interface LiveServe {
  child: ChildProcess
  stdin: Writable
  stderr: () => string
  logs: () => Array<Record<string, unknown>>
  /** Waits for a log line that `match` accepts (or the process to exit: then it throws). */
  waitLog: (match: (l: Record<string, unknown>) => boolean, timeout?: number) => Promise<Record<string, unknown>>
  /** SIGTERM, then the exit code. */
  stop: () => Promise<number | null>
}

/** `vma serve ARGS` with a pipe for stdin, stopped at teardown. */
export function spawnServe (t: Teardown, args: string[]): LiveServe {
  const child = spawn(process.execPath, [VMA, 'serve', ...args], { stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, NODE_OPTIONS: '' } })
  let stderr = ''
  child.stderr?.on('data', (b: Buffer) => { stderr += b.toString() })
  const stdin = child.stdin as Writable
  stdin.on('error', () => {})
  const exited = new Promise<number | null>(resolve => child.on('exit', code => resolve(code)))
  const stop = async (): Promise<number | null> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
    return await exited
  }
  t.teardown(async () => { await stop() })
  const logs = (): Array<Record<string, unknown>> => stderr.split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as Record<string, unknown>)
  const waitLog = async (match: (l: Record<string, unknown>) => boolean, timeout = 60_000): Promise<Record<string, unknown>> => {
    const until = Date.now() + timeout
    for (;;) {
      const found = logs().find(match)
      if (found !== undefined) return found
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`vma serve exited (${child.exitCode ?? child.signalCode}): ${stderr}`)
      if (Date.now() > until) throw new Error(`no such log line within ${timeout} ms: ${stderr}`)
      await sleep(20)
    }
  }
  return { child, stdin, stderr: () => stderr, logs, waitLog, stop }
}

/** Writes `bytes` to `out` at about `rate` bytes a second (which may be changed on the way), in pieces; `written` counts what the pipe has taken. */
export class Feeder {
  written = 0
  constructor (private readonly out: Writable, public rate: number, private readonly piece = 16384) {}

  /** Writes bytes [from, to) of `bytes` at the rate: after each piece, a pause as long as it takes at the rate (a stall is never made up by a burst). */
  async feed (bytes: Buffer, from: number, to: number): Promise<void> {
    for (let at = from; at < to;) {
      const n = Math.min(this.piece, to - at)
      await new Promise<void>((resolve, reject) => this.out.write(bytes.subarray(at, at + n), err => { if (err) reject(err); else resolve() }))
      at += n
      this.written += n
      await sleep(n / this.rate * 1000)
    }
  }
}

/** An archive of one disk whose clusters come in order, 59 to an extent; and where its last extent starts. */
export function orderedArchive (device: BuildDevice): { archive: Buffer, lastExtent: number } {
  const spec = { configs: [{ name: 'qemu-server.conf', data: Buffer.from('boot: order=virtio0\n') }], devices: [device] }
  const slots: Slot[] = []
  for (let c = 0; c * 65536 < device.size; c++) slots.push({ dev: device.id, cluster: c })
  const extents: Buffer[] = []
  for (let i = 0; i < slots.length; i += 59) extents.push(buildExtent(spec, slots.slice(i, i + 59)))
  const archive = Buffer.concat([buildHeader(spec), ...extents])
  return { archive, lastExtent: archive.length - extents[extents.length - 1].length }
}

/** A running `qemu-io -r -f raw -c 'read -v OFFSET LENGTH' URI`: the bytes it read, or the error it printed. */
export function qemuIoRead (uri: string, offset: number, length: number): { exited: () => boolean, result: Promise<{ bytes?: Buffer, error?: string }> } {
  const child = spawn('qemu-io', ['-r', '-f', 'raw', '-c', `read -v ${offset} ${length}`, uri], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (b: Buffer) => { out += b.toString() })
  child.stderr.on('data', (b: Buffer) => { out += b.toString() })
  let done = false
  const result = new Promise<{ bytes?: Buffer, error?: string }>(resolve => child.on('close', () => {
    done = true
    if (!/read \d+\/\d+ bytes at offset/.test(out)) { resolve({ error: out }); return }
    const bytes = Buffer.alloc(length)
    for (const m of out.matchAll(/^([0-9a-f]{8}):((?: +[0-9a-f]{2}){1,16})/gm)) {
      const at = parseInt(m[1], 16) - offset
      Buffer.from(m[2].replace(/ /g, ''), 'hex').copy(bytes, at)
    }
    resolve({ bytes })
  }))
  return { exited: () => done, result }
}
