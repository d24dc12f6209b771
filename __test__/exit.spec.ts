// Process lifetime: small scripts run as child processes must exit by themselves once they
// have nothing left to do (an idle connection or server does not hold the event loop), and
// must stay alive while a call is pending, a handler is running, or `ref()` asks for it.
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'

import test, { type ExecutionContext } from 'ava'

import { RpcClient } from '../index.js'
import { ROOT, startWorker, tempDir, type Worker } from './helpers'

let worker: Worker
let scripts: { dir: string; cleanup: () => void }
const children = new Set<ChildProcess>()

test.before(async () => {
  worker = await startWorker()
  scripts = tempDir()
})

test.after.always(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL')
  await worker?.stop()
  scripts?.cleanup()
})

// Every script starts with this: the package by absolute path (computed here, at run time),
// its first argument as SOCKET, and a loud failure for anything unexpected.
const PRELUDE = `'use strict'
const ferry = require(${JSON.stringify(ROOT)})
const SOCKET = process.argv[2]
process.on('unhandledRejection', (e) => {
  console.error('unhandled rejection:', (e && e.stack) || e)
  process.exit(3)
})
// Prints 'still alive' after a few ticks of a timer that does not hold the loop itself: it
// only fires if something else (the thing under test) keeps the process running.
function reportStillAlive() {
  let ticks = 0
  const iv = setInterval(() => {
    if (++ticks === 3) {
      clearInterval(iv)
      console.log('still alive')
    }
  }, 10)
  iv.unref()
}
// Calls fn on the first line the test writes to stdin, without stdin holding the loop.
function onStdin(fn) {
  process.stdin.setEncoding('utf8')
  process.stdin.once('data', (d) => fn(String(d).trim()))
  process.stdin.unref()
}
`

interface Child {
  proc: ChildProcess
  /** Resolves with the first stdout line for which `pred` holds. */
  line: (pred: (line: string) => boolean) => Promise<string>
  /** Resolves once the child exited, with its code and all its output. */
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string[]; stderr: string }>
}

let counter = 0

/** Writes `source` (after the prelude) to a script file and runs it with `args`. */
function runScript(t: ExecutionContext, source: string, args: string[], env?: NodeJS.ProcessEnv): Child {
  t.timeout(60_000, 'the child did not exit by itself')
  const file = join(scripts.dir, `child-${++counter}.js`)
  writeFileSync(file, PRELUDE + source)
  const proc = spawn(process.execPath, [file, ...args], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  })
  children.add(proc)
  const stdout: string[] = []
  const watchers: Array<{ pred: (l: string) => boolean; resolve: (l: string) => void }> = []
  let stderr = ''
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const lines = createInterface({ input: proc.stdout! })
  lines.on('line', (l) => {
    stdout.push(l)
    for (const w of watchers.filter((w) => w.pred(l))) {
      watchers.splice(watchers.indexOf(w), 1)
      w.resolve(l)
    }
  })
  const linesDone = new Promise<void>((resolve) => lines.once('close', resolve))
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once('exit', (code, signal) => resolve({ code, signal })),
  ).then(async (r) => {
    await linesDone
    children.delete(proc)
    return { ...r, stdout, stderr }
  })
  return {
    proc,
    exit,
    line: (pred) => {
      const seen = stdout.find(pred)
      if (seen !== undefined) return Promise.resolve(seen)
      return new Promise<string>((resolve, reject) => {
        watchers.push({ pred, resolve })
        exit.then((r) => reject(new Error(`child exited (${r.code}) before the line; stdout: ${r.stdout.join(' | ')}; stderr: ${r.stderr}`)))
      })
    },
  }
}

/** Asserts a clean exit (code 0, no stderr) with exactly these stdout lines. */
async function exitsWith(t: ExecutionContext, child: Child, stdout: string[]): Promise<void> {
  const r = await child.exit
  t.is(r.stderr, '')
  t.deepEqual(r.stdout, stdout)
  t.deepEqual({ code: r.code, signal: r.signal }, { code: 0, signal: null })
}

// ----- (a), (b): one call, then nothing -----------------------------------------------------

test('an RpcClient that made one call and then does nothing exits by itself', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then(async (client) => {
  console.log('result', await client.call('add', { a: 2, b: 3 }))
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['result 5'])
})

test('initRpcClient + rpc.call, then nothing: exits by itself', async (t) => {
  const child = runScript(
    t,
    `ferry.initRpcClient(SOCKET).then(async () => {
  console.log('result', await ferry.rpc.call('multiply', { a: 6, b: 7 }))
  console.log('client', ferry.rpc.client !== null)
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['result 42', 'client true'])
})

test('rpc.call connecting by itself through FERRY_SOCKET, then nothing: exits by itself', async (t) => {
  const child = runScript(
    t,
    `ferry.rpc.call('add', { a: 1, b: 2 }).then((r) => console.log('result', r))`,
    [],
    { FERRY_SOCKET: worker.socket },
  )
  await exitsWith(t, child, ['result 3'])
})

test('a connection whose calls all failed exits by itself', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then(async (client) => {
  await client.call('fail', {}).catch((e) => console.log('failed', e.code))
  await client.call('no_such_function', {}).catch((e) => console.log('failed', e.code))
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['failed ERR_FERRY_HANDLER', 'failed ERR_FERRY_NOT_FOUND'])
})

// ----- (c) a server with no clients ---------------------------------------------------------

test('RpcServer.listen with no clients exits by itself', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const child = runScript(
    t,
    `ferry.RpcServer.listen(SOCKET).then((s) => {
  s.handle('add', ({ a, b }) => a + b)
  console.log('listening', s.path === SOCKET)
})`,
    [join(dir, 'child.sock')],
  )
  await exitsWith(t, child, ['listening true'])
})

test('RpcServer.listen({ref: true}) stays up until s.unref()', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const child = runScript(
    t,
    `ferry.RpcServer.listen(SOCKET, { ref: true }).then((s) => {
  console.log('listening')
  reportStillAlive()
  onStdin((line) => {
    console.log('got', line)
    s.unref()
  })
})`,
    [join(dir, 'child.sock')],
  )
  await child.line((l) => l === 'still alive')
  child.proc.stdin!.write('unref\n')
  await exitsWith(t, child, ['listening', 'still alive', 'got unref'])
})

test('a running handler keeps a server process alive; an idle accepted connection does not', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const socket = join(dir, 'child.sock')
  const child = runScript(
    t,
    `ferry.RpcServer.listen(SOCKET, { ref: true }).then((s) => {
  s.handle('slow', async () => {
    s.unref() // from here on, only the call being served holds the process
    await new Promise((r) => setTimeout(r, 50).unref())
    console.log('answering')
    return 'served'
  })
  console.log('listening')
})`,
    [socket],
  )
  await child.line((l) => l === 'listening')
  const client = await RpcClient.connect(socket)
  t.teardown(() => client.close())
  t.is(await client.call('slow', {}), 'served')
  // Our connection stays open, idle: the child exits anyway.
  await exitsWith(t, child, ['listening', 'answering'])
})

// ----- (d) ref() / unref() ------------------------------------------------------------------

test('with client.ref() the process stays up until client.unref()', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then(async (client) => {
  client.ref()
  console.log('result', await client.call('add', { a: 2, b: 3 }))
  reportStillAlive()
  onStdin((line) => {
    console.log('got', line)
    client.unref()
  })
})`,
    [worker.socket],
  )
  await child.line((l) => l === 'still alive')
  t.is(child.proc.exitCode, null)
  child.proc.stdin!.write('unref\n')
  await exitsWith(t, child, ['result 5', 'still alive', 'got unref'])
})

test('ref() before any call holds the process; unref() after a later call releases it', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then((client) => {
  client.ref()
  console.log('connected')
  reportStillAlive()
  onStdin(async (line) => {
    console.log('got', line)
    console.log('result', await client.call('add', { a: 1, b: 1 }))
    client.unref()
  })
})`,
    [worker.socket],
  )
  await child.line((l) => l === 'still alive')
  child.proc.stdin!.write('go\n')
  await exitsWith(t, child, ['connected', 'still alive', 'got go', 'result 2'])
})

// ----- close() in a process with nothing else to do ----------------------------------------
// The promise of close() must settle, or the code after `await x.close()` silently never runs.

test('await client.close() resolves before the process exits', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then(async (client) => {
  console.log('result', await client.call('add', { a: 1, b: 1 }))
  await client.close()
  console.log('closed', client.closed)
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['result 2', 'closed true'])
})

test('await closeRpcClient() resolves before the process exits', async (t) => {
  const child = runScript(
    t,
    `ferry.initRpcClient(SOCKET).then(async () => {
  console.log('result', await ferry.rpc.call('add', { a: 1, b: 1 }))
  await ferry.closeRpcClient()
  console.log('closed', ferry.rpc.client)
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['result 2', 'closed null'])
})

test('await server.close() with a connected peer resolves before the process exits', async (t) => {
  const { dir, cleanup } = tempDir()
  t.teardown(cleanup)
  const socket = join(dir, 'child.sock')
  const child = runScript(
    t,
    `ferry.RpcServer.listen(SOCKET, { ref: true }).then((s) => {
  s.onConnection(() => console.log('peer'))
  console.log('listening')
  onStdin(async () => {
    await s.close()
    console.log('server closed', require('node:fs').existsSync(SOCKET))
  })
})`,
    [socket],
  )
  await child.line((l) => l === 'listening')
  const client = await RpcClient.connect(socket)
  t.teardown(() => client.close())
  await child.line((l) => l === 'peer')
  child.proc.stdin!.write('close\n')
  await exitsWith(t, child, ['listening', 'peer', 'server closed false'])
})

// ----- (e) a pending call keeps the process alive -------------------------------------------

test('a pending call keeps the process alive until it is answered', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then((client) => {
  client.call('sleep', { ms: 300 }).then((r) => console.log('slept', r))
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['slept 300'])
})

test('a pending rpc.call keeps the process alive until it is answered', async (t) => {
  const child = runScript(
    t,
    `ferry.initRpcClient(SOCKET).then(() => {
  ferry.rpc.call('sleep', { ms: 300 }).then((r) => console.log('slept', r))
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['slept 300'])
})

test('a pending invokeHandler keeps the process alive until it is answered', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then((client) => {
  client.call('sleep', { ms: 200 }).then((r) => console.log('slept', r))
  client
    .invokeHandler('worker_status', { method: 'GET', path: '/late', headers: {} })
    .then((r) => console.log('route', r.status, r.body))
})`,
    [worker.socket],
  )
  const r = await child.exit
  t.is(r.code, 0, r.stderr)
  t.deepEqual([...r.stdout].sort(), ['route 200 worker ok: GET /late', 'slept 200'])
})

test('a call that times out keeps the process alive until the timeout, then lets it exit', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then((client) => {
  client.call('sleep', { ms: 60000 }, { timeoutMs: 100 }).catch((e) => console.log('failed', e.code))
})`,
    [worker.socket],
  )
  // Exits with the timeout reported, without waiting for the worker's late answer (whose
  // 60 s would exceed this test's own timeout).
  await exitsWith(t, child, ['failed ERR_FERRY_TIMEOUT'])
})

test('a handler of the client serving the worker keeps the process alive until it answers', async (t) => {
  const child = runScript(
    t,
    `ferry.RpcClient.connect(SOCKET).then((client) => {
  client.handle('hello', async ({ name }) => {
    await new Promise((r) => setTimeout(r, 50).unref())
    return 'hello ' + name
  })
  client.call('call_peer', { function_name: 'hello', params: { name: 'child' } }).then((r) => console.log(r))
})`,
    [worker.socket],
  )
  await exitsWith(t, child, ['hello child'])
})

// ----- worker threads: each has its own event loop and Node-API environment ------------------

test('a worker thread with an idle connection ends by itself, and one terminated with calls pending ends cleanly', async (t) => {
  const child = runScript(
    t,
    `const { Worker } = require('node:worker_threads')
const body = (holdCall) => \`
const { parentPort } = require('node:worker_threads')
const ferry = require(\${JSON.stringify(${JSON.stringify(ROOT)})})
ferry.RpcClient.connect(\${JSON.stringify(SOCKET)}).then(async (client) => {
  parentPort.postMessage(await client.call('add', { a: 1, b: 2 }))
  if (\${holdCall}) {
    client.call('sleep', { ms: 60000 }).catch(() => {})
    parentPort.postMessage('holding')
  }
})\`
;(async () => {
  // Ends by itself: the connection is idle and holds nothing.
  const idle = new Worker(body(false), { eval: true })
  idle.on('message', (m) => console.log('idle thread', m))
  console.log('idle thread exit', await new Promise((r) => idle.once('exit', r)))
  // terminate() with the socket open and a call pending: the environment is torn down
  // around the open socket.
  for (let i = 0; i < 3; i++) {
    const busy = new Worker(body(true), { eval: true })
    await new Promise((r) => busy.on('message', (m) => m === 'holding' && r()))
    console.log('terminated', await busy.terminate())
  }
})()`,
    [worker.socket],
  )
  await exitsWith(t, child, ['idle thread 3', 'idle thread exit 0', 'terminated 1', 'terminated 1', 'terminated 1'])
})
