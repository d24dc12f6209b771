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
const { runClient, BaseClient, ALL_BUT_MEMORY } = require('./common.cjs')

const SERVER_ID = 'ferry-bench'

ipc.config.id = 'ferry-bench-client'
ipc.config.silent = true
ipc.config.maxRetries = 0
ipc.config.stopRetrying = true

class Client extends BaseClient {
  constructor(conn) {
    super()
    this.conn = conn
    conn.on('reply', (m) => {
      this.settle(m.id, m.error === undefined ? undefined : new Error(m.error), m.result)
    })
    conn.on('disconnect', () => this.failAll(new Error('disconnected')))
    conn.on('error', (e) => this.failAll(e))
  }

  call(fn, params) {
    return this.track((id) => this.conn.emit('call', { id, fn, params }))
  }

  shutdown() {
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
    ...ALL_BUT_MEMORY,
    echo: 'node-ipc carries JSON text events; binary echo is covered by net-json (base64)',
  },
  connect,
})
