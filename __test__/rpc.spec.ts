// Node calling the Rust example worker: every function, every error type, timeouts,
// cancellation, concurrency, values.
import { rmSync, writeFileSync } from 'node:fs'

import test from 'ava'

import { RpcClient, RpcError, initRpcClient, closeRpcClient, rpc } from '../index.js'
import { startWorker, type Worker } from './helpers'

let worker: Worker
let client: RpcClient

test.before(async () => {
  worker = await startWorker()
  client = await RpcClient.connect(worker.socket)
})

test.after.always(async () => {
  await client?.close()
  await worker?.stop()
})

async function rejects(t: any, p: Promise<unknown>, code: string, errorType?: string): Promise<RpcError> {
  const e = await t.throwsAsync(p, { instanceOf: RpcError })
  t.is(e.code, code, e.message)
  if (errorType !== undefined) t.is(e.errorType, errorType)
  return e
}

test('add, multiply, fibonacci, is_prime, sum_array', async (t) => {
  t.is(await client.call('add', { a: 2, b: 3 }), 5)
  t.is(await client.call('add', { a: 0.5, b: 0.25 }), 0.75)
  t.is(await client.call('multiply', { a: 6, b: 7 }), 42)
  t.is(await client.call('fibonacci', { n: 0 }), 0)
  t.is(await client.call('fibonacci', { n: 10 }), 55)
  // fib(90) is beyond 2^53: it arrives as a BigInt, exactly.
  t.is(await client.call('fibonacci', { n: 90 }), 2880067194370816120n)
  t.is(await client.call('is_prime', { n: 7919 }), true)
  t.is(await client.call('is_prime', { n: 7917 }), false)
  t.is(await client.call('is_prime', { n: 1 }), false)
  // JS numbers beyond 32 bits travel as float64; whole ones still fit integer params.
  t.is(await client.call('is_prime', { n: 4294967311 }), true)
  t.is(await client.call('fibonacci', { n: 2 ** 40 }).catch((e) => e.code), 'ERR_FERRY_INVALID_PARAMS')
  t.is(await client.call('sum_array', { values: [1, 2, 3.5] }), 6.5)
  t.is(await client.call('sum_array', { values: [] }), 0)
})

test('echo returns every MessagePack value unchanged', async (t) => {
  const value = {
    nil: null,
    yes: true,
    no: false,
    int: -42,
    float: 3.25,
    big: 2n ** 62n,
    negBig: -(2n ** 62n),
    str: 'héllo ✓',
    empty: '',
    list: [1, 'two', [3], { four: 4 }],
    bin: Buffer.from([0, 1, 2, 255]),
    nested: { a: { b: { c: [] as unknown[] } } },
  }
  t.deepEqual(await client.call('echo', value), value)
  t.deepEqual(await client.call('echo', [1, 2, 3]), [1, 2, 3])
  t.is(await client.call('echo', 'plain string'), 'plain string')
  t.is(await client.call('echo'), null, 'absent params are nil')
  const u8 = new Uint8Array([9, 8, 7])
  t.deepEqual([...((await client.call('echo', u8)) as Buffer)], [9, 8, 7])
})

test('get_benchmarks returns an object; sleep answers after ms', async (t) => {
  const info = (await client.call('get_benchmarks', {})) as { runtime: string; functions: string[] }
  t.is(info.runtime, 'ferry-core')
  t.true(info.functions.includes('add'))
  t.is(await client.call('sleep', { ms: 5 }), 5)
})

test('NotFound, InvalidParams, HandlerError', async (t) => {
  await rejects(t, client.call('no_such_function', {}), 'ERR_FERRY_NOT_FOUND', 'NotFound')
  await rejects(t, client.call('add', { a: 'x', b: 1 }), 'ERR_FERRY_INVALID_PARAMS', 'InvalidParams')
  await rejects(t, client.call('add', null), 'ERR_FERRY_INVALID_PARAMS', 'InvalidParams')
  const e = await rejects(t, client.call('fail', {}), 'ERR_FERRY_HANDLER', 'HandlerError')
  t.regex(e.message, /always fails/)
})

test('calls by more names than a client keeps by id each reach the peer under their own name', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  t.teardown(() => c.close())
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
  // 1,100 names: the first ones kept by id (up to the client's limit), the rest sent as strings.
  const names = Array.from({ length: 1100 }, (_, i) => `nope_${i}_${'é'.repeat(i % 3)}`)
  const errors = await Promise.all(names.map((n) => c.call(n, {}).then(() => null, (e: RpcError) => e)))
  errors.forEach((e, i) => {
    t.is(e?.code, 'ERR_FERRY_NOT_FOUND', names[i])
    t.true(e?.message.includes(`\`${names[i]}\``), `${names[i]}: ${e?.message}`)
  })
  // A name kept by id before the limit, and one first called after it, both still work.
  t.is(await c.call('add', { a: 2, b: 3 }), 5)
  t.is(await c.call('sleep', { ms: 1 }), 1)
  for (const n of names.slice(0, 3).concat(names.slice(-3))) {
    await rejects(t, c.call(n, {}), 'ERR_FERRY_NOT_FOUND', 'NotFound')
  }
})

test('a panicking function is Internal and the worker keeps serving', async (t) => {
  const e = await rejects(t, client.call('panic', {}), 'ERR_FERRY_INTERNAL', 'Internal')
  t.regex(e.message, /panic/)
  t.is(await client.call('add', { a: 1, b: 1 }), 2)
  const other = await RpcClient.connect(worker.socket)
  t.is(await other.call('add', { a: 2, b: 2 }), 4)
  await other.close()
})

test('a timeout rejects with ERR_FERRY_TIMEOUT and the connection goes on', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  await rejects(t, c.call('sleep', { ms: 2000 }, { timeoutMs: 50 }), 'ERR_FERRY_TIMEOUT')
  t.is(c.pendingCalls, 0)
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
  // The connection's default applies when the call sets none.
  const quick = await RpcClient.connect(worker.socket, { timeoutMs: 30 })
  await rejects(t, quick.call('sleep', { ms: 2000 }), 'ERR_FERRY_TIMEOUT')
  t.is(await quick.call('sleep', { ms: 1 }, { timeoutMs: 0 }), 1, 'timeoutMs 0 waits forever')
  await Promise.all([c.close(), quick.close()])
})

test('each timeout fires at its own deadline, whatever order the calls came in, never before it', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  const started = performance.now()
  // Armed for the long one first; the short one made after it must fire on its own.
  const long = c.call('sleep', { ms: 10_000 }, { timeoutMs: 1500 })
  const longDone = rejects(t, long, 'ERR_FERRY_TIMEOUT').then(() => performance.now() - started)
  const short = c.call('sleep', { ms: 10_000 }, { timeoutMs: 100 })
  await rejects(t, short, 'ERR_FERRY_TIMEOUT')
  t.is(c.pendingCalls, 1, 'the long call is still pending when the short one times out')
  // A later deadline than the armed one: fires once the timer moves on to it.
  const laterStarted = performance.now()
  const later = c.call('sleep', { ms: 10_000 }, { timeoutMs: 2000 })
  t.true((await longDone) >= 1500, 'not before its deadline')
  await rejects(t, later, 'ERR_FERRY_TIMEOUT')
  t.true(performance.now() - laterStarted >= 2000, 'not before its deadline')
  t.is(c.pendingCalls, 0)
  await c.close()
})

test('AbortSignal cancels a pending call', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  const ac = new AbortController()
  const p = c.call('sleep', { ms: 2000 }, { signal: ac.signal })
  t.is(c.pendingCalls, 1)
  ac.abort()
  await rejects(t, p, 'ERR_FERRY_CANCELLED')
  await rejects(t, c.call('add', { a: 1, b: 2 }, { signal: ac.signal }), 'ERR_FERRY_CANCELLED')
  t.is(c.pendingCalls, 0)
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
  await c.close()
})

test('1,000 concurrent calls answered out of order', async (t) => {
  const n = 1000
  const delays = Array.from({ length: n }, (_, i) => (i * 7919) % 23)
  const order: number[] = []
  const results = await Promise.all(
    delays.map((ms, i) =>
      client.call<number>('sleep', { ms }).then((r) => {
        order.push(i)
        return r
      }),
    ),
  )
  t.deepEqual(results, delays)
  t.notDeepEqual(order, [...order].sort((a, b) => a - b), 'answers arrived out of order')
})

test('params that cannot be encoded reject locally', async (t) => {
  await rejects(t, client.call('echo', { s: Symbol('x') }), 'ERR_FERRY_ENCODE')
  await rejects(t, client.call('echo', 2n ** 70n), 'ERR_FERRY_ENCODE')
  t.is(await client.call('add', { a: 1, b: 1 }), 2)
})

test('a frame over the limit is refused before sending', async (t) => {
  const small = await RpcClient.connect(worker.socket, { maxFrameBytes: 1024 })
  await rejects(t, small.call('echo', Buffer.alloc(4096)), 'ERR_FERRY_FRAME_TOO_LARGE')
  t.is(await small.call('add', { a: 1, b: 1 }), 2)
  await small.close()
})

test('large binary echo (4 MiB)', async (t) => {
  const big = Buffer.alloc(4 * 1024 * 1024, 7)
  const back = (await client.call('echo', big)) as Buffer
  t.is(back.length, big.length)
  t.true(back.equals(big))
})

test.serial('the process-wide client: not initialized, init, call, close', async (t) => {
  await closeRpcClient()
  const saved = process.env.FERRY_SOCKET
  delete process.env.FERRY_SOCKET
  const e = await rejects(t, rpc.call('add', { a: 1, b: 2 }), 'ERR_FERRY_NOT_INITIALIZED')
  t.regex(e.message, /initRpcClient/)
  await initRpcClient(worker.socket, { connectTimeoutMs: 2000 })
  t.is(await rpc.call<number>('add', { a: 2, b: 3 }), 5)
  const pending = rpc.call('sleep', { ms: 5000 })
  await closeRpcClient()
  await rejects(t, pending, 'ERR_FERRY_CLOSED')
  await rejects(t, rpc.call('add', { a: 1, b: 2 }), 'ERR_FERRY_NOT_INITIALIZED')
  // FERRY_SOCKET makes the first call connect by itself.
  process.env.FERRY_SOCKET = worker.socket
  try {
    t.is(await rpc.call<number>('multiply', { a: 3, b: 4 }), 12)
  } finally {
    await closeRpcClient()
    if (saved === undefined) delete process.env.FERRY_SOCKET
    else process.env.FERRY_SOCKET = saved
  }
})

test('connect retries until the socket exists, then times out with ERR_FERRY_CONNECT', async (t) => {
  const e = await t.throwsAsync(RpcClient.connect(worker.socket + '.missing', { connectTimeoutMs: 100 }), {
    instanceOf: RpcError,
  })
  t.is(e!.code, 'ERR_FERRY_CONNECT')
  t.is((e!.cause as NodeJS.ErrnoException).code, 'ENOENT')
})

test('connect fails at once, without retrying, when retrying cannot help', async (t) => {
  // A path longer than a Unix socket address holds, and a path through a regular file.
  const tooLong = '/tmp/' + 'x'.repeat(200)
  const notADir = worker.socket + '.file/sock'
  writeFileSync(worker.socket + '.file', '')
  try {
    for (const [path, code] of [
      [tooLong, 'EINVAL'],
      [notADir, 'ENOTDIR'],
    ]) {
      const started = performance.now()
      const e = await t.throwsAsync(RpcClient.connect(path, { connectTimeoutMs: 10_000 }), { instanceOf: RpcError })
      t.is(e!.code, 'ERR_FERRY_CONNECT')
      t.is((e!.cause as NodeJS.ErrnoException).code, code)
      t.regex(e!.message, new RegExp(code))
      // Well inside the 10 s connect timeout: it was not retried until the deadline.
      t.true(performance.now() - started < 5_000)
    }
  } finally {
    rmSync(worker.socket + '.file', { force: true })
  }
})

test('the worker exiting fails pending calls with ERR_FERRY_CONNECTION_LOST', async (t) => {
  const w = await startWorker()
  const c = await RpcClient.connect(w.socket)
  const pending = c.call('sleep', { ms: 10_000 })
  w.child.kill('SIGKILL')
  await rejects(t, pending, 'ERR_FERRY_CONNECTION_LOST')
  await rejects(t, c.call('add', { a: 1, b: 1 }), 'ERR_FERRY_CONNECTION_LOST')
  t.true(c.closed)
  await w.stop()
})

test('the worker shuts down gracefully on SIGTERM and removes its socket', async (t) => {
  const w = await startWorker()
  const c = await RpcClient.connect(w.socket)
  const slow = c.call('sleep', { ms: 200 })
  // The call is on the wire once the next tick flushed it; wait for the worker to have it.
  await new Promise((r) => setTimeout(r, 0))
  await c.call('add', { a: 1, b: 1 })
  w.child.kill('SIGTERM')
  t.is(await slow, 200, 'the running call was answered before exit')
  t.is(await w.stop(), 0)
  const { existsSync } = await import('node:fs')
  t.false(existsSync(w.socket))
  await c.close()
})

test('function names of every length around the 128-byte fast path arrive whole, multibyte characters included', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  t.teardown(() => c.close())
  for (let len = 118; len <= 134; len++) {
    for (const tail of ['', '€', '😀']) {
      const name = 'f'.repeat(len - Buffer.byteLength(tail)) + tail
      const e = await t.throwsAsync(c.call(name, {}), { instanceOf: RpcError })
      t.is(e!.code, 'ERR_FERRY_NOT_FOUND')
      t.is(e!.message, `no function named \`${name}\``)
    }
  }
  // And a real function still answers after all that.
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
})

test('calls pending for long, many at once and answered out of order all settle with their own results', async (t) => {
  const c = await RpcClient.connect(worker.socket)
  t.teardown(() => c.close())
  // One call held while thousands of others pass: later ids land on its slot of the client's
  // table of pending calls over and over.
  const held = new AbortController()
  const long = c.call('sleep', { ms: 60_000 }, { signal: held.signal })
  for (let round = 0; round < 20; round++) {
    const batch = Array.from({ length: 300 }, (_, i) => c.call('add', { a: round, b: i }))
    t.deepEqual(
      await Promise.all(batch),
      batch.map((_, i) => round + i),
    )
  }
  t.is(c.pendingCalls, 1)
  // Many pending at once (the table grows), answered out of order: shorter sleeps first.
  const sleeps = Array.from({ length: 3000 }, (_, i) => c.call('sleep', { ms: 100 - (i % 100) }))
  const adds = Array.from({ length: 3000 }, (_, i) => c.call('add', { a: i, b: 1 }))
  t.is(c.pendingCalls, 6001)
  t.deepEqual(await Promise.all(adds), adds.map((_, i) => i + 1))
  t.deepEqual(await Promise.all(sleeps), sleeps.map((_, i) => 100 - (i % 100)))
  t.is(c.pendingCalls, 1)
  held.abort()
  await rejects(t, long, 'ERR_FERRY_CANCELLED')
  t.is(c.pendingCalls, 0)
  t.is(await c.call('add', { a: 1, b: 2 }), 3)
})
