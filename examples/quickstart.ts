// The quick start: TypeScript calling Rust, and Rust calling TypeScript, over one Unix socket.
//
//   npm run example
//
// 1. Starts the Rust example worker (crates/ferry-core/examples/worker.rs) on a temp socket.
// 2. Calls its functions from TypeScript with the process-wide client (`rpc.call`).
// 3. Serves a TypeScript function and a route on the same connection and has the worker call
//    them back (`call_peer`, `invoke_peer`).
// 4. Listens with an RpcServer and lets a separate Rust process (examples/caller.rs) call a
//    TypeScript route handler, the way a Rust HTTP server hands requests to TS handlers.
import { execFile, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'

import { RpcError, RpcServer, closeRpcClient, initRpcClient, rpc } from '../index.js'

const bin = (name: string) => resolve(__dirname, '..', 'target', 'release', 'examples', name)

async function main() {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-quickstart-'))
  const workerSocket = join(dir, 'worker.sock')

  // 1. The Rust worker prints `ready <path>` once it listens.
  const worker = spawn(bin('worker'), [workerSocket], { stdio: ['ignore', 'pipe', 'inherit'] })
  await new Promise<void>((ready) =>
    createInterface({ input: worker.stdout! }).on('line', (l) => l.startsWith('ready') && ready()),
  )

  try {
    // 2. TypeScript -> Rust.
    await initRpcClient(workerSocket)
    console.log('add(2, 3)        =', await rpc.call<number>('add', { a: 2, b: 3 }))
    console.log('fibonacci(90)    =', await rpc.call('fibonacci', { n: 90 }), '(a BigInt: beyond 2^53)')
    console.log('is_prime(7919)   =', await rpc.call('is_prime', { n: 7919 }))
    console.log('echo(binary)     =', await rpc.call('echo', Buffer.from('ferry')))
    try {
      await rpc.call('sleep', { ms: 1000 }, { timeoutMs: 50 })
    } catch (e) {
      console.log('sleep(1000ms)    =', (e as RpcError).code, '(timeoutMs: 50)')
    }
    try {
      await rpc.call('fail', {})
    } catch (e) {
      const err = e as RpcError
      console.log('fail()           =', err.code, err.errorType, '-', err.message)
    }

    // 3. Rust -> TypeScript on the same connection.
    const client = rpc.client!
    client.handle('greet', async ({ name }: { name: string }) => `hello, ${name}, from TypeScript`)
    client.handleRoute('api_users_get', async (req) => ({
      status: 200,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ users: ['ada', 'grace'], path: req.path }),
    }))
    console.log('worker -> greet  =', await rpc.call('call_peer', { function_name: 'greet', params: { name: 'Rust' } }))
    const res = await rpc.call('invoke_peer', {
      handler_id: 'api_users_get',
      request: { method: 'GET', path: '/api/users', headers: {} },
    })
    console.log('worker -> route  =', res)

    // 4. A separate Rust process calling a TypeScript route handler on an RpcServer.
    const serverSocket = join(dir, 'app.sock')
    const server = await RpcServer.listen(serverSocket)
    server.handleRoute('api_users_get', (req) => ({
      status: 200,
      headers: { 'content-type': 'text/plain' },
      body: `${req.method} ${req.path} handled in TypeScript`,
    }))
    const { stdout } = await promisify(execFile)(bin('caller'), [
      serverSocket,
      'route',
      'api_users_get',
      JSON.stringify({ method: 'GET', path: '/api/users', headers: {} }),
    ])
    console.log('rust caller      =', stdout.trim())
    await server.close()
  } finally {
    await closeRpcClient()
    worker.kill('SIGTERM')
    await new Promise((r) => worker.once('exit', r))
    rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
