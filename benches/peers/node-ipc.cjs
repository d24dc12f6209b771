'use strict'
// node-ipc client (node-ipc-server.cjs on the other end): 'call' events {id, fn, params} ->
// 'reply' events {id, result} over a Unix socket, node-ipc's default 'fast' profile (JSON event
// envelopes, '\f'-delimited, one socket.write per emit).
// Engines mismatch: node-ipc 14 declares node >= 22.13 because it ships only an ES module and
// relies on require(esm); Node 20.19+ has require(esm) unflagged too, and 14.0.0 runs on Node
// 20.20 (npm warns EBADENGINE on install). It is pinned exactly: versions 9.2.2, 10.1.1 and
// 10.1.2 were malicious; never loosen the range.
// Scenarios: latency, throughput, first (echo and memory are skipped).

const ipc = require('node-ipc').default
const { runClient } = require('./common.cjs')

const SERVER_ID = 'ferry-bench'

ipc.config.id = 'ferry-bench-client'
ipc.config.silent = true
ipc.config.maxRetries = 0
ipc.config.stopRetrying = true

class Client {
  constructor(conn) {
    this.conn = conn
    this.nextId = 1
    this.pending = new Map()
    this.closed = null
    conn.on('reply', (m) => {
      const p = this.pending.get(m.id)
      if (p === undefined) return
      this.pending.delete(m.id)
      if (m.error === undefined) p.resolve(m.result)
      else p.reject(new Error(m.error))
    })
    conn.on('disconnect', () => this.failAll(new Error('disconnected')))
    conn.on('error', (e) => this.failAll(e))
  }

  call(fn, params) {
    if (this.closed) return Promise.reject(this.closed)
    const id = this.nextId++
    this.conn.emit('call', { id, fn, params })
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
    ipc.disconnect(SERVER_ID)
  }
}

function connect(o) {
  return new Promise((resolve, reject) => {
    ipc.connectTo(SERVER_ID, o.socket, () => {
      const conn = ipc.of[SERVER_ID]
      const onError = (e) => reject(e)
      conn.on('error', onError)
      conn.on('connect', () => {
        conn.off('error', onError)
        resolve(new Client(conn))
      })
    })
  })
}

runClient({
  scenarios: {
    latency: true,
    throughput: true,
    echo: 'node-ipc carries JSON text events; binary echo is covered by net-json (base64)',
    first: true,
    memory: 'memory is measured only for clients of the Rust worker',
  },
  connect,
})
