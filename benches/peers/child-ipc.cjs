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
const { runClient, BaseClient, ALL_BUT_MEMORY } = require('./common.cjs')

class Client extends BaseClient {
  constructor(child) {
    super()
    this.child = child
    child.on('message', (m) => {
      this.settle(m.id, m.error === undefined ? undefined : new Error(m.error), m.result)
    })
    child.on('exit', (code, signal) => this.failAll(new Error(`child exited (${code ?? signal})`)))
    child.on('error', (e) => this.failAll(e))
  }

  call(fn, params) {
    return this.track((id) => this.child.send({ id, fn, params }))
  }

  shutdown() {
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
  scenarios: ALL_BUT_MEMORY,
  connect(o) {
    echoMode = serialization(o)
    return connect(o)
  },
  echo: {
    params: (buf) => (echoMode === 'advanced' ? buf : buf.toString('base64')),
    size: (r) => (echoMode === 'advanced' ? r.length : Buffer.from(r, 'base64').length),
  },
})
