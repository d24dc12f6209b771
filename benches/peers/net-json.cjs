'use strict'
// Node on both ends (server: net-json-server.cjs): node:net on a Unix socket, frames of a
// 4-byte big-endian length + a JSON body with Ferry's envelope
//   {type:'rpc_call', function_name, params, request_id}
//     -> {type:'rpc_response', request_id, result}
// Writes of one tick are batched into one socket.write, as in net-msgpackr.cjs. JSON has no
// binary type: echo sends its payload as a base64 string (the size reported is the raw bytes).
// Scenarios: latency, throughput, echo, first (memory is skipped).

const { runClient, BaseClient, connectUnix, FrameReader, FrameWriter, ALL_BUT_MEMORY } = require('./common.cjs')

class Client extends BaseClient {
  constructor(socket) {
    super()
    this.socket = socket
    this.writer = new FrameWriter(socket)
    const reader = new FrameReader((buf, start, end) =>
      this.onMessage(JSON.parse(buf.toString('utf8', start, end))),
    )
    socket.on('data', (chunk) => reader.push(chunk))
    socket.on('error', (e) => this.failAll(e))
    socket.on('close', () => this.failAll(new Error('connection closed')))
  }

  call(fn, params) {
    return this.track((id) => {
      const body = JSON.stringify({ type: 'rpc_call', function_name: fn, params, request_id: id })
      this.writer.push(Buffer.from(body))
    })
  }

  onMessage(m) {
    const error = m.type === 'rpc_response' ? undefined : new Error(`${m.type}: ${m.error}`)
    this.settle(m.request_id, error, m.result)
  }

  shutdown() {
    this.socket.destroy()
  }
}

function connect(o) {
  return connectUnix(o.socket, (socket) => new Client(socket))
}

runClient({
  scenarios: ALL_BUT_MEMORY,
  connect,
  echo: {
    params: (buf) => buf.toString('base64'),
    // Decode what came back, so the cost of base64 on the receiving side is counted too.
    size: (r) => Buffer.from(r, 'base64').length,
  },
})
