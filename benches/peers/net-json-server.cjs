'use strict'
// Node server for net-json.cjs: node:net on a Unix socket, frames of a 4-byte big-endian length
// + a JSON body. Answers {type:'rpc_call', function_name, params, request_id} with
// {type:'rpc_response', request_id, result} (or {type:'rpc_error', request_id, error}).
// Functions: add {a,b}, echo (returns params), sleep {ms}. Answers written in one tick are
// batched into one socket.write.
//   node net-json-server.cjs <socket-path>

const net = require('node:net')
const { FrameReader, FrameWriter, handlers, removeStale, serverReady } = require('./common.cjs')

const path = process.argv[2]
if (!path) {
  process.stderr.write('usage: net-json-server.cjs <socket-path>\n')
  process.exit(2)
}

const server = net.createServer((socket) => {
  const writer = new FrameWriter(socket)
  const answer = (m) => writer.push(Buffer.from(JSON.stringify(m)))
  const reader = new FrameReader((buf, start, end) => {
    const m = JSON.parse(buf.toString('utf8', start, end))
    const id = m.request_id
    const fn = handlers[m.function_name]
    if (m.type !== 'rpc_call' || fn === undefined) {
      const error = `cannot answer ${m.type} ${m.function_name}`
      answer({ type: 'rpc_error', request_id: id, error })
      return
    }
    let result
    try {
      result = fn(m.params)
    } catch (e) {
      answer({ type: 'rpc_error', request_id: id, error: String(e) })
      return
    }
    if (result instanceof Promise) {
      result.then(
        (r) => answer({ type: 'rpc_response', request_id: id, result: r }),
        (e) => answer({ type: 'rpc_error', request_id: id, error: String(e) }),
      )
    } else {
      answer({ type: 'rpc_response', request_id: id, result })
    }
  })
  socket.on('data', (chunk) => reader.push(chunk))
  socket.on('error', () => socket.destroy())
})

removeStale(path)
server.listen(path, () => serverReady(path, () => new Promise((r) => server.close(() => r()))))
