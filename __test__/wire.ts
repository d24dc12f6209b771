// Raw-socket helpers for wire-level tests: hand-made frames (4-byte big-endian length +
// body) over `node:net`, with no Ferry code on this side of the socket.
import { spawn } from 'node:child_process'
import net from 'node:net'

import { encode } from '@msgpack/msgpack'

import { unpack } from '../index.js'

/** Encodes a message the way a foreign peer would: integers in integer forms (2**40 → uint64). */
export function body(message: Record<string, unknown>): Buffer {
  return Buffer.from(encode(message))
}

/** Prefixes `payload` with its length (4 bytes, big-endian). */
export function frame(payload: Buffer): Buffer {
  const prefix = Buffer.alloc(4)
  prefix.writeUInt32BE(payload.length)
  return Buffer.concat([prefix, payload])
}

/** Just a length prefix, for truncated and oversized frames. */
export function prefix(length: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(length)
  return b
}

/**
 * The bytes `"request_id": <id>` take in a MessagePack map when the id is written in its
 * shortest form (fixstr key, then the id as @msgpack/msgpack writes it: shortest int form
 * or shortest str header). Lets a test check the kind of an echoed id, not just its value.
 */
export function requestIdBytes(id: string | number): Buffer {
  return Buffer.concat([Buffer.from(encode('request_id')), Buffer.from(encode(id))])
}

export interface Frame {
  /** The raw body. */
  body: Buffer
  /** The body decoded with the package's `unpack`. */
  msg: any
}

/** One raw connection: write frames, read frames one by one, see the peer close. */
export class WireSocket {
  readonly socket: net.Socket
  private buffered = Buffer.alloc(0)
  private frames: Frame[] = []
  private waiters: Array<{ resolve: (f: Frame) => void; reject: (e: Error) => void }> = []
  private ended = false
  /** Resolves once the peer closed the connection (read to 'close'). */
  readonly closed: Promise<void>

  private constructor(socket: net.Socket) {
    this.socket = socket
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()))
    socket.on('data', (chunk: Buffer) => this.onData(chunk))
    socket.on('error', () => {}) // EPIPE/ECONNRESET after the peer closed: seen as 'close'
    socket.once('close', () => {
      this.ended = true
      for (const w of this.waiters.splice(0)) w.reject(new Error('connection closed before a frame arrived'))
    })
  }

  static connect(path: string): Promise<WireSocket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ path })
      socket.once('error', reject)
      socket.once('connect', () => {
        socket.off('error', reject)
        resolve(new WireSocket(socket))
      })
    })
  }

  private onData(chunk: Buffer): void {
    this.buffered = Buffer.concat([this.buffered, chunk])
    while (this.buffered.length >= 4) {
      const n = this.buffered.readUInt32BE(0)
      if (this.buffered.length < 4 + n) break
      const b = Buffer.from(this.buffered.subarray(4, 4 + n))
      this.buffered = this.buffered.subarray(4 + n)
      const f: Frame = { body: b, msg: unpack(b) }
      const w = this.waiters.shift()
      if (w) w.resolve(f)
      else this.frames.push(f)
    }
  }

  /** Bytes as given (prefix included, or not: the caller decides). */
  writeRaw(bytes: Buffer): void {
    this.socket.write(bytes)
  }

  /** One frame holding `payload`. */
  sendBody(payload: Buffer): void {
    this.socket.write(frame(payload))
  }

  /** One MessagePack frame. */
  send(message: Record<string, unknown>): void {
    this.sendBody(body(message))
  }

  /** The next frame from the peer; rejects if the connection closes first. */
  next(): Promise<Frame> {
    const f = this.frames.shift()
    if (f) return Promise.resolve(f)
    if (this.ended) return Promise.reject(new Error('connection closed before a frame arrived'))
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }))
  }

  /** Sends `message` and returns the next frame. */
  async request(message: Record<string, unknown>): Promise<Frame> {
    this.send(message)
    return this.next()
  }

  /** Frames received but not read yet. */
  get unread(): number {
    return this.frames.length
  }

  destroy(): void {
    this.socket.destroy()
  }
}

export interface ProcessResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

/** Runs a program to its end and collects its output. */
export function run(file: string, args: string[], options: { env?: NodeJS.ProcessEnv } = {}): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env })
    let stdout = ''
    let stderr = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.once('error', reject)
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }))
  })
}

/** Polls `predicate` (every few ms) until it holds; for states with no event to wait on. */
export async function until(predicate: () => boolean, what: string, attempts = 2000): Promise<void> {
  for (let i = 0; i < attempts; i++) {
    if (predicate()) return
    await new Promise((r) => setTimeout(r, 5))
  }
  throw new Error(`gave up waiting for ${what}`)
}
