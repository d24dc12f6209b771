// The wire protocol byte by byte: raw `node:net` sockets with hand-made frames against both
// listening peers, the Rust example worker and a Node `RpcServer`. Nothing of Ferry runs on
// the sending side, so these tests see exactly what a foreign (ZapJS-style) peer sees.
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'
import { ExtData, encode } from '@msgpack/msgpack'

import { RpcServer } from '../index.js'
import { startWorker, tempDir, type Worker } from './helpers'
import { WireSocket, body, frame, prefix, requestIdBytes } from './wire'

/** The Node server's frame limit in these tests. */
const NODE_LIMIT = 1024
/** The worker's limit: the default, 16 MiB. */
const WORKER_LIMIT = 16 * 1024 * 1024

interface Target {
  name: 'worker' | 'node'
  path: string
  /** The largest body the target accepts. */
  limit: number
  /** A length prefix the target must refuse. */
  oversize: number
}

let worker: Worker
let server: RpcServer
let serverDir: { dir: string; cleanup: () => void }
const targets: Record<Target['name'], Target> = {} as any

// Route `ordered` (Node server): invocations whose body is `wait` block on this gate.
let openGate: () => void = () => {}
let gate: Promise<void> = Promise.resolve()
const finished: string[] = []

test.before(async () => {
  worker = await startWorker()
  serverDir = tempDir()
  server = await RpcServer.listen(join(serverDir.dir, 'node.sock'), { maxFrameBytes: NODE_LIMIT })
  server
    .handle('add', ({ a, b }: { a: number; b: number }) => a + b)
    .handle('big', () => 2 ** 40)
    .handleRoute('ordered', async (req) => {
      const name = String(req.body)
      if (name.startsWith('wait')) await gate
      finished.push(name)
      return { status: 200, headers: { 'x-name': name }, body: name }
    })
  targets.worker = { name: 'worker', path: worker.socket, limit: WORKER_LIMIT, oversize: 0x7fffffff }
  targets.node = { name: 'node', path: server.path, limit: NODE_LIMIT, oversize: NODE_LIMIT + 1 }
})

test.after.always(async () => {
  await server?.close({ graceMs: 0 })
  serverDir?.cleanup()
  await worker?.stop()
})

const addCall = (request_id: unknown) => ({
  type: 'rpc_call',
  function_name: 'add',
  params: { a: 2, b: 3 },
  request_id,
})

/** One valid call on `ws`, answered with 5: the connection is still serving. */
async function stillServes(t: ExecutionContext, ws: WireSocket, id: string | number = 'alive'): Promise<void> {
  const f = await ws.request(addCall(id))
  t.deepEqual(f.msg, { type: 'rpc_response', request_id: id, result: 5 })
}

async function connect(t: ExecutionContext, target: Target): Promise<WireSocket> {
  const ws = await WireSocket.connect(target.path)
  t.teardown(() => ws.destroy())
  return ws
}

for (const name of ['worker', 'node'] as const) {
  const target = () => targets[name]

  test(`${name}: a string request_id is echoed as the same string`, async (t) => {
    const ws = await connect(t, target())
    for (const id of ['req_1732000000000_0', '', '1', 'x'.repeat(40), 'héllo ✓']) {
      const f = await ws.request(addCall(id))
      t.deepEqual(f.msg, { type: 'rpc_response', request_id: id, result: 5 }, JSON.stringify(id))
      // Same kind: a str, not the integer 1 for "1".
      t.true(f.body.includes(requestIdBytes(id)), `id ${JSON.stringify(id)} echoed as a str`)
    }
  })

  test(`${name}: an integer request_id is echoed as the same integer`, async (t) => {
    const ws = await connect(t, target())
    for (const id of [0, 1, 127, 128, 65_536, 2 ** 32, 2 ** 40, Number.MAX_SAFE_INTEGER]) {
      const f = await ws.request(addCall(id))
      t.deepEqual(f.msg, { type: 'rpc_response', request_id: id, result: 5 }, String(id))
      // Shortest unsigned integer form: never a float, never a string.
      t.true(f.body.includes(requestIdBytes(id)), `id ${id} echoed as an integer`)
    }
    // Beyond 2^53: the full u64 range.
    const max = 2n ** 64n - 1n
    ws.sendBody(Buffer.from(encode(addCall(max), { useBigInt64: true })))
    const f = await ws.next()
    t.deepEqual(f.msg, { type: 'rpc_response', request_id: max, result: 5 })
    t.true(f.body.includes(Buffer.from('cfffffffffffffffff', 'hex')))
    // An id written as a signed int (d2 00 00 00 05) is the uint 5, echoed in the shortest form.
    const signed = Buffer.concat([
      Buffer.from([0x84]),
      ...['type', 'rpc_call', 'function_name', 'add', 'params'].map((s) => Buffer.from(encode(s))),
      Buffer.from(encode({ a: 2, b: 3 })),
      Buffer.from(encode('request_id')),
      Buffer.from([0xd2, 0, 0, 0, 5]),
    ])
    ws.sendBody(signed)
    const g = await ws.next()
    t.deepEqual(g.msg, { type: 'rpc_response', request_id: 5, result: 5 })
    t.true(g.body.includes(requestIdBytes(5)))
  })

  test(`${name}: a JSON body is answered in MessagePack`, async (t) => {
    const ws = await connect(t, target())
    ws.sendBody(Buffer.from('{"type":"rpc_call","function_name":"add","params":{"a":2,"b":3},"request_id":1}'))
    const f = await ws.next()
    t.deepEqual(f.msg, { type: 'rpc_response', request_id: 1, result: 5 })
    t.is(f.body[0], 0x83, 'a MessagePack fixmap of 3 entries, not JSON')
    // The exact answer of protocol.md 13.1.
    t.is(f.body.toString('hex'), body({ type: 'rpc_response', request_id: 1, result: 5 }).toString('hex'))
    ws.sendBody(Buffer.from('{"type":"rpc_call","function_name":"add","params":{"a":2,"b":3},"request_id":"j"}\n'))
    t.deepEqual((await ws.next()).msg, { type: 'rpc_response', request_id: 'j', result: 5 })
  })

  test(`${name}: a garbage body is answered with BAD_MESSAGE and the socket keeps serving`, async (t) => {
    const ws = await connect(t, target())
    const junk = [
      Buffer.from([0xc1, 0xff, 0x00, 0x13, 0x37]), // never-used marker
      Buffer.from('\x00\x01\x02 not a message'),
      Buffer.alloc(0), // N = 0
      Buffer.from(encode([1, 2, 3])), // an array, not a map
      Buffer.from('{"type": "rpc_call", '), // JSON syntax error
      Buffer.concat([body(addCall(3)), Buffer.from([0x00])]), // trailing bytes
    ]
    for (const b of junk) {
      ws.sendBody(b)
      const f = await ws.next()
      t.like(f.msg, { type: 'error', code: 'BAD_MESSAGE', status: 400 }, b.toString('hex'))
      t.false('request_id' in f.msg, 'no id could be read')
      t.is(typeof f.msg.message, 'string')
    }
    await stillServes(t, ws)
    t.is(ws.unread, 0, 'exactly one answer per frame')
  })

  test(`${name}: an unknown type is answered with UNKNOWN_MESSAGE_TYPE and the socket keeps serving`, async (t) => {
    const ws = await connect(t, target())
    const f = await ws.request({ type: 'ping', request_id: 'abc' })
    t.deepEqual(f.msg, {
      type: 'error',
      code: 'UNKNOWN_MESSAGE_TYPE',
      message: 'unknown message type `ping`',
      status: 400,
      request_id: 'abc',
    })
    const g = await ws.request({ type: 'ping', request_id: 7 })
    t.like(g.msg, { type: 'error', code: 'UNKNOWN_MESSAGE_TYPE', status: 400, request_id: 7 })
    const h = await ws.request({ type: 'ping' })
    t.like(h.msg, { type: 'error', code: 'UNKNOWN_MESSAGE_TYPE', status: 400 })
    t.false('request_id' in h.msg)
    await stillServes(t, ws)
  })

  test(`${name}: an rpc_call without function_name is BAD_MESSAGE echoing request_id`, async (t) => {
    const ws = await connect(t, target())
    const f = await ws.request({ type: 'rpc_call', params: { a: 1, b: 2 }, request_id: 'a' })
    t.like(f.msg, { type: 'error', code: 'BAD_MESSAGE', status: 400, request_id: 'a' })
    t.true(f.body.includes(requestIdBytes('a')))
    const g = await ws.request({ type: 'rpc_call', request_id: 2 ** 40 })
    t.like(g.msg, { type: 'error', code: 'BAD_MESSAGE', status: 400, request_id: 2 ** 40 })
    t.true(g.body.includes(requestIdBytes(2 ** 40)))
    // Missing `type` (protocol.md 9.3): the id is still echoed.
    const h = await ws.request({ function_name: 'add', request_id: 3 })
    t.like(h.msg, { type: 'error', code: 'BAD_MESSAGE', status: 400, request_id: 3 })
    await stillServes(t, ws)
  })

  test(`${name}: health_check is answered with health_check_response`, async (t) => {
    const ws = await connect(t, target())
    const f = await ws.request({ type: 'health_check' })
    t.deepEqual(f.msg, { type: 'health_check_response' })
    t.is(f.body.toString('hex'), '81a474797065b56865616c74685f636865636b5f726573706f6e7365')
    // Extra keys, an id included, are ignored and not echoed.
    const g = await ws.request({ type: 'health_check', request_id: 9, extra: [1, { x: null }] })
    t.deepEqual(g.msg, { type: 'health_check_response' })
    // Several in one write: one answer each.
    ws.writeRaw(Buffer.concat([frame(body({ type: 'health_check' })), frame(body({ type: 'health_check' }))]))
    t.deepEqual((await ws.next()).msg, { type: 'health_check_response' })
    t.deepEqual((await ws.next()).msg, { type: 'health_check_response' })
  })

  test(`${name}: a frame split across writes is reassembled`, async (t) => {
    const ws = await connect(t, target())
    const bytes = frame(body(addCall('split')))
    for (let i = 0; i < bytes.length; i += 3) ws.writeRaw(bytes.subarray(i, i + 3))
    t.deepEqual((await ws.next()).msg, { type: 'rpc_response', request_id: 'split', result: 5 })
  })

  test(`${name}: a truncated frame then close: the server survives`, async (t) => {
    const other = await connect(t, target())
    const ws = await connect(t, target())
    ws.writeRaw(Buffer.concat([prefix(100), Buffer.alloc(10, 0x81)]))
    ws.socket.end()
    await ws.closed // the server ends the connection after our EOF
    t.is(ws.unread, 0, 'nothing is answered for a partial frame')
    await stillServes(t, other, 'other')
    const fresh = await connect(t, target())
    await stillServes(t, fresh, 'fresh')
  })

  test(`${name}: an oversized length prefix gets FRAME_TOO_LARGE, then the socket is closed`, async (t) => {
    const { limit, oversize } = target()
    const other = await connect(t, target())
    const ws = await connect(t, target())
    // A complete frame before the bad prefix, in the same write, is still processed.
    ws.writeRaw(Buffer.concat([frame(body({ type: 'health_check' })), prefix(oversize), Buffer.alloc(16, 0x81)]))
    t.deepEqual((await ws.next()).msg, { type: 'health_check_response' })
    const f = await ws.next()
    t.deepEqual(f.msg, {
      type: 'error',
      code: 'FRAME_TOO_LARGE',
      message: `frame of ${oversize} bytes exceeds the limit of ${limit} bytes`,
      status: 413,
    })
    await ws.closed
    t.is(ws.unread, 0)
    await stillServes(t, other, 'other')
    const fresh = await connect(t, target())
    await stillServes(t, fresh, 'fresh')
  })

  test(`${name}: an id-less invoke_handler of an unknown route is HANDLER_NOT_FOUND without id`, async (t) => {
    const ws = await connect(t, target())
    const request = { method: 'GET', path: '/', headers: {} }
    const f = await ws.request({ type: 'invoke_handler', handler_id: 'nope', request })
    t.deepEqual(f.msg, { type: 'error', code: 'HANDLER_NOT_FOUND', message: 'no handler `nope`', status: 404 })
    const g = await ws.request({ type: 'invoke_handler', handler_id: 'nope', request, request_id: 5 })
    t.deepEqual(g.msg, {
      type: 'error',
      code: 'HANDLER_NOT_FOUND',
      message: 'no handler `nope`',
      status: 404,
      request_id: 5,
    })
    // Protocol.md 13.6: the exact bytes.
    t.is(
      g.body.toString('hex'),
      '85a474797065a56572726f72a4636f6465b148414e444c45525f4e4f545f464f554e44a76d657373616765b16e6f2068616e646c657220606e6f706560a6737461747573cd0194aa726571756573745f696405',
    )
  })
}

test('node: a body of exactly maxFrameBytes is accepted', async (t) => {
  const ws = await connect(t, targets.node)
  const base = body({ ...addCall('edge'), pad: '' }).length
  // A str 16 pad: 3 header bytes instead of 1 once it grows past 31 bytes.
  const message = { ...addCall('edge'), pad: 'x'.repeat(NODE_LIMIT - base - 2) }
  const b = body(message)
  t.is(b.length, NODE_LIMIT)
  ws.sendBody(b)
  t.deepEqual((await ws.next()).msg, { type: 'rpc_response', request_id: 'edge', result: 5 })
})

test('node: a JS integer result above 2^32 is written as a MessagePack integer', async (t) => {
  const ws = await connect(t, targets.node)
  const f = await ws.request({ type: 'rpc_call', function_name: 'big', request_id: 1 })
  t.deepEqual(f.msg, { type: 'rpc_response', request_id: 1, result: 2 ** 40 })
  // uint 64 (cf ...), as the worker writes it; not float 64 (cb ...), which a Rust u64 rejects.
  const asInteger = Buffer.concat([Buffer.from(encode('result')), Buffer.from(encode(2 ** 40))])
  t.true(f.body.includes(asInteger), `result written as ${f.body.subarray(-9).toString('hex')}`)
})

test('worker: invoke_handler with and without request_id', async (t) => {
  const ws = await connect(t, targets.worker)
  const request = { method: 'GET', path: '/status', headers: {} }
  const f = await ws.request({ type: 'invoke_handler', handler_id: 'worker_status', request })
  t.deepEqual(f.msg, {
    type: 'handler_response',
    handler_id: 'worker_status',
    status: 200,
    headers: { 'content-type': 'text/plain' },
    body: 'worker ok: GET /status',
  })
  const g = await ws.request({ type: 'invoke_handler', handler_id: 'worker_status', request, request_id: 'r1' })
  t.deepEqual(g.msg, { ...f.msg, request_id: 'r1' })
})

test.serial('node: two id-less invoke_handlers, the first slower, are answered in order', async (t) => {
  gate = new Promise((resolve) => (openGate = resolve))
  finished.length = 0
  const ws = await connect(t, targets.node)
  // ZapJS sends no request_id; the body names the invocation.
  const invoke = (name: string) => ({
    type: 'invoke_handler',
    handler_id: 'ordered',
    request: { method: 'POST', path: '/o', headers: {}, body: name },
  })
  ws.writeRaw(Buffer.concat([frame(body(invoke('wait-1'))), frame(body(invoke('quick-2')))]))
  // The second finishes first; release the first only once it has.
  await untilFinished('quick-2')
  openGate()
  const first = await ws.next()
  const second = await ws.next()
  t.deepEqual(finished, ['quick-2', 'wait-1'], 'the handlers finished in the other order')
  t.deepEqual(first.msg, {
    type: 'handler_response',
    handler_id: 'ordered',
    status: 200,
    headers: { 'x-name': 'wait-1' },
    body: 'wait-1',
  })
  t.deepEqual(second.msg, {
    type: 'handler_response',
    handler_id: 'ordered',
    status: 200,
    headers: { 'x-name': 'quick-2' },
    body: 'quick-2',
  })
})

test.serial('node: an invocation with an id is not held behind a slow id-less one', async (t) => {
  gate = new Promise((resolve) => (openGate = resolve))
  finished.length = 0
  const ws = await connect(t, targets.node)
  const invoke = (name: string, id?: string) => ({
    type: 'invoke_handler',
    handler_id: 'ordered',
    request: { method: 'POST', path: '/o', headers: {}, body: name },
    ...(id === undefined ? {} : { request_id: id }),
  })
  ws.writeRaw(
    Buffer.concat([frame(body(invoke('wait-a'))), frame(body(invoke('b', 'id-b'))), frame(body(invoke('c')))]),
  )
  const b = await ws.next()
  t.like(b.msg, { type: 'handler_response', body: 'b', request_id: 'id-b' })
  await untilFinished('c')
  openGate()
  const a = await ws.next()
  const c = await ws.next()
  t.like(a.msg, { type: 'handler_response', body: 'wait-a' })
  t.false('request_id' in a.msg)
  t.like(c.msg, { type: 'handler_response', body: 'c' })
  t.false('request_id' in c.msg)
  t.is(finished[finished.length - 1], 'wait-a')
})

/** Resolves once the `ordered` handler has finished invocation `name`. */
async function untilFinished(name: string): Promise<void> {
  while (!finished.includes(name)) await new Promise((r) => setImmediate(r))
}

test('node: params msgpackr cannot unpack fail only their call, even in one read with good calls', async (t) => {
  const ws = await connect(t, targets.node)
  // An extension type (5) msgpackr does not know, between two good calls, in one write.
  const odd = { type: 'rpc_call', function_name: 'add', params: new ExtData(5, new Uint8Array([0])), request_id: 'odd' }
  ws.socket.write(Buffer.concat([frame(body(addCall('before'))), frame(body(odd)), frame(body(addCall('after')))]))
  const answers = new Map<unknown, any>()
  for (let i = 0; i < 3; i++) {
    const f = await ws.next()
    answers.set(f.msg.request_id, f.msg)
  }
  t.deepEqual(answers.get('before'), { type: 'rpc_response', request_id: 'before', result: 5 })
  t.deepEqual(answers.get('after'), { type: 'rpc_response', request_id: 'after', result: 5 })
  t.is(answers.get('odd').type, 'rpc_error')
  t.is(answers.get('odd').error_type, 'InvalidParams')
  t.regex(answers.get('odd').error, /params could not be decoded/)
})
