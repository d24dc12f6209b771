// Busy-polling (`busyPollMicros`, and the worker's `--busy-poll-us`): calls of every shape still
// complete with both ends polling, bad values are refused, and a connection waiting on a slow
// answer polls for a bounded time rather than for as long as the call is pending.
// Serial: the CPU check reads this process's CPU time, which other tests would add to.
import { join } from 'node:path'

import test from 'ava'

import { RpcClient, RpcServer } from '../index.js'
import { startWorker, tempDir, type Worker } from './helpers'

let worker: Worker

test.before(async () => {
  worker = await startWorker(['--busy-poll-us', '200'])
})

test.after.always(async () => {
  await worker?.stop()
})

test.serial('busyPollMicros must be a number of microseconds >= 0', async (t) => {
  await t.throwsAsync(RpcClient.connect(worker.socket, { busyPollMicros: '50' as any }), {
    instanceOf: TypeError,
    message: /busyPollMicros must be a number, got string/,
  })
  await t.throwsAsync(RpcClient.connect(worker.socket, { busyPollMicros: -1 }), {
    message: /busyPollMicros must be a number of microseconds >= 0, got -1/,
  })
  await t.throwsAsync(RpcClient.connect(worker.socket, { busyPollMicros: NaN }), {
    message: /busyPollMicros must be a number of microseconds >= 0/,
  })
})

test.serial('Node and the Rust worker both busy-polling: sequential, concurrent, large and callback calls', async (t) => {
  const client = await RpcClient.connect(worker.socket, { busyPollMicros: 200 })
  t.teardown(() => client.close())
  client.handle('double_js', (n: number) => n * 2)
  for (let i = 0; i < 300; i++) t.is(await client.call('add', { a: i, b: 1 }), i + 1)
  const sums = await Promise.all(Array.from({ length: 1000 }, (_, i) => client.call('add', { a: i, b: 2 })))
  t.deepEqual(sums, Array.from({ length: 1000 }, (_, i) => i + 2))
  const blob = Buffer.alloc(3 * 1024 * 1024, 7)
  const back = (await client.call('echo', blob)) as Buffer
  t.true(Buffer.isBuffer(back) && back.equals(blob))
  // The worker calls back into this client while the client waits for its answer.
  for (let i = 0; i < 50; i++) {
    t.is(await client.call('call_peer', { function_name: 'double_js', params: i }), 2 * i)
  }
})

test.serial('a Node server and client both busy-polling', async (t) => {
  const { dir, cleanup } = tempDir()
  const server = await RpcServer.listen(join(dir, 'node.sock'), { busyPollMicros: 200 })
  t.teardown(async () => {
    await server.close({ graceMs: 0 })
    cleanup()
  })
  server.handle('inc', (n: number) => n + 1)
  server.handle('later', async (n: number) => {
    await new Promise((r) => setTimeout(r, 5))
    return n
  })
  const client = await RpcClient.connect(server.path, { busyPollMicros: 200 })
  t.teardown(() => client.close())
  for (let i = 0; i < 300; i++) t.is(await client.call('inc', i), i + 1)
  const got = await Promise.all(Array.from({ length: 200 }, (_, i) => client.call(i % 2 ? 'inc' : 'later', i)))
  t.deepEqual(
    got,
    Array.from({ length: 200 }, (_, i) => (i % 2 ? i + 1 : i)),
  )
})

test.serial('waiting on a slow answer, a busy-polling client polls once per loop turn, not all along', async (t) => {
  // 20 ms of polling per turn, and a call answered after 400 ms: polling that went on for as
  // long as the call is pending would spend most of those 400 ms of CPU.
  const client = await RpcClient.connect(worker.socket, { busyPollMicros: 20_000 })
  t.teardown(() => client.close())
  t.is(await client.call('add', { a: 1, b: 1 }), 2)
  const before = process.cpuUsage()
  t.is(await client.call('sleep', { ms: 400 }), 400)
  const used = process.cpuUsage(before)
  const ms = (used.user + used.system) / 1000
  t.true(ms < 200, `${ms} ms of CPU while waiting 400 ms`)
})
