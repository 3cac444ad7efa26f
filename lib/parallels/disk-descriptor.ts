/**
 * DiskDescriptor.xml of a Parallels .hdd bundle (../shared/specs/prl-xml.rst):
 * parsed into what the spec covers, built new, and rewritten (a snapshot
 * image added) with everything else left exactly as it was. XML goes through
 * fast-xml-parser in its order-preserving mode; DOCTYPEs and entities other
 * than XML's own five are refused before parsing, so nothing expands.
 */
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import { VmapipeError } from '../errors.js'

/** The GUID a top snapshot has when no TopGUID names it. */
export const TOP_GUID = '{5fbaabe3-6958-40ff-92a7-860e329aab41}'
/** ParentGUID of the root snapshot. */
export const ROOT_PARENT = '{00000000-0000-0000-0000-000000000000}'

export interface DescriptorImage {
  /** `{uuid}`, lower case. */
  guid: string
  type: 'Plain' | 'Compressed'
  /** Relative to the descriptor's directory, or absolute. */
  file: string
}

export interface DescriptorStorage {
  /** Sectors. */
  start: number
  end: number
  /** Cluster size of the storage's expandable images, in sectors. */
  blockSize: number
  images: DescriptorImage[]
}

export interface DiskDescriptor {
  /** Sectors. */
  diskSize: number
  cylinders: number
  heads: number
  sectorsPerTrack: number
  padding: number
  storages: DescriptorStorage[]
  topGuid?: string
  shots: Array<{ guid: string, parentGuid: string }>
}

/** One node of fast-xml-parser's ordered tree: a tag name holding its children, attributes under ':@'. */
type XmlNode = Record<string, unknown>

const OPTIONS = {
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  commentPropName: '#comment',
  cdataPropName: '#cdata',
  processEntities: true,
  htmlEntities: false,
} as const
type Xml = typeof import('fast-xml-parser')
let loaded: { xml: Xml, parser: InstanceType<Xml['XMLParser']> } | undefined
/** fast-xml-parser, required on first use: every command loads this module through the format registry, few read or write XML. */
function fxp (): NonNullable<typeof loaded> {
  if (loaded === undefined) {
    const xml = createRequire(import.meta.url)('fast-xml-parser') as Xml
    loaded = { xml, parser: new xml.XMLParser({ ...OPTIONS, trimValues: false, parseTagValue: false, parseAttributeValue: false }) }
  }
  return loaded
}

/** Text quoted from the input into a message, cut to a readable length. */
const clip = (text: string): string => text.length > 200 ? `${text.slice(0, 200)}...` : text

export const newGuid = (): string => `{${randomUUID()}}`

/** An E_PARALLELS_XML error: a descriptor, or the bundle it describes, at `where` is wrong. */
export function fail (where: string, message: string): VmapipeError {
  return new VmapipeError('E_PARALLELS_XML', `${where}: ${message}`)
}

/** Linux's PATH_MAX: no longer <File> can name a file. */
const PATH_MAX = 4096
/** A descriptor is five elements deep; deeper nesting is refused here, naming the element, before any parser recurses into it. */
const MAX_DEPTH = 64

/** Refuses elements nested deeper than MAX_DEPTH in `markup` (comments, CDATA and processing instructions blanked out). */
function checkDepth (markup: string, where: string): void {
  let depth = 0
  for (const tag of markup.matchAll(/<(\/?)([^\s/>!?]+)(?:"[^"]*"|'[^']*'|[^'">])*?(\/?)>/g)) {
    if (tag[1] === '/') depth--
    else if (tag[3] !== '/' && ++depth > MAX_DEPTH) {
      const line = markup.slice(0, tag.index).split('\n').length
      throw fail(where, `<${tag[2]}> at line ${line} is nested ${depth} elements deep, more than the ${MAX_DEPTH} allowed`)
    }
  }
}

/** Parses the text after the safety checks; the ordered tree, for rewriting. */
function parseTree (xml: string, where: string): XmlNode[] {
  // Comments, CDATA and processing instructions hold text, not markup; blanked with their line breaks kept, so lines still count.
  const markup = xml.replace(/<!--[\s\S]*?-->|<!\[CDATA\[[\s\S]*?\]\]>|<\?[\s\S]*?\?>/g, m => m.replace(/[^\n]/g, ' '))
  if (/<!DOCTYPE/i.test(markup)) throw fail(where, 'a DOCTYPE is not allowed in a DiskDescriptor.xml')
  if (/<!ENTITY/i.test(markup)) throw fail(where, 'entity declarations are not allowed in a DiskDescriptor.xml')
  const entity = /&(?!(?:amp|lt|gt|quot|apos|#\d+|#x[0-9a-f]+);)[^;\s]{0,32};?/i.exec(markup)
  if (entity !== null) throw fail(where, `entity reference ${entity[0]} is not allowed (only &amp; &lt; &gt; &quot; &apos; and character references)`)
  checkDepth(markup, where)
  const valid = fxp().xml.XMLValidator.validate(xml)
  // The validator's message can quote the whole input (every unclosed tag); a line of it says enough.
  if (valid !== true) throw fail(where, `not well-formed XML at line ${valid.err.line}: ${clip(valid.err.msg)}`)
  try {
    return fxp().parser.parse(xml) as XmlNode[]
  } catch (err) {
    throw fail(where, `cannot be parsed: ${clip((err as Error).message)}`)
  }
}

const tagOf = (node: XmlNode): string => Object.keys(node).find(k => k !== ':@') as string
const childrenOf = (node: XmlNode): XmlNode[] => (node[tagOf(node)] as XmlNode[] | undefined) ?? []
const elements = (children: XmlNode[], name: string): XmlNode[] => children.filter(n => tagOf(n) === name)

function only (children: XmlNode[], name: string, where: string, path: string): XmlNode {
  const found = elements(children, name)
  if (found.length !== 1) throw fail(where, found.length === 0 ? `${path} has no <${name}>` : `${path} has ${found.length} <${name}> elements, one expected`)
  return found[0]
}

function textOf (node: XmlNode): string {
  return childrenOf(node).map(c => String(c['#text'] ?? '')).join('').trim()
}

function numberOf (children: XmlNode[], name: string, where: string, path: string): number {
  const text = textOf(only(children, name, where, path))
  const n = Number(text)
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n)) throw fail(where, `<${name}> in ${path} is "${clip(text)}", not a whole number`)
  return n
}

function guidOf (children: XmlNode[], name: string, where: string, path: string): string {
  const text = textOf(only(children, name, where, path))
  if (!/^\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}$/i.test(text)) {
    throw fail(where, `<${name}> in ${path} is "${clip(text)}", not a GUID in braces`)
  }
  return text.toLowerCase()
}

function rootOf (tree: XmlNode[], where: string): XmlNode {
  const root = only(tree.filter(n => !tagOf(n).startsWith('?') && tagOf(n) !== '#comment' && tagOf(n) !== '#text'),
    'Parallels_disk_image', where, 'the document')
  const version = (root[':@'] as Record<string, string> | undefined)?.['@_Version']
  if (version !== '1.0') throw fail(where, `Parallels_disk_image Version is ${version === undefined ? 'missing' : `"${clip(version)}"`}, only 1.0 is known`)
  return root
}

/** What a DiskDescriptor.xml says, checked for form (the bundle reader checks the meaning). */
export function parseDescriptor (xml: string, where: string): DiskDescriptor {
  return describe(rootOf(parseTree(xml, where), where), where)
}

function describe (root: XmlNode, where: string): DiskDescriptor {
  const top = childrenOf(root)
  const params = childrenOf(only(top, 'Disk_Parameters', where, 'Parallels_disk_image'))
  const storages = elements(childrenOf(only(top, 'StorageData', where, 'Parallels_disk_image')), 'Storage').map((node, s) => {
    const path = `Storage ${s + 1}`
    const children = childrenOf(node)
    return {
      start: numberOf(children, 'Start', where, path),
      end: numberOf(children, 'End', where, path),
      blockSize: numberOf(children, 'Blocksize', where, path),
      images: elements(children, 'Image').map((image, i) => {
        const at = `${path} Image ${i + 1}`
        const fields = childrenOf(image)
        const type = textOf(only(fields, 'Type', where, at))
        if (type !== 'Plain' && type !== 'Compressed') throw fail(where, `<Type> in ${at} is "${clip(type)}", neither Plain nor Compressed`)
        const file = textOf(only(fields, 'File', where, at))
        if (file === '' || file.includes('\0')) throw fail(where, `<File> in ${at} is empty or holds NUL`)
        if (Buffer.byteLength(file) > PATH_MAX) {
          throw fail(where, `<File> in ${at} is ${Buffer.byteLength(file)} bytes, longer than a path can be (${PATH_MAX})`)
        }
        return { guid: guidOf(fields, 'GUID', where, at), type: type as DescriptorImage['type'], file }
      }),
    }
  })
  const snapshots = childrenOf(only(top, 'Snapshots', where, 'Parallels_disk_image'))
  const descriptor: DiskDescriptor = {
    diskSize: numberOf(params, 'Disk_size', where, 'Disk_Parameters'),
    cylinders: numberOf(params, 'Cylinders', where, 'Disk_Parameters'),
    heads: numberOf(params, 'Heads', where, 'Disk_Parameters'),
    sectorsPerTrack: numberOf(params, 'Sectors', where, 'Disk_Parameters'),
    padding: numberOf(params, 'Padding', where, 'Disk_Parameters'),
    storages,
    shots: elements(snapshots, 'Shot').map((shot, i) => ({
      guid: guidOf(childrenOf(shot), 'GUID', where, `Shot ${i + 1}`),
      parentGuid: guidOf(childrenOf(shot), 'ParentGUID', where, `Shot ${i + 1}`),
    })),
  }
  if (elements(snapshots, 'TopGUID').length > 0) descriptor.topGuid = guidOf(snapshots, 'TopGUID', where, 'Snapshots')
  return descriptor
}

/** The top snapshot: TopGUID when present, else the predefined top GUID. */
export function topOf (d: DiskDescriptor, where: string): string {
  if (d.topGuid !== undefined) return d.topGuid
  if (d.shots.some(s => s.guid === TOP_GUID)) return TOP_GUID
  throw fail(where, `no top snapshot: neither <TopGUID> nor a Shot with GUID ${TOP_GUID}`)
}

const el = (name: string, content: string | XmlNode[]): XmlNode => ({ [name]: typeof content === 'string' ? [{ '#text': content }] : content })
const imageNode = (image: DescriptorImage): XmlNode => el('Image', [el('GUID', image.guid), el('Type', image.type), el('File', image.file)])
const shotNode = (guid: string, parent: string): XmlNode => el('Shot', [el('GUID', guid), el('ParentGUID', parent)])

/** A new DiskDescriptor.xml. */
export function buildDescriptor (d: DiskDescriptor): string {
  const root = el('Parallels_disk_image', [
    el('Disk_Parameters', [
      el('Disk_size', String(d.diskSize)),
      el('Cylinders', String(d.cylinders)),
      el('Heads', String(d.heads)),
      el('Sectors', String(d.sectorsPerTrack)),
      el('Padding', String(d.padding)),
    ]),
    el('StorageData', d.storages.map(s => el('Storage', [
      el('Start', String(s.start)),
      el('End', String(s.end)),
      el('Blocksize', String(s.blockSize)),
      ...s.images.map(imageNode),
    ]))),
    el('Snapshots', [
      ...(d.topGuid === undefined ? [] : [el('TopGUID', d.topGuid)]),
      ...d.shots.map(s => shotNode(s.guid, s.parentGuid)),
    ]),
  ])
  root[':@'] = { '@_Version': '1.0' }
  const declaration = { '?xml': [{ '#text': '' }], ':@': { '@_version': '1.0', '@_encoding': 'UTF-8' } }
  return (new (fxp().xml.XMLBuilder)({ ...OPTIONS, format: true, indentBy: '  ' }).build([declaration, root]) as string).trimEnd() + '\n'
}

/**
 * Adds `image` (an overlay) to the descriptor as the new top snapshot: an
 * Image in the storage, a Shot whose parent is the old top, and TopGUID
 * naming it. Every other node, attribute, comment and blank stays as it was.
 */
export function addSnapshotImage (xml: string, image: DescriptorImage, where: string): string {
  const tree = parseTree(xml, where)
  const root = rootOf(tree, where)
  const d = describe(root, where)
  if (d.storages.length !== 1) throw fail(where, `${d.storages.length} storages: only a disk with one storage can take a snapshot here`)
  if (d.storages[0].images.some(i => i.guid === image.guid)) throw fail(where, `an image with GUID ${image.guid} exists already`)
  const parent = topOf(d, where)
  const top = childrenOf(root)
  const storage = childrenOf(elements(childrenOf(only(top, 'StorageData', where, 'Parallels_disk_image')), 'Storage')[0])
  append(storage, imageNode(image))
  const snapshots = childrenOf(only(top, 'Snapshots', where, 'Parallels_disk_image'))
  append(snapshots, shotNode(image.guid, parent))
  const topGuid = elements(snapshots, 'TopGUID')[0]
  if (topGuid !== undefined) topGuid.TopGUID = [{ '#text': image.guid }]
  else prepend(snapshots, el('TopGUID', image.guid))
  const out = new (fxp().xml.XMLBuilder)({ ...OPTIONS, format: false, suppressEmptyNode: false }).build(tree) as string
  // The builder rewrites the prolog (declaration quotes, blanks); keep the original's.
  const prolog = (text: string): string => /^[\s\S]*?(?=<Parallels_disk_image[\s>])/.exec(text)?.[0] ?? ''
  return prolog(xml) + out.slice(prolog(out).length) + (/\s*$/.exec(xml)?.[0] ?? '')
}

const blank = (node: XmlNode | undefined): string | undefined => {
  const text = node?.['#text']
  return typeof text === 'string' && text.trim() === '' ? text : undefined
}

/** Puts `node` first, indented like the element it now precedes. */
function prepend (children: XmlNode[], node: XmlNode): void {
  const indent = blank(children[0])
  if (indent !== undefined) children.splice(1, 0, node, { '#text': indent })
  else children.unshift(node)
}

/** Appends `node` after the last element, indented like it, before the closing blank. */
function append (children: XmlNode[], node: XmlNode): void {
  if (blank(children[children.length - 1]) === undefined) {
    children.push(node)
    return
  }
  const indent = blank(children[children.length - 3])
  children.splice(children.length - 1, 0, ...(indent === undefined ? [] : [{ '#text': indent }]), node)
}
