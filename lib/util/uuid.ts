/** UUIDs as text (8-4-4-4-12 hex digits) and as their 16 bytes. */
const UUID_TEXT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

export function isUuid (text: string): boolean {
  return UUID_TEXT.test(text)
}

export function formatUuid (bytes: Buffer): string {
  const h = bytes.toString('hex')
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`
}

/** The 16 bytes of a UUID that isUuid accepts. */
export function uuidBytes (text: string): Buffer {
  return Buffer.from(text.replace(/-/g, ''), 'hex')
}
