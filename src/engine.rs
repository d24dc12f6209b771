//! `NativeEngine`: one connection's protocol engine for the Node event loop.
//!
//! The wrapper feeds it the bytes its socket reads and writes out what
//! [`NativeEngine::take_output`] returns (once per tick, so a burst of calls shares one
//! `write`). A call crosses into Rust once (`call` queues the frame and returns the call's id)
//! and its answer crosses back once per *read*, not per call: `feed` writes every result of
//! a read into one MessagePack buffer `[id, value, id, value, ...]` and hands it to the
//! wrapper's `deliver` hook, which unpacks it with one msgpackr call and resolves the
//! promises. Envelopes, ids, matching and deadlines stay in Rust. Every buffer from JS is
//! validated (one value, well-formed) before it is spliced into a frame, and whole numbers
//! that msgpackr wrote as float64 are rewritten as integers in place.

use std::time::{Duration, Instant};

use ferry_core::engine::{Deadline, Engine, EngineConfig, Event, InvokeOutcome, InvokeReply};
use ferry_core::message::normalize_whole_floats;
use ferry_core::{Error as CoreError, ErrorType, Payload, RequestId};
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use slab::Slab;

use crate::error;
use crate::raw::{self, FnRef, RawValue};

/// Kind tags of the items in the array returned by [`NativeEngine::take_incoming`].
const INCOMING_CALL: u32 = 0;
const INCOMING_INVOKE: u32 = 1;

/// Bits of the status returned by `feed` and `status`.
const STATUS_INCOMING: u32 = 1;
const STATUS_FATAL: u32 = 2;
const STATUS_OUTPUT: u32 = 4;
const STATUS_IDLE: u32 = 8;

enum Incoming {
    Call(RequestId, String, Payload),
    Invoke(InvokeReply, Payload),
}

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
    hooks: Option<Hooks>,
    /// The peer's calls decoded by `feed`, waiting for `takeIncoming`.
    incoming: Vec<Incoming>,
    /// The results of one `feed` as `[id, value, ...]`, for one `deliver` call.
    batch: Vec<u8>,
    /// The peer's calls being served by JS handlers, by the token JS answers with.
    calls: Slab<RequestId>,
    invokes: Slab<InvokeReply>,
    spare: Vec<u8>,
    /// Why the last `call`/`invoke` failed before it was queued (it returned 0).
    last_error: Option<CoreError>,
    fatal: Option<String>,
}

fn bad_arg(msg: impl Into<String>) -> napi::Error {
    napi::Error::new(Status::InvalidArg, msg.into())
}

#[napi]
impl NativeEngine {
    /// Creates an engine. `maxFrameBytes`: the largest frame sent or accepted (0 means the
    /// default, 16 MiB). `sendCancel`: tell the peer when a call times out or is cancelled.
    /// Hooks: `deliver(buffer)` gets the answered calls of one read as consecutive
    /// MessagePack values `id, result, id, result, ...`; `fail(id, error)` gets a call that
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
            hooks: Some(Hooks {
                deliver: FnRef::new(e, deliver.raw())?,
                fail: FnRef::new(e, fail.raw())?,
                make_error: FnRef::new(e, make_error.raw())?,
            }),
            incoming: Vec::new(),
            batch: Vec::new(),
            calls: Slab::new(),
            invokes: Slab::new(),
            spare: Vec::new(),
            last_error: None,
            fatal: None,
        })
    }

    /// Hands `[id, result, ...]` to the `deliver` hook; false when the hook threw (it settles
    /// nothing then: it unpacks the whole buffer before resolving any call).
    fn deliver(&self, env: sys::napi_env, pairs: &[u8]) -> bool {
        let Some(hooks) = &self.hooks else {
            return true;
        };
        match raw::buffer_copy(env, pairs) {
            Ok(buf) => hooks.deliver.call(env, &[buf]).is_ok(),
            Err(_) => false,
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
        let at = Instant::now().checked_add(timeout)?;
        Some(Deadline { at, timeout })
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
    /// (see `takeError`). `timeoutMs <= 0`: no deadline.
    #[napi]
    pub fn call(&mut self, name: String, mut params: BufferSlice, timeout_ms: f64) -> f64 {
        self.call_raw(&name, &mut params, timeout_ms)
    }

    /// `call`'s work, shared with the raw `fastCall` entry point.
    pub(crate) fn call_raw(&mut self, name: &str, params: &mut [u8], timeout_ms: f64) -> f64 {
        if let Err(e) = normalize_whole_floats(params) {
            return self.queued(Err((
                CoreError::Encode(format!("not one MessagePack value: {e}")),
                0,
            )));
        }
        let deadline = Self::deadline(timeout_ms);
        let r = self.engine.call_with_id(name, params, deadline);
        self.queued(r)
    }

    /// A type-tagged handle of this engine for the raw `fastCall(handle, name, params,
    /// timeoutMs)`, which is `call` without napi-rs's per-call overhead. Valid while this
    /// object is alive: keep both together.
    #[napi(ts_return_type = "object")]
    pub fn fast_handle(&mut self, env: Env) -> Result<RawValue> {
        crate::fast::make_handle(env.raw(), self as *mut NativeEngine).map(RawValue)
    }

    /// Queues an `invoke_handler` of `handlerId` with a MessagePack-encoded request; like
    /// `call`. It resolves to `{status, headers, body}`.
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
        self.queued(r)
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
        self.engine.cancel(id as u64).is_some()
    }

    /// Feeds bytes read from the socket: delivers the answered calls of this read in one
    /// `deliver` call, fails the failed ones, answers health checks and bad messages, and
    /// queues the peer's calls for `takeIncoming`. Returns the status bits: 1 incoming calls
    /// queued, 2 fatal (flush, then close the socket; see `fatalReason`), 4 frames to write,
    /// 8 idle (no call pending either way).
    #[napi]
    pub fn feed(&mut self, env: Env, chunk: BufferSlice) -> u32 {
        let raw_env = env.raw();
        self.engine.feed(&chunk);
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        // Each answered call's id and where its `[id, result]` pair ends in `batch`.
        let mut items: Vec<(u64, usize)> = Vec::new();
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Settled {
                    token,
                    result: Ok(payload),
                } => {
                    rmp::encode::write_uint(&mut batch, token).expect("Vec write");
                    batch.extend_from_slice(payload.as_bytes());
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
                } => self
                    .incoming
                    .push(Incoming::Call(request_id, function_name, params)),
                Event::Invoke { reply, request } => {
                    self.incoming.push(Incoming::Invoke(reply, request))
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
        if !items.is_empty() && !self.deliver(raw_env, &batch) {
            // msgpackr refused the batch (an extension type it does not know, say): deliver
            // call by call, so only the calls whose results it cannot unpack fail.
            let mut start = 0;
            for (id, end) in items {
                if !self.deliver(raw_env, &batch[start..end]) {
                    let e =
                        CoreError::Decode("the result could not be unpacked in JavaScript".into());
                    self.fail(raw_env, id, &e);
                }
                start = end;
            }
        }
        if batch.capacity() > 1 << 20 {
            batch = Vec::new();
        }
        self.batch = batch;
        self.status()
    }

    /// The status bits, as `feed` returns them.
    #[napi]
    pub fn status(&self) -> u32 {
        let mut bits = 0;
        if !self.incoming.is_empty() {
            bits |= STATUS_INCOMING;
        }
        if self.fatal.is_some() {
            bits |= STATUS_FATAL;
        }
        if self.engine.has_output() {
            bits |= STATUS_OUTPUT;
        }
        if self.engine.pending_len() == 0
            && self.calls.is_empty()
            && self.invokes.is_empty()
            && self.incoming.is_empty()
        {
            bits |= STATUS_IDLE;
        }
        bits
    }

    /// The peer's calls queued by `feed`, as a flat array `[kind, token, name, params, ...]`
    /// (kind 0: rpc_call, 1: invoke_handler). Answer each with its token.
    #[napi(ts_return_type = "Array<number | string | Buffer>")]
    pub fn take_incoming(&mut self, env: Env) -> Result<RawValue> {
        let raw_env = env.raw();
        let mut items: Vec<sys::napi_value> = Vec::with_capacity(self.incoming.len() * 4);
        for item in std::mem::take(&mut self.incoming) {
            match item {
                Incoming::Call(request_id, function_name, params) => {
                    // Build every JS value first: a failure must not leave a token behind.
                    let kind = raw::uint(raw_env, INCOMING_CALL)?;
                    let name = raw::string(raw_env, &function_name)?;
                    let params = raw::buffer_copy(raw_env, params.as_bytes())?;
                    let token = raw::uint(raw_env, self.calls.vacant_key() as u32)?;
                    self.calls.insert(request_id);
                    items.extend([kind, token, name, params]);
                }
                Incoming::Invoke(reply, request) => {
                    let kind = raw::uint(raw_env, INCOMING_INVOKE)?;
                    let handler = raw::string(raw_env, reply.handler_id())?;
                    let request = raw::buffer_copy(raw_env, request.as_bytes())?;
                    let token = raw::uint(raw_env, self.invokes.vacant_key() as u32)?;
                    self.invokes.insert(reply);
                    items.extend([kind, token, handler, request]);
                }
            }
        }
        let mut array = std::ptr::null_mut();
        raw::check(
            unsafe { sys::napi_create_array_with_length(raw_env, items.len(), &mut array) },
            "create array",
        )?;
        for (i, v) in items.into_iter().enumerate() {
            raw::check(
                unsafe { sys::napi_set_element(raw_env, array, i as u32, v) },
                "set element",
            )?;
        }
        Ok(RawValue(array))
    }

    /// Why the stream can no longer be trusted (an oversized length prefix), or null.
    #[napi(getter)]
    pub fn fatal_reason(&self) -> Option<String> {
        self.fatal.clone()
    }

    /// The frames queued since the last call, as one Buffer, or null when there are none.
    #[napi]
    pub fn take_output(&mut self, env: Env) -> Result<Option<BufferSlice<'_>>> {
        if !self.engine.has_output() {
            return Ok(None);
        }
        let spare = std::mem::take(&mut self.spare);
        let out = self.engine.take_output(spare);
        // Small batches are copied (cheap, and the buffer is reused); large ones are handed
        // over without a copy as an external buffer that frees the Vec when collected.
        if out.len() >= 32 * 1024 {
            return BufferSlice::from_data(&env, out).map(Some);
        }
        let buf = BufferSlice::copy_from(&env, &out)?;
        self.spare = out;
        Ok(Some(buf))
    }

    /// Fails the calls whose deadline has passed with `ERR_FERRY_TIMEOUT` (through `fail`).
    /// Returns the milliseconds until the next deadline, or -1 when no call has one.
    #[napi]
    pub fn expire(&mut self, env: Env) -> f64 {
        for (id, e) in self.engine.expire(Instant::now()) {
            self.fail(env.raw(), id, &e);
        }
        self.next_deadline_ms()
    }

    /// Milliseconds until the earliest deadline of a pending call, or -1 when none has one.
    #[napi]
    pub fn next_deadline_ms(&self) -> f64 {
        match self.engine.next_deadline() {
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
        let id = self
            .calls
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown call token"))?;
        match normalize_whole_floats(&mut result) {
            Ok(()) => self.engine.respond(&id, Ok(&result)),
            Err(e) => {
                let msg = format!("the result is not one MessagePack value: {e}");
                self.engine.respond(&id, Err((&msg, &ErrorType::Internal)));
            }
        }
        Ok(())
    }

    /// Answers the peer's call `token` with an `rpc_error`.
    #[napi]
    pub fn reply_error(&mut self, token: u32, message: String, error_type: String) -> Result<()> {
        let id = self
            .calls
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown call token"))?;
        self.engine
            .respond(&id, Err((&message, &ErrorType::parse(&error_type))));
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
        let reply = self
            .invokes
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown invocation token"))?;
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
        let reply = self
            .invokes
            .try_remove(token as usize)
            .ok_or_else(|| bad_arg("unknown invocation token"))?;
        let status = u16::try_from(status).unwrap_or(500);
        self.engine.respond_invoke(
            reply,
            InvokeOutcome::Error {
                code: &code,
                message: &message,
                status,
            },
        );
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
    }
}

impl ObjectFinalize for NativeEngine {
    fn finalize(mut self, env: Env) -> Result<()> {
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
