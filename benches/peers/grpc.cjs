'use strict'
// gRPC client (@grpc/grpc-js) over a `unix:` address to grpc-server.cjs: unary calls on one
// channel (one HTTP/2 connection; concurrent calls are concurrent streams). add goes to Add
// (JSON body), echo to Echo (raw bytes). Service definition: grpc-service.cjs.
// Scenarios: latency, throughput, echo, first (memory is skipped).

const grpc = require('@grpc/grpc-js')
const { service, channelOptions } = require('./grpc-service.cjs')
const { runClient, ALL_BUT_MEMORY } = require('./common.cjs')

const Bench = grpc.makeGenericClientConstructor(service, 'Bench')
const methods = { add: 'Add', echo: 'Echo' }

function connect(o) {
  const client = new Bench(`unix:${o.socket}`, grpc.credentials.createInsecure(), channelOptions)
  const call = (fn, params) =>
    new Promise((resolve, reject) => {
      client[methods[fn]](params, (err, res) => (err ? reject(err) : resolve(res)))
    })
  // The channel connects lazily, on the first call (which is what `first` measures).
  return Promise.resolve({ call, close: () => client.close() })
}

runClient({
  scenarios: ALL_BUT_MEMORY,
  connect,
})
