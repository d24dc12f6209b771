'use strict'
// Node on both ends (server: net-json-server.cjs): node:net on a Unix socket, frames of a
// 4-byte big-endian length + a JSON body with Ferry's envelope
//   {type:'rpc_call', function_name, params, request_id}
//     -> {type:'rpc_response', request_id, result}
// Writes of one tick are batched into one socket.write, as in net-msgpackr.cjs. JSON has no
// binary type: echo sends its payload as a base64 string (the size reported is the raw bytes).
// Scenarios: latency, throughput, echo, first (memory is skipped).

const net = require('node:net')
const { runClient, FrameReader, FrameWriter } = require('./common.cjs')

class Client {
  constructor(socket) {
    this.socket = socket
    this.nextId = 1
    this.pending = new Map()
    this.writer = new FrameWriter(socket)
    this.closed = null
    const reader = new FrameReader((buf, start, end) =>
      this.onMessage(JSON.parse(buf.toString('utf8', start, end))),
    )
    socket.on('data', (chunk) => reader.push(chunk))
    socket.on('error', (e) => this.failAll(e))
    socket.on('close', () => this.failAll(new Error('connection closed')))
  }

  call(fn, params) {
    if (this.closed) return Promise.reject(this.closed)
    const id = this.nextId++
    const body = JSON.stringify({ type: 'rpc_call', function_name: fn, params, request_id: id })
    this.writer.push(Buffer.from(body))
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }))
  }

  onMessage(m) {
    const p = this.pending.get(m.request_id)
    if (p === undefined) return
    this.pending.delete(m.request_id)
    if (m.type === 'rpc_response') p.resolve(m.result)
    else p.reject(new Error(`${m.type}: ${m.error}`))
  }

  failAll(e) {
    if (this.closed) return
    this.closed = e
    for (const p of this.pending.values()) p.reject(e)
    this.pending.clear()
  }

  close() {
    this.failAll(new Error('client closed'))
    this.socket.destroy()
  }
}

function connect(o) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(o.socket)
    socket.once('error', reject)
    socket.once('connect', () => {
      socket.off('error', reject)
      resolve(new Client(socket))
    })
  })
}

runClient({
  scenarios: {
    latency: true,
    throughput: true,
    echo: true,
    first: true,
    memory: 'memory is measured only for clients of the Rust worker',
  },
  connect,
  echo: {
    params: (buf) => buf.toString('base64'),
    // Decode what came back, so the cost of base64 on the receiving side is counted too.
    size: (r) => Buffer.from(r, 'base64').length,
  },
})
