/**
 * A real HTTP proxy between the AWS SDK and the test store that breaks
 * things on purpose: it cuts the connection part way through a GET's answer
 * or a part's upload, and can answer a create with If-None-Match as a store
 * that does not know the header does (501 NotImplemented). Requests are
 * forwarded as they are (the Host header too, which the signature covers).
 */
import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'

export interface FaultRules {
  /** Cut the connection after this many bytes of a GET's answer body, for the next `times` GETs that reach it. */
  dropGet?: { afterBytes: number, times: number }
  /** Cut the connection after this many bytes of an UploadPart's body, for the next `times` parts that reach it. */
  dropPart?: { afterBytes: number, times: number }
  /** Answer a PUT carrying If-None-Match with 501 NotImplemented, as stores without conditional writes do. */
  refuseConditionalCreate?: boolean
}

export interface FaultCounts {
  droppedGets: number
  droppedParts: number
  refusedCreates: number
  requests: number
}

/** A request as it passed: what tests check of what the SDK sends (checksum headers, conditions). */
export interface SeenRequest {
  method: string
  url: string
  headers: Record<string, string | string[] | undefined>
}

export interface FaultProxy {
  /** The endpoint to give the client in place of the store's. */
  endpoint: string
  /** The last 1,000 requests. */
  seen: SeenRequest[]
  /** Change them at any time; each request reads them as it arrives. */
  rules: FaultRules
  counts: FaultCounts
}

const NOT_IMPLEMENTED = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>' +
  '<Message>A header you provided implies functionality that is not implemented</Message><Header>If-None-Match</Header></Error>'

/** Starts a proxy to `upstream` (http://host:port) on loopback, closed when the test ends. */
export async function s3FaultProxy (t: Test, upstream: string, rules: FaultRules = {}): Promise<FaultProxy> {
  const target = new URL(upstream)
  const counts: FaultCounts = { droppedGets: 0, droppedParts: 0, refusedCreates: 0, requests: 0 }
  const proxy: FaultProxy = { endpoint: '', seen: [], rules, counts }

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    counts.requests++
    proxy.seen.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers })
    if (proxy.seen.length > 1000) proxy.seen.shift()
    const url = new URL(req.url ?? '/', 'http://proxy')
    const r = proxy.rules
    if (req.method === 'PUT' && r.refuseConditionalCreate === true && req.headers['if-none-match'] !== undefined) {
      counts.refusedCreates++
      req.resume()
      res.writeHead(501, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(NOT_IMPLEMENTED), connection: 'close' })
      res.end(NOT_IMPLEMENTED)
      return
    }
    const dropGet = req.method === 'GET' && url.pathname.split('/').filter(Boolean).length > 1 && r.dropGet !== undefined && r.dropGet.times > 0
      ? r.dropGet
      : undefined
    const dropPart = req.method === 'PUT' && url.searchParams.has('partNumber') && r.dropPart !== undefined && r.dropPart.times > 0
      ? r.dropPart
      : undefined
    if (dropGet !== undefined) dropGet.times--
    if (dropPart !== undefined) dropPart.times--
    // Expect: 100-continue is answered here (node's server does), and not signed.
    const { expect: _expect, ...headers } = req.headers
    const up = request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers }, answer => {
      res.writeHead(answer.statusCode ?? 502, answer.headers)
      let sent = 0
      let cut = false
      answer.on('data', (chunk: Buffer) => {
        if (cut) return
        if (dropGet !== undefined && sent + chunk.length > dropGet.afterBytes) {
          res.write(chunk.subarray(0, Math.max(0, dropGet.afterBytes - sent)))
          counts.droppedGets++
          cut = true
          // Flushes what was written, then resets: the client sees a body cut short.
          setImmediate(() => { res.socket?.destroy(); answer.destroy() })
          return
        }
        sent += chunk.length
        res.write(chunk)
      })
      answer.on('end', () => res.end())
      answer.on('error', () => res.socket?.destroy())
    })
    up.on('error', () => res.socket?.destroy())
    let received = 0
    req.on('data', (chunk: Buffer) => {
      if (up.destroyed) return
      received += chunk.length
      if (dropPart !== undefined && received > dropPart.afterBytes) {
        counts.droppedParts++
        req.socket.destroy()
        up.destroy()
        return
      }
      up.write(chunk)
    })
    req.on('end', () => up.end())
    req.on('error', () => up.destroy())
  }

  const server = createServer(handle)
  server.keepAliveTimeout = 1000
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  t.teardown(async () => {
    server.closeAllConnections()
    await new Promise(resolve => server.close(resolve))
  })
  return proxy
}
