'use strict'
// HTTP/1.1 client (undici 7) over a Unix socket to the Rust axum server
// (`target/release/axum-server <socket-path>`, benches/rust):
//   POST /add  application/json {"a":1,"b":2} -> 3 (JSON)
//   POST /echo application/octet-stream       -> the same bytes
// Keep-alive throughout. latency and first: one Client, one connection, pipelining 1.
// throughput and echo keep --inflight requests outstanding; --http picks how:
//   pipeline (default): one Client, one connection, pipelining = inflight. This is what the
//     contract asks for ("outstanding on one connection"); the requests are marked idempotent,
//     without which undici never pipelines a POST behind another request.
//   pool: a Pool of `inflight` connections with pipelining 1 (classic HTTP/1.1 concurrency).
// Scenarios: latency, throughput, echo, first (memory is skipped).

const { Client, Pool } = require('undici')
const { runClient, ALL_BUT_MEMORY } = require('./common.cjs')

const ORIGIN = 'http://localhost' // only the Host header; the connection goes to socketPath
const JSON_TYPE = { 'content-type': 'application/json' }
const BIN_TYPE = { 'content-type': 'application/octet-stream' }
const method = 'POST'
const idempotent = true // lets undici pipeline these POSTs

function dispatcherFor(o) {
  const socketPath = o.socket
  const single = o.scenario === 'latency' || o.scenario === 'first'
  const mode = single ? 'single' : o.extra.http || 'pipeline'
  if (mode === 'single') return new Client(ORIGIN, { socketPath, pipelining: 1 })
  if (mode === 'pipeline') return new Client(ORIGIN, { socketPath, pipelining: o.inflight })
  if (mode === 'pool') {
    return new Pool(ORIGIN, { socketPath, connections: o.inflight, pipelining: 1 })
  }
  throw new Error('--http must be pipeline or pool')
}

async function checked(res, what) {
  if (res.statusCode !== 200) {
    const text = await res.body.text()
    throw new Error(`${what}: HTTP ${res.statusCode} ${text.slice(0, 200)}`)
  }
  return res.body
}

function connect(o) {
  const d = dispatcherFor(o)
  const call = async (fn, params) => {
    if (fn === 'add') {
      const body = JSON.stringify(params)
      const res = await d.request({ method, path: '/add', headers: JSON_TYPE, body, idempotent })
      return (await checked(res, 'add')).json()
    }
    if (fn === 'echo') {
      const body = params
      const res = await d.request({ method, path: '/echo', headers: BIN_TYPE, body, idempotent })
      return Buffer.from(await (await checked(res, 'echo')).arrayBuffer())
    }
    throw new Error(`no route for ${fn}`)
  }
  // The connection is made on the first request (which is what `first` measures).
  return Promise.resolve({ call, close: () => d.close() })
}

runClient({
  scenarios: ALL_BUT_MEMORY,
  connect,
})
