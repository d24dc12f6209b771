/**
 * ferry-ipc: fast typed RPC between TypeScript and Rust over a Unix socket, both ways.
 *
 * ```ts
 * import { initRpcClient, rpc, closeRpcClient } from 'ferry-ipc'
 * await initRpcClient('/tmp/app.sock')
 * const sum = await rpc.call<number>('add', { a: 2, b: 3 })
 * await closeRpcClient()
 * ```
 *
 * Values are anything MessagePack carries: null, booleans, numbers (integers beyond 2^53
 * arrive as BigInt), strings, arrays, plain objects, and Buffer/Uint8Array as binary.
 * `undefined` is sent as null.
 */

/** The stable codes of {@link RpcError}. */
export type RpcErrorCode =
  /** The peer has no function (or route handler) of that name. */
  | 'ERR_FERRY_NOT_FOUND'
  /** The params did not decode into the function's input type. */
  | 'ERR_FERRY_INVALID_PARAMS'
  /** The function ran and failed (a Rust `Err`, or a JS handler that threw). */
  | 'ERR_FERRY_HANDLER'
  /** A bug on the serving side, such as a panic; the peer keeps serving. */
  | 'ERR_FERRY_INTERNAL'
  /** The peer answered with an error type Ferry does not know; see `errorType`. */
  | 'ERR_FERRY_REMOTE'
  /** No answer within the call's timeout. */
  | 'ERR_FERRY_TIMEOUT'
  /** The call's AbortSignal fired. */
  | 'ERR_FERRY_CANCELLED'
  /** The connection ended (peer exited, socket error) before the answer. */
  | 'ERR_FERRY_CONNECTION_LOST'
  /** This side closed the connection while the call was pending, or called after close. */
  | 'ERR_FERRY_CLOSED'
  /** `rpc.call` before `initRpcClient` (and no `FERRY_SOCKET`). */
  | 'ERR_FERRY_NOT_INITIALIZED'
  /** Connecting failed, or the socket did not answer within `connectTimeoutMs`. */
  | 'ERR_FERRY_CONNECT'
  /** `RpcServer.listen` on a path a live server holds, or that is not a socket. */
  | 'ERR_FERRY_ADDR_IN_USE'
  /** A frame exceeded the size limit (ours when sending, the peer's when it complained). */
  | 'ERR_FERRY_FRAME_TOO_LARGE'
  /** The peer could not parse a message (`BAD_MESSAGE`, `UNKNOWN_MESSAGE_TYPE`). */
  | 'ERR_FERRY_BAD_MESSAGE'
  /** Params could not be encoded (symbols, BigInts beyond 64 bits, cyclic objects). */
  | 'ERR_FERRY_ENCODE'
  /** A result could not be decoded (an extension type msgpackr does not know, say). */
  | 'ERR_FERRY_DECODE'
  /** The peer broke the protocol, for example with a malformed answer. */
  | 'ERR_FERRY_PROTOCOL'

/** The `error_type` values of the wire protocol's `rpc_error`. */
export type WireErrorType = 'NotFound' | 'InvalidParams' | 'HandlerError' | 'Internal'

/**
 * Every failure of a Ferry call. Switch on `code`, never on `message`.
 *
 * A handler may throw an error with `errorType` set to one of {@link WireErrorType} to choose
 * the type the caller sees (default `HandlerError`).
 */
export declare class RpcError extends Error {
  constructor(message: string, code: RpcErrorCode | string, errorType?: string, options?: ErrorOptions)
  /** Always `'RpcError'`. */
  readonly name: 'RpcError'
  /** What failed, like `ERR_FERRY_TIMEOUT`. */
  readonly code: RpcErrorCode
  /**
   * When the error came from the peer: the wire `error_type` of an `rpc_error` (`NotFound`,
   * `InvalidParams`, `HandlerError`, `Internal`), or the `code` of an `error` message
   * (`HANDLER_NOT_FOUND`, `HANDLER_EXECUTION_ERROR`, `BAD_MESSAGE`...).
   */
  readonly errorType?: string
}

/** Options of one call. */
export interface CallOptions {
  /**
   * Reject with `ERR_FERRY_TIMEOUT` if no answer arrives within this many milliseconds; 0 or
   * Infinity waits forever; a negative value rejects at once with `ERR_FERRY_TIMEOUT`; NaN or
   * a non-number rejects with a `TypeError`. The peer is sent a `cancel`.
   * @default the connection's `timeoutMs` (30000)
   */
  timeoutMs?: number
  /** Aborting rejects the call with `ERR_FERRY_CANCELLED` and sends the peer a `cancel`. */
  signal?: AbortSignal
}

/** Options of a connection, shared by clients and by the connections a server accepts. */
export interface ConnectionOptions {
  /**
   * Timeout of calls that do not set their own, in milliseconds; 0 waits forever.
   * @default 30000
   */
  timeoutMs?: number
  /**
   * The largest frame sent or accepted, in bytes. A peer that announces a larger frame is
   * sent a `FRAME_TOO_LARGE` error and disconnected; a larger call is rejected locally with
   * `ERR_FERRY_FRAME_TOO_LARGE`.
   * @default 16777216 (16 MiB)
   */
  maxFrameBytes?: number
  /**
   * Send the peer a `cancel` message when a call times out or is aborted.
   * @default true
   */
  sendCancel?: boolean
  /**
   * Busy-polling, in microseconds: at the end of an event-loop turn in which this connection
   * sent calls or received anything, while calls are pending or the peer is active, keep
   * checking the socket for up to this long before the loop waits (yielding the CPU between
   * checks), so that an answer that comes soon finds the thread awake. On machines whose
   * idle cores wake slowly (VMs), this removes most of a call's latency: measured on a
   * 2-core VM with 50 on both ends, unpinned, a call's median went from 80-100 to 12-20
   * µs (docs/benchmarks.md). The cost: CPU, up to this long per loop turn, during which
   * other events of the loop wait too; and a few percent of latency when both processes
   * share one core. Capped at 1,000,000. A Rust peer has the same setting
   * (`ConnectionConfig::busy_poll`). 0 turns it off.
   * @default 0
   */
  busyPollMicros?: number
}

/** Options of {@link RpcClient.connect} and {@link initRpcClient}. */
export interface ClientOptions extends ConnectionOptions {
  /**
   * Keep retrying while the socket is missing or refuses connections (a peer still
   * starting) for this many milliseconds, then reject with `ERR_FERRY_CONNECT`.
   * @default 5000
   */
  connectTimeoutMs?: number
  /** Aborting stops the connect retries; the connect rejects with `ERR_FERRY_CANCELLED`. */
  signal?: AbortSignal
}

/** Options of {@link RpcServer.listen}. */
export interface ServerOptions extends ConnectionOptions {
  /**
   * Keep the process alive while listening. By default an idle server does not (like
   * `server.unref()`); call {@link RpcServer.ref} to change it later.
   * @default false
   */
  ref?: boolean
}

/** An HTTP-like request, as ZapJS's `invoke_handler` carries it. */
export interface HandlerRequest {
  method: string
  path: string
  headers: Record<string, string>
  query?: Record<string, string>
  params?: Record<string, string>
  body?: unknown
  [key: string]: unknown
}

/** A route handler's answer. */
export interface HandlerResponse<Body = unknown> {
  /** HTTP status. @default 200 */
  status: number
  /** Header names to values. @default {} */
  headers: Record<string, string>
  /** The body, usually a string. @default null */
  body: Body
}

/** What a handler knows about the call it serves. */
export interface HandlerContext {
  /** The connection the call arrived on: call the peer back on it. */
  connection: RpcConnection
}

/** Serves one function: gets the decoded params, returns (or resolves to) the result. */
export type Handler<P = any, R = unknown> = (params: P, ctx: HandlerContext) => R | Promise<R>

/** Serves one route: gets the request, returns (or resolves to) the response. */
export type RouteHandler<Req = HandlerRequest> = (
  request: Req,
  ctx: HandlerContext,
) => Partial<HandlerResponse> | Promise<Partial<HandlerResponse>>

/**
 * One connection, both directions: call the peer's functions and serve its calls to yours.
 * An idle connection does not keep the process alive; a pending call does.
 */
export declare class RpcConnection {
  protected constructor()
  /** Calls the peer's function `name` with `params` and resolves with its result. */
  call<R = unknown>(name: string, params?: unknown, options?: CallOptions): Promise<R>
  /** Invokes the peer's route handler `handlerId`; resolves with `{status, headers, body}`. */
  invokeHandler<Body = unknown>(
    handlerId: string,
    request: HandlerRequest,
    options?: CallOptions,
  ): Promise<HandlerResponse<Body>>
  /** Serves the peer's calls of `name` arriving on this connection. Returns `this`. */
  handle<P = any, R = unknown>(name: string, handler: Handler<P, R>): this
  /** Serves the peer's invocations of route `handlerId` on this connection. Returns `this`. */
  handleRoute<Req = HandlerRequest>(handlerId: string, handler: RouteHandler<Req>): this
  /** The number of calls awaiting an answer. */
  readonly pendingCalls: number
  /** Whether the connection has ended. */
  readonly closed: boolean
  /** Keep the process alive while this connection is open, even when idle. Returns `this`. */
  ref(): this
  /** Let the process exit while this connection is idle (the default). Returns `this`. */
  unref(): this
  /**
   * Closes the connection: pending calls reject with `ERR_FERRY_CLOSED`, queued frames are
   * flushed first. Resolves once the socket is closed.
   */
  close(): Promise<void>
}

/** A connection made by connecting to a listening peer. */
export declare class RpcClient extends RpcConnection {
  /**
   * Connects to the Unix socket at `socketPath`, retrying until `connectTimeoutMs` while
   * the peer is still starting.
   */
  static connect(socketPath: string, options?: ClientOptions): Promise<RpcClient>
}

/** Listens on a Unix socket and serves JS handlers to every peer that connects. */
export declare class RpcServer {
  private constructor()
  /**
   * Listens on `socketPath`. A stale socket file (no server behind it) is removed; a path
   * held by a live server, or that is not a socket, rejects with `ERR_FERRY_ADDR_IN_USE`.
   */
  static listen(socketPath: string, options?: ServerOptions): Promise<RpcServer>
  /** The socket path. */
  readonly path: string
  /** The connected peers; each can also be called back. */
  readonly connections: RpcConnection[]
  /** Serves `rpc_call`s of `name` from every peer. Returns `this`. */
  handle<P = any, R = unknown>(name: string, handler: Handler<P, R>): this
  /** Serves `invoke_handler`s of `handlerId` from every peer. Returns `this`. */
  handleRoute<Req = HandlerRequest>(handlerId: string, handler: RouteHandler<Req>): this
  /** Calls `listener` with every new peer's connection. Returns `this`. */
  onConnection(listener: (connection: RpcConnection) => void): this
  /** Keep the process alive while listening. Returns `this`. */
  ref(): this
  /** Let the process exit while only listening (the default). Returns `this`. */
  unref(): this
  /**
   * Stops accepting, waits up to `graceMs` for running handlers to answer, closes every
   * connection and removes the socket file. (A handler that itself awaits `close()` counts as
   * running, so it makes close wait the whole grace period.)
   */
  close(options?: {
    /** @default 5000 */
    graceMs?: number
  }): Promise<void>
}

/**
 * Connects the process-wide client that {@link rpc} uses, replacing (and then closing) any
 * previous one once the new one is connected. Retries until the socket answers or
 * `connectTimeoutMs` passes. Calls made meanwhile wait for it. A later `initRpcClient` or
 * `closeRpcClient` supersedes it: it then closes its client and rejects with `ERR_FERRY_CLOSED`.
 */
export declare function initRpcClient(socketPath: string, options?: ClientOptions): Promise<RpcClient>

/** Closes the process-wide client: every pending call settles with `ERR_FERRY_CLOSED`. */
export declare function closeRpcClient(): Promise<void>

/** Calls through the process-wide client. */
export declare const rpc: {
  /**
   * Calls the peer's function `name`. Before {@link initRpcClient} this rejects with
   * `ERR_FERRY_NOT_INITIALIZED`, unless the `FERRY_SOCKET` environment variable is set, in
   * which case the first call connects to it.
   */
  call<R = unknown>(name: string, params?: unknown, options?: CallOptions): Promise<R>
  /** Invokes the peer's route handler `handlerId`. */
  invokeHandler<Body = unknown>(
    handlerId: string,
    request: HandlerRequest,
    options?: CallOptions,
  ): Promise<HandlerResponse<Body>>
  /** The connected process-wide client, or null. */
  readonly client: RpcClient | null
}

/** Encodes a value as Ferry does (MessagePack, plain maps, `undefined` as nil). */
export declare function pack(value: unknown): Buffer
/** Decodes MessagePack as Ferry does (integers beyond 2^53 as BigInt). */
export declare function unpack(buffer: Uint8Array): unknown
