'use strict'
// Node's built-in child_process IPC: the client forks its own child (child-ipc-server.cjs) and
// calls it with process.send messages {id, fn, params} -> {id, result}. --socket is ignored.
// `first` includes forking the child (a Node process start): there is no server to reach before.
//
// --serialization json|advanced picks the channel's serialization. The default is the faster one
// for each scenario, measured on Node 20: 'json' for the small calls (latency, throughput,
// first; 'advanced' is about 4x slower in throughput) and 'advanced' for echo (structured clone
// carries the Buffer as binary; with 'json' echo has to send base64 strings, about 3x slower).
// Scenarios: latency, throughput, echo, first (memory is skipped).

const { fork } = require('node:child_process')
const path = require('node:path')
const { runClient } = require('./common.cjs')

class Client {
  constructor(child) {
    this.child = child
    this.nextId = 1
    this.pending = new Map()
    this.closed = null
    child.on('message', (m) => {
      const p = this.pending.get(m.id)
      if (p === undefined) return
      this.pending.delete(m.id)
      if (m.error === undefined) p.resolve(m.result)
      else p.reject(new Error(m.error))
    })
    child.on('exit', (code, signal) => this.failAll(new Error(`child exited (${code ?? signal})`)))
    child.on('error', (e) => this.failAll(e))
  }

  call(fn, params) {
    if (this.closed) return Promise.reject(this.closed)
    const id = this.nextId++
    this.child.send({ id, fn, params })
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }))
  }

  failAll(e) {
    if (this.closed) return
    this.closed = e
    for (const p of this.pending.values()) p.reject(e)
    this.pending.clear()
  }

  close() {
    this.failAll(new Error('client closed'))
    this.child.disconnect()
  }
}

function serialization(o) {
  const s = o.extra.serialization || (o.scenario === 'echo' ? 'advanced' : 'json')
  if (s !== 'json' && s !== 'advanced') throw new Error('--serialization must be json or advanced')
  return s
}

function connect(o) {
  return new Promise((resolve, reject) => {
    const child = fork(path.join(__dirname, 'child-ipc-server.cjs'), [], {
      serialization: serialization(o),
      stdio: ['ignore', 2, 2, 'ipc'], // the child's output must never reach our stdout
    })
    child.once('error', reject)
    child.once('spawn', () => {
      child.off('error', reject)
      resolve(new Client(child))
    })
  })
}

let echoMode
runClient({
  scenarios: {
    latency: true,
    throughput: true,
    echo: true,
    first: true,
    memory: 'memory is measured only for clients of the Rust worker',
  },
  connect(o) {
    echoMode = serialization(o)
    return connect(o)
  },
  echo: {
    params: (buf) => (echoMode === 'advanced' ? buf : buf.toString('base64')),
    size: (r) => (echoMode === 'advanced' ? r.length : Buffer.from(r, 'base64').length),
  },
})
