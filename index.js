'use strict'
// ferry-ipc: the JavaScript face of Ferry. A small wrapper over the native engine
// (native.js, built by napi-rs from src/): it owns the `net` sockets and moves opaque bytes
// between them and Rust, which does the framing, request ids, deadlines, envelopes and
// limits. Values cross as MessagePack packed and unpacked by msgpackr. Typings and
// documentation: index.d.ts.

const fs = require('node:fs')
const net = require('node:net')
const { Packr } = require('msgpackr')
const { NativeEngine } = require('./native.js')

const packr = new Packr({
  useRecords: false, // plain MessagePack maps, readable by any peer
  mapsAsObjects: true,
  encodeUndefinedAsNil: true,
  variableMapSize: true,
  int64AsType: 'auto', // integers beyond 2^53 come back as BigInt
})
const NIL = Buffer.from([0xc0])
const pack = (value) => (value === undefined ? NIL : packr.pack(value))
const unpack = (buffer) => packr.unpack(buffer)

/** Wire error types a handler may choose by throwing an error with `errorType` set. */
const WIRE_ERROR_TYPES = new Set(['NotFound', 'InvalidParams', 'HandlerError', 'Internal'])

const DEFAULT_TIMEOUT_MS = 30_000
const DEFAULT_CONNECT_TIMEOUT_MS = 5_000
const DEFAULT_CLOSE_GRACE_MS = 5_000

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
 * One connection, both directions. Created by RpcClient.connect or by RpcServer for each
 * peer; the socket belongs to it.
 */
class RpcConnection {
  constructor(socket, options = {}, server = null) {
    this._socket = socket
    this._server = server
    this._defaultTimeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS
    this._native = new NativeEngine(options.maxFrameBytes ?? 0, options.sendCancel ?? true, unpack, makeError)
    this._handlers = new Map()
    this._routes = new Map()
    this._flushScheduled = false
    this._flush = () => {
      this._flushScheduled = false
      this._flushNow()
    }
    this._timer = null
    this._timerAt = Infinity
    this._onTimer = () => this._expire()
    this._userRef = false
    this._refed = true
    this._closed = false
    this._closeReason = null
    this._closedPromise = new Promise((resolve) => (this._resolveClosed = resolve))
    socket.on('data', (chunk) => this._onData(chunk))
    socket.on('error', (err) => this._lost(`socket error: ${err.message}`))
    socket.on('close', () => this._lost('peer closed the connection'))
    this._updateRef()
  }

  /**
   * Calls the peer's function `name`. See index.d.ts.
   */
  call(name, params, options) {
    return this._request(this._native.call, String(name), params, 'params', options)
  }

  /** Invokes the peer's route handler `handlerId` with an HTTP-like request. */
  invokeHandler(handlerId, request, options) {
    return this._request(this._native.invoke, String(handlerId), request ?? {}, 'request', options)
  }

  _request(start, name, value, what, options) {
    const signal = options?.signal
    if (signal?.aborted) {
      return Promise.reject(new RpcError('call cancelled', 'ERR_FERRY_CANCELLED', undefined, { cause: signal.reason }))
    }
    let buffer
    try {
      buffer = pack(value)
    } catch (e) {
      return Promise.reject(new RpcError(`could not encode ${what}: ${handlerErrorMessage(e)}`, 'ERR_FERRY_ENCODE'))
    }
    const timeoutMs = options?.timeoutMs ?? this._defaultTimeoutMs
    return this._track(start.call(this._native, name, buffer, timeoutMs), timeoutMs, signal)
  }

  _track(promise, timeoutMs, signal) {
    if (signal) {
      const id = this._native.lastCallId()
      const onAbort = () => {
        if (this._native.cancel(id)) this._afterSettle()
      }
      signal.addEventListener('abort', onAbort, { once: true })
      const cleanup = () => signal.removeEventListener('abort', onAbort)
      promise.then(cleanup, cleanup)
    }
    if (timeoutMs > 0) {
      const at = performance.now() + timeoutMs
      if (at < this._timerAt) this._armTimer()
    }
    this._scheduleFlush()
    this._updateRef()
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
    return this._closed ? 0 : this._native.pending
  }

  /** Whether the connection has ended. */
  get closed() {
    return this._closed
  }

  /** Keep the process alive while this connection is open, even when idle. */
  ref() {
    this._userRef = true
    this._updateRef()
    return this
  }

  /** Let the process exit when this connection is idle (the default). */
  unref() {
    this._userRef = false
    this._updateRef()
    return this
  }

  /**
   * Closes the connection: pending calls reject with ERR_FERRY_CLOSED, queued frames are
   * flushed. Resolves once the socket is closed.
   */
  close() {
    if (!this._closed) {
      this._finish(null)
      // Destroy once our frames are flushed rather than wait for the peer's FIN: the socket
      // is unref'd now, and an idle process must be able to await close() and go on.
      this._socket.end(() => this._socket.destroy())
    }
    return this._closedPromise
  }

  _scheduleFlush() {
    if (!this._flushScheduled) {
      this._flushScheduled = true
      process.nextTick(this._flush)
    }
  }

  _flushNow() {
    if (this._socket.destroyed) return
    const out = this._native.takeOutput()
    if (out !== null) this._socket.write(out)
  }

  _armTimer() {
    if (this._timer) clearTimeout(this._timer)
    this._timer = null
    this._timerAt = Infinity
    if (this._closed) return
    const ms = this._native.nextDeadlineMs()
    if (ms < 0) return
    // The timer never holds the process open by itself: a pending call refs the socket.
    this._timer = setTimeout(this._onTimer, Math.ceil(ms)).unref()
    this._timerAt = performance.now() + ms
  }

  _expire() {
    this._timer = null
    this._timerAt = Infinity
    if (this._closed) return
    this._native.expire()
    this._armTimer()
    this._afterSettle()
  }

  _afterSettle() {
    this._scheduleFlush() // timeouts and cancellations queue `cancel` frames
    this._updateRef()
  }

  _updateRef() {
    const busy = !this._closed && (this._userRef || this._native.pending > 0 || this._native.serving > 0)
    if (busy !== this._refed) {
      this._refed = busy
      if (busy) this._socket.ref()
      else this._socket.unref()
    }
  }

  _onData(chunk) {
    if (this._closed) return
    const incoming = this._native.feed(chunk)
    if (incoming !== null) {
      for (let i = 0; i < incoming.length; i += 4) {
        if (incoming[i] === 0) this._runCall(incoming[i + 1], incoming[i + 2], incoming[i + 3])
        else this._runRoute(incoming[i + 1], incoming[i + 2], incoming[i + 3])
      }
    }
    const fatal = this._native.fatalReason
    this._flushNow()
    if (fatal !== null) {
      this._finish(fatal)
      this._socket.end(() => this._socket.destroy())
      return
    }
    this._updateRef()
  }

  _context(requestToken) {
    return { connection: this, token: requestToken }
  }

  _runCall(token, name, paramsBuffer) {
    if (this._closed) return
    const handler = this._handlers.get(name) ?? this._server?._handlers.get(name)
    if (handler === undefined) {
      this._native.replyError(token, `no function named \`${name}\``, 'NotFound')
      return
    }
    let params
    try {
      params = unpack(paramsBuffer)
    } catch (e) {
      this._native.replyError(token, `params could not be decoded: ${handlerErrorMessage(e)}`, 'InvalidParams')
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
    let buffer
    try {
      buffer = pack(value === undefined ? null : value)
    } catch (e) {
      this._native.replyError(token, `result could not be encoded: ${handlerErrorMessage(e)}`, 'Internal')
      this._afterSettle()
      return
    }
    this._native.reply(token, buffer)
    this._afterSettle()
  }

  _replyCallError(token, e) {
    if (this._closed) return
    const type = e && typeof e.errorType === 'string' && WIRE_ERROR_TYPES.has(e.errorType) ? e.errorType : 'HandlerError'
    this._native.replyError(token, handlerErrorMessage(e), type)
    this._afterSettle()
  }

  _runRoute(token, handlerId, requestBuffer) {
    if (this._closed) return
    const handler = this._routes.get(handlerId) ?? this._server?._routes.get(handlerId)
    if (handler === undefined) {
      this._native.replyRouteError(token, 'HANDLER_NOT_FOUND', `no handler \`${handlerId}\``, 404)
      return
    }
    Promise.resolve()
      .then(() => handler(unpack(requestBuffer), this._context(token)))
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
    this._socket.destroy()
  }

  _finish(lostReason) {
    if (this._closed) {
      return
    }
    this._closed = true
    this._closeReason = lostReason
    // Flush what is queued (answers, error frames) before the socket goes.
    this._flushNow()
    this._native.close(lostReason ?? undefined)
    if (this._timer) clearTimeout(this._timer)
    this._timer = null
    this._socket.unref()
    this._refed = false
    this._server?._connections.delete(this)
    if (this._socket.destroyed || this._socket.closed) this._resolveClosed()
    else this._socket.once('close', () => this._resolveClosed())
  }
}

function isRetryableConnectError(err) {
  return err && (err.code === 'ENOENT' || err.code === 'ECONNREFUSED' || err.code === 'EAGAIN')
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** A connection made by connecting to a listening peer. */
class RpcClient extends RpcConnection {
  /**
   * Connects to `socketPath`, retrying while the socket is missing or refuses (a peer that
   * is still starting) until `connectTimeoutMs`.
   */
  static async connect(socketPath, options = {}) {
    const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS
    const deadline = performance.now() + connectTimeoutMs
    let delay = 5
    for (;;) {
      try {
        const socket = await connectOnce(socketPath)
        return new RpcClient(socket, options)
      } catch (err) {
        if (!isRetryableConnectError(err)) {
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
        await sleep(Math.min(delay, left))
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
    this._identity = null
    try {
      const st = fs.lstatSync(path)
      this._identity = `${st.dev}:${st.ino}`
    } catch {}
    server.on('connection', (socket) => {
      const conn = new RpcConnection(socket, this._options, this)
      if (this._closing) {
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
    const tmp = `${socketPath}.${process.pid}.${Math.random().toString(36).slice(2, 8)}`
    const server = net.createServer()
    await new Promise((resolve, reject) => {
      server.once('error', reject)
      server.listen(tmp, () => {
        server.off('error', reject)
        resolve()
      })
    })
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
      const deadline = performance.now() + graceMs
      for (;;) {
        const busy = [...this._connections].some((c) => !c._closed && c._native.serving > 0)
        if (!busy || performance.now() >= deadline) break
        await sleep(5)
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
let globalConnecting = null

/** Connects the process-wide client used by `rpc.call`. */
async function initRpcClient(socketPath, options = {}) {
  const previous = globalClient
  globalClient = null
  const connecting = RpcClient.connect(socketPath, options)
  globalConnecting = connecting
  try {
    const client = await connecting
    if (globalConnecting === connecting) {
      globalClient = client
      globalConnecting = null
    }
    return client
  } finally {
    if (globalConnecting === connecting && globalClient === null) globalConnecting = null
    if (previous) await previous.close()
  }
}

/** Closes the process-wide client; every pending call settles. */
async function closeRpcClient() {
  const client = globalClient
  globalClient = null
  globalConnecting = null
  if (client) await client.close()
}

function notInitialized() {
  return new RpcError(
    'rpc.call() was used before the client was connected: call `await initRpcClient(socketPath)` first, ' +
      'or set the FERRY_SOCKET environment variable',
    'ERR_FERRY_NOT_INITIALIZED',
  )
}

async function lazyClient() {
  if (globalConnecting) return globalConnecting
  const path = process.env.FERRY_SOCKET
  if (!path) throw notInitialized()
  return initRpcClient(path)
}

/** The process-wide client's calls. */
const rpc = {
  call(name, params, options) {
    if (globalClient !== null) return globalClient.call(name, params, options)
    return lazyClient().then((client) => client.call(name, params, options))
  },
  invokeHandler(handlerId, request, options) {
    if (globalClient !== null) return globalClient.invokeHandler(handlerId, request, options)
    return lazyClient().then((client) => client.invokeHandler(handlerId, request, options))
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
