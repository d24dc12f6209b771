'use strict'
// A Node Ferry server (RpcServer with JS handlers) for the benchmark contract: Rust peers
// (benches/rust ferry-client) call these handlers, measuring Rust -> JS.
const { RpcServer } = require('../../index.js')

async function main() {
  const path = process.argv[2]
  const s = await RpcServer.listen(path, { ref: true })
  s.handle('add', (p) => p.a + p.b)
  s.handle('echo', (p) => p)
  s.handle('sleep', (p) => new Promise((r) => setTimeout(() => r(p.ms), p.ms)))
  const stop = () => s.close({ graceMs: 100 }).then(() => process.exit(0))
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
  process.stdout.write(`ready ${path}\n`)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
