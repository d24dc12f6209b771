// Conformance tests of an independent peer (./independent-peer.ts, written from
// docs/protocol.md alone with @msgpack/msgpack and node:net) against the Rust example worker
// and against the Node package. Section numbers (§) refer to docs/protocol.md.
import test from 'ava'
import type { ExecutionContext } from 'ava'
import { encode } from '@msgpack/msgpack'
import { join } from 'node:path'

import { RpcClient, RpcServer } from '../index.js'
import type { HandlerRequest, HandlerResponse, RpcConnection, RpcError } from '../index.js'
import { startWorker, tempDir, type Worker } from './helpers'
import { Peer, PeerRouteError, PeerRpcError, PeerServer, frame, type Answer, type Received } from './independent-peer'

/** Bytes from the hex dumps of §13 (whitespace ignored). */
const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex')

const DOC = {
  // §13.1
  addCall: hex(`00 00 00 3b 84 a4 74 79 70 65 a8 72 70 63 5f 63 61 6c 6c ad 66 75 6e 63 74 69 6f 6e 5f 6e 61 6d
    65 a3 61 64 64 a6 70 61 72 61 6d 73 82 a1 61 02 a1 62 03 aa 72 65 71 75 65 73 74 5f 69 64 01`),
  addResponse: hex(`00 00 00 27 83 a4 74 79 70 65 ac 72 70 63 5f 72 65 73 70 6f 6e 73 65 aa 72 65 71 75 65 73 74 5f
    69 64 01 a6 72 65 73 75 6c 74 05`),
  // §13.2
  addCallJson: hex(`00 00 00 4f 7b 22 74 79 70 65 22 3a 22 72 70 63 5f 63 61 6c 6c 22 2c 22 66 75 6e 63 74 69 6f 6e
    5f 6e 61 6d 65 22 3a 22 61 64 64 22 2c 22 70 61 72 61 6d 73 22 3a 7b 22 61 22 3a 32 2c 22 62 22
    3a 33 7d 2c 22 72 65 71 75 65 73 74 5f 69 64 22 3a 31 7d`),
  // §13.3
  getUserCall: hex(`00 00 00 51 84 a4 74 79 70 65 a8 72 70 63 5f 63 61 6c 6c ad 66 75 6e 63 74 69 6f 6e 5f 6e 61 6d
    65 a8 67 65 74 5f 75 73 65 72 a6 70 61 72 61 6d 73 81 a2 69 64 2a aa 72 65 71 75 65 73 74 5f 69
    64 b3 72 65 71 5f 31 37 33 32 30 30 30 30 30 30 30 30 30 5f 30`),
  getUserResponse: hex(`00 00 00 47 83 a4 74 79 70 65 ac 72 70 63 5f 72 65 73 70 6f 6e 73 65 aa 72 65 71 75 65 73 74 5f
    69 64 b3 72 65 71 5f 31 37 33 32 30 30 30 30 30 30 30 30 30 5f 30 a6 72 65 73 75 6c 74 82 a2 69
    64 2a a4 6e 61 6d 65 a3 41 64 61`),
  // §13.4
  notFound: hex(`00 00 00 4f 84 a4 74 79 70 65 a9 72 70 63 5f 65 72 72 6f 72 aa 72 65 71 75 65 73 74 5f 69 64 02
    a5 65 72 72 6f 72 b8 6e 6f 20 66 75 6e 63 74 69 6f 6e 20 6e 61 6d 65 64 20 60 6e 6f 70 65 60 aa
    65 72 72 6f 72 5f 74 79 70 65 a8 4e 6f 74 46 6f 75 6e 64`),
  // §13.5
  invokeNoId: hex(`00 00 00 5b 83 a4 74 79 70 65 ae 69 6e 76 6f 6b 65 5f 68 61 6e 64 6c 65 72 aa 68 61 6e 64 6c 65
    72 5f 69 64 ad 61 70 69 5f 75 73 65 72 73 5f 67 65 74 a7 72 65 71 75 65 73 74 83 a7 68 65 61 64
    65 72 73 80 a6 6d 65 74 68 6f 64 a3 47 45 54 a4 70 61 74 68 aa 2f 61 70 69 2f 75 73 65 72 73`),
  handlerResponseNoId: hex(`00 00 00 62 85 a4 74 79 70 65 b0 68 61 6e 64 6c 65 72 5f 72 65 73 70 6f 6e 73 65 aa 68 61 6e 64
    6c 65 72 5f 69 64 ad 61 70 69 5f 75 73 65 72 73 5f 67 65 74 a6 73 74 61 74 75 73 cc c8 a7 68 65
    61 64 65 72 73 81 ac 63 6f 6e 74 65 6e 74 2d 74 79 70 65 aa 74 65 78 74 2f 70 6c 61 69 6e a4 62
    6f 64 79 a2 6f 6b`),
  // §13.6
  invokeH2: hex(`00 00 00 49 84 a4 74 79 70 65 ae 69 6e 76 6f 6b 65 5f 68 61 6e 64 6c 65 72 aa 68 61 6e 64 6c 65
    72 5f 69 64 a1 68 a7 72 65 71 75 65 73 74 82 a6 6d 65 74 68 6f 64 a3 47 45 54 a4 70 61 74 68 a1
    2f aa 72 65 71 75 65 73 74 5f 69 64 02`),
  handlerNotFound5: hex(`00 00 00 53 85 a4 74 79 70 65 a5 65 72 72 6f 72 a4 63 6f 64 65 b1 48 41 4e 44 4c 45 52 5f 4e 4f
    54 5f 46 4f 55 4e 44 a7 6d 65 73 73 61 67 65 b1 6e 6f 20 68 61 6e 64 6c 65 72 20 60 6e 6f 70 65
    60 a6 73 74 61 74 75 73 cd 01 94 aa 72 65 71 75 65 73 74 5f 69 64 05`),
  // §13.7
  unknownPing: hex(`00 00 00 63 85 a4 74 79 70 65 a5 65 72 72 6f 72 a4 63 6f 64 65 b4 55 4e 4b 4e 4f 57 4e 5f 4d 45
    53 53 41 47 45 5f 54 59 50 45 a7 6d 65 73 73 61 67 65 bb 75 6e 6b 6e 6f 77 6e 20 6d 65 73 73 61
    67 65 20 74 79 70 65 20 60 70 69 6e 67 60 a6 73 74 61 74 75 73 cd 01 90 aa 72 65 71 75 65 73 74
    5f 69 64 a3 61 62 63`),
  frameTooLarge: hex(`00 00 00 70 84 a4 74 79 70 65 a5 65 72 72 6f 72 a4 63 6f 64 65 af 46 52 41 4d 45 5f 54 4f 4f 5f
    4c 41 52 47 45 a7 6d 65 73 73 61 67 65 d9 3b 66 72 61 6d 65 20 6f 66 20 32 30 39 37 31 35 32 30
    20 62 79 74 65 73 20 65 78 63 65 65 64 73 20 74 68 65 20 6c 69 6d 69 74 20 6f 66 20 31 36 37 37
    37 32 31 36 20 62 79 74 65 73 a6 73 74 61 74 75 73 cd 01 9d`),
  // §13.8
  healthCheck: hex(`00 00 00 13 81 a4 74 79 70 65 ac 68 65 61 6c 74 68 5f 63 68 65 63 6b`),
  healthCheckResponse: hex(`00 00 00 1c 81 a4 74 79 70 65 b5 68 65 61 6c 74 68 5f 63 68 65 63 6b 5f 72 65 73 70 6f 6e 73 65`),
  cancel1: hex(`00 00 00 19 82 a4 74 79 70 65 a6 63 61 6e 63 65 6c aa 72 65 71 75 65 73 74 5f 69 64 01`),
}

/** The frame (prefix + body) of a received message, for byte comparisons with §13. */
const wire = (r: Received): Buffer => frame(r.raw)

function expectResult(t: ExecutionContext, ans: Answer, result: unknown): void {
  t.is(ans.type, 'rpc_response', JSON.stringify(ans))
  t.deepEqual(ans.result, result)
}

function expectRpcError(t: ExecutionContext, ans: Answer, errorType: string): void {
  t.is(ans.type, 'rpc_error', JSON.stringify(ans))
  t.is(ans.error_type, errorType)
  t.is(typeof ans.error, 'string')
}

const ofType = (type: string) => (r: Received) => r.msg?.type === type

// ---------------------------------------------------------------------------------------------
// The Rust example worker, one worker for the file, a fresh connection per test (§2.1: each
// connection has its own id counter and state).

let worker: Worker
test.before(async () => {
  worker = await startWorker()
})
test.after.always(async () => {
  await worker?.stop()
})

async function connectWorker(t: ExecutionContext): Promise<Peer> {
  const peer = await Peer.connect(worker.socket)
  t.teardown(() => peer.close())
  return peer
}

test('worker: add with integer id 1, bytes as in §13.1', async (t) => {
  const peer = await connectWorker(t)
  const ans = await peer.call('add', { a: 2, b: 3 })
  t.deepEqual(peer.sent[0], DOC.addCall, 'our encoder produces the §13.1 call bytes')
  expectResult(t, ans, 5)
  t.deepEqual(wire(peer.received[0]), DOC.addResponse)
  expectResult(t, await peer.call('multiply', { a: 6, b: 7 }), 42)
  expectResult(t, await peer.call('fibonacci', { n: 10 }), 55)
  expectResult(t, await peer.call('is_prime', { n: 97 }), true)
  expectResult(t, await peer.call('sum_array', { values: [1, 2, 3, 4] }), 10)
  const bench = await peer.call('get_benchmarks', {})
  t.is(bench.type, 'rpc_response')
})

test('worker: echo returns map, array, binary, nil and absent params unchanged', async (t) => {
  const peer = await connectWorker(t)
  const map = { s: 'x', n: -3, f: 1.5, nested: { list: [1, 'two', null, true] } }
  expectResult(t, await peer.call('echo', map), map)
  expectResult(t, await peer.call('echo', [1, [2, 3], 'four', { five: 5 }]), [1, [2, 3], 'four', { five: 5 }])

  const bin = new Uint8Array([0, 1, 2, 0xfe, 0xff])
  const binAns = await peer.call('echo', bin)
  t.is(binAns.type, 'rpc_response')
  t.true(binAns.result instanceof Uint8Array, 'bin comes back as bin')
  t.deepEqual(Buffer.from(binAns.result as Uint8Array), Buffer.from(bin))
  const binRaw = peer.received.find((r) => r.msg?.request_id === binAns.request_id)!
  t.true(binRaw.raw.includes(Buffer.from([0xc4, 0x05, 0, 1, 2, 0xfe, 0xff])), 'written as bin 8')

  // params: nil (§6.1 "send params: nil or omit it")
  expectResult(t, await peer.call('echo', null), null)
  // params absent = nil (§6.1)
  const absent = await peer.call('echo', undefined, { omitParams: true })
  expectResult(t, absent, null)
  t.true('result' in absent, 'Ferry always writes result (§6.2)')
})

test('worker: the four error types (§7.1), bytes of NotFound as in §13.4', async (t) => {
  const peer = await connectWorker(t)
  const notFound = await peer.call('nope', {}, { id: 2 })
  expectRpcError(t, notFound, 'NotFound')
  t.is(notFound.error, 'no function named `nope`')
  t.deepEqual(wire(peer.received[0]), DOC.notFound)

  expectRpcError(t, await peer.call('add', { a: 'two', b: 3 }), 'InvalidParams')
  expectRpcError(t, await peer.call('add', [1, 2, 3]), 'InvalidParams')
  expectRpcError(t, await peer.call('fail', {}), 'HandlerError')
  const internal = await peer.call('panic', {})
  expectRpcError(t, internal, 'Internal')
  t.regex(internal.error as string, /^function `panic` panicked: /)
  // "the connection survives" (§7.1 Internal)
  expectResult(t, await peer.call('add', { a: 1, b: 1 }), 2)
})

test('worker: string ids are echoed as strings, integer ids as integers, and never match each other', async (t) => {
  const peer = await connectWorker(t)
  const s = await peer.call('add', { a: 40, b: 2 }, { id: 'req_1732000000000_0' })
  expectResult(t, s, 42)
  t.is(s.request_id, 'req_1732000000000_0')
  t.true(peer.received[0].raw.includes(Buffer.from('b3726571', 'hex')), 'fixstr of 19 bytes, as in §13.3')

  const big = await peer.call('add', { a: 1, b: 2 }, { id: 2 ** 40 })
  expectResult(t, big, 3)
  t.is(big.request_id, 2 ** 40)

  // "7" and 7 in flight at the same time are different ids (§5)
  const [asString, asInt] = await Promise.all([
    peer.call('sleep', { ms: 50 }, { id: '7' }),
    peer.call('add', { a: 3, b: 4 }, { id: 7 }),
  ])
  t.is(asString.request_id, '7')
  t.is(asString.type, 'rpc_response')
  expectResult(t, asInt, 7)
  t.is(asInt.request_id, 7)

  // "an id received as D0 05 is echoed as 05" (§5)
  const signed = Buffer.from(encode({ type: 'rpc_call', function_name: 'add', params: { a: 1, b: 4 } }))
  signed[0] = 0x84 // one more entry: request_id as int 8
  peer.sendBody(Buffer.concat([signed, Buffer.from(encode('request_id')), Buffer.from([0xd0, 0x05])]))
  const echoed = await peer.waitFor((r) => r.msg?.request_id === 5)
  t.is(echoed.msg?.result, 5)
  t.true(echoed.raw.includes(Buffer.from('aa726571756573745f696405', 'hex')))
})

test('worker: calls in flight are answered out of order and matched by id (§8.1)', async (t) => {
  const peer = await connectWorker(t)
  const order: unknown[] = []
  const calls = [300, 150, 10].map((ms) => peer.call('sleep', { ms }).then((a) => (order.push(a.request_id), a)))
  t.is(peer.pendingCalls, 3)
  const answers = await Promise.all(calls)
  answers.forEach((a, i) => t.is(a.request_id, i + 1))
  t.deepEqual(order, [3, 2, 1])
  t.is(peer.pendingCalls, 0)
})

test('worker: a JSON body (§13.2) is answered in MessagePack', async (t) => {
  const peer = await connectWorker(t)
  const body = Buffer.from(JSON.stringify({ type: 'rpc_call', function_name: 'add', params: { a: 2, b: 3 }, request_id: 1 }))
  t.deepEqual(frame(body), DOC.addCallJson, 'the §13.2 frame')
  peer.writeRaw(DOC.addCallJson)
  const r = await peer.waitFor(ofType('rpc_response'))
  t.not(r.raw[0], 0x7b)
  t.deepEqual(wire(r), DOC.addResponse)

  // JSON with a string id and whitespace after the object (§4.6)
  peer.sendBody(Buffer.from('{"type":"rpc_call","function_name":"echo","params":[1,"x",null],"request_id":"j"}\n '))
  const j = await peer.waitFor((x) => x.msg?.request_id === 'j')
  t.deepEqual(j.msg?.result, [1, 'x', null])
})

test('worker: health_check (§6.7, §13.8)', async (t) => {
  const peer = await connectWorker(t)
  await peer.healthCheck()
  t.deepEqual(peer.sent[0], DOC.healthCheck)
  t.deepEqual(wire(peer.received[0]), DOC.healthCheckResponse)
  // "Other keys (including a request_id) are ignored and not echoed"
  peer.send({ type: 'health_check', request_id: 9 })
  const r = await peer.waitFor((x) => x !== peer.received[0] && x.msg?.type === 'health_check_response')
  t.deepEqual(r.msg, { type: 'health_check_response' })
})

test('worker: framing: several frames in one write, one frame split across writes (§2.2)', async (t) => {
  const peer = await connectWorker(t)
  const a = frame(encode({ type: 'rpc_call', function_name: 'add', params: { a: 1, b: 2 }, request_id: 'a' }))
  const b = frame(encode({ type: 'rpc_call', function_name: 'add', params: { a: 3, b: 4 }, request_id: 'b' }))
  const c = frame(encode({ type: 'rpc_call', function_name: 'add', params: { a: 5, b: 6 }, request_id: 'c' }))
  const all = Buffer.concat([a, b, c])
  const cut = a.length + b.length + 2 // inside c's length prefix
  await new Promise<void>((res) => peer.socket.write(all.subarray(0, cut), () => res()))
  await peer.waitFor((r) => r.msg?.request_id === 'b')
  peer.writeRaw(all.subarray(cut))
  const rc = await peer.waitFor((r) => r.msg?.request_id === 'c')
  t.is(rc.msg?.result, 11)
  t.is((await peer.waitFor((r) => r.msg?.request_id === 'a')).msg?.result, 3)
})

test('worker: worker_status route with and without request_id (§6.4, §6.5)', async (t) => {
  const peer = await connectWorker(t)
  const req = { method: 'GET', path: '/status', headers: {} }
  const withId = await peer.invoke('worker_status', req, { id: 'inv-1' })
  t.is(withId.type, 'handler_response')
  t.is(withId.request_id, 'inv-1')
  t.is(withId.status, 200)
  t.deepEqual(Object.keys(withId), ['type', 'handler_id', 'status', 'headers', 'body', 'request_id'])

  const noId = await peer.invoke('worker_status', req, { noId: true })
  t.is(noId.type, 'handler_response')
  t.false('request_id' in noId)
  t.deepEqual(Object.keys(noId), ['type', 'handler_id', 'status', 'headers', 'body'])

  // Unknown route: HANDLER_NOT_FOUND with the id echoed, bytes as in §13.6
  const nf = await peer.invoke('nope', req, { id: 5 })
  t.is(nf.type, 'error')
  t.deepEqual(wire(peer.received.find((r) => r.msg === nf)!), DOC.handlerNotFound5)
})

test('worker: bad input gets error replies and the connection keeps serving (§9)', async (t) => {
  const peer = await connectWorker(t)
  peer.send({ type: 'ping', request_id: 'abc' })
  const ping = await peer.waitFor(ofType('error'))
  t.deepEqual(wire(ping), DOC.unknownPing)

  peer.send({ type: 'rpc_call', request_id: 'a' })
  const missing = await peer.waitFor((r) => r.msg?.type === 'error' && r.msg.request_id === 'a')
  t.is(missing.msg?.code, 'BAD_MESSAGE')
  t.is(missing.msg?.status, 400)

  peer.sendBody(new Uint8Array(0))
  peer.sendBody(Buffer.from([0xc1]))
  peer.sendBody(Buffer.from(encode([1, 2])))
  peer.sendBody(Buffer.from('{"type":'))
  peer.send({ type: 'rpc_call', function_name: 'f', request_id: -1 })
  peer.send({ type: 'error', request_id: 9 }) // malformed error: never answered
  // A call after the bad frames proves the stream is still in sync.
  expectResult(t, await peer.call('add', { a: 1, b: 1 }, { id: 'after' }), 2)
  const idless = peer.received.filter((r) => r.msg?.type === 'error' && !('request_id' in r.msg))
  t.is(idless.length, 5, 'five BAD_MESSAGE replies without request_id')
  for (const r of idless) t.is(r.msg?.code, 'BAD_MESSAGE')
})

test('worker: an oversized length prefix gets FRAME_TOO_LARGE and the connection closes (§3.3, §13.7)', async (t) => {
  const peer = await connectWorker(t)
  const ended = new Promise((res) => peer.once('end', res))
  peer.writeRaw(Buffer.from([0x01, 0x40, 0x00, 0x00]))
  const err = await peer.waitFor(ofType('error'))
  t.deepEqual(wire(err), DOC.frameTooLarge)
  await ended
  t.true(peer.closed)
})

// ---- the worker calling our peer back on the same connection ----

test('worker: call_peer makes the worker call a function our peer serves (§2.1, §13.9)', async (t) => {
  const peer = await connectWorker(t)
  peer.functions.set('whoami', (params) => ({ me: 'independent peer', got: params }))
  const ans = await peer.call('call_peer', { function_name: 'whoami', params: { x: 1 } })
  expectResult(t, ans, { me: 'independent peer', got: { x: 1 } })

  const call = peer.received.find(ofType('rpc_call'))!
  t.deepEqual(Object.keys(call.msg!), ['type', 'function_name', 'params', 'request_id'], '4-entry map, §6.1 order')
  t.is(call.raw[0], 0x84)
  t.is(call.msg!.request_id, 1, "Ferry's own ids start at 1 on each connection (§5)")
  const ourAnswer = peer.sent.find((f) => f.includes(Buffer.from('rpc_response')))!
  t.truthy(ourAnswer)

  // A function that fails on our side
  peer.functions.set('refuse', () => {
    throw new PeerRpcError('refused by peer', 'HandlerError')
  })
  const refused = await peer.call('call_peer', { function_name: 'refuse', params: null })
  t.is(refused.type, 'rpc_error')
  t.log('call_peer -> our rpc_error HandlerError surfaced as', refused)

  // A function we do not serve: we answer NotFound (§14.1 step 5)
  const notServed = await peer.call('call_peer', { function_name: 'not_served', params: {} })
  t.is(notServed.type, 'rpc_error')
  t.log('call_peer -> our rpc_error NotFound surfaced as', notServed)
  const ids = peer.received.filter(ofType('rpc_call')).map((r) => r.msg!.request_id)
  t.deepEqual(ids, [1, 2, 3])
})

test('worker: invoke_peer makes the worker send us invoke_handler, answered with handler_response (§6.4, §6.5)', async (t) => {
  const peer = await connectWorker(t)
  peer.routes.set('peer_route', (request) => ({
    status: 201,
    headers: { 'content-type': 'application/json', 'x-peer': 'independent' },
    body: { seen: request },
  }))
  const request = { method: 'POST', path: '/items', headers: { accept: '*/*' }, body: 'payload' }
  const ans = await peer.call('invoke_peer', { handler_id: 'peer_route', request })
  expectResult(t, ans, {
    status: 201,
    headers: { 'content-type': 'application/json', 'x-peer': 'independent' },
    body: { seen: request },
  })
  const inv = peer.received.find(ofType('invoke_handler'))!
  t.deepEqual(Object.keys(inv.msg!), ['type', 'handler_id', 'request', 'request_id'])
  t.is(inv.msg!.request_id, 1, 'Ferry always includes a request_id (§6.4)')
  t.deepEqual(inv.msg!.request, request)
})

test('worker: invoke_peer as the worker\'s second call on the connection gets id 2 (§5, §13.6)', async (t) => {
  const peer = await connectWorker(t)
  peer.functions.set('noop', () => null)
  peer.routes.set('h', () => ({ status: 204 }))
  expectResult(t, await peer.call('call_peer', { function_name: 'noop', params: null }), null)
  const ans = await peer.call('invoke_peer', { handler_id: 'h', request: { method: 'GET', path: '/' } })
  expectResult(t, ans, { status: 204, headers: {}, body: null })
  const inv = peer.received.find(ofType('invoke_handler'))!
  // The worker passes the request through its HttpRequest type (§6.4), which fills in
  // `headers: {}`, so the bytes are §13.6's plus that key; the envelope is the same.
  t.deepEqual(inv.msg, { type: 'invoke_handler', handler_id: 'h', request: { method: 'GET', path: '/', headers: {} }, request_id: 2 })
})

test('worker: invoke_peer answered with error HANDLER_NOT_FOUND makes the outer call fail', async (t) => {
  const peer = await connectWorker(t)
  // No route registered: the peer answers `error` HANDLER_NOT_FOUND 404 with the id (§14.1 step 5).
  const ans = await peer.call('invoke_peer', { handler_id: 'missing_route', request: { method: 'GET', path: '/' } })
  t.is(ans.type, 'rpc_error')
  t.log('outer call failed with', ans)
  const ourError = peer.sent.map((f) => f.subarray(4)).find((b) => b.includes(Buffer.from('HANDLER_NOT_FOUND')))
  t.truthy(ourError)

  // HANDLER_EXECUTION_ERROR from a route that fails
  peer.routes.set('broken', () => {
    throw new PeerRouteError('HANDLER_EXECUTION_ERROR', 'route broke', 500)
  })
  const broken = await peer.call('invoke_peer', { handler_id: 'broken', request: { method: 'GET', path: '/' } })
  t.is(broken.type, 'rpc_error')
  t.log('outer call for HANDLER_EXECUTION_ERROR failed with', broken)
})

test('worker: an id-less handler_response (ZapJS style) answers the oldest invocation (§8.2)', async (t) => {
  const peer = await connectWorker(t)
  peer.autoAnswer = false
  const outer = peer.call('invoke_peer', { handler_id: 'zap', request: { method: 'GET', path: '/z' } })
  const inv = await peer.waitFor(ofType('invoke_handler'))
  t.not(inv.msg!.request_id, undefined)
  peer.send({ type: 'handler_response', handler_id: 'zap', status: 200, headers: { a: 'b' }, body: 'zapped' })
  expectResult(t, await outer, { status: 200, headers: { a: 'b' }, body: 'zapped' })
})

// ---------------------------------------------------------------------------------------------
// The Node package.

async function nodeServer(t: ExecutionContext): Promise<RpcServer> {
  const { dir, cleanup } = tempDir()
  const server = await RpcServer.listen(join(dir, 'node.sock'))
  t.teardown(async () => {
    await server.close({ graceMs: 0 })
    cleanup()
  })
  return server
}

test('node RpcServer: our peer calls greet (rpc_call) with integer and string ids', async (t) => {
  const server = await nodeServer(t)
  server.handle('greet', (p: { name: string }) => `hello ${p.name}`)
  server.handle('get_user', (p: { id: number }) => ({ id: p.id, name: 'Ada' }))
  server.handle('boom', () => {
    throw new Error('boom!')
  })
  const peer = await Peer.connect(server.path)
  t.teardown(() => peer.close())

  const a = await peer.call('greet', { name: 'Ada' })
  expectResult(t, a, 'hello Ada')
  t.is(a.request_id, 1)
  const s = await peer.call('greet', { name: 'Bob' }, { id: 'req_1732000000000_1' })
  expectResult(t, s, 'hello Bob')
  t.is(s.request_id, 'req_1732000000000_1')

  // §13.3 byte for byte, served by Node
  peer.writeRaw(DOC.getUserCall)
  const gu = await peer.waitFor((r) => r.msg?.request_id === 'req_1732000000000_0')
  t.deepEqual(wire(gu), DOC.getUserResponse)

  expectRpcError(t, await peer.call('nope', {}), 'NotFound')
  const boom = await peer.call('boom', {})
  expectRpcError(t, boom, 'HandlerError')
  t.is(boom.error, 'boom!')

  // JSON body to Node
  peer.sendBody(Buffer.from('{"type":"rpc_call","function_name":"greet","params":{"name":"Json"},"request_id":77}'))
  const j = await peer.waitFor((r) => r.msg?.request_id === 77)
  t.is(j.msg?.result, 'hello Json')
  t.not(j.raw[0], 0x7b)

  await peer.healthCheck()
  peer.send({ type: 'ping', request_id: 'abc' })
  t.deepEqual(wire(await peer.waitFor(ofType('error'))), DOC.unknownPing)
})

test('node RpcServer: our peer invokes api_users_get with and without request_id', async (t) => {
  const server = await nodeServer(t)
  let release!: () => void
  const slowGate = new Promise<void>((res) => (release = res))
  server.handleRoute('api_users_get', async (req): Promise<HandlerResponse> => {
    if (req.path === '/slow') await slowGate
    if (req.path === '/fast') release()
    if (req.path === '/api/users') return { status: 200, headers: { 'content-type': 'text/plain' }, body: 'ok' }
    return { status: 200, headers: { 'x-path': req.path }, body: { users: ['ada'], method: req.method } }
  })
  const peer = await Peer.connect(server.path)
  t.teardown(() => peer.close())

  const withId = await peer.invoke('api_users_get', { method: 'GET', path: '/u', headers: {} }, { id: 41 })
  t.is(withId.type, 'handler_response')
  t.is(withId.request_id, 41)
  t.is(withId.status, 200)
  t.deepEqual(withId.headers, { 'x-path': '/u' })
  t.deepEqual(withId.body, { users: ['ada'], method: 'GET' })

  const strId = await peer.invoke('api_users_get', { method: 'GET', path: '/s', headers: {} }, { id: 'inv_s' })
  t.is(strId.request_id, 'inv_s')

  // §13.5 byte for byte: id-less invocation and id-less answer
  peer.writeRaw(DOC.invokeNoId)
  const zap = await peer.waitFor((r) => r.msg?.type === 'handler_response' && !('request_id' in r.msg))
  t.deepEqual(wire(zap), DOC.handlerResponseNoId)

  // §8.3: id-less invocations are answered in arrival order even if the later one finishes first
  const slow = peer.invoke('api_users_get', { method: 'GET', path: '/slow', headers: {} }, { noId: true })
  const fast = peer.invoke('api_users_get', { method: 'GET', path: '/fast', headers: {} }, { noId: true })
  const [s, f] = await Promise.all([slow, fast])
  t.deepEqual(s.headers, { 'x-path': '/slow' })
  t.deepEqual(f.headers, { 'x-path': '/fast' })
  t.false('request_id' in s)

  const nf = await peer.invoke('nope', { method: 'GET', path: '/', headers: {} }, { id: 5 })
  t.deepEqual(wire(peer.received.find((r) => r.msg === nf)!), DOC.handlerNotFound5)
  const nfNoId = await peer.invoke('nope', { method: 'GET', path: '/', headers: {} }, { noId: true })
  t.is(nfNoId.type, 'error')
  t.is(nfNoId.code, 'HANDLER_NOT_FOUND')
  t.is(nfNoId.status, 404)
  t.false('request_id' in nfNoId)
})

test('node RpcServer: the server calls our peer back on the same connection', async (t) => {
  const server = await nodeServer(t)
  const connected = new Promise<RpcConnection>((res) => server.onConnection(res))
  const peer = await Peer.connect(server.path)
  t.teardown(() => peer.close())
  peer.functions.set('whoami', () => 'peer')
  peer.routes.set('r', (req) => ({ status: 202, headers: { k: 'v' }, body: req }))
  const conn = await connected
  t.is(await conn.call<string>('whoami'), 'peer')
  const call = peer.received.find(ofType('rpc_call'))!
  t.deepEqual(call.msg, { type: 'rpc_call', function_name: 'whoami', params: null, request_id: 1 })
  const res = await conn.invokeHandler('r', { method: 'GET', path: '/', headers: {} })
  t.deepEqual(res, { status: 202, headers: { k: 'v' }, body: { method: 'GET', path: '/', headers: {} } })
  t.is(peer.received.find(ofType('invoke_handler'))!.msg!.request_id, 2)
})

test('node RpcClient: our peer listens with node:net and answers call and invokeHandler', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.functions.set('double', (p) => (p as { n: number }).n * 2)
    peer.functions.set('invalid', () => {
      throw new PeerRpcError('n must be a number', 'InvalidParams')
    })
    peer.functions.set('custom', () => {
      throw new PeerRpcError('teapot', 'Teapot')
    })
    peer.functions.set('never', () => new Promise(() => {}))
    peer.routes.set('r1', (req) => ({ status: 200, headers: { 'x-r': '1' }, body: { echo: req } }))
    peer.routes.set('fails', () => {
      throw new PeerRouteError('HANDLER_EXECUTION_ERROR', 'route failed', 500)
    })
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()

  t.is(await client.call<number>('double', { n: 21 }), 42)
  // §13.6: invoke_handler of `h` with {method: "GET", path: "/"} as the client's call 2,
  // answered by our peer with HANDLER_NOT_FOUND
  const hErr = await t.throwsAsync<RpcError>(client.invokeHandler('h', { method: 'GET', path: '/' } as HandlerRequest))
  t.is(hErr?.code, 'ERR_FERRY_NOT_FOUND')
  t.is(hErr?.errorType, 'HANDLER_NOT_FOUND')
  t.deepEqual(wire(peer.received.find(ofType('invoke_handler'))!), DOC.invokeH2)

  const req: HandlerRequest = { method: 'GET', path: '/', headers: {} }
  t.deepEqual(await client.invokeHandler('r1', req), { status: 200, headers: { 'x-r': '1' }, body: { echo: req } })
  const calls = peer.received.filter((r) => r.msg?.type === 'rpc_call' || r.msg?.type === 'invoke_handler')
  t.deepEqual(
    calls.map((r) => r.msg!.request_id),
    [1, 2, 3],
    'one counter for rpc_call and invoke_handler, from 1 (§5)',
  )
  t.deepEqual(peer.received.find(ofType('rpc_call'))!.raw, Buffer.from(encode({ type: 'rpc_call', function_name: 'double', params: { n: 21 }, request_id: 1 })))

  // Error mapping of §12
  const inv = await t.throwsAsync<RpcError>(client.call('invalid', {}))
  t.is(inv?.code, 'ERR_FERRY_INVALID_PARAMS')
  t.is(inv?.errorType, 'InvalidParams')
  const nf = await t.throwsAsync<RpcError>(client.call('not_served', {}))
  t.is(nf?.code, 'ERR_FERRY_NOT_FOUND')
  const custom = await t.throwsAsync<RpcError>(client.call('custom', {}))
  t.is(custom?.code, 'ERR_FERRY_REMOTE')
  t.is(custom?.errorType, 'Teapot')
  const fails = await t.throwsAsync<RpcError>(client.invokeHandler('fails', req))
  t.is(fails?.code, 'ERR_FERRY_HANDLER')
  t.is(fails?.errorType, 'HANDLER_EXECUTION_ERROR')

  // Call without params: params is written as nil (§6.1)
  t.is(await client.call('double', { n: 0 }), 0)
  await t.throwsAsync(client.call('double'))
  const noParams = peer.received.filter(ofType('rpc_call')).at(-1)!
  t.true('params' in noParams.msg!)
  t.is(noParams.msg!.params, null)

  // Our health check to the client, and the client's to us is not part of the API
  await peer.healthCheck()
})

test('node RpcClient: id-less answers (ZapJS style) are matched to the oldest invocation (§8.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.autoAnswer = false
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()

  const first = client.invokeHandler('a', { method: 'GET', path: '/1', headers: {} })
  const second = client.invokeHandler('b', { method: 'GET', path: '/2', headers: {} })
  await peer.waitFor((r) => r.msg?.type === 'invoke_handler' && r.msg.handler_id === 'b')
  peer.send({ type: 'handler_response', handler_id: 'a', status: 200, headers: {}, body: 'first' })
  peer.send({ type: 'error', code: 'HANDLER_NOT_FOUND', message: 'no handler `b`', status: 404 })
  t.deepEqual(await first, { status: 200, headers: {}, body: 'first' })
  const err = await t.throwsAsync<RpcError>(second)
  t.is(err?.code, 'ERR_FERRY_NOT_FOUND')
})

test('node RpcClient: a timed-out call sends cancel (§11.1, §13.8)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.functions.set('never', () => new Promise(() => {}))
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()

  const err = await t.throwsAsync<RpcError>(client.call('never', {}, { timeoutMs: 100 }))
  t.is(err?.code, 'ERR_FERRY_TIMEOUT')
  const cancel = await peer.waitFor(ofType('cancel'))
  t.deepEqual(wire(cancel), DOC.cancel1)
  // A late answer to the cancelled id is ignored by the client; it keeps working.
  peer.send({ type: 'rpc_response', request_id: 1, result: 'late' })
  peer.functions.set('ok', () => 'ok')
  t.is(await client.call('ok'), 'ok')
})

// ---------------------------------------------------------------------------------------------
// Further statements of the document, checked against both implementations.

/** Builds a MessagePack map body from [key, already-encoded value] pairs (for duplicates etc.). */
function rawMap(entries: [string, Uint8Array][]): Buffer {
  const parts: Uint8Array[] = [Uint8Array.of(0x80 | entries.length)]
  for (const [k, v] of entries) parts.push(encode(k), v)
  return Buffer.concat(parts)
}

test('worker: the §9.3 table of bad input, reserved keys (§4.4) and nil rules (§4.5)', async (t) => {
  const peer = await connectWorker(t)
  const cases: { name: string; body: Uint8Array; reply: null | { code: string; request_id?: unknown } }[] = [
    { name: 'unknown type, int id', body: encode({ type: 'ping', request_id: 7 }), reply: { code: 'UNKNOWN_MESSAGE_TYPE', request_id: 7 } },
    { name: 'missing type', body: encode({ function_name: 'f', request_id: 3 }), reply: { code: 'BAD_MESSAGE', request_id: 3 } },
    { name: 'negative id', body: encode({ type: 'rpc_call', function_name: 'f', request_id: -1 }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'nil error_type', body: encode({ type: 'rpc_error', request_id: 9, error: 'x', error_type: null }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'rpc_error not pending, lacks error', body: encode({ type: 'rpc_error', request_id: 19 }), reply: { code: 'BAD_MESSAGE', request_id: 19 } },
    { name: 'handler_response without status', body: encode({ type: 'handler_response', handler_id: 'h' }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'error without code', body: encode({ type: 'error', request_id: 29 }), reply: null },
    { name: 'reserved key of wrong kind', body: encode({ type: 'health_check', code: 1 }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'nil request_id on rpc_call (= absent, required)', body: encode({ type: 'rpc_call', function_name: 'add', params: null, request_id: null }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'float id', body: encode({ type: 'rpc_call', function_name: 'add', request_id: 1.5 }), reply: { code: 'BAD_MESSAGE' } },
    { name: 'handler_response status > 65535', body: encode({ type: 'handler_response', handler_id: 'h', status: 70000, request_id: 39 }), reply: { code: 'BAD_MESSAGE', request_id: 39 } },
    { name: 'JSON 1.0 id', body: Buffer.from('{"type":"rpc_call","function_name":"add","request_id":1.0}'), reply: { code: 'BAD_MESSAGE' } },
    { name: 'JSON with leading space', body: Buffer.from(' {"type":"health_check"}'), reply: { code: 'BAD_MESSAGE' } },
    { name: 'trailing bytes', body: Buffer.concat([encode({ type: 'health_check' }), Buffer.from([0xc0])]), reply: { code: 'BAD_MESSAGE' } },
    { name: 'cancel of nothing', body: encode({ type: 'cancel', request_id: 49 }), reply: null },
    { name: 'health_check_response', body: encode({ type: 'health_check_response' }), reply: null },
  ]
  for (const c of cases) {
    const before = peer.received.length
    peer.sendBody(c.body)
    const marker = `after ${c.name}`
    expectResult(t, await peer.call('echo', marker, { id: marker }), marker)
    const replies = peer.received.slice(before).filter((r) => r.msg?.request_id !== marker)
    if (c.reply === null) {
      t.is(replies.length, 0, `${c.name}: no reply`)
      continue
    }
    t.is(replies.length, 1, `${c.name}: one reply`)
    const m = replies[0]?.msg
    t.is(m?.type, 'error', c.name)
    t.is(m?.code, c.reply.code, c.name)
    t.is(m?.status, 400, c.name)
    if (c.reply.request_id === undefined) t.false(m !== undefined && 'request_id' in m, `${c.name}: no request_id`)
    else t.is(m?.request_id, c.reply.request_id, `${c.name}: request_id`)
    t.log(c.name, '->', m?.message)
  }
})

test('worker: key order, unknown keys and duplicate keys (§4.2)', async (t) => {
  const peer = await connectWorker(t)
  // request_id first, an unknown key carrying a nested value, and `function_name` twice (last wins)
  peer.sendBody(
    rawMap([
      ['request_id', encode('k')],
      ['extra', encode({ nested: [1, { deep: true }], bin: new Uint8Array([1]) })],
      ['function_name', encode('nope')],
      ['params', encode({ a: 20, b: 22 })],
      ['function_name', encode('add')],
      ['type', encode('rpc_call')],
    ]),
  )
  const r = await peer.waitFor((x) => x.msg?.request_id === 'k')
  t.deepEqual(r.msg, { type: 'rpc_response', request_id: 'k', result: 42 })
})

test('worker: frame size limit: exactly max_frame is accepted, max_frame + 1 is not (§3.2)', async (t) => {
  const peer = await connectWorker(t)
  const overhead = encode({ type: 'rpc_call', function_name: 'nope', params: new Uint8Array(70000), request_id: 1 }).length - 70000
  // bin 32 header is 5 bytes instead of bin 16's 3
  const payload = 16 * 1024 * 1024 - overhead
  const body = encode({ type: 'rpc_call', function_name: 'nope', params: new Uint8Array(payload), request_id: 1 })
  t.is(body.length, 16 * 1024 * 1024)
  peer.sendBody(body)
  const ans = await peer.waitFor((r) => r.msg?.request_id === 1)
  t.is(ans.msg?.error_type, 'NotFound')

  const ended = new Promise((res) => peer.once('end', res))
  peer.writeRaw(Buffer.from([0x01, 0x00, 0x00, 0x01])) // 16 777 217
  const err = await peer.waitFor(ofType('error'))
  t.is(err.msg?.code, 'FRAME_TOO_LARGE')
  t.is(err.msg?.message, 'frame of 16777217 bytes exceeds the limit of 16777216 bytes')
  await ended
})

test('worker (Rust): cancel stops a running rpc_call and nothing is sent for it (§11.2)', async (t) => {
  const peer = await connectWorker(t)
  const cancelled = peer.call('sleep', { ms: 150 }, { id: 1, timeoutMs: 60_000 })
  cancelled.catch(() => {})
  peer.send({ type: 'cancel', request_id: 1 })
  // A call that finishes well after the cancelled one would have
  expectResult(t, await peer.call('sleep', { ms: 400 }, { id: 2 }), 400)
  t.false(peer.received.some((r) => r.msg?.request_id === 1), 'no answer for the cancelled call')
  // cancel with the wrong id kind does not stop a call
  const kept = peer.call('sleep', { ms: 50 }, { id: 3 })
  peer.send({ type: 'cancel', request_id: '3' })
  expectResult(t, await kept, 50)
})

test('node RpcServer: JS handlers run to completion after cancel, route defaults, errorType (§10, §11.2)', async (t) => {
  const server = await nodeServer(t)
  let release!: () => void
  const gate = new Promise<void>((res) => (release = res))
  server.handle('slow', async () => {
    await gate
    return 'done'
  })
  server.handle('reject_params', () => {
    throw Object.assign(new Error('bad n'), { errorType: 'InvalidParams' })
  })
  server.handleRoute('defaults', () => ({}))
  server.handleRoute('odd_status', () => ({ status: 42, body: 'x' }))
  const peer = await Peer.connect(server.path)
  t.teardown(() => peer.close())

  const slow = peer.call('slow', null, { id: 1 })
  peer.send({ type: 'cancel', request_id: 1 })
  release()
  expectResult(t, await slow, 'done')

  expectRpcError(t, await peer.call('reject_params', {}), 'InvalidParams')

  const d = await peer.invoke('defaults', { method: 'GET', path: '/', headers: {} })
  t.deepEqual(d, { type: 'handler_response', handler_id: 'defaults', status: 200, headers: {}, body: null, request_id: d.request_id })
  const o = await peer.invoke('odd_status', { method: 'GET', path: '/', headers: {} })
  t.is(o.status, 200)

  // FRAME_TOO_LARGE from Node, same bytes as §13.7
  peer.writeRaw(Buffer.from([0x01, 0x40, 0x00, 0x00]))
  t.deepEqual(wire(await peer.waitFor(ofType('error'))), DOC.frameTooLarge)
})

test('node RpcServer.listen: a live socket is not taken over; the probe sends nothing (§2.3)', async (t) => {
  const { dir, cleanup } = tempDir()
  const path = join(dir, 'taken.sock')
  const ps = await PeerServer.listen(path)
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const err = await t.throwsAsync<RpcError>(RpcServer.listen(path))
  t.is(err?.code, 'ERR_FERRY_ADDR_IN_USE')
  const probe = await ps.firstPeer()
  await new Promise((res) => (probe.closed ? res(null) : probe.once('end', res)))
  t.is(probe.received.length, 0, 'the probe connection sent no byte')
})

test('node RpcClient: malformed answers, error answers to rpc_call, string ids (§8, §9.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.autoAnswer = false
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()
  // Answer rpc_calls by hand: nothing registered would answer NotFound, so hold them.
  const callIds: unknown[] = []
  peer.on('frame', (r: Received) => {
    if (r.msg?.type === 'rpc_call') callIds.push(r.msg.request_id)
  })
  peer.functions.clear()
  const nextCall = async (n: number) => {
    await peer.waitFor(() => callIds.length >= n)
    return callIds[n - 1]
  }
  // Prevent the peer's own NotFound answers: serve every name with a never-settling function.
  const hold = () => new Promise(() => {})
  for (const name of ['m1', 'm2', 'm3', 'm4']) peer.functions.set(name, hold)

  // §9.2 step 1: a malformed answer naming a pending call ends it with ERR_FERRY_PROTOCOL; nothing is sent back
  const m1 = client.call('m1', {})
  const id1 = await nextCall(1)
  const sentBefore = peer.received.length
  peer.send({ type: 'rpc_error', request_id: id1 })
  const e1 = await t.throwsAsync<RpcError>(m1)
  t.is(e1?.code, 'ERR_FERRY_PROTOCOL')

  // §6.6: an `error` carrying the id of a pending rpc_call ends it
  const m2 = client.call('m2', {})
  const id2 = await nextCall(2)
  peer.send({ type: 'error', code: 'BAD_MESSAGE', message: 'no', status: 400, request_id: id2 })
  const e2 = await t.throwsAsync<RpcError>(m2)
  t.is(e2?.code, 'ERR_FERRY_BAD_MESSAGE')

  // §8.1: a string id never matches Ferry's integer id
  const m3 = client.call('m3', {})
  const id3 = await nextCall(3)
  peer.send({ type: 'rpc_response', request_id: String(id3), result: 'wrong' })
  peer.send({ type: 'rpc_response', request_id: id3, result: 'right' })
  t.is(await m3, 'right')
  // nothing was sent back for the malformed rpc_error (only the calls themselves arrived)
  t.deepEqual(
    peer.received.slice(sentBefore).map((r) => r.msg?.type),
    ['rpc_call', 'rpc_call'],
  )

})

// DISCREPANCY (reported): §8.2 says "In Ferry, an invocation that timed out or was cancelled
// **stays in this queue** until an id-less handler_response or error consumes it (that answer is
// then dropped)". The Node API instead hands the late id-less answer to the next invocation
// (with sendCancel on or off, after a timeout or an abort). Kept as a known failure so that the
// suite shows it without asserting the undocumented behaviour.
test('node RpcClient: against a peer that answers in order, a late id-less answer to a timed-out invocation is dropped (§8.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.autoAnswer = false
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()

  // A first id-less answer tells Ferry that this peer answers invocations in order.
  const first = client.invokeHandler('first', { method: 'GET', path: '/0', headers: {} })
  await peer.waitFor((r) => r.msg?.type === 'invoke_handler' && r.msg.handler_id === 'first')
  peer.send({ type: 'handler_response', handler_id: 'first', status: 200, headers: {}, body: 'first answer' })
  t.deepEqual(await first, { status: 200, headers: {}, body: 'first answer' })

  const timedOut = client.invokeHandler('late', { method: 'GET', path: '/1', headers: {} }, { timeoutMs: 50 })
  t.is((await t.throwsAsync<RpcError>(timedOut))?.code, 'ERR_FERRY_TIMEOUT')
  t.deepEqual((await peer.waitFor(ofType('cancel'))).msg, { type: 'cancel', request_id: 2 })
  const next = client.invokeHandler('next', { method: 'GET', path: '/2', headers: {} })
  await peer.waitFor((r) => r.msg?.type === 'invoke_handler' && r.msg.handler_id === 'next')
  peer.send({ type: 'handler_response', handler_id: 'late', status: 200, headers: {}, body: 'late answer' })
  peer.send({ type: 'handler_response', handler_id: 'next', status: 200, headers: {}, body: 'next answer' })
  t.deepEqual(await next, { status: 200, headers: {}, body: 'next answer' })
})

test('node RpcClient: an oversized call fails locally and consumes no id (§3.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.functions.set('len', (p) => (p as Uint8Array).length)
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'), { maxFrameBytes: 1024 })
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()
  const big = await t.throwsAsync<RpcError>(client.call('len', new Uint8Array(2000)))
  t.is(big?.code, 'ERR_FERRY_FRAME_TOO_LARGE')
  t.is(await client.call('len', new Uint8Array(10)), 10)
  t.is(peer.received.find(ofType('rpc_call'))!.msg!.request_id, 1)
})

test('worker: answers our peer sends to the worker\'s calls: malformed, `error` with id, id-less `error` (§6.6, §8.2, §9.2)', async (t) => {
  const peer = await connectWorker(t)
  peer.autoAnswer = false
  peer.functions.set('hold', () => new Promise(() => {}))

  // A malformed rpc_error naming the worker's pending call ends it; nothing is sent back.
  const outer1 = peer.call('call_peer', { function_name: 'hold', params: null })
  const c1 = await peer.waitFor(ofType('rpc_call'))
  peer.send({ type: 'rpc_error', request_id: c1.msg!.request_id })
  const a1 = await outer1
  t.is(a1.type, 'rpc_error')
  t.log('malformed answer ->', a1)

  // An `error` carrying the id of the worker's pending rpc_call ends that call.
  const outer2 = peer.call('call_peer', { function_name: 'hold', params: null })
  const c2 = await peer.waitFor((r) => r.msg?.type === 'rpc_call' && r.msg.request_id !== c1.msg!.request_id)
  peer.send({ type: 'error', code: 'BAD_MESSAGE', message: 'complaint', status: 400, request_id: c2.msg!.request_id })
  const a2 = await outer2
  t.is(a2.type, 'rpc_error')
  t.log('error with id ->', a2)

  // An id-less `error` answers the oldest outstanding invocation.
  const outer3 = peer.call('invoke_peer', { handler_id: 'zap', request: { method: 'GET', path: '/' } })
  await peer.waitFor(ofType('invoke_handler'))
  peer.send({ type: 'error', code: 'HANDLER_NOT_FOUND', message: 'no handler `zap`', status: 404 })
  const a3 = await outer3
  t.is(a3.type, 'rpc_error')
  t.log('id-less error ->', a3)

  // Nothing but calls came back: no BAD_MESSAGE for the malformed answer, no error for the errors.
  t.deepEqual(
    peer.received.filter((r) => r.msg?.type !== 'rpc_call' && r.msg?.type !== 'invoke_handler').map((r) => r.msg?.request_id),
    [a1.request_id, a2.request_id, a3.request_id],
  )
})

test('worker: invoke_handler `request` is required, nil is accepted by the protocol (§4.5, §6.4)', async (t) => {
  const peer = await connectWorker(t)
  peer.send({ type: 'invoke_handler', handler_id: 'worker_status', request_id: 'noreq' })
  const noReq = await peer.waitFor((r) => r.msg?.request_id === 'noreq')
  t.is(noReq.msg?.code, 'BAD_MESSAGE')
  // nil passes the protocol; worker_status's request type rejects it -> HANDLER_EXECUTION_ERROR 500
  const nil = await peer.invoke('worker_status', null)
  t.is(nil.type, 'error')
  t.is(nil.code, 'HANDLER_EXECUTION_ERROR')
  t.is(nil.status, 500)
})

// DISCREPANCY (reported): §6.5 says Ferry's Rust `Connection::invoke_handler` "fails the call
// with ERR_FERRY_DECODE if `headers` is `nil`". Through the worker's invoke_peer, a nil `headers`
// is accepted and comes back as `{}` (a map with a non-string value does fail).
test('worker: a handler_response with nil headers reads as empty headers (§6.5)', async (t) => {
  const peer = await connectWorker(t)
  peer.autoAnswer = false
  const outer = peer.call('invoke_peer', { handler_id: 'x', request: { method: 'GET', path: '/' } })
  const inv = await peer.waitFor(ofType('invoke_handler'))
  peer.send({ type: 'handler_response', handler_id: 'x', status: 201, headers: null, body: null, request_id: inv.msg!.request_id })
  const ans = await outer
  t.is(ans.type, 'rpc_response')
  t.deepEqual(ans.result, { status: 201, headers: {}, body: null })
})

test('worker (Rust): graceful shutdown on SIGTERM answers new calls with Internal "the server is shutting down" (§2.2)', async (t) => {
  const w = await startWorker()
  t.teardown(() => w.stop())
  const peer = await Peer.connect(w.socket)
  t.teardown(() => peer.close())
  const ended = new Promise((res) => peer.once('end', res))
  const inflight = peer.call('sleep', { ms: 400 })
  expectResult(t, await peer.call('add', { a: 1, b: 1 }), 2)
  w.child.kill('SIGTERM')
  let refused: Answer | undefined
  for (let i = 0; i < 1000 && !refused; i++) {
    const a = await peer.call('add', { a: i, b: 0 })
    if (a.type === 'rpc_error') refused = a
  }
  t.truthy(refused)
  t.is(refused?.error_type, 'Internal')
  t.is(refused?.error, 'the server is shutting down')
  // invoke_handler is still served during the grace period
  t.is((await peer.invoke('worker_status', { method: 'GET', path: '/', headers: {} })).type, 'handler_response')
  expectResult(t, await inflight, 400)
  await ended
})

test('node RpcClient: invokeHandler returns {status, headers, body} with absent headers as {} (§6.5); peer EOF fails pending calls (§2.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  const ps = await PeerServer.listen(join(dir, 'peer.sock'), (peer) => {
    peer.autoAnswer = false
    peer.functions.set('hold', () => new Promise(() => {}))
  })
  t.teardown(async () => {
    await ps.close()
    cleanup()
  })
  const client = await RpcClient.connect(join(dir, 'peer.sock'))
  t.teardown(() => client.close())
  const peer = await ps.firstPeer()
  const r = client.invokeHandler('x', { method: 'GET', path: '/', headers: {} })
  const inv = await peer.waitFor(ofType('invoke_handler'))
  peer.send({ type: 'handler_response', handler_id: 'x', status: 201, request_id: inv.msg!.request_id })
  t.deepEqual(await r, { status: 201, headers: {}, body: null })

  const pending = client.call('hold', {})
  await peer.waitFor(ofType('rpc_call'))
  await peer.close()
  const err = await t.throwsAsync<RpcError>(pending)
  t.is(err?.code, 'ERR_FERRY_CONNECTION_LOST')
  t.true(client.closed)
})

test('node RpcServer.close({graceMs}): running handlers finish, new calls are served meanwhile, then EOF (§2.2)', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const server = await RpcServer.listen(join(dir, 'node.sock'))
  let release!: () => void
  const gate = new Promise<void>((res) => (release = res))
  let entered!: () => void
  const running = new Promise<void>((res) => (entered = res))
  server.handle('slow', async () => {
    entered()
    await gate
    return 'slow done'
  })
  server.handle('quick', () => 'quick')
  const peer = await Peer.connect(server.path)
  t.teardown(() => peer.close())
  const ended = new Promise((res) => peer.once('end', res))
  const slow = peer.call('slow', null)
  await running
  const closing = server.close({ graceMs: 5000 })
  expectResult(t, await peer.call('quick', null), 'quick')
  release()
  expectResult(t, await slow, 'slow done')
  await closing
  await ended
})
