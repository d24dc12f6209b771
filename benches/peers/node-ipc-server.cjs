'use strict'
// node-ipc server for node-ipc.cjs: answers 'call' events {id, fn, params} with 'reply' events
// {id, result} (or {id, error}) on a Unix socket, node-ipc's default 'fast' profile (JSON
// event envelopes, '\f'-delimited).
// node-ipc 14 declares engines node >= 22.13 (for require() of its ES module); Node 20.19+ has
// the same require(esm) unflagged, and it works on Node 20.20 (see node-ipc.cjs).
//   node node-ipc-server.cjs <socket-path>

const ipc = require('node-ipc').default
const { handlers, serverReady } = require('./common.cjs')

const path = process.argv[2]
if (!path) {
  process.stderr.write('usage: node-ipc-server.cjs <socket-path>\n')
  process.exit(2)
}

ipc.config.id = 'ferry-bench'
ipc.config.silent = true
ipc.config.unlink = true // removes a stale socket file before listening

ipc.serve(path, () => {
  ipc.server.on('call', (m, socket) => {
    const reply = (r) => ipc.server.emit(socket, 'reply', r)
    const fn = handlers[m.fn]
    if (fn === undefined) return reply({ id: m.id, error: `no function ${m.fn}` })
    Promise.resolve()
      .then(() => fn(m.params))
      .then(
        (result) => reply({ id: m.id, result }),
        (e) => reply({ id: m.id, error: String(e) }),
      )
  })
  serverReady(path, () => ipc.server.stop())
})
ipc.server.on('error', (e) => {
  process.stderr.write(`node-ipc-server: ${e}\n`)
  process.exit(1)
})
ipc.server.start()
