//! `NativeEngine`: one connection's protocol engine and socket on the Node event loop.
//!
//! The engine owns the connection's Unix socket, watched by libuv on Node's own loop (see
//! [`crate::socket`]): no thread sits between a call and the socket. A call crosses into Rust
//! once (the raw `call` queues the frame and returns the call's id); the frames queued in one
//! loop turn go out in one `send`. Answers cross back once per *read*, not per call: every result
//! of a read goes into one MessagePack buffer `[id, value, id, value, ...]` handed to the
//! wrapper's `deliver` hook, which unpacks it with one msgpackr call and resolves the
//! promises. Envelopes, ids, matching and deadlines stay in Rust. Every buffer from JS is
//! validated (one value, well-formed) before it is spliced into a frame, and whole numbers
//! that msgpackr wrote as float64 are rewritten as integers in place.

use std::time::{Duration, Instant};

use ferry_core::engine::{
    Deadline, EarlyWrites, Engine, EngineConfig, Event, InvokeOutcome, InvokeReply,
};
use ferry_core::frame::FrameDecoder;
use ferry_core::message::normalize_whole_floats;
use ferry_core::{Error as CoreError, ErrorType, RequestId};
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use slab::Slab;

use crate::error;
use crate::raw::{self, FnRef, RawValue};
use crate::socket::{Driver, JsScope, NativeSocket};
use crate::uv;

/// Kinds of the native socket's `onSocket(kind, arg)` events.
const SOCKET_INCOMING: u32 = 0;
const SOCKET_LOST: u32 = 1;
const SOCKET_FATAL: u32 = 2;
const SOCKET_CLOSED: u32 = 3;

/// How much one readable event reads at most before letting the loop go on.
const READ_BUDGET: usize = 4 << 20;

/// The least room one read gets (more when a frame's start says it needs more).
const READ_ROOM: usize = 16 * 1024;

/// Kind tags of the calls in the batch made by [`NativeEngine::incoming_batch`].
const INCOMING_CALL: u32 = 0;
const INCOMING_INVOKE: u32 = 1;

/// The array32 header at the start of a results batch.
const BATCH_HEADER: usize = 5;
/// A result this large makes `process` size its batch for the whole read at once.
const LARGE_RESULT: usize = 16 * 1024;

/// Binary params and JS handlers' binary results of at least this many bytes are written from
/// the caller's Buffer, at once, instead of copied into the turn's frames (when nothing else
/// waits to be written).
const WRITE_IN_PLACE: usize = 16 * 1024;

/// Bits of the status returned by `process`.
const STATUS_INCOMING: u32 = 1;
const STATUS_FATAL: u32 = 2;

struct Hooks {
    deliver: FnRef,
    fail: FnRef,
    make_error: FnRef,
}

/// One connection's protocol state, driven by the JS wrapper from the Node event loop.
/// Internal: use `RpcClient`, `RpcServer` and `rpc` from the package instead.
#[napi(custom_finalize)]
pub struct NativeEngine {
    /// Pending calls carry their own id as the token.
    engine: Engine<u64>,
    /// What was read from the socket and not yet handled (a frame's start, at most).
    input: FrameDecoder,
    hooks: Option<Hooks>,
    /// The peer's calls of one read, written by `process` as the MessagePack array that
    /// [`Self::incoming_batch`] hands to JS (its count is filled in then).
    incoming: Vec<u8>,
    /// Each of those calls: whether it is an `rpc_call` (else an invocation), its token, and
    /// where its four values end in `incoming`.
    incoming_items: Vec<(bool, usize, usize)>,
    /// The results of one read as the MessagePack array `[id, value, ...]`, for one `deliver`
    /// call.
    batch: Vec<u8>,
    /// Each result's call id and where its pair ends in `batch`.
    items: Vec<(u64, usize)>,
    /// The wrapper's scratch Buffer: batches that fit are copied there instead of into a new
    /// Buffer per read.
    scratch: Option<Buffer>,
    /// The peer's calls being served by JS handlers, by the token JS answers with.
    calls: Slab<RequestId>,
    invokes: Slab<InvokeReply>,
    spare: Vec<u8>,
    /// The end of a frame whose params are written from the caller's memory (see
    /// `call_interned_bin`), kept between calls.
    rest: Vec<u8>,
    /// Why the last `call`/`invoke` failed before it was queued (it returned 0).
    last_error: Option<CoreError>,
    fatal: Option<String>,
    /// The socket, once `connect` or `adopt` succeeded, until it is closed.
    socket: Option<NativeSocket>,
    /// The wrapper's `ref()`: hold the process open even when idle.
    user_ref: bool,
    /// `busyPollMicros`: how long to keep checking the socket before the loop waits.
    busy_poll: Duration,
    /// Input was read since the last busy poll (the peer is active).
    read_since_poll: bool,
    /// The earliest deadline when the wrapper last armed its timer (`nextDeadlineMs`): a call
    /// with an earlier deadline, or any deadline when there was none, needs it armed again.
    armed: Option<Instant>,
    /// Function names kept by `intern_name`, by id.
    names: Vec<String>,
    /// When frames go out before the end of the loop turn (see `flush_early`).
    early: EarlyWrites,
    /// The error of an early flush, left for the next regular flush to report (an early flush
    /// runs inside a call from JS, where the connection's loss cannot be announced).
    write_failed: Option<std::io::Error>,
}

/// `incoming`, ready for one more call: started afresh with an array32 header (its count
/// filled in later) before the first call of a read.
fn incoming_item<'a>(incoming: &'a mut Vec<u8>, items: &[(bool, usize, usize)]) -> &'a mut Vec<u8> {
    if items.is_empty() {
        incoming.clear();
        incoming.extend_from_slice(&[0xdd, 0, 0, 0, 0][..BATCH_HEADER]);
    }
    incoming
}

/// Appends one call's four values `kind, token, name, params` to the incoming batch.
fn write_incoming(out: &mut Vec<u8>, kind: u32, token: usize, name: &str, params: &[u8]) {
    rmp::encode::write_uint(out, kind as u64).expect("Vec write");
    rmp::encode::write_uint(out, token as u64).expect("Vec write");
    rmp::encode::write_str(out, name).expect("Vec write");
    out.extend_from_slice(params);
}

fn bad_arg(msg: impl Into<String>) -> napi::Error {
    napi::Error::new(Status::InvalidArg, msg.into())
}

#[napi]
impl NativeEngine {
    /// Creates an engine. `maxFrameBytes`: the largest frame sent or accepted (0 means the
    /// default, 16 MiB). `sendCancel`: tell the peer when a call times out or is cancelled.
    /// Hooks: `deliver(len, buffer)` gets the answered calls of one read as one MessagePack
    /// array `[id, result, id, result, ...]`, in the first `len` bytes of `scratch` when
    /// `buffer` is undefined (unpack it with copied binaries: `scratch` is reused), else in
    /// `buffer`, which is its own; `fail(id, error)` gets a call that
    /// failed (remote error, timeout, connection loss); `makeError(code, message, errorType)`
    /// builds the errors.
    #[napi(constructor)]
    pub fn new(
        env: Env,
        max_frame_bytes: u32,
        send_cancel: bool,
        deliver: Function,
        fail: Function,
        make_error: Function,
        scratch: Buffer,
    ) -> Result<Self> {
        let max_frame = if max_frame_bytes == 0 {
            ferry_core::frame::DEFAULT_MAX_FRAME
        } else {
            max_frame_bytes as usize
        };
        let e = env.raw();
        Ok(NativeEngine {
            engine: Engine::new(EngineConfig {
                max_frame,
                send_cancel,
            }),
            input: FrameDecoder::new(max_frame),
            hooks: Some(Hooks {
                deliver: FnRef::new(e, deliver.raw())?,
                fail: FnRef::new(e, fail.raw())?,
                make_error: FnRef::new(e, make_error.raw())?,
            }),
            incoming: Vec::new(),
            incoming_items: Vec::new(),
            batch: Vec::new(),
            items: Vec::new(),
            scratch: Some(scratch),
            calls: Slab::new(),
            invokes: Slab::new(),
            spare: Vec::new(),
            rest: Vec::new(),
            last_error: None,
            fatal: None,
            socket: None,
            user_ref: false,
            busy_poll: Duration::ZERO,
            read_since_poll: false,
            armed: None,
            names: Vec::new(),
            early: EarlyWrites::new(),
            write_failed: None,
        })
    }

    /// Calls the `deliver` hook; false when it threw (it settles nothing then: it unpacks the
    /// whole array before resolving any call).
    fn call_deliver(&self, env: sys::napi_env, args: [sys::napi_value; 2]) -> bool {
        match &self.hooks {
            Some(hooks) => hooks.deliver.call(env, &args).is_ok(),
            None => true,
        }
    }

    /// Hands one MessagePack array `[id, result, ...]` to the `deliver` hook, through the
    /// scratch Buffer when it fits, else in a new Buffer.
    fn deliver_bytes(&mut self, env: sys::napi_env, bytes: &[u8]) -> bool {
        self.bytes_args(env, bytes)
            .is_ok_and(|args| self.call_deliver(env, args))
    }

    /// `[len, undefined]` with `bytes` copied into the scratch Buffer when they fit, else
    /// `[undefined, buffer]` with a new Buffer: how MessagePack batches reach the wrapper.
    fn bytes_args(&mut self, env: sys::napi_env, bytes: &[u8]) -> Result<[sys::napi_value; 2]> {
        match self.scratch.as_mut() {
            Some(scratch) if bytes.len() <= scratch.len() => {
                scratch[..bytes.len()].copy_from_slice(bytes);
                raw::uint(env, bytes.len() as u32).map(|len| [len, raw::undefined(env)])
            }
            _ => raw::buffer_copy(env, bytes).map(|b| [raw::undefined(env), b]),
        }
    }

    /// After a batch was refused: delivers each `[id, result]` on its own and fails the calls
    /// whose result JS cannot unpack. `items` holds each pair's end in `batch`.
    fn deliver_each(&mut self, env: sys::napi_env, batch: &[u8], items: &[(u64, usize)]) {
        let mut start = BATCH_HEADER;
        let mut one = Vec::new();
        for &(id, end) in items {
            one.clear();
            one.push(0x92);
            one.extend_from_slice(&batch[start..end]);
            if !self.deliver_bytes(env, &one) {
                let e = CoreError::Decode("the result could not be unpacked in JavaScript".into());
                self.fail(env, id, &e);
            }
            start = end;
        }
    }

    /// Hands a failed call to the `fail` hook.
    fn fail(&self, env: sys::napi_env, id: u64, err: &CoreError) {
        let Some(hooks) = &self.hooks else { return };
        let js_err = error::to_js(env, &hooks.make_error, err);
        if let Ok(id) = raw::double(env, id as f64) {
            let _ = hooks.fail.call(env, &[id, js_err]);
        }
    }

    /// The deadline for a timeout in milliseconds; `None` (no deadline) for zero, infinite or
    /// out-of-range values. The wrapper rejects negative and NaN timeouts before this.
    fn deadline(timeout_ms: f64) -> Option<Deadline> {
        if timeout_ms.is_nan() || timeout_ms <= 0.0 {
            return None;
        }
        let timeout = Duration::try_from_secs_f64(timeout_ms / 1000.0).ok()?;
        // The usual timeouts (seconds) from the coarse clock: a precise reading costs about
        // 30 ns here, a tenth of the whole native call.
        Deadline::after_approx(timeout)
    }

    /// The id to return for a call queued with `deadline` (see `call`).
    fn queued_at(
        &mut self,
        r: std::result::Result<u64, (CoreError, u64)>,
        deadline: Option<Deadline>,
    ) -> f64 {
        let id = self.queued(r);
        match deadline {
            Some(d) if id > 0.0 && self.armed.is_none_or(|a| d.at < a) => {
                // Armed for this one until the wrapper asks `nextDeadlineMs`.
                self.armed = Some(d.at);
                -id
            }
            _ => id,
        }
    }

    fn queued(&mut self, r: std::result::Result<u64, (CoreError, u64)>) -> f64 {
        match r {
            Ok(id) => {
                self.last_error = None;
                id as f64
            }
            Err((e, _)) => {
                self.last_error = Some(e);
                0.0
            }
        }
    }

    /// Queues an `rpc_call` of `name` with MessagePack-encoded `params` and returns its id;
    /// the answer comes through `deliver` or `fail`. Returns 0 when the call failed at once
    /// (see `takeError`). `timeoutMs <= 0`: no deadline. The id comes back negated when the
    /// call's deadline is earlier than the one the wrapper's timer was last armed for (see
    /// `nextDeadlineMs`), or the timer is not armed: the wrapper then arms it again.
    #[napi]
    pub fn call(&mut self, name: String, mut params: BufferSlice, timeout_ms: f64) -> f64 {
        self.call_raw(&name, &mut params, timeout_ms)
    }

    /// `call`'s work, shared with the raw `call` entry point (`fastFunctions`).
    pub(crate) fn call_raw(&mut self, name: &str, params: &mut [u8], timeout_ms: f64) -> f64 {
        if let Err(e) = normalize_whole_floats(params) {
            return self.queued(Err((
                CoreError::Encode(format!("not one MessagePack value: {e}")),
                0,
            )));
        }
        let deadline = Self::deadline(timeout_ms);
        let r = self.engine.call_with_id(name, params, deadline);
        self.call_queued(r, deadline)
    }

    /// Keeps `name` for calls that name it by the returned id (`callNamed` of
    /// `fastFunctions`), so that a call need not copy its function name out of a JS string.
    /// Ids are small integers from 0, one per name asked for; the wrapper asks once per name,
    /// for a bounded number of names (`MAX_INTERNED_NAMES` in index.js), and calls other names
    /// by string.
    #[napi]
    pub fn intern_name(&mut self, name: String) -> u32 {
        self.names.push(name);
        (self.names.len() - 1) as u32
    }

    /// `call_raw` with a name `intern_name` kept; `None` for an id it did not give.
    pub(crate) fn call_interned(
        &mut self,
        name_id: u32,
        params: &mut [u8],
        timeout_ms: f64,
    ) -> Option<f64> {
        let name_id = name_id as usize;
        if name_id >= self.names.len() {
            return None;
        }
        if let Err(e) = normalize_whole_floats(params) {
            return Some(self.queued(Err((
                CoreError::Encode(format!("not one MessagePack value: {e}")),
                0,
            ))));
        }
        let deadline = Self::deadline(timeout_ms);
        let r = self
            .engine
            .call_with_id(&self.names[name_id], params, deadline);
        Some(self.call_queued(r, deadline))
    }

    /// `call_interned` with the params a MessagePack `bin` of `bytes` (a Buffer or Uint8Array
    /// passed as the params, which msgpackr would encode the same way): the bytes are copied
    /// once, straight into the frame, instead of packed by msgpackr and copied again.
    pub(crate) fn call_interned_bin(
        &mut self,
        name_id: u32,
        bytes: &[u8],
        timeout_ms: f64,
    ) -> Option<f64> {
        let name_id = name_id as usize;
        if name_id >= self.names.len() {
            return None;
        }
        let mut head = [0u8; 5];
        let Some(head) = ferry_core::message::bin_header(bytes.len(), &mut head) else {
            return Some(self.queued(Err((
                CoreError::Encode(format!("a binary of {} bytes is too long", bytes.len())),
                0,
            ))));
        };
        let deadline = Self::deadline(timeout_ms);
        if bytes.len() >= WRITE_IN_PLACE && self.can_write_now() {
            let mut rest = std::mem::take(&mut self.rest);
            rest.clear();
            let r = self.engine.call_split_with_id(
                &self.names[name_id],
                &[head],
                bytes,
                &mut rest,
                deadline,
            );
            if r.is_ok() {
                self.write_now(bytes, &rest);
            }
            self.rest = rest;
            return Some(self.call_queued(r, deadline));
        }
        let r = self
            .engine
            .call_parts_with_id(&self.names[name_id], &[head, bytes], deadline);
        Some(self.call_queued(r, deadline))
    }

    /// Whether frames can be written from this call, ahead of the turn's end: the socket
    /// is open and not ending, has nothing waiting to be written, and no write failed.
    fn can_write_now(&self) -> bool {
        self.write_failed.is_none()
            && self
                .socket
                .as_ref()
                .is_some_and(|s| !s.ending && !s.has_unwritten())
    }

    /// Writes what the engine has queued, then `payload` and `rest` (the rest of its last
    /// frame, which the engine left to the caller), from where they lie. A failure is kept
    /// for the turn's end to report, as with an early flush.
    fn write_now(&mut self, payload: &[u8], rest: &[u8]) {
        let Some(s) = self.socket.as_mut() else {
            return;
        };
        let out = self.engine.take_output(std::mem::take(&mut self.spare));
        if let Err(e) = s.write_parts::<NativeEngine, 3>([&out, payload, rest]) {
            self.write_failed = Some(e);
        }
        // The turn's end reports a failed write and holds the process open for the rest.
        s.arm::<NativeEngine>();
        self.spare = out;
    }

    fn call_queued(
        &mut self,
        r: std::result::Result<u64, (CoreError, u64)>,
        deadline: Option<Deadline>,
    ) -> f64 {
        let id = self.queued_at(r, deadline);
        self.flush_early();
        self.touched();
        id
    }

    /// This engine's raw entry points, `{call, callNamed, callBinNamed, reply, replyBin}`:
    /// `call(name,
    /// buffer, start, end, timeoutMs)` is `call` with the params `buffer[start..end]` and
    /// without napi-rs's per-call overhead, `callNamed(nameId, ...)` the same with a name
    /// `internName` kept, `callBinNamed(nameId, ...)` that with the params the MessagePack
    /// `bin` of those bytes, `reply(token, buffer, start, end)` is `reply` likewise, and
    /// `replyBin(token, ...)` answers with the `bin` of those bytes (see src/fast.rs). Each
    /// function keeps this engine alive.
    #[napi(
        ts_return_type = "{ call: (name: string, buffer: Uint8Array, start: number, end: number, timeoutMs: number) => number; callNamed: (nameId: number, buffer: Uint8Array, start: number, end: number, timeoutMs: number) => number; callBinNamed: (nameId: number, buffer: Uint8Array, start: number, end: number, timeoutMs: number) => number; reply: (token: number, buffer: Uint8Array, start: number, end: number) => void; replyBin: (token: number, buffer: Uint8Array, start: number, end: number) => void }"
    )]
    pub fn fast_functions(&mut self, env: Env, this: This) -> Result<RawValue> {
        // SAFETY: `this` wraps `self`, on the JS thread.
        unsafe {
            crate::fast::fast_functions(env.raw(), this.object.raw(), self as *mut NativeEngine)
        }
        .map(RawValue)
    }

    /// Queues an `invoke_handler` of `handlerId` with a MessagePack-encoded request; like
    /// `call` (including the negated id). It resolves to `{status, headers, body}`.
    #[napi]
    pub fn invoke(&mut self, handler_id: String, mut request: BufferSlice, timeout_ms: f64) -> f64 {
        if let Err(e) = normalize_whole_floats(&mut request) {
            return self.queued(Err((
                CoreError::Encode(format!("not one MessagePack value: {e}")),
                0,
            )));
        }
        let deadline = Self::deadline(timeout_ms);
        let r = self.engine.invoke_with_id(&handler_id, &request, deadline);
        let id = self.queued_at(r, deadline);
        self.flush_early();
        self.touched();
        id
    }

    /// The error of the last `call`/`invoke` that returned 0.
    #[napi(ts_return_type = "Error")]
    pub fn take_error(&mut self, env: Env) -> Result<RawValue> {
        let err = self.last_error.take().unwrap_or(CoreError::Closed);
        let hooks = self
            .hooks
            .as_ref()
            .ok_or_else(|| napi::Error::new(Status::GenericFailure, "engine was finalized"))?;
        Ok(RawValue(error::to_js(env.raw(), &hooks.make_error, &err)))
    }

    /// Forgets a pending call (the wrapper rejects it with `ERR_FERRY_CANCELLED`) and tells
    /// the peer. Returns false when the call had already ended.
    #[napi]
    pub fn cancel(&mut self, id: f64) -> bool {
        let found = self.engine.cancel(id as u64).is_some();
        self.touched();
        found
    }

    /// Acts on the frames read so far: delivers the answered calls of this read in one
    /// `deliver` call, fails the failed ones, answers health checks and bad messages, and
    /// writes the peer's calls for [`Self::incoming_batch`]. Values are copied once, straight
    /// from the read buffer into the batches. Returns the status bits: 1 incoming calls
    /// queued, 2 fatal (the stream cannot be trusted; see `fatal`).
    fn process(&mut self, raw_env: sys::napi_env) -> u32 {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        // An array32 header, its count filled in once known.
        batch.extend_from_slice(&[0xdd, 0, 0, 0, 0][..BATCH_HEADER]);
        let mut items = std::mem::take(&mut self.items);
        items.clear();
        // The results of this read take at most the bytes read (each frame's envelope is
        // larger than the id written in its stead): room for all of them is made at the first
        // large one, so that a batch of large results is not copied again each time it grows.
        // (Only then: a read of large incoming calls with a small answer among them must not
        // allocate the whole read's size for the answers.)
        let room = self.input.buffered();
        let mut reserved = false;
        let mut frames = self.input.frames();
        for frame in frames.by_ref() {
            let Some(ev) = self.engine.on_decoded(frame) else {
                continue;
            };
            match ev {
                Event::Settled {
                    token,
                    result: Ok(value),
                } => {
                    if !reserved && value.len() >= LARGE_RESULT {
                        batch.reserve(room);
                        reserved = true;
                    }
                    rmp::encode::write_uint(&mut batch, token).expect("Vec write");
                    batch.extend_from_slice(&value);
                    items.push((token, batch.len()));
                }
                Event::Settled {
                    token,
                    result: Err(e),
                } => self.fail(raw_env, token, &e),
                Event::Call {
                    request_id,
                    function_name,
                    params,
                } => {
                    let token = self.calls.insert(request_id);
                    let out = incoming_item(&mut self.incoming, &self.incoming_items);
                    write_incoming(out, INCOMING_CALL, token, &function_name, &params);
                    self.incoming_items.push((true, token, out.len()));
                }
                Event::Invoke { reply, request } => {
                    let out = incoming_item(&mut self.incoming, &self.incoming_items);
                    let token = self.invokes.vacant_key();
                    write_incoming(out, INCOMING_INVOKE, token, reply.handler_id(), &request);
                    let token = self.invokes.insert(reply);
                    self.incoming_items.push((false, token, out.len()));
                }
                // JS handlers run to completion; their answer is then ignored by the peer.
                Event::Cancel { .. } => {}
                Event::Warning(_) => {}
                Event::Fatal(e) => {
                    self.fatal = Some(e.to_string());
                    break;
                }
            }
        }
        let consumed = frames.consumed();
        self.input.consume(consumed);
        if !items.is_empty() {
            let count = (2 * items.len()) as u32;
            batch[1..BATCH_HEADER].copy_from_slice(&count.to_be_bytes());
            let fits = self
                .scratch
                .as_ref()
                .is_some_and(|s| batch.len() <= s.len());
            if fits {
                if !self.deliver_bytes(raw_env, &batch) {
                    // msgpackr refused the batch (an extension type it does not know, say):
                    // deliver call by call, so only the calls it cannot unpack fail.
                    self.deliver_each(raw_env, &batch, &items);
                }
            } else {
                // Too big for the scratch Buffer: handed over whole, without a copy. Its bytes
                // stay readable through the Buffer (alive in this handle scope) for a retry.
                match raw::buffer_from_vec(raw_env, std::mem::take(&mut batch)) {
                    Ok((buf, ptr, len)) => {
                        if !self.call_deliver(raw_env, [raw::undefined(raw_env), buf]) {
                            // SAFETY: the Buffer owning these bytes is alive in this scope.
                            let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                            self.deliver_each(raw_env, bytes, &items);
                        }
                    }
                    Err(_) => {
                        let e = CoreError::Decode("out of memory for the results".into());
                        for &(id, _) in &items {
                            self.fail(raw_env, id, &e);
                        }
                    }
                }
            }
        }
        if batch.capacity() > 1 << 20 {
            batch = Vec::new();
        }
        self.items = items;
        self.batch = batch;
        self.status()
    }

    fn status(&self) -> u32 {
        let mut bits = 0;
        if !self.incoming_items.is_empty() {
            bits |= STATUS_INCOMING;
        }
        if self.fatal.is_some() {
            bits |= STATUS_FATAL;
        }
        bits
    }

    /// The peer's calls written by `process`, as one MessagePack array `[kind, token, name,
    /// params, ...]` (kind 0: rpc_call, 1: invoke_handler; for an invocation, `name` is the
    /// handler id and `params` the request), which the wrapper unpacks with one msgpackr call.
    /// Also returns each call's kind, token and where its four values end in the array. JS
    /// answers each call with its token.
    fn incoming_batch(&mut self) -> (Vec<u8>, Vec<(bool, usize, usize)>) {
        let mut batch = std::mem::take(&mut self.incoming);
        let items = std::mem::take(&mut self.incoming_items);
        if !items.is_empty() {
            let count = (4 * items.len()) as u32;
            batch[1..BATCH_HEADER].copy_from_slice(&count.to_be_bytes());
        }
        (batch, items)
    }

    /// The peer's call JS answers with `token`, no longer pending.
    fn take_call(&mut self, token: u32) -> Result<RequestId> {
        self.calls
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown call token"))
    }

    /// The peer's invocation JS answers with `token`, no longer pending.
    fn take_invoke(&mut self, token: u32) -> Result<InvokeReply> {
        self.invokes
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown invocation token"))
    }

    /// Answers a call of the peer that JS could not take (its params do not unpack in JS, or V8
    /// is out of memory) and forgets its token.
    fn refuse_token(&mut self, is_call: bool, token: usize) {
        if is_call {
            if let Some(id) = self.calls.try_remove(token) {
                let why = "params could not be decoded in JavaScript";
                self.engine
                    .respond(&id, Err((why, &ErrorType::InvalidParams)));
            }
        } else if let Some(reply) = self.invokes.try_remove(token) {
            self.engine.respond_invoke(
                reply,
                InvokeOutcome::Error {
                    code: ferry_core::message::codes::HANDLER_EXECUTION_ERROR,
                    message: "the request could not be decoded in JavaScript",
                    status: 500,
                },
            );
        }
    }

    /// Fails the calls whose deadline has passed with `ERR_FERRY_TIMEOUT` (through `fail`).
    /// Returns the milliseconds until the next deadline, or -1 when no call has one.
    #[napi]
    pub fn expire(&mut self, env: Env) -> f64 {
        for (id, e) in self.engine.expire(Instant::now()) {
            self.fail(env.raw(), id, &e);
        }
        self.touched();
        self.next_deadline_ms()
    }

    /// Milliseconds until the earliest deadline of a pending call, or -1 when none has one.
    /// The wrapper arms its timer with this (and only then): later calls with an earlier
    /// deadline come back with a negated id.
    #[napi]
    pub fn next_deadline_ms(&mut self) -> f64 {
        self.armed = self.engine.next_deadline();
        match self.armed {
            Some(at) => at.saturating_duration_since(Instant::now()).as_secs_f64() * 1000.0,
            None => -1.0,
        }
    }

    /// The number of our calls awaiting an answer.
    #[napi(getter)]
    pub fn pending(&self) -> u32 {
        self.engine.pending_len() as u32
    }

    /// The number of the peer's calls and invocations that JS has not answered yet.
    #[napi(getter)]
    pub fn serving(&self) -> u32 {
        (self.calls.len() + self.invokes.len()) as u32
    }

    /// Answers the peer's call `token` with a MessagePack-encoded result.
    #[napi]
    pub fn reply(&mut self, token: u32, mut result: BufferSlice) -> Result<()> {
        self.reply_raw(token, &mut result)
    }

    /// `reply`'s work, shared with the raw `reply` entry point (`fastFunctions`).
    pub(crate) fn reply_raw(&mut self, token: u32, result: &mut [u8]) -> Result<()> {
        let id = self.take_call(token)?;
        match normalize_whole_floats(result) {
            Ok(()) => self.engine.respond(&id, Ok(result)),
            Err(e) => {
                let msg = format!("the result is not one MessagePack value: {e}");
                self.engine.respond(&id, Err((&msg, &ErrorType::Internal)));
            }
        }
        self.flush_early();
        self.touched();
        Ok(())
    }

    /// Answers the peer's call `token` with the MessagePack `bin` of `bytes` (a Buffer or
    /// Uint8Array a JS handler returned, which msgpackr would encode the same way), copied
    /// once, straight into the frame, or from 16 KiB written from where it lies when the
    /// socket has nothing else waiting (as large params are).
    pub(crate) fn reply_bin(&mut self, token: u32, bytes: &[u8]) -> Result<()> {
        let id = self.take_call(token)?;
        let mut head = [0u8; 5];
        match ferry_core::message::bin_header(bytes.len(), &mut head) {
            // Large, and the socket free: written from the caller's memory, now.
            Some(head) if bytes.len() >= WRITE_IN_PLACE && self.can_write_now() => {
                if self.engine.respond_split(&id, &[head], bytes) {
                    self.write_now(bytes, &[]);
                }
            }
            Some(head) => self.engine.respond_parts(&id, &[head, bytes]),
            None => {
                let msg = format!("a binary of {} bytes is too long", bytes.len());
                self.engine.respond(&id, Err((&msg, &ErrorType::Internal)));
            }
        }
        self.flush_early();
        self.touched();
        Ok(())
    }

    /// Answers the peer's call `token` with an `rpc_error`.
    #[napi]
    pub fn reply_error(&mut self, token: u32, message: String, error_type: String) -> Result<()> {
        let id = self.take_call(token)?;
        self.engine
            .respond(&id, Err((&message, &ErrorType::parse(&error_type))));
        self.flush_early();
        self.touched();
        Ok(())
    }

    /// Answers the peer's invocation `token` with a `handler_response`; `headers` and `body`
    /// are MessagePack-encoded.
    #[napi]
    pub fn reply_route(
        &mut self,
        token: u32,
        status: u32,
        mut headers: BufferSlice,
        mut body: BufferSlice,
    ) -> Result<()> {
        let reply = self.take_invoke(token)?;
        let status = u16::try_from(status).unwrap_or(500);
        if normalize_whole_floats(&mut headers).is_err()
            || normalize_whole_floats(&mut body).is_err()
        {
            let outcome = InvokeOutcome::Error {
                code: ferry_core::message::codes::HANDLER_EXECUTION_ERROR,
                message: "the handler's response is not encodable",
                status: 500,
            };
            self.engine.respond_invoke(reply, outcome);
        } else {
            self.engine.respond_invoke(
                reply,
                InvokeOutcome::Response {
                    status,
                    headers: &headers,
                    body: &body,
                },
            );
        }
        self.flush_early();
        self.touched();
        Ok(())
    }

    /// Answers the peer's invocation `token` with an `error {code, message, status}`.
    #[napi]
    pub fn reply_route_error(
        &mut self,
        token: u32,
        code: String,
        message: String,
        status: u32,
    ) -> Result<()> {
        let reply = self.take_invoke(token)?;
        let status = u16::try_from(status).unwrap_or(500);
        self.engine.respond_invoke(
            reply,
            InvokeOutcome::Error {
                code: &code,
                message: &message,
                status,
            },
        );
        self.flush_early();
        self.touched();
        Ok(())
    }

    /// Ends the connection's protocol state: every pending call fails (through `fail`), with
    /// `ERR_FERRY_CONNECTION_LOST` and `lostReason` when given, else `ERR_FERRY_CLOSED`.
    /// Later calls fail the same way.
    #[napi]
    pub fn close(&mut self, env: Env, lost_reason: Option<String>) {
        for (id, e) in self.engine.close(lost_reason) {
            self.fail(env.raw(), id, &e);
        }
        self.calls.clear();
        self.invokes.clear();
        self.incoming.clear();
        self.incoming_items.clear();
        self.user_ref = false;
        self.touched();
    }
}

/// The native socket: Rust owns the connection's socket and libuv watches it on Node's loop.
#[napi]
impl NativeEngine {
    /// Connects to the Unix socket at `path` without blocking and, on success, owns it:
    /// reads, writes and answers happen in Rust on the JS thread, and `onSocket(kind, arg)`
    /// reports what JS must act on (0: the peer's calls, as `takeIncoming` returns them;
    /// 1: the connection was lost, with the reason; 2: the stream is untrusted, with the
    /// reason: close it; 3: an ended socket finished writing and closed). Returns 0, or the
    /// errno of the failed connect (EAGAIN: the listener's backlog is full, retry).
    #[napi]
    pub fn connect(
        &mut self,
        env: Env,
        this: This,
        path: String,
        on_socket: Function,
    ) -> Result<i32> {
        use socket2::{Domain, SockAddr, Type};
        let attempt = (|| {
            let addr = SockAddr::unix(&path)?;
            let sock = socket2::Socket::new(Domain::UNIX, Type::STREAM, None)?;
            sock.set_nonblocking(true)?;
            match sock.connect(&addr) {
                Ok(()) => Ok(sock),
                // Not seen with Unix sockets on Linux; elsewhere, treat as busy and retry.
                Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {
                    Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
                }
                Err(e) => Err(e),
            }
        })();
        match attempt {
            Ok(sock) => self.attach(env, this, sock, on_socket).map(|()| 0),
            Err(e) => Ok(errno_of(&e)),
        }
    }

    /// Takes over a connected socket accepted by Node (`fd` of a paused `net.Socket`): the
    /// descriptor is duplicated, so the caller destroys its socket afterwards. Like `connect`.
    #[napi]
    pub fn adopt(&mut self, env: Env, this: This, fd: i32, on_socket: Function) -> Result<i32> {
        use std::os::fd::BorrowedFd;
        if fd < 0 {
            return Err(bad_arg("adopt: not a file descriptor"));
        }
        // SAFETY: the caller's socket owns `fd` and keeps it open during this call.
        match unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() {
            Ok(owned) => {
                let sock = socket2::Socket::from(owned);
                sock.set_nonblocking(true)?;
                self.attach(env, this, sock, on_socket).map(|()| 0)
            }
            Err(e) => Ok(errno_of(&e)),
        }
    }

    fn attach(
        &mut self,
        env: Env,
        this: This,
        sock: socket2::Socket,
        on_socket: Function,
    ) -> Result<()> {
        if self.socket.is_some() {
            return Err(bad_arg("the engine already has a socket"));
        }
        let hook = FnRef::new(env.raw(), on_socket.raw())?;
        let owner = self as *mut NativeEngine;
        // SAFETY: on the JS thread; `this` wraps `self`, and the socket holds a strong
        // reference to it while open, so `owner` stays valid for the handles.
        let socket =
            unsafe { NativeSocket::open(env.raw(), this.object.raw(), owner, sock, hook)? };
        self.socket = Some(socket);
        self.touched();
        Ok(())
    }

    /// Keeps the process alive while the socket is open, even when idle (`ref()`), or only
    /// while calls are pending either way (the default).
    #[napi]
    pub fn set_ref(&mut self, on: bool) {
        self.user_ref = on;
        self.touched();
    }

    /// Busy-polling (`busyPollMicros`; 0, the default, turns it off): at the end of each turn
    /// of the event loop in which this connection wrote calls or read anything, and while
    /// calls are pending or the peer is active, keep checking the socket for up to this many
    /// microseconds before the loop waits, yielding the CPU between checks, so that an answer
    /// that comes soon finds the thread awake. Values are capped at one second.
    #[napi]
    pub fn set_busy_poll(&mut self, micros: f64) -> Result<()> {
        if micros.is_nan() || micros < 0.0 {
            return Err(bad_arg(format!(
                "busyPollMicros must be a number of microseconds >= 0, got {micros}"
            )));
        }
        self.busy_poll = Duration::from_secs_f64(micros.min(1e6) / 1e6);
        Ok(())
    }

    /// Writes the queued frames now, as far as the socket takes them. Returns the error that
    /// ended the connection, or null.
    #[napi]
    pub fn flush_socket(&mut self) -> Option<String> {
        self.flush_out().err().map(|e| format!("socket error: {e}"))
    }

    /// Stops reading and closes the socket once the queued frames are written. Returns true
    /// when it is closed already; otherwise `onSocket(3)` follows.
    #[napi]
    pub fn end_socket(&mut self) -> bool {
        let Some(s) = self.socket.as_mut() else {
            return true;
        };
        s.ending = true;
        s.stop_reading::<NativeEngine>();
        let done = match self.flush_out() {
            Ok(()) => !self.socket.as_ref().is_some_and(|s| s.has_unwritten()),
            Err(_) => true,
        };
        if done {
            self.close_socket();
        }
        done
    }

    /// Closes the socket now; unwritten frames are dropped.
    #[napi]
    pub fn destroy_socket(&mut self) {
        self.close_socket();
    }
}

impl NativeEngine {
    /// After anything that may queue frames or change what is pending: makes sure the frames
    /// go out this loop turn, and holds the process open exactly while something is pending.
    #[inline]
    fn touched(&mut self) {
        if let Some(s) = self.socket.as_mut() {
            if self.engine.has_output() {
                s.arm::<NativeEngine>();
            }
        }
        self.update_ref();
    }

    /// Refs the poll handle exactly while something is pending: our calls, the peer's calls
    /// being answered by JS, or bytes not yet written (a reply must not be lost because the
    /// loop had nothing else to do), or while the user asked for `ref()`.
    #[inline]
    fn update_ref(&mut self) {
        if let Some(s) = self.socket.as_mut() {
            let busy = self.user_ref
                || self.engine.pending_len() != 0
                || !self.calls.is_empty()
                || !self.invokes.is_empty()
                || self.engine.has_output()
                || s.has_unwritten();
            // An ending socket is held by the wrapper's close timer instead.
            s.set_ref(busy && !s.ending);
        }
    }

    /// Called after a call or an answer was queued: writes the frames queued in this loop turn
    /// now, rather than at its end, when [`EarlyWrites`] says so, so that the peer starts on
    /// them while JS goes on queuing more (measured on a 2-core VM, unpinned, 64 calls in
    /// flight: about 2x the calls per second, +15-30% with 1,024; docs/benchmarks.md).
    #[inline]
    fn flush_early(&mut self) {
        let len = self.engine.output_len();
        if !self.early.due(len) || self.write_failed.is_some() {
            return;
        }
        let r = self.flush_out();
        self.early.wrote(len);
        if let Err(e) = r {
            self.write_failed = Some(e);
        }
        // The turn's end must run `on_prepare` (even with nothing left to write): it reports a
        // failed write and starts the next turn's count of early writes.
        if let Some(s) = self.socket.as_mut() {
            s.arm::<NativeEngine>();
        }
    }

    /// Moves the engine's queued frames to the socket and writes what it takes.
    fn flush_out(&mut self) -> std::io::Result<()> {
        if let Some(e) = self.write_failed.take() {
            return Err(e);
        }
        let Some(s) = self.socket.as_mut() else {
            return Ok(());
        };
        s.disarm();
        if self.engine.has_output() {
            if !s.has_unwritten() {
                let spare = std::mem::take(&mut s.wbuf);
                s.wbuf = self.engine.take_output(spare);
                s.wpos = 0;
            } else {
                let out = self.engine.take_output(std::mem::take(&mut self.spare));
                s.wbuf.drain(..s.wpos);
                s.wpos = 0;
                s.wbuf.extend_from_slice(&out);
                self.spare = out;
            }
        }
        let r = s.write_pending::<NativeEngine>();
        self.update_ref();
        r
    }

    /// Busy-polling (see `set_busy_poll`): called where the loop is about to wait, after this
    /// turn's frames were written. Polls only while the connection is in use: calls of ours
    /// pending, or input read since the last poll (the peer may have more to send).
    fn busy_wait(&mut self) {
        if self.busy_poll.is_zero() {
            return;
        }
        let active = std::mem::take(&mut self.read_since_poll);
        if !active && self.engine.pending_len() == 0 {
            return;
        }
        let Some(s) = self.socket.as_ref() else {
            return;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&s.sock);
        let until = Instant::now() + self.busy_poll;
        while !ferry_core::engine::readable_now(fd) && Instant::now() < until {
            // With both processes on one core, the peer must run for the answer to come.
            // SAFETY: no arguments; cannot fail on Linux.
            unsafe { libc::sched_yield() };
        }
    }

    fn close_socket(&mut self) {
        if let Some(s) = self.socket.take() {
            // SAFETY: on the JS thread (every caller is a JS call or a libuv callback).
            unsafe { s.close::<NativeEngine>(true) };
        }
    }

    /// Calls `onSocket(kind, arg)`. No borrow of the engine may be held: JS may call back in.
    ///
    /// # Safety
    /// `this` is live, on the JS thread, inside a [`JsScope`].
    unsafe fn emit(this: *mut NativeEngine, kind: u32, arg: Option<sys::napi_value>) {
        let Some(env) = (*this).socket.as_ref().map(|s| s.env) else {
            return;
        };
        let arg = arg.unwrap_or_else(|| raw::undefined(env));
        if let Err(exception) = Self::call_hook(this, kind, [arg, raw::undefined(env)]) {
            // The wrapper's hook does not throw here; if it ever does, report it like any
            // exception thrown from an I/O callback.
            sys::napi_fatal_exception(env, exception);
        }
    }

    /// Calls `onSocket(kind, a, b)`; the exception it threw, if any.
    unsafe fn call_hook(
        this: *mut NativeEngine,
        kind: u32,
        [a, b]: [sys::napi_value; 2],
    ) -> std::result::Result<(), sys::napi_value> {
        let Some(s) = (*this).socket.as_ref() else {
            return Ok(());
        };
        let env = s.env;
        let hook = s.hook.clone_raw();
        let kind = raw::uint(env, kind).unwrap_or(std::ptr::null_mut());
        hook.call(env, &[kind, a, b]).map(|_| ())
    }

    /// Hands the peer's calls of one read to JS as one MessagePack array (`onSocket(0, len)`
    /// over the scratch Buffer, or `onSocket(0, undefined, buffer)`). If JS cannot unpack it
    /// (the hook throws before any handler runs), each call is handed over on its own, and
    /// the ones that still do not unpack are answered with an error.
    unsafe fn hand_incoming(this: *mut NativeEngine, env: sys::napi_env) {
        let (batch, items) = (*this).incoming_batch();
        let taken = match (*this).bytes_args(env, &batch) {
            Ok(args) => Self::call_hook(this, SOCKET_INCOMING, args).is_ok(),
            Err(_) => false,
        };
        if taken {
            return;
        }
        let mut start = BATCH_HEADER;
        let mut one = Vec::new();
        for (is_call, token, end) in items {
            one.clear();
            one.push(0x94);
            one.extend_from_slice(&batch[start..end]);
            start = end;
            let taken = match (*this).bytes_args(env, &one) {
                Ok(args) => Self::call_hook(this, SOCKET_INCOMING, args).is_ok(),
                Err(_) => false,
            };
            if !taken {
                (*this).refuse_token(is_call, token);
            }
        }
    }

    unsafe fn emit_reason(this: *mut NativeEngine, kind: u32, reason: &str) {
        let Some(env) = (*this).socket.as_ref().map(|s| s.env) else {
            return;
        };
        if let Ok(r) = raw::string(env, reason) {
            Self::emit(this, kind, Some(r));
        }
    }

    /// Reads what the socket has (up to [`READ_BUDGET`]); returns whether the peer hung up
    /// and the error that ended the stream, if any.
    fn read_socket(&mut self) -> (bool, Option<std::io::Error>) {
        use std::io::Read;
        let Some(s) = self.socket.as_ref() else {
            return (false, None);
        };
        let mut total = 0;
        loop {
            let room = self.input.spare(READ_ROOM);
            let want = room.len();
            match (&s.sock).read(room) {
                Ok(0) => return (true, None),
                Ok(n) => {
                    self.input.filled(n);
                    total += n;
                    // A short read means the socket is drained (the poll is level-triggered:
                    // anything arriving meanwhile fires it again).
                    if n < want || total >= READ_BUDGET {
                        return (false, None);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (false, None),
                Err(e) => return (false, Some(e)),
            }
        }
    }
}

const EINPROGRESS: i32 = libc::EINPROGRESS;

fn errno_of(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n) if n > 0 => n,
        _ => match e.kind() {
            std::io::ErrorKind::WouldBlock => libc::EAGAIN,
            std::io::ErrorKind::NotFound => libc::ENOENT,
            // A path too long for a socket address, or with a NUL.
            _ => libc::EINVAL,
        },
    }
}

// JS runs inside these callbacks (hooks, handlers, promise continuations) and may call back
// into the engine at once (the raw `call`, `reply`, `close`...). So no `&mut NativeEngine` is
// held across a call into JS here: each step re-borrows through the raw pointer. (`process` does hold
// one while `deliver` and `fail` run: those hooks only settle promises, whose continuations run
// later, when the callback scope closes.)
impl Driver for NativeEngine {
    unsafe fn on_poll(this: *mut Self, status: std::ffi::c_int, events: std::ffi::c_int) {
        if events & uv::UV_READABLE != 0 {
            (*this).read_since_poll = true;
        }
        let Some(s) = (*this).socket.as_ref() else {
            return;
        };
        let scope = JsScope::open(s);
        let env = s.env;
        // libuv reports an error condition (the peer reset the connection, say) as a negative
        // status, with the handle stopped. Bytes received before it still count: read first.
        let failed = status < 0;
        let failure = || {
            let e = (*this)
                .socket
                .as_ref()
                .and_then(|s| s.sock.take_error().ok().flatten())
                .unwrap_or_else(|| std::io::Error::from_raw_os_error(-status));
            format!("socket error: {e}")
        };
        if s.ending {
            // Only writing is left; done when written, or when it cannot be.
            let done = failed
                || match (*this).flush_out() {
                    Ok(()) => !(*this).socket.as_ref().is_some_and(|s| s.has_unwritten()),
                    Err(_) => true,
                };
            if done {
                Self::emit(this, SOCKET_CLOSED, None);
                (*this).close_socket();
            }
        } else {
            let mut lost = None;
            if !failed && events & uv::UV_WRITABLE != 0 {
                if let Err(e) = (*this).flush_out() {
                    lost = Some(format!("socket error: {e}"));
                }
            }
            if failed || events & uv::UV_READABLE != 0 {
                let (eof, err) = (*this).read_socket();
                let bits = (*this).process(env);
                if bits & STATUS_INCOMING != 0 {
                    Self::hand_incoming(this, env);
                }
                if bits & STATUS_FATAL != 0 {
                    if let Some(s) = (*this).socket.as_mut() {
                        s.stop_reading::<NativeEngine>();
                    }
                    let reason = (*this).fatal.clone().unwrap_or_default();
                    Self::emit_reason(this, SOCKET_FATAL, &reason);
                    lost = None;
                } else if lost.is_none() {
                    lost = match err {
                        Some(e) => Some(format!("socket error: {e}")),
                        None if eof => Some("peer closed the connection".to_string()),
                        None if failed => Some(failure()),
                        None => None,
                    };
                }
            }
            if let Some(reason) = lost {
                Self::emit_reason(this, SOCKET_LOST, &reason);
            }
        }
        (*this).touched();
        // Promise continuations run here: a sequential caller queues its next call.
        drop(scope);
        (*this).early.end_batch();
        if (*this).socket.as_ref().is_some_and(|s| !s.ending) {
            if let Err(e) = (*this).flush_out() {
                let Some(s) = (*this).socket.as_ref() else {
                    return;
                };
                let _scope = JsScope::open(s);
                Self::emit_reason(this, SOCKET_LOST, &format!("socket error: {e}"));
                return;
            }
            (*this).busy_wait();
        }
    }

    unsafe fn on_prepare(this: *mut Self) {
        (*this).early.end_batch();
        let written = (*this).flush_out();
        let Some(s) = (*this).socket.as_ref() else {
            return;
        };
        let ending_done = s.ending && (written.is_err() || !s.has_unwritten());
        if written.is_ok() && !s.ending {
            (*this).busy_wait();
        }
        if written.is_err() || ending_done {
            let _scope = JsScope::open(s);
            match written {
                _ if ending_done => {
                    Self::emit(this, SOCKET_CLOSED, None);
                    (*this).close_socket();
                }
                Err(e) => Self::emit_reason(this, SOCKET_LOST, &format!("socket error: {e}")),
                Ok(()) => {}
            }
        }
    }

    unsafe fn on_teardown(this: *mut Self) {
        if let Some(s) = (*this).socket.take() {
            s.close::<NativeEngine>(false);
        }
    }
}

impl ObjectFinalize for NativeEngine {
    fn finalize(mut self, env: Env) -> Result<()> {
        // Only at environment teardown can an engine with an open socket be collected.
        if let Some(s) = self.socket.take() {
            unsafe { s.close::<NativeEngine>(false) };
        }
        // The wrapper holding the promises is gone too; just release the references.
        self.engine
            .close(Some("the connection was garbage-collected".into()));
        if let Some(h) = self.hooks.take() {
            h.deliver.release(env.raw());
            h.fail.release(env.raw());
            h.make_error.release(env.raw());
        }
        Ok(())
    }
}
