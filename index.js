'use strict'
// ferry-ipc: the JavaScript face of Ferry. A small wrapper over the native engine
// (native.js, built by napi-rs from src/), which owns each connection's socket on Node's own
// event loop and does the I/O, framing, request ids, deadlines, envelopes and limits. JS keeps
// the promises and runs the handlers. Values cross as MessagePack packed and unpacked by
// msgpackr. Typings and documentation: index.d.ts.

const fs = require('node:fs')
const net = require('node:net')
const path = require('node:path')
const util = require('node:util')
const { Packr, REUSE_BUFFER_MODE, RESET_BUFFER_MODE } = require('msgpackr')
const { NativeEngine } = require('./native.js')

const packr = new Packr({
  useRecords: false, // plain MessagePack maps, readable by any peer
  mapsAsObjects: true,
  encodeUndefinedAsNil: true,
  variableMapSize: true,
  int64AsType: 'auto', // integers beyond 2^53 come back as BigInt
})
// The results of one read arrive in SCRATCH when they fit (one Buffer for every connection:
// each delivery is unpacked before the next can start), unpacked with binaries copied out of it.
const SCRATCH = Buffer.allocUnsafeSlow(64 * 1024)
const scratchUnpackr = new Packr({
  useRecords: false,
  mapsAsObjects: true,
  int64AsType: 'auto',
  copyBuffers: true,
})
const NIL = Buffer.from([0xc0])
// How many function names a client keeps by id (see `_names`); calls of further names pass
// their name as a string, so a program that makes up names cannot grow this without bound.
const MAX_INTERNED_NAMES = 1024
// Buffers (and other Uint8Arrays) of this many bytes or more passed as a call's params, or
// returned by a handler, go to Rust as they are, which writes them as the MessagePack bin
// msgpackr would make (one copy fewer); smaller ones are packed like any value.
const BIN_DIRECT = 1024
const pack = (value) => (value === undefined ? NIL : packr.pack(value))
// A call's params are packed into msgpackr's own buffer, returned whole with the bytes at
// [start, end), and the next pack reuses the space: no Buffer is made per call. Valid only
// until the next pack; the engine copies them into the frame at once.
const IN_PLACE = REUSE_BUFFER_MODE | RESET_BUFFER_MODE
const NIL_IN_PLACE = Object.assign(Buffer.from([0xc0]), { start: 0, end: 1 })
const packInPlace = (value) => (value === undefined ? NIL_IN_PLACE : packr.pack(value, IN_PLACE))
const unpack = (buffer) => packr.unpack(buffer)

// What NativeEngine reports through onSocket(kind, arg).
const SOCKET_INCOMING = 0
const SOCKET_LOST = 1
const SOCKET_FATAL = 2
const SOCKET_CLOSED = 3

/** Wire error types a handler may choose by throwing an error with `errorType` set. */
const WIRE_ERROR_TYPES = new Set(['NotFound', 'InvalidParams', 'HandlerError', 'Internal'])

const DEFAULT_TIMEOUT_MS = 30_000
const DEFAULT_CONNECT_TIMEOUT_MS = 5_000
const DEFAULT_CLOSE_GRACE_MS = 5_000
/** How long close() waits for queued frames to flush before destroying the socket. */
const CLOSE_FLUSH_MS = 2_000
/** The longest Unix socket path Linux accepts (sun_path less its terminating NUL). */
const MAX_SOCKET_PATH = 107
/** setTimeout's largest delay; longer deadlines re-arm. */
const MAX_TIMER_MS = 2 ** 31 - 1

/** Every failure of a Ferry call: `code` says which, `errorType` carries the peer's. */
class RpcError extends Error {
  constructor(message, code, errorType, options) {
    super(message, options)
    this.name = 'RpcError'
    this.code = code
    if (errorType !== undefined) this.errorType = errorType
  }
}

const makeError = (code, message, errorType) => new RpcError(message, code, errorType)

function handlerErrorMessage(e) {
  if (e instanceof Error) return e.message
  try {
    return String(e)
  } catch {
    return 'handler threw a value that cannot be printed'
  }
}

function register(map, name, handler) {
  if (typeof handler !== 'function') throw new TypeError('handler must be a function')
  map.set(String(name), handler)
}

/**
 * The resolvers of pending calls, `{ id, resolve, reject }`, by id. The engine hands out ids in
 * sequence, so a power-of-two ring indexed by an id's low bits holds nearly all of them: an
 * array access per call instead of a Map's hashing, insertion, deletion and rehashing. An id
 * whose slot is held by an older pending call goes to a Map; the ring doubles once that Map
 * holds more than a quarter of its size, so a long-pending call never makes the ring chase ids.
 */
class PendingCalls {
  constructor() {
    this._ring = new Array(1024).fill(undefined)
    this._mask = 1023
    this._overflow = new Map()
    this.size = 0
  }

  add(call) {
    this._put(call)
    this.size++
    if (this._overflow.size > (this._mask + 1) >> 2) this._grow()
  }

  get(id) {
    const call = this._ring[id & this._mask]
    if (call !== undefined && call.id === id) return call
    return this._overflow.size === 0 ? undefined : this._overflow.get(id)
  }

  /** Removes and returns the call with this id, if pending. */
  take(id) {
    const i = id & this._mask
    const call = this._ring[i]
    if (call !== undefined && call.id === id) {
      this._ring[i] = undefined
      this.size--
      return call
    }
    if (this._overflow.size === 0) return undefined
    const other = this._overflow.get(id)
    if (other !== undefined) {
      this._overflow.delete(id)
      this.size--
    }
    return other
  }

  _put(call) {
    const i = call.id & this._mask
    if (this._ring[i] === undefined) this._ring[i] = call
    else this._overflow.set(call.id, call)
  }

  _grow() {
    const old = this._ring
    const overflow = this._overflow
    this._ring = new Array(old.length * 2).fill(undefined)
    this._mask = this._ring.length - 1
    this._overflow = new Map()
    for (const call of old) if (call !== undefined) this._put(call)
    for (const call of overflow.values()) this._put(call)
  }
}

/**
 * One connection, both directions. Created by RpcClient.connect or by RpcServer for each
 * peer; the socket belongs to its native engine.
 */
class RpcConnection {
  constructor(options = {}, server = null) {
    this._server = server
    this._defaultTimeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS
    // Pending calls by id: Rust owns ids, matching and deadlines; JS keeps the resolvers.
    const pending = new PendingCalls()
    this._pending = pending
    // All answers of one read arrive as one array [id, result, id, result, ...], in the first
    // `len` bytes of SCRATCH or in a Buffer of its own. It is unpacked whole before any call
    // settles, so if unpacking throws, Rust can retry call by call.
    const deliver = (len, buffer) => {
      const values = buffer === undefined ? scratchUnpackr.unpack(SCRATCH, len) : packr.unpack(buffer)
      for (let i = 0; i < values.length; i += 2) {
        const call = pending.take(values[i])
        if (call !== undefined) call.resolve(values[i + 1])
      }
    }
    const fail = (id, err) => {
      const call = pending.take(id)
      if (call !== undefined) call.reject(err)
    }
    this._native = new NativeEngine(options.maxFrameBytes ?? 0, options.sendCancel ?? true, deliver, fail, makeError, SCRATCH)
    if (options.busyPollMicros !== undefined) {
      if (typeof options.busyPollMicros !== 'number') {
        throw new TypeError(`busyPollMicros must be a number, got ${typeof options.busyPollMicros}`)
      }
      this._native.setBusyPoll(options.busyPollMicros)
    }
    // The per-call entry points, without napi-rs's method overhead (see src/fast.rs).
    const fast = this._native.fastFunctions()
    this._fastCall = fast.call
    this._fastCallNamed = fast.callNamed
    this._fastCallBinNamed = fast.callBinNamed
    this._fastReply = fast.reply
    this._fastReplyBin = fast.replyBin
    // Function names the engine keeps, by the id it gave each: a call by id does not copy its
    // name out of the string (about 5% of calls/s with many small calls in flight).
    this._names = new Map()
    this._onSocket = (kind, arg, buffer) => {
      if (kind === SOCKET_INCOMING) {
        // The peer's calls of one read as one array, in the first `arg` bytes of SCRATCH or in
        // `buffer`: unpacked whole before any handler runs, so if unpacking throws, Rust can
        // hand the calls over one by one and refuse only those that do not unpack.
        const calls = buffer === undefined ? scratchUnpackr.unpack(SCRATCH, arg) : packr.unpack(buffer)
        try {
          this._dispatch(calls)
        } catch (e) {
          // Not an unpacking failure: must not make Rust hand the calls over again.
          queueMicrotask(() => {
            throw e
          })
        }
      } else if (kind === SOCKET_LOST) this._lost(arg)
      else if (kind === SOCKET_FATAL) {
        this._finish(arg)
        this._endSocket()
      } else if (kind === SOCKET_CLOSED) this._socketClosed()
    }
    this._handlers = new Map()
    this._routes = new Map()
    this._timer = null
    this._onTimer = () => this._expire()
    this._socketOpen = false
    this._closeTimer = null
    this._closed = false
    this._closeReason = null
    this._closedPromise = new Promise((resolve) => (this._resolveClosed = resolve))
  }

  /** Connects the engine to `path`: 0, or the errno of a failed attempt. */
  _connect(path) {
    const errno = this._native.connect(path, this._onSocket)
    if (errno === 0) this._socketOpen = true
    return errno
  }

  /**
   * Takes over a socket accepted by net.Server (created paused, so Node never read from it):
   * the engine duplicates the descriptor and Node's socket is destroyed.
   */
  _adopt(socket) {
    const fd = socket._handle?.fd
    let errno = -1
    try {
      if (typeof fd === 'number' && fd >= 0) errno = this._native.adopt(fd, this._onSocket)
    } catch {
      // The engine could not take it (out of memory, say): the peer is just disconnected.
    } finally {
      socket.destroy()
    }
    if (errno === 0) {
      this._socketOpen = true
      return true
    }
    return false
  }

  /**
   * Calls the peer's function `name`. See index.d.ts.
   */
  call(name, params, options) {
    return this._request(true, String(name), params, 'params', options)
  }

  /** Invokes the peer's route handler `handlerId` with an HTTP-like request. */
  invokeHandler(handlerId, request, options) {
    return this._request(false, String(handlerId), request ?? {}, 'request', options)
  }

  /** The id the engine keeps `name` under (interned at its first call), or undefined once
   * MAX_INTERNED_NAMES are kept. */
  _nameId(name) {
    let nameId = this._names.get(name)
    if (nameId === undefined && this._names.size < MAX_INTERNED_NAMES) {
      nameId = this._native.internName(name)
      this._names.set(name, nameId)
    }
    return nameId
  }

  _request(isCall, name, value, what, options) {
    const signal = options?.signal
    if (signal?.aborted) {
      return Promise.reject(new RpcError('call cancelled', 'ERR_FERRY_CANCELLED', undefined, { cause: signal.reason }))
    }
    const timeoutMs = options?.timeoutMs ?? this._defaultTimeoutMs
    if (typeof timeoutMs !== 'number' || Number.isNaN(timeoutMs)) {
      const err = new TypeError(`timeoutMs must be a number, got ${typeof timeoutMs === 'number' ? 'NaN' : typeof timeoutMs}`)
      err.code = 'ERR_INVALID_ARG_TYPE'
      return Promise.reject(err)
    }
    if (timeoutMs < 0) {
      // A deadline already in the past (a computed budget that ran out) fails at once.
      return Promise.reject(new RpcError(`call timed out: timeoutMs is ${timeoutMs}`, 'ERR_FERRY_TIMEOUT'))
    }
    const nameId = isCall ? this._nameId(name) : undefined
    let id
    if (nameId !== undefined && value instanceof Uint8Array && value.length >= BIN_DIRECT) {
      // A large Buffer (or other Uint8Array) as the params: Rust writes the MessagePack bin
      // msgpackr would make of it, copying the bytes once, straight into the frame. A view
      // Node-API cannot read (none known) takes the general path below.
      try {
        id = this._fastCallBinNamed(nameId, value, 0, value.length, timeoutMs)
      } catch {}
    }
    if (id === undefined) {
      // Packed last: the bytes are only valid until the next pack (user code, such as a
      // getter of `options`, could pack in between).
      let packed
      try {
        packed = packInPlace(value)
      } catch (e) {
        return Promise.reject(new RpcError(`could not encode ${what}: ${handlerErrorMessage(e)}`, 'ERR_FERRY_ENCODE'))
      }
      if (!isCall) {
        id = this._native.invoke(name, packed.subarray(packed.start, packed.end), timeoutMs)
      } else if (nameId === undefined) {
        id = this._fastCall(name, packed, packed.start, packed.end, timeoutMs)
      } else {
        id = this._fastCallNamed(nameId, packed, packed.start, packed.end, timeoutMs)
      }
    }
    if (id === 0) return Promise.reject(this._native.takeError())
    // A negated id: this call's deadline comes before the one the timer is armed for (the
    // engine keeps track, so no clock is read here).
    const arm = id < 0
    if (arm) id = -id
    const promise = new Promise((resolve, reject) => this._pending.add({ id, resolve, reject }))
    if (signal) {
      const onAbort = () => {
        if (this._pending.get(id) !== undefined && this._native.cancel(id)) {
          const call = this._pending.take(id)
          call.reject(new RpcError('call cancelled', 'ERR_FERRY_CANCELLED', undefined, { cause: signal.reason }))
          this._afterSettle()
        }
      }
      signal.addEventListener('abort', onAbort, { once: true })
      const cleanup = () => signal.removeEventListener('abort', onAbort)
      promise.then(cleanup, cleanup)
    }
    if (arm) this._armTimer()
    // The engine writes the frame before the loop next waits, and holds the process open
    // while the call is pending.
    return promise
  }

  /** Serves the peer's `rpc_call`s of `name` on this connection. */
  handle(name, handler) {
    register(this._handlers, name, handler)
    return this
  }

  /** Serves the peer's `invoke_handler`s of `handlerId` on this connection. */
  handleRoute(handlerId, handler) {
    register(this._routes, handlerId, handler)
    return this
  }

  /** The number of our calls awaiting an answer. */
  get pendingCalls() {
    return this._pending.size
  }

  /** Whether the connection has ended. */
  get closed() {
    return this._closed
  }

  /** Keep the process alive while this connection is open, even when idle. */
  ref() {
    if (!this._closed) this._native.setRef(true)
    return this
  }

  /** Let the process exit when this connection is idle (the default). */
  unref() {
    if (!this._closed) this._native.setRef(false)
    return this
  }

  /**
   * Closes the connection: pending calls reject with ERR_FERRY_CLOSED, queued frames are
   * flushed. Resolves once the socket is closed.
   */
  close() {
    if (!this._closed) {
      this._finish(null)
      this._endSocket()
    }
    return this._closedPromise
  }

  /**
   * Ends the socket once queued frames are written, without waiting for the peer's FIN (an
   * idle process must be able to await close() and go on), and destroys it anyway after
   * CLOSE_FLUSH_MS if the peer does not read.
   */
  _endSocket() {
    if (!this._socketOpen || this._closeTimer !== null) return
    if (this._native.endSocket()) {
      this._socketClosed()
      return
    }
    this._closeTimer = setTimeout(() => this._destroySocket(), CLOSE_FLUSH_MS)
  }

  _destroySocket() {
    if (!this._socketOpen) return
    this._native.destroySocket()
    this._socketClosed()
  }

  _socketClosed() {
    if (!this._socketOpen) return
    this._socketOpen = false
    if (this._closeTimer) clearTimeout(this._closeTimer)
    this._closeTimer = null
    this._resolveClosed()
  }

  /** (Re)arms the timer for the earliest deadline, which the engine then remembers. */
  _armTimer() {
    if (this._timer) clearTimeout(this._timer)
    this._timer = null
    if (this._closed) return
    const ms = this._native.nextDeadlineMs()
    if (ms < 0) return
    // The timer never holds the process open by itself: a pending call refs the socket.
    const delay = Math.min(Math.ceil(ms), MAX_TIMER_MS)
    this._timer = setTimeout(this._onTimer, delay).unref()
  }

  _expire() {
    this._timer = null
    if (this._closed) return
    this._native.expire()
    this._armTimer()
    this._afterSettle()
  }

  /** After a call of ours or the peer's settled (the engine flushes and re-refs itself). */
  _afterSettle() {
    this._server?._drained?.()
  }

  /** The peer's calls of one read: `[kind, token, name, params, ...]`, params unpacked. */
  _dispatch(incoming) {
    for (let i = 0; i < incoming.length; i += 4) {
      if (incoming[i] === 0) this._runCall(incoming[i + 1], incoming[i + 2], incoming[i + 3])
      else this._runRoute(incoming[i + 1], incoming[i + 2], incoming[i + 3])
    }
  }

  _context(requestToken) {
    return { connection: this, token: requestToken }
  }

  _runCall(token, name, params) {
    if (this._closed) return
    const handler = this._handlers.get(name) ?? this._server?._handlers.get(name)
    if (handler === undefined) {
      this._native.replyError(token, `no function named \`${name}\``, 'NotFound')
      return
    }
    let result
    try {
      result = handler(params, this._context(token))
    } catch (e) {
      this._replyCallError(token, e)
      return
    }
    if (result !== null && typeof result === 'object' && typeof result.then === 'function') {
      Promise.resolve(result).then(
        (value) => this._replyCall(token, value),
        (e) => this._replyCallError(token, e),
      )
    } else {
      this._replyCall(token, result)
    }
  }

  _replyCall(token, value) {
    if (this._closed) return
    if (value instanceof Uint8Array && value.length >= BIN_DIRECT) {
      // As for a call's params (see `_request`): Rust writes the bin, one copy.
      let sent = false
      try {
        this._fastReplyBin(token, value, 0, value.length)
        sent = true
      } catch {}
      if (sent) {
        this._afterSettle()
        return
      }
    }
    let packed
    try {
      packed = packInPlace(value === undefined ? null : value)
    } catch (e) {
      this._native.replyError(token, `result could not be encoded: ${handlerErrorMessage(e)}`, 'Internal')
      this._afterSettle()
      return
    }
    // The raw twin of `reply` (see src/fast.rs), on the bytes msgpackr just wrote.
    this._fastReply(token, packed, packed.start, packed.end)
    this._afterSettle()
  }

  _replyCallError(token, e) {
    if (this._closed) return
    const type = e && typeof e.errorType === 'string' && WIRE_ERROR_TYPES.has(e.errorType) ? e.errorType : 'HandlerError'
    this._native.replyError(token, handlerErrorMessage(e), type)
    this._afterSettle()
  }

  _runRoute(token, handlerId, request) {
    if (this._closed) return
    const handler = this._routes.get(handlerId) ?? this._server?._routes.get(handlerId)
    if (handler === undefined) {
      this._native.replyRouteError(token, 'HANDLER_NOT_FOUND', `no handler \`${handlerId}\``, 404)
      return
    }
    Promise.resolve()
      .then(() => handler(request, this._context(token)))
      .then(
        (response) => {
          if (this._closed) return
          const r = response ?? {}
          let headers, body
          try {
            headers = pack(r.headers ?? {})
            body = pack(r.body ?? null)
          } catch (e) {
            this._native.replyRouteError(token, 'HANDLER_EXECUTION_ERROR', `response could not be encoded: ${handlerErrorMessage(e)}`, 500)
            this._afterSettle()
            return
          }
          const status = Number.isInteger(r.status) && r.status >= 100 && r.status <= 999 ? r.status : 200
          this._native.replyRoute(token, status, headers, body)
          this._afterSettle()
        },
        (e) => {
          if (this._closed) return
          this._native.replyRouteError(token, 'HANDLER_EXECUTION_ERROR', handlerErrorMessage(e), 500)
          this._afterSettle()
        },
      )
  }

  _lost(reason) {
    if (this._closed) return
    this._finish(reason)
    this._destroySocket()
  }

  _finish(lostReason) {
    if (this._closed) {
      return
    }
    this._closed = true
    this._closeReason = lostReason
    // Write what is queued (answers, error frames) before the socket goes.
    if (this._socketOpen) this._native.flushSocket()
    this._native.close(lostReason ?? undefined)
    if (this._timer) clearTimeout(this._timer)
    this._timer = null
    this._server?._connections.delete(this)
    this._server?._drained?.()
    if (!this._socketOpen) this._resolveClosed()
  }
}

function connectOnce(path) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ path })
    const onError = (err) => {
      socket.destroy()
      reject(err)
    }
    socket.once('error', onError)
    socket.once('connect', () => {
      socket.off('error', onError)
      resolve(socket)
    })
  })
}

/** Errors of a connect attempt worth retrying: a peer still starting, or a full backlog. */
const RETRYABLE_CONNECT = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN', 'EINPROGRESS'])

/** An Error like Node's own for a failed connect, from the engine's errno. */
function connectError(errno, socketPath) {
  let code
  try {
    code = util.getSystemErrorName(-errno)
  } catch {
    code = `E${errno}`
  }
  const err = new Error(`connect ${code} ${socketPath}`)
  err.code = code
  err.errno = -errno
  err.syscall = 'connect'
  err.address = socketPath
  return err
}

/** Resolves after `ms`, or as soon as `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer)
      signal?.removeEventListener('abort', done)
      resolve()
    }
    const timer = setTimeout(done, ms)
    signal?.addEventListener('abort', done, { once: true })
  })
}

/** A connection made by connecting to a listening peer. */
class RpcClient extends RpcConnection {
  /**
   * Connects to `socketPath`, retrying while the socket is missing or refuses (a peer that
   * is still starting) until `connectTimeoutMs`.
   */
  static async connect(socketPath, options = {}) {
    const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS
    const signal = options.signal
    const deadline = performance.now() + connectTimeoutMs
    let delay = 5
    const client = new RpcClient(options)
    for (;;) {
      if (signal?.aborted) {
        throw new RpcError(`connecting to ${socketPath} was aborted`, 'ERR_FERRY_CANCELLED', undefined, { cause: signal.reason })
      }
      let errno
      try {
        errno = client._connect(socketPath)
      } catch (e) {
        // The engine could not watch the socket (libuv or V8 out of resources).
        throw new RpcError(`cannot connect to ${socketPath}: ${handlerErrorMessage(e)}`, 'ERR_FERRY_CONNECT', undefined, { cause: e })
      }
      if (errno === 0) return client
      {
        const err = connectError(errno, socketPath)
        if (!RETRYABLE_CONNECT.has(err.code)) {
          throw new RpcError(`cannot connect to ${socketPath}: ${err.message}`, 'ERR_FERRY_CONNECT', undefined, { cause: err })
        }
        const left = deadline - performance.now()
        if (left <= 0) {
          throw new RpcError(
            `cannot connect to ${socketPath} within ${connectTimeoutMs} ms: ${err.message}`,
            'ERR_FERRY_CONNECT',
            undefined,
            { cause: err },
          )
        }
        await sleep(Math.min(delay, left), signal)
        delay = Math.min(delay * 2, 100)
      }
    }
  }
}

async function clearStaleSocket(path) {
  let stat
  try {
    stat = fs.lstatSync(path)
  } catch (e) {
    if (e.code === 'ENOENT') return
    throw e
  }
  if (!stat.isSocket()) {
    throw new RpcError(`cannot listen on ${path}: the path exists and is not a socket`, 'ERR_FERRY_ADDR_IN_USE')
  }
  try {
    const probe = await connectOnce(path)
    probe.destroy()
  } catch (e) {
    if (e.code === 'ECONNREFUSED') {
      try {
        fs.unlinkSync(path)
      } catch (u) {
        if (u.code !== 'ENOENT') throw u
      }
      return
    }
    throw e
  }
  throw new RpcError(`cannot listen on ${path}: a live server is listening there`, 'ERR_FERRY_ADDR_IN_USE')
}

/** Listens on a Unix socket path and serves JS handlers to every peer that connects. */
class RpcServer {
  constructor(server, path, options) {
    this._server = server
    this._path = path
    this._options = options
    this._handlers = new Map()
    this._routes = new Map()
    this._connections = new Set()
    this._closing = null
    /** Set while close() waits for running handlers: called whenever one answers. */
    this._drained = null
    this._identity = null
    try {
      const st = fs.lstatSync(path)
      this._identity = `${st.dev}:${st.ino}`
    } catch {}
    server.on('connection', (socket) => {
      const conn = new RpcConnection(this._options, this)
      if (!conn._adopt(socket) || this._closing) {
        conn.close()
        return
      }
      this._connections.add(conn)
      this._onConnection?.(conn)
    })
  }

  /**
   * Listens on `socketPath`. A stale socket file is removed; a live server's is not.
   */
  static async listen(socketPath, options = {}) {
    await clearStaleSocket(socketPath)
    // Bind a private name, then hard-link it to the real path: the link fails if anyone took
    // the path meanwhile (no stealing), and libuv, which unlinks the bound name on close, never
    // removes a successor's socket file; close() removes the real path only if it is ours.
    if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH) {
      const err = new TypeError(`cannot listen on ${socketPath}: Unix socket paths are limited to ${MAX_SOCKET_PATH} bytes`)
      err.code = 'ERR_INVALID_ARG_VALUE'
      throw err
    }
    const tmp = path.join(path.dirname(socketPath), `.ferry-${Math.random().toString(36).slice(2, 10)}`)
    // A path too close to the limit for the private name is bound directly.
    const viaLink = Buffer.byteLength(tmp) <= MAX_SOCKET_PATH
    // Connections are created paused: their engines take the sockets over before any read.
    const server = net.createServer({ pauseOnConnect: true })
    await new Promise((resolve, reject) => {
      server.once('error', reject)
      server.listen(viaLink ? tmp : socketPath, () => {
        server.off('error', reject)
        resolve()
      })
    })
    if (viaLink) {
      try {
        fs.linkSync(tmp, socketPath)
      } catch (e) {
        server.close()
        if (e.code === 'EEXIST') {
          throw new RpcError(`cannot listen on ${socketPath}: the path was taken meanwhile`, 'ERR_FERRY_ADDR_IN_USE')
        }
        throw e
      } finally {
        try {
          fs.unlinkSync(tmp)
        } catch {}
      }
    }
    server.on('error', () => {})
    const s = new RpcServer(server, socketPath, options)
    if (!options.ref) server.unref()
    return s
  }

  /** The socket path. */
  get path() {
    return this._path
  }

  /** The connected peers. */
  get connections() {
    return [...this._connections]
  }

  /** Serves `rpc_call`s of `name` from every peer. */
  handle(name, handler) {
    register(this._handlers, name, handler)
    return this
  }

  /** Serves `invoke_handler`s of `handlerId` from every peer. */
  handleRoute(handlerId, handler) {
    register(this._routes, handlerId, handler)
    return this
  }

  /** Calls `listener(connection)` for every new peer. */
  onConnection(listener) {
    this._onConnection = listener
    return this
  }

  /** Keep the process alive while listening. */
  ref() {
    this._server.ref()
    return this
  }

  /** Let the process exit while only listening (the default). */
  unref() {
    this._server.unref()
    return this
  }

  /**
   * Stops accepting, waits up to `graceMs` (default 5000) for running handlers to answer,
   * closes every connection and removes the socket file.
   */
  close(options = {}) {
    if (this._closing) return this._closing
    const graceMs = options.graceMs ?? DEFAULT_CLOSE_GRACE_MS
    this._closing = (async () => {
      const stopped = new Promise((resolve) => this._server.close(() => resolve()))
      // Wait until no handler is running (each answer checks again) or the grace period ends.
      const busy = () => [...this._connections].some((c) => !c._closed && c._native.serving > 0)
      if (busy()) {
        await new Promise((resolve) => {
          const done = () => {
            clearTimeout(timer)
            this._drained = null
            resolve()
          }
          const timer = setTimeout(done, graceMs)
          this._drained = () => {
            if (!busy()) done()
          }
        })
      }
      await Promise.all([...this._connections].map((c) => c.close()))
      await stopped
      try {
        const st = fs.lstatSync(this._path)
        if (`${st.dev}:${st.ino}` === this._identity) fs.unlinkSync(this._path)
      } catch {}
    })()
    return this._closing
  }
}

// ----- the process-wide client ------------------------------------------------------------

let globalClient = null
/** The initRpcClient in flight, if any: calls made meanwhile wait for it. */
let globalConnecting = null
/** Bumped by every initRpcClient and closeRpcClient: an init that finds it changed was superseded. */
let generation = 0
/** Stops the retry loop of the init in flight. */
let connectAbort = null

/** Connects the process-wide client used by `rpc.call`. */
function initRpcClient(socketPath, options = {}) {
  const gen = ++generation
  connectAbort?.abort()
  const abort = new AbortController()
  connectAbort = abort
  const signal = options.signal ? AbortSignal.any([options.signal, abort.signal]) : abort.signal
  const superseded = () =>
    new RpcError('initRpcClient was superseded by a later initRpcClient or closeRpcClient', 'ERR_FERRY_CLOSED')
  const init = (async () => {
    let client
    try {
      client = await RpcClient.connect(socketPath, { ...options, signal })
    } catch (e) {
      throw gen !== generation ? superseded() : e
    }
    if (gen !== generation) {
      await client.close()
      throw superseded()
    }
    // The previous client is replaced only once the new one works.
    const previous = globalClient
    globalClient = client
    if (previous) await previous.close()
    return client
  })()
  globalConnecting = init
  const clear = () => {
    if (globalConnecting === init) globalConnecting = null
    if (connectAbort === abort) connectAbort = null
  }
  init.then(clear, clear)
  return init
}

/** Closes the process-wide client; every pending call settles. */
async function closeRpcClient() {
  generation++
  connectAbort?.abort()
  const client = globalClient
  const connecting = globalConnecting
  globalClient = null
  globalConnecting = null
  if (client) await client.close()
  // An init in flight stops retrying, closes any client it got and rejects.
  if (connecting) await connecting.catch(() => {})
}

function notInitialized() {
  return new RpcError(
    'rpc.call() was used before the client was connected: call `await initRpcClient(socketPath)` first, ' +
      'or set the FERRY_SOCKET environment variable',
    'ERR_FERRY_NOT_INITIALIZED',
  )
}

/**
 * Waits for the client being connected (or connects to FERRY_SOCKET), within the call's own
 * signal and timeout; resolves with the client and the options left for the call itself.
 */
function lazyClient(options) {
  let connecting = globalConnecting
  if (!connecting) {
    const envPath = process.env.FERRY_SOCKET
    if (!envPath) return Promise.reject(notInitialized())
    connecting = initRpcClient(envPath)
  }
  const signal = options?.signal
  const timeoutMs = options?.timeoutMs
  if (!signal && !(timeoutMs > 0)) return connecting.then((client) => [client, options])
  const started = performance.now()
  return new Promise((resolve, reject) => {
    let timer = null
    const onAbort = () => finish(new RpcError('call cancelled', 'ERR_FERRY_CANCELLED', undefined, { cause: signal.reason }))
    const finish = (err, client) => {
      if (timer) clearTimeout(timer)
      signal?.removeEventListener('abort', onAbort)
      if (err) return reject(err)
      const left = timeoutMs > 0 ? Math.max(timeoutMs - (performance.now() - started), 0.001) : timeoutMs
      resolve([client, { ...options, timeoutMs: left }])
    }
    if (signal?.aborted) return onAbort()
    signal?.addEventListener('abort', onAbort, { once: true })
    if (timeoutMs > 0) {
      timer = setTimeout(
        () => finish(new RpcError(`call timed out after ${timeoutMs} ms while connecting`, 'ERR_FERRY_TIMEOUT')),
        Math.min(timeoutMs, MAX_TIMER_MS),
      )
    }
    connecting.then(
      (client) => finish(null, client),
      (err) => finish(err),
    )
  })
}

/** The process-wide client's calls. */
const rpc = {
  call(name, params, options) {
    if (globalClient !== null) return globalClient.call(name, params, options)
    return lazyClient(options).then(([client, opts]) => client.call(name, params, opts))
  },
  invokeHandler(handlerId, request, options) {
    if (globalClient !== null) return globalClient.invokeHandler(handlerId, request, options)
    return lazyClient(options).then(([client, opts]) => client.invokeHandler(handlerId, request, opts))
  },
  /** The connected process-wide client, or null. */
  get client() {
    return globalClient
  },
}

module.exports = {
  RpcError,
  RpcConnection,
  RpcClient,
  RpcServer,
  initRpcClient,
  closeRpcClient,
  rpc,
  pack,
  unpack,
}
