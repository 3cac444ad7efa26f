/**
 * NBD conversations for the fuzzer. A recording proxy sits between a real
 * client and a real server and keeps what each side sent, and how much it
 * had heard from the other side before. Replaying one side (mutated) to the
 * library's client or server then follows the same rhythm: a segment goes
 * out once the peer has sent what it sent in the recording, or has gone
 * quiet, so that a peer that took another path is not kept waiting.
 */
import { connect, createServer, type Socket } from 'node:net'

/** Bytes one side sent once the other side had sent `after` bytes. */
export interface Segment { after: number, data: Buffer }

export interface Recording { toClient: Segment[], toServer: Segment[] }

function add (list: Segment[], after: number, data: Buffer): void {
  const last = list[list.length - 1]
  if (last !== undefined && last.after === after) last.data = Buffer.concat([last.data, data])
  else list.push({ after, data: Buffer.from(data) })
}

/** Runs `session` against a proxy at `proxyPath` that forwards to `upstream` and records both directions. */
export async function record (proxyPath: string, upstream: () => Socket, session: () => Promise<void>): Promise<Recording> {
  const rec: Recording = { toClient: [], toServer: [] }
  const sockets: Socket[] = []
  const server = createServer(client => {
    const up = upstream()
    sockets.push(client, up)
    let fromClient = 0
    let fromServer = 0
    up.on('data', (b: Buffer) => { add(rec.toClient, fromClient, b); fromServer += b.length; client.write(b) })
    client.on('data', (b: Buffer) => { add(rec.toServer, fromServer, b); fromClient += b.length; up.write(b) })
    up.on('end', () => client.end())
    client.on('end', () => up.end())
    up.on('error', () => client.destroy())
    client.on('error', () => up.destroy())
  })
  await new Promise<void>(resolve => server.listen(proxyPath, resolve))
  try {
    await session()
    // Let the last bytes through the proxy.
    await new Promise(resolve => setTimeout(resolve, 100))
  } finally {
    for (const s of sockets) s.destroy()
    await new Promise<void>(resolve => server.close(() => resolve()))
  }
  return rec
}

/** The segments' bytes end to end, with where each one starts. */
export function flatten (segments: Segment[]): { bytes: Buffer, starts: number[], afters: number[] } {
  return {
    bytes: Buffer.concat(segments.map(s => s.data)),
    starts: segments.map((_, i) => segments.slice(0, i).reduce((n, s) => n + s.data.length, 0)),
    afters: segments.map(s => s.after),
  }
}

/** Cuts `bytes` (a mutated flattening) at the original starts again. */
export function cut (bytes: Buffer, starts: number[], afters: number[]): Segment[] {
  const out: Segment[] = []
  for (let i = 0; i < starts.length; i++) {
    const from = Math.min(bytes.length, starts[i])
    const to = i + 1 < starts.length ? Math.min(bytes.length, starts[i + 1]) : bytes.length
    out.push({ after: afters[i], data: bytes.subarray(from, to) })
  }
  return out
}

/** How long a peer may be quiet before the next segment goes out anyway (ms). */
const QUIET = 15

/**
 * Plays `segments` into `socket` as the recording did, then half-closes it.
 * Resolves when the socket is closed.
 */
export async function play (socket: Socket, segments: Segment[], heardBytes?: Buffer[]): Promise<void> {
  let heard = 0
  let next = 0
  let timer: NodeJS.Timeout | undefined
  const closed = new Promise<void>(resolve => socket.once('close', () => resolve()))
  const sendDue = (force: boolean): void => {
    if (socket.destroyed) return
    while (next < segments.length && (force || segments[next].after <= heard)) {
      socket.write(segments[next++].data)
      force = false
    }
    clearTimeout(timer)
    if (next < segments.length) timer = setTimeout(() => sendDue(true), QUIET)
    else timer = setTimeout(() => { if (!socket.destroyed) socket.end() }, QUIET)
  }
  socket.on('data', (b: Buffer) => { heard += b.length; heardBytes?.push(b); sendDue(false) })
  socket.on('error', () => {})
  if (socket.connecting) socket.once('connect', () => sendDue(false))
  else sendDue(false)
  await closed
  clearTimeout(timer)
}

/** A one-connection fake server at `path` that plays `segments` to whoever connects. */
export async function fakeServer (path: string, segments: Segment[]): Promise<{ heard: Buffer[], close: () => Promise<void> }> {
  let conn: Socket | undefined
  const heard: Buffer[] = []
  const server = createServer(socket => {
    conn = socket
    void play(socket, segments, heard)
  })
  await new Promise<void>(resolve => server.listen(path, resolve))
  return {
    heard,
    close: async () => {
      conn?.destroy()
      await new Promise<void>(resolve => server.close(() => resolve()))
    },
  }
}

export function dial (path: string): Socket { return connect(path) }
