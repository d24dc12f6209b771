// Edge cases found in review: odd timeouts, aborts after local failures, closing against a
// peer that never reads, and races of the process-wide client.
import { createServer, type Socket } from 'node:net'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { RpcClient, RpcError, RpcServer, closeRpcClient, initRpcClient, pack, rpc } from '../index.js'
import { startWorker, tempDir, type Worker } from './helpers'
import { WireSocket, until } from './wire'

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

test('huge timeouts mean no deadline and never crash the process', async (t) => {
  for (const timeoutMs of [3e9, 1e22, Number.MAX_VALUE, Infinity, 0]) {
    t.is(await client.call('add', { a: 1, b: 2 }, { timeoutMs }), 3, String(timeoutMs))
  }
})

test('a negative timeout fails at once; NaN and non-numbers are a TypeError', async (t) => {
  const late = await t.throwsAsync(client.call('add', { a: 1, b: 2 }, { timeoutMs: -5 }), { instanceOf: RpcError })
  t.is(late!.code, 'ERR_FERRY_TIMEOUT')
  const nan = await t.throwsAsync(client.call('add', { a: 1, b: 2 }, { timeoutMs: NaN }), { instanceOf: TypeError })
  t.is((nan as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_TYPE')
  await t.throwsAsync(client.call('add', {}, { timeoutMs: '10' as unknown as number }), { instanceOf: TypeError })
  t.is(await client.call('add', { a: 1, b: 2 }), 3)
})

test('aborting a call that failed locally does not cancel another call', async (t) => {
  const c = await RpcClient.connect(worker.socket, { maxFrameBytes: 1024 })
  const other = c.call('sleep', { ms: 50 })
  const ac = new AbortController()
  const big = c.call('echo', Buffer.alloc(4096), { signal: ac.signal })
  ac.abort()
  t.is((await t.throwsAsync(big, { instanceOf: RpcError }))!.code, 'ERR_FERRY_FRAME_TOO_LARGE')
  t.is(await other, 50)
  await c.close()
})

test('close() resolves even when the peer never reads', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const sockets: Socket[] = []
  const silent = createServer((s) => {
    s.pause() // accept, never read
    sockets.push(s)
  })
  const path = join(dir, 'silent.sock')
  await new Promise<void>((r) => silent.listen(path, r))
  t.teardown(() => {
    sockets.forEach((s) => s.destroy())
    silent.close()
  })
  const c = await RpcClient.connect(path)
  const pending = c.call('echo', Buffer.alloc(8 * 1024 * 1024))
  await c.close()
  t.true(c.closed)
  t.is((await t.throwsAsync(pending, { instanceOf: RpcError }))!.code, 'ERR_FERRY_CLOSED')
})

test.serial('closeRpcClient during initRpcClient: the init rejects and no client is left', async (t) => {
  await closeRpcClient()
  const init = initRpcClient(worker.socket)
  const call = rpc.call('add', { a: 1, b: 2 })
  await closeRpcClient()
  t.is((await t.throwsAsync(init, { instanceOf: RpcError }))!.code, 'ERR_FERRY_CLOSED')
  t.is((await t.throwsAsync(call, { instanceOf: RpcError }))!.code, 'ERR_FERRY_CLOSED')
  t.is(rpc.client, null)
})

test.serial('concurrent initRpcClient: the later one wins, the earlier one closes its client', async (t) => {
  await closeRpcClient()
  const first = initRpcClient(worker.socket)
  const second = initRpcClient(worker.socket)
  t.is((await t.throwsAsync(first, { instanceOf: RpcError }))!.code, 'ERR_FERRY_CLOSED')
  const winner = await second
  t.is(rpc.client, winner)
  t.is(await rpc.call('add', { a: 2, b: 2 }), 4)
  // A failed re-init keeps the working client.
  await t.throwsAsync(initRpcClient(worker.socket + '.missing', { connectTimeoutMs: 50 }))
  t.is(rpc.client, winner)
  t.false(winner.closed)
  await closeRpcClient()
  t.true(winner.closed)
})

test.serial('a lazy FERRY_SOCKET connect honours the call timeout and signal', async (t) => {
  await closeRpcClient()
  const saved = process.env.FERRY_SOCKET
  process.env.FERRY_SOCKET = worker.socket + '.missing'
  try {
    const e = await t.throwsAsync(rpc.call('add', { a: 1, b: 2 }, { timeoutMs: 50 }), { instanceOf: RpcError })
    t.is(e!.code, 'ERR_FERRY_TIMEOUT')
    await closeRpcClient()
    const aborted = await t.throwsAsync(rpc.call('add', {}, { signal: AbortSignal.abort() }), { instanceOf: RpcError })
    t.is(aborted!.code, 'ERR_FERRY_CANCELLED')
  } finally {
    await closeRpcClient()
    if (saved === undefined) delete process.env.FERRY_SOCKET
    else process.env.FERRY_SOCKET = saved
  }
})

test('RpcServer.listen works near the socket path limit and refuses paths beyond it', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const near = join(dir, 'x'.repeat(Math.max(1, 107 - Buffer.byteLength(dir) - 1)))
  t.is(Buffer.byteLength(near), 107)
  const s = await RpcServer.listen(near)
  s.handle('ping', () => 'pong')
  const c = await RpcClient.connect(near)
  t.is(await c.call('ping'), 'pong')
  await c.close()
  await s.close()
  const e = await t.throwsAsync(RpcServer.listen(near + 'y'), { instanceOf: TypeError })
  t.is((e as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_VALUE')
})

type Fast = {
  call: (...args: unknown[]) => number
  callNamed: (...args: unknown[]) => number
  callBinNamed: (...args: unknown[]) => number
  reply: (...args: unknown[]) => void
}

/** The raw entry points of `c`'s engine (see src/fast.rs). */
function fastOf(c: RpcClient): Fast {
  const r = c as unknown as {
    _fastCall: Fast['call']
    _fastCallNamed: Fast['callNamed']
    _fastCallBinNamed: Fast['callBinNamed']
    _fastReply: Fast['reply']
  }
  return { call: r._fastCall, callNamed: r._fastCallNamed, callBinNamed: r._fastCallBinNamed, reply: r._fastReply }
}

test('the raw entry points refuse too few arguments and arguments of the wrong type', async (t) => {
  const fast = fastOf(client)
  const params = pack({ a: 1, b: 2 })
  const before = client.pendingCalls
  t.throws(() => fast.call('add', params, 0, params.length), { instanceOf: TypeError, message: /call\(name/ })
  t.throws(() => fast.callNamed(0, params), { instanceOf: TypeError, message: /callNamed\(nameId/ })
  t.throws(() => fast.callBinNamed(0, params), { instanceOf: TypeError, message: /callBinNamed\(nameId/ })
  for (const buffer of ['abc', null, {}, [1, 2]]) {
    t.throws(() => fast.callBinNamed(0, buffer, 0, 1, 0), { instanceOf: TypeError, message: /must be a Buffer/ })
  }
  t.throws(() => fast.callBinNamed(0, params, 0, params.length + 1, 0), { instanceOf: TypeError, message: /start and end/ })
  t.throws(() => fast.reply(), { instanceOf: TypeError, message: /reply\(token/ })
  for (const name of [42, null, {}, Symbol('add')]) {
    t.throws(() => fast.call(name, params, 0, params.length, 0), { instanceOf: TypeError, message: /name must be a string/ })
  }
  for (const buffer of ['abc', null, {}, [1, 2]]) {
    t.throws(() => fast.call('add', buffer, 0, 1, 0), { instanceOf: TypeError, message: /must be a Buffer/ })
  }
  t.is(client.pendingCalls, before)
  t.is(await client.call('add', { a: 1, b: 2 }), 3)
})

test('a raw entry point keeps its engine alive, and lets it go with itself', async (t) => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { setFlagsFromString } = require('node:v8') as typeof import('node:v8')
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { runInNewContext } = require('node:vm') as typeof import('node:vm')
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { NativeEngine } = require('../native.js') as {
    NativeEngine: new (...args: unknown[]) => { fastFunctions(): Fast; internName(name: string): number }
  }
  let collected = false
  const registry = new FinalizationRegistry(() => {
    collected = true
  })
  const settle = async () => {
    for (let i = 0; i < 20 && !collected; i++) {
      gc()
      await new Promise((resolve) => setImmediate(resolve))
    }
  }
  let fns: Fast | undefined = (() => {
    const noop = () => undefined
    const engine = new NativeEngine(0, true, noop, noop, noop, Buffer.alloc(64))
    registry.register(engine, 'engine')
    engine.internName('add')
    return engine.fastFunctions()
  })()
  await settle()
  t.false(collected, 'the engine was collected while its functions were alive')
  // The engine still answers through them: the name it kept is known, others are not.
  t.throws(() => fns!.callNamed(1, Buffer.from([0xc0]), 0, 1, 0), { message: /unknown nameId/ })
  t.throws(() => fns!.reply(7, Buffer.from([0xc0]), 0, 1), { message: /unknown call token/ })
  fns = undefined
  await settle()
  t.true(collected, 'the engine outlived its functions')
})

test('making the raw entry points runs no setter user code put on the prototype chain', (t) => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { NativeEngine } = require('../native.js') as {
    NativeEngine: new (...args: unknown[]) => { fastFunctions(): Fast }
  }
  const noop = () => undefined
  const engine = new NativeEngine(0, true, noop, noop, noop, Buffer.alloc(64))
  const ran: string[] = []
  const keys = ['0', 'call', 'callNamed', 'reply', 'engine']
  // Synchronous from here to the cleanup: no other test runs while the setters exist.
  for (const key of keys) {
    Object.defineProperty(Object.prototype, key, { set: () => ran.push(key), configurable: true })
  }
  let fns: Fast
  try {
    fns = engine.fastFunctions()
  } finally {
    for (const key of keys) delete (Object.prototype as Record<string, unknown>)[key]
  }
  t.deepEqual(ran, [])
  t.is(typeof fns.call, 'function')
  t.is(typeof fns.callNamed, 'function')
  t.is(typeof fns.reply, 'function')
})

test('the raw reply refuses a bad range or a token that is not pending', async (t) => {
  const { reply } = fastOf(client)
  const result = pack(3)
  for (const [start, end] of [
    [1, 0],
    [0, result.length + 1],
    ['0', 1],
  ]) {
    t.throws(() => reply(0, result, start, end), { instanceOf: TypeError }, `${start}..${end}`)
  }
  t.throws(() => reply('x', result, 0, result.length), { instanceOf: TypeError })
  // No call of the peer is pending on this client: the token is unknown.
  t.throws(() => reply(12345, result, 0, result.length), { message: /unknown call token/ })
  t.is(await client.call('add', { a: 1, b: 2 }), 3)
})

test('the raw callNamed refuses a name id its engine did not give', async (t) => {
  const other = await RpcClient.connect(worker.socket)
  t.teardown(() => other.close())
  const { callNamed } = fastOf(other)
  // Another client's engine gave id 0 (its first call), not this one.
  t.is(await client.call('add', { a: 1, b: 2 }), 3)
  const { callBinNamed } = fastOf(other)
  for (const id of [0, 1, 4096, 2 ** 32 - 1]) {
    t.throws(() => callNamed(id, Buffer.from([0xc0]), 0, 1, 0), { message: /unknown nameId/ }, `${id}`)
    t.throws(() => callBinNamed(id, Buffer.alloc(2048), 0, 2048, 0), { message: /unknown nameId/ }, `${id}`)
  }
  t.throws(() => callNamed('add', Buffer.from([0xc0]), 0, 1, 0), { instanceOf: TypeError })
  t.is(other.pendingCalls, 0)
  // The engine still works, and gives its first name id 0.
  t.is(await other.call('add', { a: 2, b: 2 }), 4)
  t.is(callNamed(0, pack({ a: 3, b: 3 }), 0, pack({ a: 3, b: 3 }).length, 0) > 0, true)
})

test('the raw call refuses a byte range outside its buffer', async (t) => {
  const { call } = fastOf(client)
  const params = pack({ a: 1, b: 2 })
  const before = client.pendingCalls
  for (const [start, end] of [
    [1, 0],
    [0, params.length + 1],
    [-1, 2],
    ['0', 2],
    [0, undefined],
  ]) {
    t.throws(() => call('add', params, start, end, 0), { instanceOf: TypeError }, `${start}..${end}`)
  }
  // Nothing was queued, and the connection goes on.
  t.is(client.pendingCalls, before)
  t.is(await client.call('add', { a: 1, b: 2 }), 3)
})

/** A peer that never answers and keeps every frame body it receives, in order. */
async function capturingPeer(t: ExecutionContext): Promise<{ path: string; bodies: Buffer[] }> {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const path = join(dir, 'capture.sock')
  const bodies: Buffer[] = []
  const sockets: Socket[] = []
  const capture = createServer((s) => {
    sockets.push(s)
    let buf = Buffer.alloc(0)
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d])
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const len = buf.readUInt32BE(0)
        bodies.push(buf.subarray(4, 4 + len))
        buf = buf.subarray(4 + len)
      }
    })
  })
  await new Promise<void>((r) => capture.listen(path, r))
  t.teardown(() => {
    sockets.forEach((s) => s.destroy())
    capture.close()
  })
  return { path, bodies }
}

test('whole numbers beyond 32 bits leave Node as MessagePack integers, fractions as floats', async (t) => {
  const { path, bodies } = await capturingPeer(t)
  const c = await RpcClient.connect(path)
  const pending = c.call('f', { big: 2 ** 40, neg: -(2 ** 40), half: 1.5 })
  pending.catch(() => {})
  await until(() => bodies.length >= 1, 'the call to reach the peer')
  const body = bodies[0].toString('hex')
  t.true(body.includes('cf0000010000000000'), `2**40 as uint 64 in ${body}`)
  t.true(body.includes('d3ffffff0000000000'), `-(2**40) as int 64 in ${body}`)
  t.true(body.includes('cb3ff8000000000000'), `1.5 stays float 64 in ${body}`)
  await c.close()
})

// Both ways a read's results reach JS: copied into the shared scratch Buffer (small), or handed
// over as a Buffer of their own (more than 64 KiB).
for (const [size, second] of [
  ['small', 'fine'],
  ['large', Buffer.alloc(100_000, 7)],
] as const) {
  test(`a result msgpackr cannot unpack fails only its own call, with ERR_FERRY_DECODE (${size} read)`, async (t) => {
    const { dir, cleanup } = tempDir()
    t.teardown(cleanup)
    const path = join(dir, 'ext.sock')
    const frame = (body: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, 0].map((_, i) => (body.length >> (8 * (3 - i))) & 0xff)), body])
    const response = (id: number, result: Buffer) =>
      frame(Buffer.concat([Buffer.from([0x83]), pack('type'), pack('rpc_response'), pack('request_id'), pack(id), pack('result'), result]))
    const sockets: Socket[] = []
    const peer = createServer((s) => {
      sockets.push(s)
      let buf = Buffer.alloc(0)
      let calls = 0
      s.on('data', (d) => {
        buf = Buffer.concat([buf, d])
        while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
          buf = buf.subarray(4 + buf.readUInt32BE(0))
          if (++calls === 2) {
            // Both answers in one write, so they arrive in one read: an unknown extension type
            // (5) for call 1, a plain value for call 2.
            s.write(Buffer.concat([response(1, Buffer.from([0xd4, 0x05, 0x00])), response(2, pack(second))]))
          }
        }
      })
    })
    await new Promise<void>((r) => peer.listen(path, r))
    t.teardown(() => {
      sockets.forEach((s) => s.destroy())
      peer.close()
    })
    const c = await RpcClient.connect(path)
    const odd = c.call('odd')
    const ok = c.call('ok')
    t.is((await t.throwsAsync(odd, { instanceOf: RpcError }))!.code, 'ERR_FERRY_DECODE')
    t.deepEqual(await ok, second)
    t.is(c.pendingCalls, 0)
    await c.close()
  })
}

test('answers that arrived before the peer reset the connection still settle their calls', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const path = join(dir, 'reset.sock')
  const frame = (body: Buffer) => {
    const head = Buffer.alloc(4)
    head.writeUInt32BE(body.length)
    return Buffer.concat([head, body])
  }
  let peerSocket: Socket | undefined
  const connected = new Promise<void>((resolve) => {
    // The peer never reads: closing with our calls unread makes the kernel reset the
    // connection (ECONNRESET, reported by the poll as an error condition), not end it.
    const peer = createServer({ pauseOnConnect: true }, (s) => {
      peerSocket = s
      resolve()
    })
    peer.listen(path)
    t.teardown(() => peer.close())
  })
  const c = await RpcClient.connect(path)
  await connected
  const first = c.call('first')
  const second = c.call('second')
  // Two loop turns: the calls' frames have been written (once per turn, before the loop waits).
  for (let i = 0; i < 2; i++) await new Promise((r) => setImmediate(r))
  const answer = Buffer.concat([Buffer.from([0x83]), pack('type'), pack('rpc_response'), pack('request_id'), pack(1), pack('result'), pack('on time')])
  peerSocket!.write(frame(answer), () => peerSocket!.destroy())
  t.is(await first, 'on time')
  t.is((await t.throwsAsync(second, { instanceOf: RpcError }))!.code, 'ERR_FERRY_CONNECTION_LOST')
  t.true(c.closed)
})

// Large Buffers (and other Uint8Arrays) passed as params skip msgpackr: Rust writes the bin
// itself. What reaches the peer must be the very bytes msgpackr would have written.
const BIN_SIZES = [1023, 1024, 65535, 65536, 200_000]
const pattern = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + n) % 256))
/** Binaries around each bin header size and the direct path's threshold, as Buffers, a plain
 * Uint8Array, and views into a larger buffer (only the view's bytes go). */
function binValues(): Uint8Array[] {
  const backing = pattern(70_000)
  return [
    ...BIN_SIZES.map(pattern),
    new Uint8Array(pattern(4096)),
    backing.subarray(1000, 6000),
    new Uint8Array(backing.buffer, backing.byteOffset + 3, 2048),
  ]
}

/** The msgpackr bytes and the direct path write the same bytes, so these tests also count
 * which raw entry points engines created from now on are called through (serial tests: no
 * other test runs meanwhile). */
function countRawCalls(t: ExecutionContext): Record<string, number> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { NativeEngine } = require('../native.js') as { NativeEngine: { prototype: { fastFunctions(): Record<string, Function> } } }
  const original = NativeEngine.prototype.fastFunctions
  const counts: Record<string, number> = {}
  NativeEngine.prototype.fastFunctions = function (this: unknown) {
    const fast = original.call(this)
    const counted: Record<string, Function> = {}
    // The raw functions are non-enumerable properties.
    for (const name of ['call', 'callNamed', 'callBinNamed', 'reply', 'replyBin']) {
      const f = fast[name]
      counted[name] = (...args: unknown[]) => {
        counts[name] = (counts[name] ?? 0) + 1
        return f(...args)
      }
    }
    return counted
  }
  t.teardown(() => {
    NativeEngine.prototype.fastFunctions = original
  })
  return counts
}

test.serial('large binary params reach the peer exactly as msgpackr encodes them, views and Uint8Arrays included', async (t) => {
  const counts = countRawCalls(t)
  const { path, bodies } = await capturingPeer(t)
  const c = await RpcClient.connect(path)
  const values = binValues()
  values.forEach((v, i) => c.call(`bin${i}`, v).catch(() => {}))
  // Those of 1 KiB or more went the direct way, the others through msgpackr.
  const direct = values.filter((v) => v.length >= 1024).length
  t.is(counts.callBinNamed, direct)
  t.is(counts.callNamed, values.length - direct)
  // Each call's frame arrives in order.
  await until(() => bodies.length >= values.length, 'every call to reach the peer')
  t.is(bodies.length, values.length)
  values.forEach((v, i) => {
    const expected = Buffer.concat([Buffer.from('a6706172616d73', 'hex'), pack(v), Buffer.from('aa726571756573745f6964', 'hex')])
    t.true(bodies[i].includes(expected), `call ${i} (${v.length} bytes): params as msgpackr packs them`)
    t.true(bodies[i].includes(Buffer.from(`bin${i}`)), `call ${i} under its own name`)
  })
  await c.close()
})

test('large binary params of every header size echo back whole from the worker', async (t) => {
  for (const n of [...BIN_SIZES, 1 << 20]) {
    const v = Buffer.alloc(n)
    for (let i = 0; i < n; i += 997) v[i] = i % 251
    const back = (await client.call('echo', v)) as Buffer
    t.true(Buffer.isBuffer(back) && back.equals(v), `${n} bytes`)
  }
  // A Uint8Array view, not a Buffer: its bytes only.
  const backing = Buffer.alloc(10_000, 9)
  backing.fill(3, 100, 5100)
  const back = (await client.call('echo', new Uint8Array(backing.buffer, backing.byteOffset + 100, 5000))) as Buffer
  t.true(back.equals(Buffer.alloc(5000, 3)))
  // Over shared memory.
  const shared = new Uint8Array(new SharedArrayBuffer(4096)).fill(5)
  t.true(((await client.call('echo', shared)) as Buffer).equals(Buffer.alloc(4096, 5)))
})

test('large binary calls made after the peer went away end with CONNECTION_LOST, written in place or queued', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const path = join(dir, 'gone.sock')
  let peerSocket: Socket | undefined
  const connected = new Promise<void>((resolve) => {
    const peer = createServer((s) => {
      peerSocket = s
      resolve()
    })
    peer.listen(path)
    t.teardown(() => peer.close())
  })
  const c = await RpcClient.connect(path)
  await connected
  // Gone before the client's loop has seen it: the first call writes its Buffer in place
  // into a socket whose peer is closed; the second finds that write failed and is queued.
  peerSocket!.destroy()
  const calls = [c.call('echo', Buffer.alloc(65536, 1)), c.call('echo', Buffer.alloc(100_000, 2))]
  for (const call of calls) {
    const e = await t.throwsAsync(call, { instanceOf: RpcError })
    t.is(e?.code, 'ERR_FERRY_CONNECTION_LOST')
  }
  t.true(c.closed)
})

test('a binary param over the frame limit is refused before sending, and the client goes on', async (t) => {
  const small = await RpcClient.connect(worker.socket, { maxFrameBytes: 4096 })
  t.teardown(() => small.close())
  const e = await t.throwsAsync(small.call('echo', Buffer.alloc(8192)), { instanceOf: RpcError })
  t.is(e?.code, 'ERR_FERRY_FRAME_TOO_LARGE')
  t.true((await small.call('echo', Buffer.alloc(2000, 1)) as Buffer).equals(Buffer.alloc(2000, 1)))
})

test.serial('large binary results of JS handlers reach the peer exactly as msgpackr encodes them', async (t) => {
  const counts = countRawCalls(t)
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const values = binValues()
  const server = await RpcServer.listen(join(dir, 'bins.sock'))
  t.teardown(() => server.close({ graceMs: 0 }))
  server.handle('bin', (i: number) => values[i])
  const ws = await WireSocket.connect(server.path)
  t.teardown(() => ws.destroy())
  for (let i = 0; i < values.length; i++) {
    const f = await ws.request({ type: 'rpc_call', function_name: 'bin', params: i, request_id: i + 1 })
    t.is(f.msg?.type, 'rpc_response', `answer ${i}`)
    const expected = Buffer.concat([Buffer.from('a6726573756c74', 'hex'), pack(values[i])])
    t.true(f.body.subarray(-expected.length).equals(expected), `answer ${i} (${values[i].length} bytes): the result as msgpackr packs it`)
  }
  const direct = values.filter((v) => v.length >= 1024).length
  t.is(counts.replyBin, direct)
  t.is(counts.reply, values.length - direct)
})

test('a binary result over the frame limit is answered with an Internal error, and the server goes on', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const server = await RpcServer.listen(join(dir, 'limit.sock'), { maxFrameBytes: 4096 })
  t.teardown(() => server.close({ graceMs: 0 }))
  server.handle('bin', (n: number) => Buffer.alloc(n, 1))
  const c = await RpcClient.connect(server.path)
  t.teardown(() => c.close())
  const e = await t.throwsAsync(c.call('bin', 8192), { instanceOf: RpcError })
  t.is(e?.errorType, 'Internal')
  t.true(((await c.call('bin', 2000)) as Buffer).equals(Buffer.alloc(2000, 1)))
})
