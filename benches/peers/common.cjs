'use strict'
// Shared by the Node benchmark peers in this folder: argument parsing, the scenario drivers,
// statistics, the one-line JSON result, length-prefixed framing, and server start/stop.
// The client contract (scenarios, options, output) is defined in benches/README.md.
//
// A peer module calls `runClient(spec)` with
//   spec.scenarios   { latency, throughput, echo, first, memory }: true, or a string saying
//                    why the scenario is skipped
//   spec.connect(o)  async, resolves to { call(fn, params) -> Promise, close() }
//   spec.echo        optional { params(buf) -> params to send, size(result) -> bytes echoed }
//   spec.memory(o)   optional custom memory scenario (resolves to the result object)
// Options beyond the contract: --warmup-ms (throughput/echo warm-up, default 300) and any
// peer-specific `--name value`, found in `o.extra`.
// Units, the same as ferry.cjs so that ratios hold: `_us` microseconds, `first_ms`
// milliseconds, `mb_per_s` in MB (10^6 bytes) of payload one way, `rss_mb` in MiB (2^20 bytes).

const { performance } = require('node:perf_hooks')
const fs = require('node:fs')

const MB = 1e6
const MIB = 1024 * 1024
const SCENARIOS = ['latency', 'throughput', 'echo', 'first', 'memory']
const NUMERIC = {
  n: 20000,
  warmup: 2000,
  inflight: undefined, // 64 for throughput, 4 for echo
  'duration-ms': 3000,
  'warmup-ms': 300,
  size: 65536,
  pending: 10000,
}

/** `--key value` or `--key=value`. Numeric options are checked; others are kept in `extra`. */
function parseArgs(argv = process.argv.slice(2)) {
  const raw = {}
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${JSON.stringify(a)}`)
    const eq = a.indexOf('=')
    let key
    let value
    if (eq >= 0) {
      key = a.slice(2, eq)
      value = a.slice(eq + 1)
    } else {
      key = a.slice(2)
      value = argv[i + 1]
      if (value === undefined || value.startsWith('--')) throw new Error(`--${key} needs a value`)
      i++
    }
    raw[key] = value
  }
  const o = { socket: raw.socket, scenario: raw.scenario, extra: raw }
  if (!SCENARIOS.includes(o.scenario)) {
    throw new Error(`--scenario must be one of ${SCENARIOS.join('|')} (got ${o.scenario})`)
  }
  for (const [key, def] of Object.entries(NUMERIC)) {
    let v = def
    if (raw[key] !== undefined) {
      v = Number(raw[key])
      if (!Number.isInteger(v) || v < 0) throw new Error(`--${key} must be a non-negative integer`)
    }
    o[key.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = v
  }
  if (o.inflight === undefined) o.inflight = o.scenario === 'echo' ? 4 : 64
  if (o.inflight < 1) throw new Error('--inflight must be at least 1')
  return o
}

const round = (x, digits) => Number(x.toFixed(digits))
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Nearest-rank percentile of an ascending array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return NaN
  const rank = Math.ceil(p * sorted.length)
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]
}

function summarize(samplesUs) {
  const s = Float64Array.from(samplesUs).sort()
  let sum = 0
  for (let i = 0; i < s.length; i++) sum += s[i]
  return {
    p50_us: round(percentile(s, 0.5), 2),
    p99_us: round(percentile(s, 0.99), 2),
    mean_us: round(sum / s.length, 2),
    n: s.length,
  }
}

function checkAdd(r) {
  if (r !== 3) throw new Error(`add {a:1,b:2} answered ${JSON.stringify(r)}, expected 3`)
}

async function latency(client, o) {
  for (let i = 0; i < o.warmup; i++) checkAdd(await client.call('add', { a: 1, b: 2 }))
  const samples = new Float64Array(o.n)
  for (let i = 0; i < o.n; i++) {
    const t = process.hrtime.bigint()
    const r = await client.call('add', { a: 1, b: 2 })
    samples[i] = Number(process.hrtime.bigint() - t) / 1e3
    checkAdd(r)
  }
  return summarize(samples)
}

/**
 * Keeps `inflight` calls of `fire` outstanding: each completion starts the next one. Counts the
 * completions inside the measured window (after `warmupMs`) and returns completions per second.
 */
async function closedLoop(inflight, warmupMs, durationMs, fire) {
  let phase = 0 // 0 warm-up, 1 measuring, 2 stopping
  let count = 0
  const lane = async () => {
    while (phase < 2) {
      await fire()
      if (phase === 1) count++
    }
  }
  const lanes = []
  for (let i = 0; i < inflight; i++) lanes.push(lane())
  let failed = null
  const all = Promise.all(lanes).catch((e) => {
    failed = e
    phase = 2
  })
  await sleep(warmupMs)
  if (failed) throw failed
  phase = 1
  const t0 = process.hrtime.bigint()
  await sleep(durationMs)
  const counted = count
  const t1 = process.hrtime.bigint()
  phase = 2
  await all
  if (failed) throw failed
  return counted / (Number(t1 - t0) / 1e9)
}

async function throughput(client, o) {
  const fire = () => client.call('add', { a: 1, b: 2 }).then(checkAdd)
  const rate = await closedLoop(o.inflight, o.warmupMs, o.durationMs, fire)
  return { calls_per_s: Math.round(rate), inflight: o.inflight }
}

async function echo(client, o, spec) {
  const payload = Buffer.alloc(o.size)
  for (let i = 0; i < payload.length; i++) payload[i] = i & 0xff
  const params = spec.echo ? spec.echo.params(payload) : payload
  const size = spec.echo ? spec.echo.size : (r) => r.length
  const fire = () =>
    client.call('echo', params).then((r) => {
      if (size(r) !== o.size) throw new Error(`echo returned ${size(r)} bytes, expected ${o.size}`)
    })
  const rate = await closedLoop(o.inflight, o.warmupMs, o.durationMs, fire)
  return { mb_per_s: round((rate * o.size) / MB, 2), size: o.size }
}

/** Prints the one result line on stdout, then exits 0 once it is written. */
function emit(result) {
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0))
}

function fail(e) {
  process.stderr.write(`${process.argv[1]}: ${e && e.stack ? e.stack : e}\n`)
  process.exit(1)
}

/** The scenarios of a client that is not a client of the Rust worker: all but memory. */
const ALL_BUT_MEMORY = Object.freeze({
  latency: true,
  throughput: true,
  echo: true,
  first: true,
  memory: 'memory is measured only for clients of the Rust worker',
})

async function runClient(spec) {
  let o
  try {
    o = parseArgs()
  } catch (e) {
    fail(e.message)
    return
  }
  const support = spec.scenarios[o.scenario]
  if (support !== true) {
    emit({ skipped: typeof support === 'string' ? support : `${o.scenario} not supported` })
    return
  }
  try {
    let result
    if (o.scenario === 'first') {
      const t0 = performance.now()
      const client = await spec.connect(o)
      checkAdd(await client.call('add', { a: 1, b: 2 }))
      result = { first_ms: round(performance.now() - t0, 3) }
      await client.close()
    } else if (o.scenario === 'memory') {
      result = await spec.memory(o)
    } else {
      const client = await spec.connect(o)
      if (o.scenario === 'latency') result = await latency(client, o)
      else if (o.scenario === 'throughput') result = await throughput(client, o)
      else result = await echo(client, o, spec)
      await client.close()
    }
    emit(result)
  } catch (e) {
    fail(e)
  }
}

/**
 * Length-prefixed frames (4-byte big-endian body length + body), as in docs/protocol.md section 3.
 * `onFrame(buf, start, end)` gets each complete body; the buffer may be shared with later frames.
 * A frame split over many chunks is concatenated once, when its last byte has arrived.
 */
class FrameReader {
  constructor(onFrame) {
    this.onFrame = onFrame
    this.chunks = []
    this.len = 0 // bytes held in `chunks`
    this.need = 0 // bytes needed to finish the held frame, 0 while its prefix is incomplete
  }

  push(chunk) {
    if (this.len === 0) {
      this.parse(chunk)
      return
    }
    this.chunks.push(chunk)
    this.len += chunk.length
    if (this.need === 0 && this.len >= 4) {
      const head = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.len)
      this.need = 4 + head.readUInt32BE(0)
    }
    if (this.len < this.need || this.len < 4) return
    const buf = Buffer.concat(this.chunks, this.len)
    this.chunks = []
    this.len = 0
    this.need = 0
    this.parse(buf)
  }

  parse(buf) {
    const len = buf.length
    let off = 0
    while (len - off >= 4) {
      const end = off + 4 + buf.readUInt32BE(off)
      if (end > len) break
      this.onFrame(buf, off + 4, end)
      off = end
    }
    if (off < len) {
      const rest = off === 0 ? buf : buf.subarray(off)
      this.chunks = [rest]
      this.len = rest.length
      this.need = rest.length >= 4 ? 4 + rest.readUInt32BE(0) : 0
    }
  }
}

/**
 * Batches outgoing frames: `push(body)` (a Buffer) queues one length-prefixed frame; all frames
 * queued in one tick go out in a single socket.write (one copy into one buffer, one syscall).
 */
class FrameWriter {
  constructor(socket) {
    this.socket = socket
    this.bodies = []
    this.bytes = 0
    this.scheduled = false
    this.flush = this.flush.bind(this)
  }

  push(body) {
    this.bodies.push(body)
    this.bytes += 4 + body.length
    if (!this.scheduled) {
      this.scheduled = true
      process.nextTick(this.flush)
    }
  }

  flush() {
    this.scheduled = false
    const bodies = this.bodies
    if (bodies.length === 0 || this.socket.destroyed) return
    const out = Buffer.allocUnsafe(this.bytes)
    let off = 0
    for (let i = 0; i < bodies.length; i++) {
      const b = bodies[i]
      out.writeUInt32BE(b.length, off)
      out.set(b, off + 4)
      off += 4 + b.length
    }
    this.bodies = []
    this.bytes = 0
    return this.socket.write(out)
  }
}

/** Resolves once everything written to `socket` has been handed to the kernel. */
function drained(socket) {
  if (socket.writableLength === 0) return Promise.resolve()
  return new Promise((resolve, reject) => {
    socket.once('drain', resolve)
    socket.once('error', reject)
  })
}

/** Server side: removes a stale socket file before listening. */
function removeStale(path) {
  try {
    fs.rmSync(path, { force: true })
  } catch {}
}

/** Prints `ready <path>`; SIGTERM/SIGINT run `stop` (may return a promise), then exit 0. */
function serverReady(path, stop) {
  const onSignal = () => {
    Promise.resolve()
      .then(stop)
      .catch((e) => process.stderr.write(`${e}\n`))
      .finally(() => {
        removeStale(path)
        process.exit(0)
      })
  }
  process.once('SIGTERM', onSignal)
  process.once('SIGINT', onSignal)
  process.stdout.write(`ready ${path}\n`)
}

/** The functions every Node-side server answers (same names and results as the Rust worker). */
const handlers = {
  add: (p) => p.a + p.b,
  echo: (p) => p,
  sleep: (p) => new Promise((r) => setTimeout(() => r(p.ms), p.ms)),
}

/**
 * The pending-call table every hand-written peer needs: integer ids from 1, one resolver pair
 * per call, and every pending call failed at once when the transport ends. Subclasses send in
 * `call` through `track(send)`, settle answers with `settle`, and close their transport in
 * `shutdown()`.
 */
class BaseClient {
  constructor() {
    this.nextId = 1
    this.pending = new Map()
    this.closed = null
  }

  /** Sends a call with a fresh id (`send(id)`) and resolves with its answer. */
  track(send) {
    if (this.closed) return Promise.reject(this.closed)
    const id = this.nextId++
    send(id)
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }))
  }

  /** Ends call `id` with `error` or, when it is undefined, `result`. False for unknown ids. */
  settle(id, error, result) {
    const p = this.pending.get(id)
    if (p === undefined) return false
    this.pending.delete(id)
    if (error === undefined) p.resolve(result)
    else p.reject(error)
    return true
  }

  failAll(e) {
    if (this.closed) return
    this.closed = e
    for (const p of this.pending.values()) p.reject(e)
    this.pending.clear()
  }

  close() {
    this.failAll(new Error('client closed'))
    this.shutdown()
  }
}

/** Connects a node:net socket to a Unix socket path; `make(socket)` builds the client. */
function connectUnix(path, make) {
  const net = require('node:net')
  return new Promise((resolve, reject) => {
    const socket = net.connect(path)
    socket.once('error', reject)
    socket.once('connect', () => {
      socket.off('error', reject)
      resolve(make(socket))
    })
  })
}

module.exports = {
  ALL_BUT_MEMORY,
  BaseClient,
  connectUnix,
  MB,
  MIB,
  parseArgs,
  runClient,
  latency,
  throughput,
  echo,
  closedLoop,
  summarize,
  percentile,
  checkAdd,
  emit,
  fail,
  sleep,
  round,
  FrameReader,
  FrameWriter,
  drained,
  removeStale,
  serverReady,
  handlers,
}
