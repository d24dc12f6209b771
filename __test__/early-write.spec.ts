// Early writes: a loop turn that queues many calls sends the first of them while it is still
// queuing the rest (so the peer works on them in parallel), and only when this process may run
// on more than one CPU. The peer here is a raw socket server on a worker thread, which counts
// what reaches it while the test's own thread is still inside the turn that made the calls.
import { once } from 'node:events'
import { availableParallelism } from 'node:os'
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'

import test from 'ava'

import { RpcClient } from '../index.js'
import { tempDir } from './helpers'

// Counts the frames it receives (seen[0]) and records whether their request ids came in
// order (seen[1] = 1 when one did not); wakes whoever waits on seen[0], and says 'all' once
// it has all n.
const PEER = `
const net = require('node:net')
const { unpack } = require('msgpackr')
const { parentPort, workerData } = require('node:worker_threads')
const seen = new Int32Array(workerData.sab)
const server = net.createServer((sock) => {
  let buf = Buffer.alloc(0)
  let next = 1
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
      const len = buf.readUInt32BE(0)
      const msg = unpack(buf.subarray(4, 4 + len))
      buf = buf.subarray(4 + len)
      if (msg.type !== 'rpc_call' || msg.request_id !== next++) Atomics.store(seen, 1, 1)
      if (workerData.hangUp) {
        // Hang up at the first frame, and say so in seen[2].
        sock.destroy()
        Atomics.store(seen, 2, 1)
        Atomics.notify(seen, 2)
        return
      }
      if (Atomics.add(seen, 0, 1) + 1 === workerData.n) parentPort.postMessage('all')
      Atomics.notify(seen, 0)
    }
  })
  sock.on('error', () => {})
})
server.listen(workerData.path, () => parentPort.postMessage('ready'))
parentPort.on('message', () => server.close(() => process.exit(0)))
`

test('a turn that queues many calls sends the first ones before it ends, on a multi-CPU process', async (t) => {
  const { dir, cleanup } = tempDir()
  const path = join(dir, 'peer.sock')
  const sab = new SharedArrayBuffer(12)
  const seen = new Int32Array(sab)
  const N = 200
  const peer = new Worker(PEER, { eval: true, workerData: { path, sab, n: N } })
  t.teardown(async () => {
    peer.postMessage('stop')
    await once(peer, 'exit')
    cleanup()
  })
  await once(peer, 'message')
  const client = await RpcClient.connect(path, { timeoutMs: 0 })
  t.teardown(() => client.close())

  const calls: Promise<unknown>[] = []
  for (let i = 0; i < N; i++) calls.push(client.call('echo', 'x'.repeat(100)).catch(() => {}))
  // Still inside the turn that made the calls: block it until the peer has seen a frame.
  const many = availableParallelism() > 1
  Atomics.wait(seen, 0, 0, many ? 10_000 : 300)
  const early = Atomics.load(seen, 0)
  if (many) {
    t.true(early > 0, 'no frame reached the peer before the turn ended')
    t.true(early < N, `all ${early} frames went out before the turn ended, not only the first`)
  } else {
    // One CPU: nothing to overlap, so everything goes out once, at the end of the turn.
    t.is(early, 0)
  }

  // The rest go out at the end of the turn: every frame arrives, once, in order.
  await once(peer, 'message')
  t.is(Atomics.load(seen, 0), N)
  t.is(Atomics.load(seen, 1), 0, 'frames arrived out of order')
  t.is(client.pendingCalls, N)
})

test('a peer that hangs up during a turn of early writes: every call of the turn fails, none hangs', async (t) => {
  const { dir, cleanup } = tempDir()
  const path = join(dir, 'peer.sock')
  const sab = new SharedArrayBuffer(12)
  const seen = new Int32Array(sab)
  const peer = new Worker(PEER, { eval: true, workerData: { path, sab, n: 0, hangUp: true } })
  t.teardown(async () => {
    peer.postMessage('stop')
    await once(peer, 'exit')
    cleanup()
  })
  await once(peer, 'message')
  const client = await RpcClient.connect(path, { timeoutMs: 0 })
  t.teardown(() => client.close())

  const calls: Promise<unknown>[] = []
  const queue = (n: number) => {
    for (let i = 0; i < n; i++) calls.push(client.call('echo', 'x'.repeat(100)))
  }
  queue(50)
  // With early writes the peer has hung up by now, within this turn; the calls queued next
  // are written to a closed socket.
  if (availableParallelism() > 1) {
    Atomics.wait(seen, 2, 0, 10_000)
    t.is(Atomics.load(seen, 2), 1, 'the peer never saw a frame during the turn')
  }
  queue(200)
  const settled = await Promise.allSettled(calls)
  t.is(settled.length, 250)
  for (const s of settled) {
    t.is(s.status, 'rejected')
    if (s.status === 'rejected') t.is(s.reason.code, 'ERR_FERRY_CONNECTION_LOST')
  }
  t.true(client.closed)
})
