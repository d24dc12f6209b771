'use strict'
// Child side of child-ipc.cjs (forked by it, not run by the orchestrator): answers
// process.send messages {id, fn, params} with {id, result} or {id, error}.
// Functions: add {a,b}, echo (returns params), sleep {ms}.

const { handlers } = require('./common.cjs')

if (typeof process.send !== 'function') {
  process.stderr.write('child-ipc-server.cjs is forked by child-ipc.cjs, not run directly\n')
  process.exit(2)
}

process.on('message', (m) => {
  const fn = handlers[m.fn]
  if (fn === undefined) {
    process.send({ id: m.id, error: `no function ${m.fn}` })
    return
  }
  let result
  try {
    result = fn(m.params)
  } catch (e) {
    process.send({ id: m.id, error: String(e) })
    return
  }
  if (result instanceof Promise) {
    result.then(
      (r) => process.send({ id: m.id, result: r }),
      (e) => process.send({ id: m.id, error: String(e) }),
    )
  } else {
    process.send({ id: m.id, result })
  }
})
// The channel keeps this process alive; it ends when the parent disconnects or exits.
process.on('disconnect', () => process.exit(0))
