/**
 * One target per parser: how a case's bytes are handed to the library, and
 * what counts as accepted. A target returns a verdict or throws; the worker
 * turns a VmapipeError into a clean error and anything else into a crash.
 */
import { execFile } from 'node:child_process'
import { cpSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { type ClusterRecord, type RandomAccessDisk, type StreamedImage, NbdServer, VmaReader, VmapipeError } from '../lib/index.js'
import { ParallelsBundle, ParallelsImage, parseDescriptor, streamParallels } from '../lib/parallels/index.js'
import { Qcow2Image, streamQcow2 } from '../lib/qcow2/index.js'
import { RawImage } from '../lib/raw/index.js'
import { diskRecords } from '../lib/io/disk-records.js'
import { chain } from '../lib/io/chain.js'
import type { Rng } from './rng.js'
import { type Seed, mutate } from './mutate.js'
import { badReadReplies, fixParallels, fixVma, growQcow2, sprayVma } from './formats.js'
import { cut, dial, fakeServer, play } from './nbd.js'
import { clientSession } from './seeds.js'

export type Verdict =
  | { class: 'accepted', checked?: boolean }
  /** Accepted, but qemu-img reads other bytes: a failure. */
  | { class: 'mismatch', detail: string }
  /** Accepted, but qemu-img refuses the image: worth a look, not a failure. */
  | { class: 'diverge', detail: string }
  /** The peer said no in its own terms (the NBD server closing on a protocol violation). */
  | { class: 'error', detail: string }
  | { class: 'crash', detail: string }

export interface CaseContext {
  /** The case's bytes, written to this file. */
  path: string
  /** The worker's own directory for temporary files and sockets. */
  dir: string
  rng: Rng
  /** Share of accepted images compared with qemu-img. */
  crossCheck: number
  caseTimeout: number
  seed: Seed
  index: number
}

export interface Target {
  /** Edits beyond the generic ones (XML), or checksums to set again. */
  mutate?: (rng: Rng, seed: Seed, seeds: Seed[]) => { bytes: Buffer, steps: string[] }
  init?: (dir: string, seedDir: string) => Promise<void>
  run: (bytes: Buffer, ctx: CaseContext) => Promise<Verdict>
}

/** Images up to this size are read whole and may be compared with qemu-img. */
const COMPARE_LIMIT = 16 << 20
/** Records taken from a larger image before it is left (its size alone makes the rest slow, not wrong). */
const RECORD_LIMIT = 256

/** The bytes as a stream in chunks of random sizes, as a pipe would give them. */
function chunked (bytes: Buffer, rng: Rng): Readable {
  const parts: Buffer[] = []
  for (let at = 0; at < bytes.length;) {
    const n = 1 + rng.below(rng.chance(0.3) ? 512 : 65536 * 2)
    parts.push(bytes.subarray(at, at + n))
    at += n
  }
  return Readable.from(parts, { objectMode: false })
}

async function drain (stream: Readable): Promise<number> {
  let n = 0
  for await (const _ of stream) n++
  return n
}

/** The guest disk the records describe, or undefined when it is too large to hold (the records are still taken, up to RECORD_LIMIT). */
async function assemble (records: Readable, size: number): Promise<Buffer | undefined> {
  const out = size <= COMPARE_LIMIT ? Buffer.alloc(size) : undefined
  let n = 0
  for await (const r of records as AsyncIterable<ClusterRecord>) {
    if (out === undefined) {
      if (++n >= RECORD_LIMIT) { records.destroy(); break }
      continue
    }
    for (let b = 0, k = 0; b < 16; b++) {
      if ((r.mask & (1 << b)) === 0) continue
      const at = r.cluster * 65536 + b * 4096
      if (at < out.length) r.data.copy(out, at, k * 4096, Math.min((k + 1) * 4096, k * 4096 + out.length - at))
      k++
    }
  }
  return out
}

/** qemu-img's reading of the image, compared with ours. */
async function compare (ctx: CaseContext, format: 'qcow2' | 'parallels', ours: Buffer | undefined): Promise<Verdict> {
  if (ours === undefined || !ctx.rng.chance(ctx.crossCheck)) return { class: 'accepted' }
  const out = join(ctx.dir, 'qemu.raw')
  rmSync(out, { force: true })
  const refused = await new Promise<string | undefined>(resolve => {
    execFile('qemu-img', ['convert', '-f', format, '-O', 'raw', ctx.path, out], { timeout: 10_000 }, (err, _stdout, stderr) => {
      resolve(err === null ? undefined : `${err.message} ${stderr}`.replaceAll(ctx.path, 'IMAGE').replaceAll(out, 'OUT').trim())
    })
  })
  if (refused !== undefined) return { class: 'diverge', detail: `accepted here, qemu-img convert refuses: ${refused.slice(0, 500)}` }
  const theirs = readFileSync(out)
  rmSync(out, { force: true })
  // parallels.rst: an image whose header has the Empty bit (flags bit 0) "should be considered clear";
  // QEMU ignores the bit and reads the BAT. vmapipe follows the spec: a known divergence, not a failure.
  const bytes = readFileSync(ctx.path)
  if (format === 'parallels' && bytes.length >= 56 && (bytes.readUInt32LE(52) & 1) !== 0 && ours.every(b => b === 0)) {
    return { class: 'diverge', detail: 'the Empty bit is set: read as zeros here (as parallels.rst says), as the BAT says by qemu-img' }
  }
  if (theirs.length !== ours.length) return { class: 'mismatch', detail: `qemu-img reads ${theirs.length} bytes, vmapipe ${ours.length}` }
  if (!theirs.equals(ours)) {
    let at = 0
    while (theirs[at] === ours[at]) at++
    return { class: 'mismatch', detail: `first difference at byte ${at} (qemu-img 0x${theirs[at].toString(16)}, vmapipe 0x${ours[at].toString(16)})` }
  }
  return { class: 'accepted', checked: true }
}

/** A random-access image: what `vma info` asks, then every cluster as pack reads it. */
async function readImage (disk: RandomAccessDisk): Promise<Buffer | undefined> {
  try {
    await disk.describe?.()
    for (const b of disk.bitmaps ?? []) await b.dirtyBytes()
    return await assemble(diskRecords(disk, 0), disk.size)
  } finally {
    await disk.close()
  }
}

async function readStreamed (image: StreamedImage | undefined): Promise<Buffer | undefined> {
  if (image === undefined) return undefined
  return await assemble(await image.records(0), image.size)
}

type Extra = (b: Buffer, rng: Rng) => { bytes: Buffer, what: string }

/** The generic mutations, and now and then a format's own larger edit. */
function withExtra (extra: Extra): NonNullable<Target['mutate']> {
  return (rng, seed, seeds) => {
    const m = mutate(rng, seed, seeds)
    if (rng.chance(0.05)) {
      const e = extra(m.bytes, rng)
      m.bytes = e.bytes
      m.steps.push(e.what)
    }
    return m
  }
}

function withFix (fix: (b: Buffer) => void, extra?: Extra): Target['mutate'] {
  return (rng, seed, seeds) => {
    const m = extra !== undefined ? withExtra(extra)(rng, seed, seeds) : mutate(rng, seed, seeds)
    // Mostly set the checksums again, so that the parser looks past them.
    if (rng.chance(0.85)) { fix(m.bytes); m.steps.push('checksums set again') }
    return m
  }
}

// ------------------------------------------------------------ DiskDescriptor.xml

const ZERO_GUID = '{00000000-0000-0000-0000-000000000000}'
const TOP = '{5fbaabe3-6958-40ff-92a7-860e329aab41}'
const NUMBERS = ['0', '-1', '1', '4294967296', '9007199254740993', '1e400', 'NaN', '0x10', '', ' 7 ', '18446744073709551615', '1.5']
const GUIDS = [ZERO_GUID, TOP, TOP.toUpperCase(), 'not-a-guid', '']
const TYPES = ['Plain', 'Compressed', 'X']
const FILES = ['/proc/self/mem', '.', '..', '../x.hds', 'subdir', '/etc/hostname', 'escape.hds', 'snap.hds', 'missing.hds', 'a'.repeat(300), '&#0;']

function xmlMutate (rng: Rng, seed: Seed, seeds: Seed[]): { bytes: Buffer, steps: string[] } {
  if (rng.chance(0.25)) return mutate(rng, seed, seeds)
  let text = seed.bytes.toString('utf8')
  const steps: string[] = []
  const n = 1 + rng.below(3)
  for (let i = 0; i < n; i++) {
    const elements = [...text.matchAll(/<([A-Za-z_]+)>([^<]*)<\/\1>/g)]
    const blocks = [...text.matchAll(/<(Image|Shot|Storage)>[\s\S]*?<\/\1>/g)]
    const r = rng.below(9)
    if (r < 3 && elements.length > 0) {
      const e = rng.pick(elements)
      const tag = e[1]
      const value = rng.pick(/GUID/.test(tag) ? GUIDS : tag === 'File' ? FILES : tag === 'Type' ? TYPES : NUMBERS)
      text = text.slice(0, e.index) + `<${tag}>${value}</${tag}>` + text.slice((e.index ?? 0) + e[0].length)
      steps.push(`<${tag}> = ${JSON.stringify(value).slice(0, 40)}`)
    } else if (r < 5 && blocks.length > 0) {
      const b = rng.pick(blocks)
      const at = (b.index ?? 0) + (rng.chance(0.5) ? b[0].length : 0)
      const dup = rng.chance(0.6)
      text = dup ? text.slice(0, at) + b[0] + text.slice(at) : text.slice(0, b.index) + text.slice((b.index ?? 0) + b[0].length)
      steps.push(`${dup ? 'duplicate' : 'remove'} <${b[1]}>`)
    } else if (r < 6) {
      const depth = rng.pick([50, 101, 1000, 5000])
      const at = text.indexOf('</Disk_Parameters>')
      if (at >= 0) text = text.slice(0, at) + '<a>'.repeat(depth) + '</a>'.repeat(depth) + text.slice(at)
      steps.push(`nest ${depth} levels`)
    } else if (r < 7) {
      // Each entity ten of the one before: &d; is 44,000 characters.
      const dtd = `<!DOCTYPE p [<!ENTITY a "${'a'.repeat(44)}">${['b', 'c', 'd'].map((e, k) => `<!ENTITY ${e} "${`&${'abc'[k]};`.repeat(10)}">`).join('')}]>`
      const at = text.indexOf('<Parallels_disk_image')
      text = text.slice(0, Math.max(0, at)) + dtd + text.slice(Math.max(0, at)).replace(/<Padding>[^<]*</, '<Padding>&d;<')
      steps.push('entity expansion')
    } else if (r < 8) {
      text = text.replace(/Version="[^"]*"/, `Version="${rng.pick(['1.0', '2.0', '', '1.0" Version="1.0'])}"`)
      steps.push('Version attribute')
    } else {
      const cutAt = rng.below(text.length + 1)
      text = text.slice(0, cutAt)
      steps.push(`truncate to ${cutAt} characters`)
    }
  }
  return { bytes: Buffer.from(text, 'utf8'), steps }
}

// ----------------------------------------------------------------------- targets

let bundleDir = ''
let server: { socket: string, logs: Array<{ level: string, message: string }>, server: NbdServer } | undefined

export const TARGETS: Record<string, Target> = {
  vma: {
    mutate: withFix(fixVma, sprayVma),
    run: async (bytes, ctx) => {
      await drain(chain(chunked(bytes, ctx.rng), new VmaReader()))
      return { class: 'accepted' }
    },
  },
  'qcow2-image': {
    mutate: withExtra(growQcow2),
    run: async (_bytes, ctx) => await compare(ctx, 'qcow2', await readImage(await Qcow2Image.open(ctx.path))),
  },
  'qcow2-stream': {
    mutate: withExtra(growQcow2),
    run: async (bytes, ctx) => await compare(ctx, 'qcow2', await readStreamed(await streamQcow2(chunked(bytes, ctx.rng), { tmpDir: ctx.dir }))),
  },
  'parallels-image': {
    mutate: withFix(fixParallels),
    run: async (_bytes, ctx) => await compare(ctx, 'parallels', await readImage(await ParallelsImage.open(ctx.path))),
  },
  'parallels-stream': {
    mutate: withFix(fixParallels),
    run: async (bytes, ctx) => await compare(ctx, 'parallels', await readStreamed(await streamParallels(chunked(bytes, ctx.rng), 'stdin'))),
  },
  descriptor: {
    mutate: xmlMutate,
    init: async (dir, seedDir) => {
      bundleDir = join(dir, 'bundle')
      cpSync(join(seedDir, 'bundle'), bundleDir, { recursive: true })
      symlinkSync('/etc/hostname', join(bundleDir, 'escape.hds'))
    },
    run: async (bytes) => {
      const xml = bytes.toString('utf8')
      parseDescriptor(xml, 'DiskDescriptor.xml')
      writeFileSync(join(bundleDir, 'DiskDescriptor.xml'), bytes)
      await readImage(await ParallelsBundle.open(bundleDir))
      return { class: 'accepted' }
    },
  },
  'nbd-client': {
    run: async (bytes, ctx) => {
      const socket = join(ctx.dir, 'fake.sock')
      rmSync(socket, { force: true })
      const meta = ctx.seed.meta as NonNullable<Seed['meta']>
      const fake = await fakeServer(socket, cut(bytes, meta.starts, meta.afters))
      try {
        await clientSession(socket, ctx.caseTimeout)
      } finally {
        await fake.close()
      }
      // Accepted: then every READ must have been answered whole, each byte once.
      const bad = badReadReplies(Buffer.concat(fake.heard), bytes)
      if (bad !== undefined && bad.length > 0) return { class: 'mismatch', detail: `the client accepted ${bad.join('; ')}` }
      return { class: 'accepted' }
    },
  },
  'nbd-server': {
    init: async (dir, seedDir) => {
      const socket = join(dir, 'server.sock')
      const logs: Array<{ level: string, message: string }> = []
      const disk = await RawImage.open(join(seedDir, 'disk.raw'))
      const s = new NbdServer([{ name: 'disk', disk }], {
        handshakeTimeout: 1000,
        log: { info: (_f, message) => logs.push({ level: 'info', message }), warn: (_f, message) => logs.push({ level: 'warn', message }) },
      })
      await s.listen({ socket })
      server = { socket, logs, server: s }
    },
    run: async (bytes, ctx) => {
      const s = server as NonNullable<typeof server>
      s.logs.length = 0
      const meta = ctx.seed.meta as NonNullable<Seed['meta']>
      await play(dial(s.socket), cut(bytes, meta.starts, meta.afters))
      // The server's side is closed once it has said so.
      while (!s.logs.some(l => l.message === 'client disconnected')) await new Promise(resolve => setTimeout(resolve, 2))
      const warnings = s.logs.filter(l => l.level === 'warn').map(l => l.message)
      const internal = warnings.find(m => ENGINE_ERROR.test(m))
      if (internal !== undefined) return { class: 'crash', detail: `the server closed a connection on an internal error: ${internal}` }
      const refused = warnings.find(m => m.startsWith('closing the connection'))
      return refused !== undefined ? { class: 'error', detail: refused } : { class: 'accepted' }
    },
  },
}

/**
 * Not a parser: fails on purpose in each way in turn (case index mod 7), so
 * that a test sees the harness tell every class apart.
 */
TARGETS.selftest = {
  run: async (_bytes, ctx) => {
    switch (ctx.index % 7) {
      case 0: return { class: 'accepted' }
      case 1: throw new VmapipeError('E_RECORD', 'a clean refusal')
      case 2: throw new TypeError('a bug')
      case 3: process.exit(9)
      // falls through (exit does not return)
      case 4: return await new Promise<Verdict>(() => {})
      case 5: {
        // Touched at once, then held: the worker's own watch sees it at its next tick.
        const kept = Buffer.alloc(320 << 20, 1)
        return await new Promise<Verdict>(resolve => setTimeout(() => resolve({ class: kept.length > 0 ? 'accepted' : 'crash', detail: '' }), 60_000))
      }
      default: for (;;) { /* a loop that never yields */ }
    }
  },
}

/** Messages of JavaScript's own errors (a bug in the server, not a client's fault). */
const ENGINE_ERROR = new RegExp([
  'Cannot read prop', 'is not a function', 'is not defined', 'is not iterable', 'out of range', 'Invalid array length', 'Maximum call stack',
  'ERR_BUFFER_OUT_OF_BOUNDS', 'ERR_OUT_OF_RANGE', 'ERR_INVALID_ARG',
].join('|'))

/** The parsers fuzzed by default (all but the self-test). */
export const PARSERS = Object.keys(TARGETS).filter(p => p !== 'selftest')
