'use strict'
// The best pure-JS Ferry client we could write: node:net + msgpackr speaking Ferry's wire
// protocol (docs/protocol.md: 4-byte big-endian length + MessagePack map) directly to the Rust
// worker (`target/release/examples/worker <socket>`).
//   - calls are `rpc_call {type, function_name, params, request_id}` with integer ids from 1;
//   - every frame written in one tick goes out in one socket.write (FrameWriter);
//   - replies are cut from a streaming buffer (FrameReader) and matched by request_id.
// Scenarios: latency, throughput, echo (a Buffer, sent as MessagePack bin), first, memory.

const { Packr } = require('msgpackr')
const { runClient, BaseClient, connectUnix, FrameReader, FrameWriter, drained, sleep, MIB, round } = require('./common.cjs')

class RpcError extends Error {}

class Client extends BaseClient {
  constructor(socket) {
    super()
    this.socket = socket
    this.packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'auto' })
    this.writer = new FrameWriter(socket)
    const reader = new FrameReader((buf, start, end) =>
      this.onMessage(this.packr.unpack(buf.subarray(start, end))),
    )
    socket.on('data', (chunk) => reader.push(chunk))
    socket.on('error', (e) => this.failAll(e))
    socket.on('close', () => this.failAll(new Error('connection closed')))
  }

  call(fn, params) {
    return this.track((id) =>
      this.writer.push(this.packr.pack({ type: 'rpc_call', function_name: fn, params, request_id: id })),
    )
  }

  onMessage(m) {
    const error =
      m.type === 'rpc_response'
        ? undefined
        : new RpcError(`${m.type} ${m.error_type || m.code}: ${m.error || m.message}`)
    if (this.settle(m.request_id, error, m.result)) return
    if (m.type === 'health_check') {
      this.writer.push(this.packr.pack({ type: 'health_check_response' }))
    } else if (m.type === 'error') {
      this.failAll(new RpcError(`${m.code}: ${m.message}`))
    }
  }

  shutdown() {
    this.socket.destroy()
  }
}

function connect(o) {
  return connectUnix(o.socket, (socket) => new Client(socket))
}

// Holds `pending` sleep calls, waits until they are all written, then (like ferry.cjs) lets the
// process settle for 500 ms and runs a GC when --expose-gc allows it, and samples the RSS.
async function memory(o) {
  const client = await connect(o)
  for (let i = 0; i < o.pending; i++) client.call('sleep', { ms: 60000 }).catch(() => {})
  client.writer.flush()
  await drained(client.socket)
  await sleep(500)
  global.gc?.()
  if (client.closed) throw client.closed
  const rss = process.memoryUsage().rss
  if (client.pending.size !== o.pending) throw new Error('held calls were answered early')
  client.close()
  return { rss_mb: round(rss / MIB, 1), pending: o.pending }
}

runClient({
  scenarios: { latency: true, throughput: true, echo: true, first: true, memory: true },
  connect,
  memory,
})
