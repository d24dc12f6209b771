'use strict'
// Ferry's Node client (`call` through the addon) for the benchmark contract in
// benches/README.md, driven by the same scenario code as every other Node peer
// (common.cjs). The server is the Rust example worker (Node -> Rust).
const { RpcClient } = require('../../index.js')
const { runClient, round, sleep } = require('./common.cjs')

const MIB = 1024 * 1024

// `--busy-poll-us N`: the connection's busyPollMicros (default 0, as shipped).
async function connect(o) {
  // No per-call timeout: the other peers have none either.
  return RpcClient.connect(o.socket, { timeoutMs: 0, busyPollMicros: Number(o.extra['busy-poll-us'] ?? 0) })
}

// Holds `pending` sleep calls, lets the writes go out, settles, samples the RSS.
async function memory(o) {
  const client = await connect(o)
  for (let i = 0; i < o.pending; i++) client.call('sleep', { ms: 60000 }).catch(() => {})
  await sleep(500)
  global.gc?.()
  const rss = process.memoryUsage().rss
  if (client.pendingCalls !== o.pending) throw new Error('held calls were answered early')
  await client.close()
  return { rss_mb: round(rss / MIB, 1), pending: o.pending }
}

runClient({
  scenarios: { latency: true, throughput: true, echo: true, first: true, memory: true },
  connect,
  memory,
})
