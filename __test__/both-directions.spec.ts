// Calls in both directions between Rust and TypeScript: the Rust worker calling handlers a
// client registered on its own connection, the Rust `caller` example calling a Node
// `RpcServer`, and the server's socket-file lifecycle (address in use, stale files, close).
import { spawn } from 'node:child_process'
import { existsSync, lstatSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import test, { type ExecutionContext } from 'ava'

import {
  RpcClient,
  RpcError,
  RpcServer,
  type HandlerRequest,
  type RpcConnection,
  type RpcErrorCode,
} from '../index.js'
import { ROOT, startWorker, tempDir, type Worker } from './helpers'
import { run, until, type ProcessResult } from './wire'

let worker: Worker

test.before(async () => {
  worker = await startWorker()
})

test.after.always(async () => {
  await worker?.stop()
})

async function rejects(t: ExecutionContext, p: Promise<unknown>, code: RpcErrorCode, errorType?: string): Promise<RpcError> {
  const e = (await t.throwsAsync(p, { instanceOf: RpcError }))!
  t.is(e.code, code, e.message)
  if (errorType !== undefined) t.is(e.errorType, errorType)
  return e
}

/** A thrown error that picks the wire `error_type`. */
function typedError(message: string, errorType: string): Error {
  return Object.assign(new Error(message), { errorType })
}

/** A client of the worker, closed when the test ends. */
async function workerClient(t: ExecutionContext): Promise<RpcClient> {
  const c = await RpcClient.connect(worker.socket)
  t.teardown(() => c.close())
  return c
}

/** A Node server on a fresh socket, closed (and its directory removed) when the test ends. */
async function nodeServer(t: ExecutionContext): Promise<RpcServer> {
  const { dir, cleanup } = tempDir()
  const s = await RpcServer.listen(join(dir, 'node.sock'))
  t.teardown(async () => {
    await s.close({ graceMs: 0 })
    cleanup()
  })
  return s
}

function callerBin(): string {
  const bin = join(ROOT, 'target', 'release', 'examples', 'caller')
  if (!existsSync(bin)) throw new Error('caller binary not found: run `npm run build:worker` first')
  return bin
}

/** Runs the Rust `caller` example: `call <fn>` or `route <handler_id>` with JSON input. */
function caller(path: string, kind: 'call' | 'route', name: string, input: unknown): Promise<ProcessResult> {
  return run(callerBin(), [path, kind, name, JSON.stringify(input)])
}

const REQUEST: HandlerRequest = { method: 'GET', path: '/users/7', headers: { accept: 'text/plain' } }

// ----- (a) the worker calls handlers of the client, on the client's own connection ---------

test('call_peer: the worker calls a TS function back on the same connection', async (t) => {
  const client = await workerClient(t)
  let seen: RpcConnection | undefined
  client.handle('hello', (params: { name: string }, ctx) => {
    seen = ctx.connection
    return `hello ${params.name}`
  })
  t.is(await client.call('call_peer', { function_name: 'hello', params: { name: 'Ada' } }), 'hello Ada')
  t.is(seen, client, 'ctx.connection is the client the call arrived on')
  // Every MessagePack value survives the round trip through Rust and back.
  client.handle('echo_js', (params) => params)
  const value = { n: null, t: true, i: -42, f: 0.5, s: 'é ✓', l: [1, [2]], m: { a: { b: 'c' } } }
  t.deepEqual(await client.call('call_peer', { function_name: 'echo_js', params: value }), value)
  t.is(await client.call('call_peer', { function_name: 'echo_js' }), null, 'absent params are nil')
  t.is(client.pendingCalls, 0)
})

test('call_peer: a TS handler may call the worker again while serving it', async (t) => {
  const client = await workerClient(t)
  client.handle('sum_via_worker', async ({ a, b }: { a: number; b: number }, ctx) => {
    const sum = await ctx.connection.call<number>('add', { a, b })
    return { sum, doubled: await ctx.connection.call<number>('multiply', { a: sum, b: 2 }) }
  })
  const out = await client.call('call_peer', { function_name: 'sum_via_worker', params: { a: 20, b: 1 } })
  t.deepEqual(out, { sum: 21, doubled: 42 })
  // Several at once, interleaved on the one connection.
  const many = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      client.call('call_peer', { function_name: 'sum_via_worker', params: { a: i, b: i } }),
    ),
  )
  t.deepEqual(
    many,
    Array.from({ length: 20 }, (_, i) => ({ sum: 2 * i, doubled: 4 * i })),
  )
})

test('invoke_peer: the worker invokes a TS route on the same connection', async (t) => {
  const client = await workerClient(t)
  let seen: { req?: HandlerRequest; conn?: RpcConnection } = {}
  client.handleRoute('users_get', (req, ctx) => {
    seen = { req, conn: ctx.connection }
    return { status: 201, headers: { 'content-type': 'text/plain', 'x-path': req.path }, body: `user ${req.path}` }
  })
  const res = await client.call('invoke_peer', { handler_id: 'users_get', request: REQUEST })
  t.deepEqual(res, {
    status: 201,
    headers: { 'content-type': 'text/plain', 'x-path': '/users/7' },
    body: 'user /users/7',
  })
  t.is(seen.conn, client)
  t.like(seen.req, REQUEST)
  // Defaults: status 200, headers {}, body nil.
  client.handleRoute('bare', async () => ({}))
  t.deepEqual(await client.call('invoke_peer', { handler_id: 'bare', request: REQUEST }), {
    status: 200,
    headers: {},
    body: null,
  })
})

test('call_peer: a TS handler that throws fails the outer call with HandlerError', async (t) => {
  const client = await workerClient(t)
  client.handle('boom', () => {
    throw new Error('boom from TS')
  })
  client.handle('boom_async', async () => {
    throw new Error('async boom from TS')
  })
  // The worker's call fails with the JS error; the worker returns that failure as its own
  // HandlerError carrying the same message.
  let e = await rejects(t, client.call('call_peer', { function_name: 'boom' }), 'ERR_FERRY_HANDLER', 'HandlerError')
  t.is(e.message, 'boom from TS')
  e = await rejects(t, client.call('call_peer', { function_name: 'boom_async' }), 'ERR_FERRY_HANDLER', 'HandlerError')
  t.is(e.message, 'async boom from TS')
  // A function the client does not serve: the worker's NotFound becomes its HandlerError.
  e = await rejects(t, client.call('call_peer', { function_name: 'nope' }), 'ERR_FERRY_HANDLER', 'HandlerError')
  t.is(e.message, 'no function named `nope`')
  // The connection goes on.
  client.handle('ok', () => 'ok')
  t.is(await client.call('call_peer', { function_name: 'ok' }), 'ok')
})

test('call_peer: errorType InvalidParams reaches the worker, which reports its own HandlerError', async (t) => {
  const client = await workerClient(t)
  client.handle('picky', () => {
    throw typedError('a must be positive', 'InvalidParams')
  })
  // The worker's `call_peer` turns any failed call into a HandlerError with the same
  // message (ferry-core: `impl IntoRejection for Error` is `Rejection::handler`), so the
  // type chosen in TS is not forwarded; see the `caller` test below for the type itself.
  const e = await rejects(t, client.call('call_peer', { function_name: 'picky' }), 'ERR_FERRY_HANDLER', 'HandlerError')
  t.is(e.message, 'a must be positive')
})

test('invoke_peer: a TS route that throws fails the outer call', async (t) => {
  const client = await workerClient(t)
  client.handleRoute('broken', async () => {
    throw new Error('route exploded')
  })
  // The worker gets `error HANDLER_EXECUTION_ERROR` and reports it as a HandlerError whose
  // message is the peer error's display: "<message> (<code>)".
  const e = await rejects(
    t,
    client.call('invoke_peer', { handler_id: 'broken', request: REQUEST }),
    'ERR_FERRY_HANDLER',
    'HandlerError',
  )
  t.is(e.message, 'route exploded (HANDLER_EXECUTION_ERROR)')
  const nf = await rejects(
    t,
    client.call('invoke_peer', { handler_id: 'missing', request: REQUEST }),
    'ERR_FERRY_HANDLER',
    'HandlerError',
  )
  t.is(nf.message, 'no handler `missing` (HANDLER_NOT_FOUND)')
})

test("handlers are per connection: another client does not see this client's", async (t) => {
  const a = await workerClient(t)
  const b = await workerClient(t)
  a.handle('mine', () => 'a')
  t.is(await a.call('call_peer', { function_name: 'mine' }), 'a')
  const e = await rejects(t, b.call('call_peer', { function_name: 'mine' }), 'ERR_FERRY_HANDLER')
  t.is(e.message, 'no function named `mine`')
})

test('TS integer params above 2^32 reach a Rust u64 parameter as integers', async (t) => {
  const client = await workerClient(t)
  const outcome = (p: Promise<unknown>) => p.catch((e: RpcError) => `${e.code}: ${e.message}`)
  // 2^32 + 15 is the smallest prime above 2^32; `is_prime` takes `{n: u64}`.
  t.is(await outcome(client.call('is_prime', { n: 2 ** 32 + 15 })), true)
  t.is(await outcome(client.call('is_prime', { n: 2 ** 40 })), false)
  t.is(await outcome(client.call('is_prime', { n: Number.MAX_SAFE_INTEGER })), false)
  // The same values as BigInt are written as integers and work.
  t.is(await outcome(client.call('is_prime', { n: 2n ** 32n + 15n })), true)
})

// ----- (b) a Node RpcServer called by the Rust `caller` example -----------------------------

test('caller → RpcServer: a function and a route', async (t) => {
  const s = await nodeServer(t)
  s.handle('add', ({ a, b }: { a: number; b: number }) => a + b)
  s.handle('greet', async ({ name }: { name: string }) => ({ greeting: `hi ${name}`, list: [1, 2.5, 'x', null] }))
  s.handleRoute('users_get', (req) => ({
    status: 200,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ method: req.method, path: req.path, accept: req.headers.accept }),
  }))
  s.handleRoute('bare', () => ({}))

  let r = await caller(s.path, 'call', 'add', { a: 2, b: 3 })
  t.deepEqual(r, { code: 0, signal: null, stdout: '5\n', stderr: '' })
  r = await caller(s.path, 'call', 'greet', { name: 'Rust' })
  t.is(r.code, 0, r.stderr)
  t.deepEqual(JSON.parse(r.stdout), { greeting: 'hi Rust', list: [1, 2.5, 'x', null] })

  r = await caller(s.path, 'route', 'users_get', REQUEST)
  t.is(r.code, 0, r.stderr)
  t.deepEqual(JSON.parse(r.stdout), {
    status: 200,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ method: 'GET', path: '/users/7', accept: 'text/plain' }),
  })
  r = await caller(s.path, 'route', 'bare', REQUEST)
  t.is(r.code, 0, r.stderr)
  t.deepEqual(JSON.parse(r.stdout), { status: 200, headers: {}, body: null })
})

test('caller → RpcServer: errors, with the type a TS handler chose', async (t) => {
  const s = await nodeServer(t)
  s.handle('boom', () => {
    throw new Error('boom from TS')
  })
  s.handle('picky', async () => {
    throw typedError('a must be positive', 'InvalidParams')
  })
  s.handle('lost', () => {
    throw typedError('no such user', 'NotFound')
  })
  s.handle('custom', () => {
    // Not one of the four standard types: sent as HandlerError.
    throw typedError('odd', 'Teapot')
  })
  s.handleRoute('broken', () => {
    throw new Error('route exploded')
  })
  const expectations: Array<[ProcessResult, string]> = [
    [await caller(s.path, 'call', 'boom', {}), 'error ERR_FERRY_HANDLER boom from TS\n'],
    [await caller(s.path, 'call', 'picky', {}), 'error ERR_FERRY_INVALID_PARAMS a must be positive\n'],
    [await caller(s.path, 'call', 'lost', {}), 'error ERR_FERRY_NOT_FOUND no such user\n'],
    [await caller(s.path, 'call', 'custom', {}), 'error ERR_FERRY_HANDLER odd\n'],
    [await caller(s.path, 'call', 'nope', {}), 'error ERR_FERRY_NOT_FOUND no function named `nope`\n'],
    [await caller(s.path, 'route', 'broken', REQUEST), 'error ERR_FERRY_HANDLER route exploded (HANDLER_EXECUTION_ERROR)\n'],
    [await caller(s.path, 'route', 'missing', REQUEST), 'error ERR_FERRY_NOT_FOUND no handler `missing` (HANDLER_NOT_FOUND)\n'],
  ]
  for (const [r, stderr] of expectations) {
    t.is(r.code, 1)
    t.is(r.stdout, '')
    t.is(r.stderr, stderr)
  }
})

test('caller → RpcServer: s.connections lists the connected peer', async (t) => {
  const s = await nodeServer(t)
  const connected: RpcConnection[] = []
  s.onConnection((c) => connected.push(c))
  t.deepEqual(s.connections, [])
  let during: { listed: boolean; count: number; closed: boolean; back: string } | undefined
  s.handle('whoami', async (_params, ctx) => {
    // The server can call the peer back; the Rust caller serves no functions.
    const back = await ctx.connection.call('anything').then(
      () => 'answered',
      (e: RpcError) => `${e.code} ${e.errorType}`,
    )
    during = {
      listed: s.connections.includes(ctx.connection),
      count: s.connections.length,
      closed: ctx.connection.closed,
      back,
    }
    return 'you'
  })
  const r = await caller(s.path, 'call', 'whoami', {})
  t.is(r.stdout, '"you"\n', r.stderr)
  t.deepEqual(during, { listed: true, count: 1, closed: false, back: 'ERR_FERRY_NOT_FOUND NotFound' })
  t.is(connected.length, 1)
  // The caller exited: its connection leaves the list.
  await until(() => s.connections.length === 0, 'the connection to leave s.connections')
  t.true(connected[0].closed)
})

test('caller → RpcServer: an integer result above 2^32 reaches Rust as an integer', async (t) => {
  const s = await nodeServer(t)
  s.handle('big', () => 2 ** 40)
  s.handle('bigger', () => Number.MAX_SAFE_INTEGER)
  let r = await caller(s.path, 'call', 'big', {})
  t.is(r.stdout, '1099511627776\n', r.stderr)
  r = await caller(s.path, 'call', 'bigger', {})
  t.is(r.stdout, '9007199254740991\n', r.stderr)
})

// ----- (c) the server's socket file ----------------------------------------------------------

test('listen on a path a live RpcServer holds: ERR_FERRY_ADDR_IN_USE, the live one keeps serving', async (t) => {
  const s = await nodeServer(t)
  s.handle('add', ({ a, b }: { a: number; b: number }) => a + b)
  const e = await t.throwsAsync(RpcServer.listen(s.path), { instanceOf: RpcError })
  t.is(e!.code, 'ERR_FERRY_ADDR_IN_USE')
  t.true(lstatSync(s.path).isSocket())
  const c = await RpcClient.connect(s.path)
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
  await c.close()
  const r = await caller(s.path, 'call', 'add', { a: 3, b: 4 })
  t.is(r.stdout, '7\n')
})

test('listen on the path of the live Rust worker: ERR_FERRY_ADDR_IN_USE, the worker keeps serving', async (t) => {
  const e = await t.throwsAsync(RpcServer.listen(worker.socket), { instanceOf: RpcError })
  t.is(e!.code, 'ERR_FERRY_ADDR_IN_USE')
  const c = await workerClient(t)
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
})

test('listen on a path that is not a socket: ERR_FERRY_ADDR_IN_USE, the file is left alone', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const file = join(dir, 'not-a-socket')
  writeFileSync(file, 'keep me')
  const e = await t.throwsAsync(RpcServer.listen(file), { instanceOf: RpcError })
  t.is(e!.code, 'ERR_FERRY_ADDR_IN_USE')
  t.is(readFileSync(file, 'utf8'), 'keep me')
})

/** Leaves a stale socket file at `path`: a child process binds it and is killed. */
async function staleSocket(path: string): Promise<void> {
  const script = `require('node:net').createServer().listen(${JSON.stringify(path)}, () => console.log('listening'))`
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (line === 'listening') resolve()
    })
    child.once('exit', (code) => reject(new Error(`binder exited with ${code}`)))
  })
  child.kill('SIGKILL') // no chance to unlink
  await exited
}

test('listen on a stale socket file succeeds', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const path = join(dir, 'stale.sock')
  await staleSocket(path)
  t.true(lstatSync(path).isSocket(), 'the dead process left its socket file')
  await t.throwsAsync(RpcClient.connect(path, { connectTimeoutMs: 0 }), { instanceOf: RpcError, code: 'ERR_FERRY_CONNECT' })
  const s = await RpcServer.listen(path)
  t.teardown(() => s.close({ graceMs: 0 }))
  s.handle('add', ({ a, b }: { a: number; b: number }) => a + b)
  const r = await caller(path, 'call', 'add', { a: 20, b: 22 })
  t.is(r.stdout, '42\n', r.stderr)
})

test('close() answers running calls within the grace period, then removes the socket file', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const s = await RpcServer.listen(join(dir, 'close.sock'))
  let release!: () => void
  const released = new Promise<void>((r) => (release = r))
  let started!: () => void
  const running = new Promise<void>((r) => (started = r))
  s.handle('slow', async () => {
    started()
    await released
    return 'done'
  })
  const c = await RpcClient.connect(s.path)
  const pending = c.call('slow', {})
  await running
  const closing = s.close({ graceMs: 30_000 })
  release()
  t.is(await pending, 'done')
  await closing
  t.false(existsSync(s.path), 'the socket file is removed')
  await until(() => c.closed, 'the client to see the close')
  await rejects(t, c.call('slow', {}), 'ERR_FERRY_CONNECTION_LOST')
  t.is(c.pendingCalls, 0)
  await t.throwsAsync(RpcClient.connect(s.path, { connectTimeoutMs: 0 }), { instanceOf: RpcError, code: 'ERR_FERRY_CONNECT' })
})

test('close() after the grace period: pending calls of connected clients settle', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const s = await RpcServer.listen(join(dir, 'close.sock'))
  let started!: () => void
  const running = new Promise<void>((r) => (started = r))
  s.handle('never', () => {
    started()
    return new Promise(() => {})
  })
  let served!: (c: RpcConnection) => void
  const accepted = new Promise<RpcConnection>((r) => (served = r))
  s.onConnection(served)
  const c = await RpcClient.connect(s.path)
  c.handle('never_either', () => new Promise(() => {}))
  const pending = c.call('never', {}, { timeoutMs: 0 })
  await running
  // The server's own pending call to the client settles too.
  const serverSide = await accepted
  const reverse = serverSide.call('never_either', {}, { timeoutMs: 0 })
  await s.close({ graceMs: 20 })
  await rejects(t, pending, 'ERR_FERRY_CONNECTION_LOST')
  await rejects(t, reverse, 'ERR_FERRY_CLOSED')
  t.true(c.closed)
  t.is(c.pendingCalls, 0)
  t.false(existsSync(s.path))
})

test("close() does not remove a successor's socket file", async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const path = join(dir, 'shared.sock')
  const first = await RpcServer.listen(path)
  // Someone removes the file and a new server takes the path (protocol.md 2.3: a server
  // removes the socket file on stop only if it is still the one it created).
  unlinkSync(path)
  const second = await RpcServer.listen(path)
  t.teardown(() => second.close({ graceMs: 0 }))
  second.handle('who', () => 'second')
  await first.close()
  t.true(existsSync(path), "the successor's socket file is still there")
  const r = await caller(path, 'call', 'who', {})
  t.is(r.stdout, '"second"\n', r.stderr)
})
