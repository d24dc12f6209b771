'use strict'
// The generic gRPC service shared by grpc.cjs and grpc-server.cjs: no .proto, no protoc. Each
// method carries raw bytes with custom serializers: Add's messages are JSON ({a,b} -> number),
// Echo's are the bytes themselves.

const json = {
  serialize: (v) => Buffer.from(JSON.stringify(v)),
  deserialize: (b) => JSON.parse(b.toString('utf8')),
}
const bytes = {
  serialize: (b) => b,
  deserialize: (b) => b,
}

function unary(name, codec) {
  return {
    path: `/ferry.bench.Bench/${name}`,
    requestStream: false,
    responseStream: false,
    requestSerialize: codec.serialize,
    requestDeserialize: codec.deserialize,
    responseSerialize: codec.serialize,
    responseDeserialize: codec.deserialize,
  }
}

const service = { Add: unary('Add', json), Echo: unary('Echo', bytes) }

// Allow echoes of any size the benchmarks use (the default receive limit is 4 MiB).
const channelOptions = {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
}

module.exports = { service, channelOptions }
