/** Parallels fixtures and oracles: the QEMU samples, qemu-img check and compare, a small independent header decoder. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Test } from 'tap'
import { FIXTURES, exits, run } from './run.js'
import { Rng, makeDisk } from './random.js'

/** The two QEMU samples, decompressed into `dir`: [path, magic]. */
export async function qemuSamples (dir: string): Promise<Array<[string, string]>> {
  const out: Array<[string, string]> = []
  for (const [name, magic] of [['parallels-v1', 'WithoutFreeSpace'], ['parallels-v2', 'WithouFreSpacExt']]) {
    const src = join(FIXTURES, `${name}.hds.bz2`)
    if (!existsSync(src)) throw new Error(`missing ${src}`)
    const r = await run('bzip2', ['-dc', src])
    if (r.code !== 0) throw new Error(`bzip2 -dc ${src}: ${r.stderr}`)
    const path = join(dir, `${name}.hds`)
    writeFileSync(path, r.stdout)
    out.push([path, magic])
  }
  return out
}

/** qemu-img check passes with no errors and no leaked clusters. */
export async function qemuCheck (t: Test, image: string): Promise<void> {
  const r = await run('qemu-img', ['check', '-f', 'parallels', image])
  exits(t, r, 0, `qemu-img check ${image}`)
  t.match(r.stdout.toString(), /No errors were found on the image/, 'no errors')
  t.notMatch(r.stdout.toString() + r.stderr, /leak/i, 'no leaked space')
}

/** qemu-img compare finds the image equal to the raw file. */
export async function qemuCompare (t: Test, image: string, raw: string, format = 'parallels'): Promise<void> {
  exits(t, await run('qemu-img', ['compare', '-f', format, '-F', 'raw', image, raw]), 0, `qemu-img compare ${image} ${raw}`)
}

export async function qemuImg (t: Test, args: string[]): Promise<void> {
  exits(t, await run('qemu-img', args), 0, `qemu-img ${args.join(' ')}`)
}

/** Header fields and BAT decoded here, apart from the library. */
export function readImage (path: string): { bytes: Buffer, magic: string, inUse: number, tracks: number, dataOff: number, extOff: number, bat: number[] } {
  const bytes = readFileSync(path)
  const entries = bytes.readUInt32LE(32)
  return {
    bytes,
    magic: bytes.toString('latin1', 0, 16),
    inUse: bytes.readUInt32LE(44),
    tracks: bytes.readUInt32LE(28),
    dataOff: bytes.readUInt32LE(48),
    extOff: Number(bytes.readBigUInt64LE(56)),
    bat: Array.from({ length: entries }, (_, i) => bytes.readUInt32LE(64 + 4 * i)),
  }
}

/** Seeded disk bytes (see makeDisk) written to `dir/name`. */
export function randomDisk (dir: string, name: string, seed: number, size: number): { path: string, data: Buffer } {
  const path = join(dir, name)
  const data = makeDisk(new Rng(seed), size)
  writeFileSync(path, data)
  return { path, data }
}

/** A Parallels image of a raw file, made by qemu-img. */
export async function toParallels (t: Test, raw: string, image: string, clusterSize = '1M'): Promise<void> {
  await qemuImg(t, ['convert', '-f', 'raw', '-O', 'parallels', '-o', `cluster_size=${clusterSize}`, raw, image])
}
