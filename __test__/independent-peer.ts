// An independent Ferry peer written only from docs/protocol.md, using @msgpack/msgpack and
// node:net (deliberately not the project's own code or its msgpackr dependency).
//
// Framing (§3), body decoding (§4), request ids (§5), messages (§6), matching (§8), bad input
// (§9) and the serving rules of the checklist (§14).
import { decode, encode } from '@msgpack/msgpack'
import { EventEmitter } from 'node:events'
import net from 'node:net'

/** §3.2: Ferry's default limit on a frame body. */
export const DEFAULT_MAX_FRAME = 16 * 1024 * 1024

/** §5: a request id is a str or a uint; string and integer ids are different ids. */
export type RequestId = string | number | bigint

/** A decoded message: a map with str keys whose `type` names the message (§1). */
export type Message = { type: string; [key: string]: unknown }

/** One frame as received: its raw body bytes and the decoded message (or the decode failure). */
export interface Received {
  raw: Buffer
  msg?: Message
  error?: string
}

/** The answer to one of our calls (§8). */
export type Answer = Message

/** What a served route returns (§6.5). */
export interface RouteResult {
  status: number
  headers?: Record<string, string>
  body?: unknown
}

/** Thrown by a served function to choose the rpc_error's error_type (§7.1). */
export class PeerRpcError extends Error {
  constructor(
    message: string,
    readonly errorType: string = 'HandlerError',
  ) {
    super(message)
  }
}

/** Thrown by a served route to answer with an `error` message (§6.6, §7.2). */
export class PeerRouteError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(message)
  }
}

export type ServedFunction = (params: unknown, call: Message) => unknown
export type ServedRoute = (request: unknown, call: Message) => RouteResult | Promise<RouteResult>

/** §5: compare ids by kind and value, never by bytes. */
export function idKey(id: RequestId): string {
  return typeof id === 'string' ? `s:${id}` : `u:${BigInt(id).toString()}`
}

/** §3.1: a 4-byte big-endian body length, then the body. */
export function frame(body: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(4 + body.length)
  out.writeUInt32BE(body.length, 0)
  out.set(body, 4)
  return out
}

/**
 * §4.5: omit absent optional keys instead of writing nil (`ignoreUndefined`). Key order follows
 * the object's insertion order; the peer builds every message with `type` first (§14.1 step 4).
 */
export function encodeMessage(msg: Record<string, unknown>): Uint8Array {
  return encode(msg, { ignoreUndefined: true })
}

function isPlainMap(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array)
}

function isUint(v: unknown): boolean {
  return (
    (typeof v === 'number' && Number.isInteger(v) && v >= 0) || (typeof v === 'bigint' && v >= 0n)
  )
}

/** Structure check of §4.4 for the reserved keys a peer cares about. Returns a complaint or null. */
function checkReserved(m: Record<string, unknown>): string | null {
  for (const k of ['type', 'function_name', 'handler_id', 'error', 'error_type', 'code', 'message']) {
    if (k in m && typeof m[k] !== 'string') return `field \`${k}\` must be a string`
  }
  if ('digest' in m && m.digest !== null && typeof m.digest !== 'string') return 'field `digest` must be a string'
  if ('request_id' in m && m.request_id !== null && typeof m.request_id !== 'string' && !isUint(m.request_id))
    return 'field `request_id` must be a string or an unsigned integer'
  if ('status' in m && !isUint(m.status)) return 'field `status` must be an unsigned integer'
  return null
}

/**
 * §4.1: a body starting with `{` is JSON, anything else is one MessagePack map that must end
 * exactly at the end of the body. Throws with a complaint on failure.
 */
export function decodeBody(body: Buffer): Record<string, unknown> {
  if (body.length === 0) throw new Error('empty body')
  let value: unknown
  if (body[0] === 0x7b) {
    value = JSON.parse(body.toString('utf8'))
  } else {
    // @msgpack/msgpack's decode throws on trailing bytes ("Extra ... byte(s) found").
    value = decode(body)
  }
  if (!isPlainMap(value)) throw new Error('message body is not a map')
  const complaint = checkReserved(value)
  if (complaint) throw new Error(complaint)
  return value
}

interface Pending {
  kind: 'rpc_call' | 'invoke_handler'
  resolve: (answer: Answer) => void
  reject: (err: Error) => void
  timer: NodeJS.Timeout
}

interface CallOptions {
  /** The id to send; default: the next integer from the peer's own counter (from 1). */
  id?: RequestId
  /** Leave `params` out of the message entirely (§6.1: absent = nil). */
  omitParams?: boolean
  /** Fail the call locally after this many ms (a guard, not a readiness wait). */
  timeoutMs?: number
}

interface InvokeOptions {
  id?: RequestId
  /** Send the invocation without a request_id (ZapJS style, §6.4) and match by FIFO (§8.2). */
  noId?: boolean
  timeoutMs?: number
}

/** One side of one connection (§2.1: both ends are symmetric). */
export class Peer extends EventEmitter {
  readonly received: Received[] = []
  /** Raw frames written by this peer, in order. */
  readonly sent: Buffer[] = []
  readonly functions = new Map<string, ServedFunction>()
  readonly routes = new Map<string, ServedRoute>()
  maxFrame = DEFAULT_MAX_FRAME
  /** When false, unserved invoke_handlers get no answer (for tests that answer by hand). */
  autoAnswer = true

  private buf: Buffer = Buffer.alloc(0)
  private nextId = 1
  private readonly pending = new Map<string, Pending>()
  /** §8.2: our invocations, oldest first, for id-less answers. Entries are pending keys or symbols. */
  private readonly invocations: (string | symbol)[] = []
  private readonly idless = new Map<symbol, Pending>()
  private readonly healthWaiters: (() => void)[] = []
  /** §8.3: answers to id-less invocations go out in arrival order. */
  private idlessChain: Promise<void> = Promise.resolve()
  private closedFlag = false

  constructor(readonly socket: net.Socket) {
    super()
    socket.on('data', (chunk: Buffer) => this.onData(chunk))
    socket.on('close', () => this.onEnd(new Error('connection closed')))
    socket.on('error', (err) => this.onEnd(err))
  }

  static connect(path: string): Promise<Peer> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(path)
      socket.once('connect', () => {
        socket.off('error', reject)
        resolve(new Peer(socket))
      })
      socket.once('error', reject)
    })
  }

  get closed(): boolean {
    return this.closedFlag
  }

  get pendingCalls(): number {
    return this.pending.size + this.idless.size
  }

  // ---- writing (§14.1 step 2) ----

  /** Writes one frame around `body` (already encoded, MessagePack or JSON). */
  sendBody(body: Uint8Array): void {
    const f = frame(body)
    this.sent.push(f)
    this.socket.write(f)
  }

  send(msg: Record<string, unknown>): void {
    this.sendBody(encodeMessage(msg))
  }

  /** Writes arbitrary bytes (several frames at once, or part of one). */
  writeRaw(bytes: Uint8Array): void {
    this.socket.write(bytes)
  }

  // ---- calling (§14.2) ----

  private track(kind: Pending['kind'], key: string | symbol, timeoutMs: number): Promise<Answer> {
    return new Promise<Answer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.forget(key)
        reject(new Error(`${kind} ${String(key)} got no answer within ${timeoutMs} ms`))
      }, timeoutMs)
      const p: Pending = { kind, resolve, reject, timer }
      if (typeof key === 'symbol') this.idless.set(key, p)
      else this.pending.set(key, p)
    })
  }

  private forget(key: string | symbol): Pending | undefined {
    const p = typeof key === 'symbol' ? this.idless.get(key) : this.pending.get(key)
    if (typeof key === 'symbol') this.idless.delete(key)
    else this.pending.delete(key)
    const i = this.invocations.indexOf(key)
    if (i >= 0) this.invocations.splice(i, 1)
    if (p) clearTimeout(p.timer)
    return p
  }

  takeId(): number {
    return this.nextId++
  }

  /** Sends an rpc_call and resolves with its answer message (`rpc_response`, `rpc_error`, or `error`). */
  call(functionName: string, params?: unknown, opts: CallOptions = {}): Promise<Answer> {
    if (this.closedFlag) return Promise.reject(new Error('peer closed'))
    const id = opts.id ?? this.takeId()
    const key = idKey(id)
    if (this.pending.has(key)) return Promise.reject(new Error(`id ${key} already pending`))
    const answer = this.track('rpc_call', key, opts.timeoutMs ?? 10_000)
    const msg: Record<string, unknown> = { type: 'rpc_call', function_name: functionName }
    if (!opts.omitParams) msg.params = params === undefined ? null : params
    msg.request_id = id
    this.send(msg)
    return answer
  }

  /** Sends an invoke_handler and resolves with its answer (`handler_response` or `error`). */
  invoke(handlerId: string, request: unknown, opts: InvokeOptions = {}): Promise<Answer> {
    if (this.closedFlag) return Promise.reject(new Error('peer closed'))
    const msg: Record<string, unknown> = { type: 'invoke_handler', handler_id: handlerId, request }
    let key: string | symbol
    if (opts.noId) {
      key = Symbol('idless invocation')
    } else {
      const id = opts.id ?? this.takeId()
      key = idKey(id)
      if (this.pending.has(key)) return Promise.reject(new Error(`id ${key} already pending`))
      msg.request_id = id
    }
    const answer = this.track('invoke_handler', key, opts.timeoutMs ?? 10_000)
    this.invocations.push(key)
    this.send(msg)
    return answer
  }

  /** Sends a health_check and resolves on the next health_check_response (§6.8: in order). */
  healthCheck(timeoutMs = 10_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no health_check_response')), timeoutMs)
      this.healthWaiters.push(() => {
        clearTimeout(timer)
        resolve()
      })
      this.send({ type: 'health_check' })
    })
  }

  /** Resolves with the first received frame (past or future) matching `pred`. */
  waitFor(pred: (r: Received) => boolean, timeoutMs = 10_000): Promise<Received> {
    const found = this.received.find(pred)
    if (found) return Promise.resolve(found)
    return new Promise((resolve, reject) => {
      const onFrame = (r: Received) => {
        if (!pred(r)) return
        cleanup()
        resolve(r)
      }
      const timer = setTimeout(() => {
        cleanup()
        reject(new Error('waitFor: no matching frame'))
      }, timeoutMs)
      const cleanup = () => {
        clearTimeout(timer)
        this.off('frame', onFrame)
      }
      this.on('frame', onFrame)
    })
  }

  /** Closes the socket (both directions at once, §2.2: no half-close). */
  close(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve()
      this.socket.once('close', () => resolve())
      this.socket.destroy()
    })
  }

  // ---- reading (§14.1 steps 1, 3) ----

  private onData(chunk: Buffer): void {
    if (this.closedFlag) return
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk])
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32BE(0)
      if (n > this.maxFrame) {
        // §3.3: do not read the body; complain without an id, then close.
        this.send({
          type: 'error',
          code: 'FRAME_TOO_LARGE',
          message: `frame of ${n} bytes exceeds the limit of ${this.maxFrame} bytes`,
          status: 413,
        })
        this.socket.end()
        this.onEnd(new Error('oversized frame'))
        return
      }
      if (this.buf.length < 4 + n) break
      const body = Buffer.from(this.buf.subarray(4, 4 + n))
      this.buf = this.buf.subarray(4 + n)
      this.onFrame(body)
    }
  }

  private onFrame(raw: Buffer): void {
    let m: Record<string, unknown>
    try {
      m = decodeBody(raw)
    } catch (e) {
      // §9.2 stage 1: neither type nor id known; reply BAD_MESSAGE without an id.
      const rec: Received = { raw, error: (e as Error).message }
      this.received.push(rec)
      this.emit('frame', rec)
      this.send({ type: 'error', code: 'BAD_MESSAGE', message: (e as Error).message, status: 400 })
      return
    }
    if (m.request_id === null) delete m.request_id // §4.5: nil id = absent
    const rec: Received = { raw, msg: m as Message }
    this.received.push(rec)
    this.emit('frame', rec)
    this.dispatch(m)
  }

  private badMessage(m: Record<string, unknown>, why: string, code = 'BAD_MESSAGE'): void {
    if (m.type === 'error') return // §6.6: never answer an error with an error
    const reply: Record<string, unknown> = { type: 'error', code, message: why, status: 400 }
    if (m.request_id !== undefined) reply.request_id = m.request_id
    this.send(reply)
  }

  private dispatch(m: Record<string, unknown>): void {
    const type = m.type
    if (type === undefined) return this.badMessage(m, 'message lacks `type`')
    const id = m.request_id as RequestId | undefined
    switch (type) {
      case 'rpc_call':
        if (typeof m.function_name !== 'string') return this.badMessage(m, '`rpc_call` message lacks `function_name`')
        if (id === undefined) return this.badMessage(m, '`rpc_call` message lacks `request_id`')
        return void this.serveCall(m as Message, id)
      case 'invoke_handler':
        if (typeof m.handler_id !== 'string') return this.badMessage(m, '`invoke_handler` message lacks `handler_id`')
        if (!('request' in m)) return this.badMessage(m, '`invoke_handler` message lacks `request`')
        return void this.serveInvoke(m as Message, id)
      case 'rpc_response':
      case 'rpc_error':
      case 'handler_response':
      case 'error':
        return this.onAnswer(m as Message, id)
      case 'health_check':
        return this.send({ type: 'health_check_response' })
      case 'health_check_response': {
        const w = this.healthWaiters.shift()
        if (w) w()
        return
      }
      case 'cancel':
        return // §6.9: never answered; this peer cannot stop its work
      default:
        return this.badMessage(m, `unknown message type \`${String(type)}\``, 'UNKNOWN_MESSAGE_TYPE')
    }
  }

  private onAnswer(m: Message, id: RequestId | undefined): void {
    const required: Record<string, string[]> = {
      rpc_response: ['request_id'],
      rpc_error: ['request_id', 'error'],
      handler_response: ['handler_id', 'status'],
      error: ['code'],
    }
    const missing = required[m.type].find((k) => !(k in m))
    const range = (m.type === 'handler_response' || m.type === 'error') && 'status' in m && Number(m.status) > 65535
    if (missing || range) {
      // §9.2: a malformed answer naming a pending call ends it; otherwise complain.
      const p = id !== undefined ? this.forget(idKey(id)) : undefined
      if (p) p.reject(new Error(`malformed ${m.type}: ${missing ? `lacks ${missing}` : 'status out of range'}`))
      else this.badMessage(m, missing ? `\`${m.type}\` message lacks \`${missing}\`` : '`status` is out of range')
      return
    }
    if (id !== undefined) {
      // §8.1: match by id (kind and value) whatever the answer type; unknown ids are ignored.
      const p = this.forget(idKey(id))
      if (p) p.resolve(m)
      else this.emit('unmatched', m)
      return
    }
    // §8.2: id-less handler_response / error answer the oldest outstanding invocation.
    if (m.type === 'handler_response' || m.type === 'error') {
      const oldest = this.invocations[0]
      if (oldest !== undefined) {
        const p = this.forget(oldest)
        if (p) p.resolve(m)
        return
      }
    }
    this.emit('unmatched', m)
  }

  private async serveCall(m: Message, id: RequestId): Promise<void> {
    const fn = this.functions.get(m.function_name as string)
    if (!fn) {
      return this.send({
        type: 'rpc_error',
        request_id: id,
        error: `no function named \`${String(m.function_name)}\``,
        error_type: 'NotFound',
      })
    }
    try {
      const result = await fn(m.params ?? null, m)
      this.send({ type: 'rpc_response', request_id: id, result: result === undefined ? null : result })
    } catch (e) {
      const errorType = e instanceof PeerRpcError ? e.errorType : 'HandlerError'
      this.send({ type: 'rpc_error', request_id: id, error: (e as Error).message, error_type: errorType })
    }
  }

  private async serveInvoke(m: Message, id: RequestId | undefined): Promise<void> {
    const handlerId = m.handler_id as string
    const route = this.routes.get(handlerId)
    if (!route && !this.autoAnswer) return
    const work = (async (): Promise<Record<string, unknown>> => {
      if (!route) {
        return { type: 'error', code: 'HANDLER_NOT_FOUND', message: `no handler \`${handlerId}\``, status: 404 }
      }
      try {
        const r = await route(m.request, m)
        return { type: 'handler_response', handler_id: handlerId, status: r.status, headers: r.headers ?? {}, body: r.body ?? null }
      } catch (e) {
        if (e instanceof PeerRouteError) return { type: 'error', code: e.code, message: e.message, status: e.status }
        return { type: 'error', code: 'HANDLER_EXECUTION_ERROR', message: (e as Error).message, status: 500 }
      }
    })()
    if (id !== undefined) {
      const answer = await work
      answer.request_id = id
      this.send(answer)
    } else {
      // §8.3: hold each id-less answer until every earlier id-less invocation was answered.
      const prev = this.idlessChain
      this.idlessChain = prev.then(async () => this.send(await work))
      await this.idlessChain
    }
  }

  private onEnd(err: Error): void {
    if (this.closedFlag) return
    this.closedFlag = true
    // §14.1 step 7: fail every pending call; discard a partial frame.
    this.buf = Buffer.alloc(0)
    for (const key of [...this.pending.keys()]) this.forget(key)?.reject(err)
    for (const key of [...this.idless.keys()]) this.forget(key)?.reject(err)
    this.emit('end', err)
  }
}

/** A listening peer (§14.3) built on node:net; each accepted connection is a Peer. */
export class PeerServer {
  readonly peers: Peer[] = []
  private readonly waiters: ((p: Peer) => void)[] = []

  private constructor(
    readonly server: net.Server,
    setup?: (peer: Peer) => void,
  ) {
    server.on('connection', (socket) => {
      const peer = new Peer(socket)
      setup?.(peer)
      this.peers.push(peer)
      for (const w of this.waiters.splice(0)) w(peer)
    })
  }

  static listen(path: string, setup?: (peer: Peer) => void): Promise<PeerServer> {
    return new Promise((resolve, reject) => {
      const server = net.createServer()
      const ps = new PeerServer(server, setup)
      server.once('error', reject)
      server.listen(path, () => {
        server.off('error', reject)
        resolve(ps)
      })
    })
  }

  /** Resolves with the first accepted connection (waiting for it if needed). */
  firstPeer(): Promise<Peer> {
    if (this.peers.length > 0) return Promise.resolve(this.peers[0])
    return new Promise((resolve) => this.waiters.push(resolve))
  }

  async close(): Promise<void> {
    await Promise.all(this.peers.map((p) => p.close()))
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }
}
