'use strict'
// The Node floor: node:net to the raw std floor server (`floor-server std`), which echoes
// length-prefixed frames unchanged. No protocol at all: no encoding, no ids (replies come back
// in order), so it bounds what any Node client over a Unix socket could reach, Ferry included.
//   - a small call is a frame with a 24-byte body, as for the Rust floor client; its reply is
//     checked byte for byte and the call resolves to 3, so the scenario drivers' check holds;
//   - an echo sends the payload Buffer as the body and resolves to the reply's body: a view of
//     the chunk Node read (no copy) unless the frame was split over chunks (then one concat),
//     checked like the Rust floor's (length, first and last 16 bytes);
//   - frames written in one tick go out in one writev (the socket is corked for the tick): the
//     payload is written from the caller's Buffer, with no copy.
// Scenarios: latency, throughput, echo, first (memory is measured for clients of the worker).

const { runClient, connectUnix, FrameReader, ALL_BUT_MEMORY } = require('./common.cjs')

const SMALL = Buffer.alloc(24)
for (let i = 0; i < SMALL.length; i++) SMALL[i] = (i % 251) ^ 0x5a

function sameEnds(got, sent) {
  const k = Math.min(16, sent.length)
  return (
    got.length === sent.length &&
    got.compare(sent, 0, k, 0, k) === 0 &&
    got.compare(sent, sent.length - k, sent.length, got.length - k, got.length) === 0
  )
}

class Client {
  constructor(socket) {
    this.socket = socket
    // Calls in the order sent: the server answers in that order.
    this.queue = []
    this.head = 0
    this.corked = false
    this.closed = null
    this.uncork = () => {
      this.corked = false
      this.socket.uncork()
    }
    const reader = new FrameReader((buf, start, end) => this.onFrame(buf.subarray(start, end)))
    socket.on('data', (chunk) => reader.push(chunk))
    socket.on('error', (e) => this.failAll(e))
    socket.on('close', () => this.failAll(new Error('connection closed')))
  }

  call(fn, params) {
    if (this.closed) return Promise.reject(this.closed)
    const body = fn === 'add' ? SMALL : params
    if (!this.corked) {
      this.corked = true
      this.socket.cork()
      process.nextTick(this.uncork)
    }
    const head = Buffer.allocUnsafe(4)
    head.writeUInt32BE(body.length, 0)
    this.socket.write(head)
    this.socket.write(body)
    return new Promise((resolve, reject) => this.queue.push({ body, small: fn === 'add', resolve, reject }))
  }

  onFrame(got) {
    const call = this.queue[this.head]
    if (call === undefined) return this.failAll(new Error('a reply to no call'))
    this.queue[this.head++] = undefined
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head)
      this.head = 0
    }
    if (call.small) {
      if (got.equals(SMALL)) call.resolve(3)
      else call.reject(new Error('the small reply differs from the frame sent'))
    } else if (sameEnds(got, call.body)) {
      call.resolve(got)
    } else {
      call.reject(new Error('the echo differs from the payload sent'))
    }
  }

  failAll(e) {
    if (this.closed) return
    this.closed = e
    for (let i = this.head; i < this.queue.length; i++) this.queue[i]?.reject(e)
    this.queue = []
    this.head = 0
  }

  close() {
    this.failAll(new Error('client closed'))
    this.socket.destroy()
  }
}

runClient({
  scenarios: ALL_BUT_MEMORY,
  connect: (o) => connectUnix(o.socket, (socket) => new Client(socket)),
})
