'use strict'
// gRPC server (@grpc/grpc-js) for grpc.cjs on a `unix:` address: unary Add (JSON {a,b} ->
// a+b) and Echo (bytes -> the same bytes), defined in grpc-service.cjs.
//   node grpc-server.cjs <socket-path>

const grpc = require('@grpc/grpc-js')
const { service, channelOptions } = require('./grpc-service.cjs')
const { removeStale, serverReady } = require('./common.cjs')

const path = process.argv[2]
if (!path) {
  process.stderr.write('usage: grpc-server.cjs <socket-path>\n')
  process.exit(2)
}

const server = new grpc.Server(channelOptions)
server.addService(service, {
  Add: (call, cb) => cb(null, call.request.a + call.request.b),
  Echo: (call, cb) => cb(null, call.request),
})
removeStale(path)
server.bindAsync(`unix:${path}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) {
    process.stderr.write(`grpc-server: ${err.message}\n`)
    process.exit(1)
  }
  serverReady(path, () => new Promise((r) => server.tryShutdown(() => r())))
})
