//! `NativeEngine`: one connection's protocol engine for the Node event loop.
//!
//! The wrapper feeds it the bytes its socket reads and writes out what
//! [`NativeEngine::take_output`] returns (once per tick, so a burst of calls shares one
//! `write`). Calls return promises that Rust settles while handling `feed`, `expire`,
//! `cancel` or `close`: a reply costs no thread hand-off. Values cross the boundary as
//! MessagePack buffers packed and unpacked by msgpackr in JS; envelopes, ids and deadlines
//! never leave Rust.

use std::time::{Duration, Instant};

use ferry_core::engine::{Deadline, Engine, EngineConfig, Event, InvokeOutcome, InvokeReply};
use ferry_core::message::normalize_whole_floats;
use ferry_core::{Error as CoreError, ErrorType, Payload, RequestId};
use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;
use slab::Slab;

use crate::error;
use crate::raw::{self, Deferred, FnRef, RawValue};

/// Kind tags of the items in the array returned by [`NativeEngine::feed`].
const INCOMING_CALL: u32 = 0;
const INCOMING_INVOKE: u32 = 1;

/// One connection's protocol state, driven by the JS wrapper from the Node event loop.
/// Internal: use `RpcClient`, `RpcServer` and `rpc` from the package instead.
#[napi(custom_finalize)]
pub struct NativeEngine {
    engine: Engine<Deferred>,
    unpack: Option<FnRef>,
    make_error: Option<FnRef>,
    /// The peer's calls being served by JS handlers, by the token JS answers with.
    calls: Slab<RequestId>,
    invokes: Slab<InvokeReply>,
    spare: Vec<u8>,
    last_id: u64,
    fatal: Option<String>,
}

fn bad_arg(msg: impl Into<String>) -> napi::Error {
    napi::Error::new(Status::InvalidArg, msg.into())
}

#[napi]
impl NativeEngine {
    /// Creates an engine. `maxFrameBytes`: the largest frame sent or accepted (0 means the
    /// default, 16 MiB). `sendCancel`: tell the peer when a call times out or is cancelled.
    /// `unpack(buffer)` turns a MessagePack buffer into a JS value; `makeError(code, message,
    /// errorType)` builds the error a failed call rejects with.
    #[napi(constructor)]
    pub fn new(
        env: Env,
        max_frame_bytes: u32,
        send_cancel: bool,
        unpack: Function,
        make_error: Function,
    ) -> Result<Self> {
        let max_frame = if max_frame_bytes == 0 {
            ferry_core::frame::DEFAULT_MAX_FRAME
        } else {
            max_frame_bytes as usize
        };
        Ok(NativeEngine {
            engine: Engine::new(EngineConfig {
                max_frame,
                send_cancel,
            }),
            unpack: Some(FnRef::new(env.raw(), unpack.raw())?),
            make_error: Some(FnRef::new(env.raw(), make_error.raw())?),
            calls: Slab::new(),
            invokes: Slab::new(),
            spare: Vec::new(),
            last_id: 0,
            fatal: None,
        })
    }

    fn hooks(&self) -> Result<(&FnRef, &FnRef)> {
        match (&self.unpack, &self.make_error) {
            (Some(u), Some(m)) => Ok((u, m)),
            _ => Err(napi::Error::new(
                Status::GenericFailure,
                "engine was finalized",
            )),
        }
    }

    fn settle(
        &self,
        env: sys::napi_env,
        d: Deferred,
        result: std::result::Result<Payload, CoreError>,
    ) {
        let Ok((unpack, make_error)) = self.hooks() else {
            return;
        };
        match result {
            Ok(payload) => match raw::buffer_copy(env, payload.as_bytes()) {
                Ok(buf) => match unpack.call(env, &[buf]) {
                    Ok(v) => raw::resolve(env, d, v),
                    Err(exception) => raw::reject(env, d, exception),
                },
                Err(e) => {
                    let err = error::build(env, make_error, "ERR_FERRY_INTERNAL", &e.reason, None);
                    raw::reject(env, d, err)
                }
            },
            Err(e) => raw::reject(env, d, error::to_js(env, make_error, &e)),
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

    fn start(
        &mut self,
        env: &Env,
        checked: std::result::Result<(), ferry_core::message::DecodeError>,
        begin: impl FnOnce(
            &mut Engine<Deferred>,
            Deferred,
        ) -> std::result::Result<u64, (CoreError, Deferred)>,
    ) -> Result<RawValue> {
        let env = env.raw();
        let (deferred, promise) = raw::create_promise(env)?;
        if let Err(e) = checked {
            let err = CoreError::Encode(format!("not one MessagePack value: {e}"));
            self.settle(env, deferred, Err(err));
            return Ok(RawValue(promise));
        }
        // 0 is never a call id: a call that fails at once must not leave the previous call's
        // id behind for the wrapper to cancel.
        self.last_id = 0;
        match begin(&mut self.engine, deferred) {
            Ok(id) => self.last_id = id,
            Err((e, deferred)) => self.settle(env, deferred, Err(e)),
        }
        Ok(RawValue(promise))
    }

    /// Queues an `rpc_call` of `name` with MessagePack-encoded `params`. Resolves with the
    /// unpacked result; rejects with an error carrying `code`. `timeoutMs <= 0`: no deadline.
    #[napi(ts_return_type = "Promise<unknown>")]
    pub fn call(
        &mut self,
        env: Env,
        name: String,
        mut params: BufferSlice,
        timeout_ms: f64,
    ) -> Result<RawValue> {
        let deadline = Self::deadline(timeout_ms);
        let checked = normalize_whole_floats(&mut params);
        self.start(&env, checked, |engine, d| {
            engine.call(&name, &params, deadline, d)
        })
    }

    /// Queues an `invoke_handler` of `handlerId` with a MessagePack-encoded request. Resolves
    /// with `{status, headers, body}`.
    #[napi(ts_return_type = "Promise<unknown>")]
    pub fn invoke(
        &mut self,
        env: Env,
        handler_id: String,
        mut request: BufferSlice,
        timeout_ms: f64,
    ) -> Result<RawValue> {
        let deadline = Self::deadline(timeout_ms);
        let checked = normalize_whole_floats(&mut request);
        self.start(&env, checked, |engine, d| {
            engine.invoke(&handler_id, &request, deadline, d)
        })
    }

    /// The id of the last call or invocation queued, for [`NativeEngine::cancel`]; 0 when the
    /// last one failed before it was queued.
    #[napi]
    pub fn last_call_id(&self) -> f64 {
        self.last_id as f64
    }

    /// Cancels a pending call: its promise rejects with `ERR_FERRY_CANCELLED`. Returns false
    /// when the call had already ended.
    #[napi]
    pub fn cancel(&mut self, env: Env, id: f64) -> bool {
        match self.engine.cancel(id as u64) {
            Some(d) => {
                self.settle(env.raw(), d, Err(CoreError::Cancelled));
                true
            }
            None => false,
        }
    }

    /// Feeds bytes read from the socket. Settles answered calls, answers health checks and
    /// bad messages, and returns the peer's calls for JS to run as a flat array
    /// `[kind, token, name, params, ...]` (kind 0: rpc_call, 1: invoke_handler), or null.
    /// After a fatal error (see `fatalReason`) the wrapper must flush and close the socket.
    #[napi(ts_return_type = "Array<number | string | Buffer> | null")]
    pub fn feed(&mut self, env: Env, chunk: BufferSlice) -> Result<RawValue> {
        let raw_env = env.raw();
        self.engine.feed(&chunk);
        let mut incoming: Vec<sys::napi_value> = Vec::new();
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Settled { token, result } => self.settle(raw_env, token, result),
                Event::Call {
                    request_id,
                    function_name,
                    params,
                } => {
                    // Build every JS value first: a failure must not leave a token behind.
                    let kind = raw::uint(raw_env, INCOMING_CALL)?;
                    let name = raw::string(raw_env, &function_name)?;
                    let params = raw::buffer_copy(raw_env, params.as_bytes())?;
                    let token = raw::uint(raw_env, self.calls.vacant_key() as u32)?;
                    self.calls.insert(request_id);
                    incoming.extend([kind, token, name, params]);
                }
                Event::Invoke { reply, request } => {
                    let kind = raw::uint(raw_env, INCOMING_INVOKE)?;
                    let handler = raw::string(raw_env, reply.handler_id())?;
                    let request = raw::buffer_copy(raw_env, request.as_bytes())?;
                    let token = raw::uint(raw_env, self.invokes.vacant_key() as u32)?;
                    self.invokes.insert(reply);
                    incoming.extend([kind, token, handler, request]);
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
        if incoming.is_empty() {
            return Ok(RawValue(raw::null(raw_env)));
        }
        let mut array = std::ptr::null_mut();
        raw::check(
            unsafe { sys::napi_create_array_with_length(raw_env, incoming.len(), &mut array) },
            "create array",
        )?;
        for (i, v) in incoming.into_iter().enumerate() {
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
        let buf = BufferSlice::copy_from(&env, &out)?;
        self.spare = out;
        // Do not keep a huge buffer around after one large message.
        if self.spare.capacity() > 1 << 20 {
            self.spare = Vec::new();
        }
        Ok(Some(buf))
    }

    /// Fails the calls whose deadline has passed with `ERR_FERRY_TIMEOUT`. Returns the
    /// milliseconds until the next deadline, or -1 when no call has one.
    #[napi]
    pub fn expire(&mut self, env: Env) -> f64 {
        for (d, e) in self.engine.expire(Instant::now()) {
            self.settle(env.raw(), d, Err(e));
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

    /// Ends the connection's protocol state: every pending call rejects, with
    /// `ERR_FERRY_CONNECTION_LOST` and `lostReason` when given, else `ERR_FERRY_CLOSED`.
    /// Later calls reject the same way.
    #[napi]
    pub fn close(&mut self, env: Env, lost_reason: Option<String>) {
        for (d, e) in self.engine.close(lost_reason) {
            self.settle(env.raw(), d, Err(e));
        }
        self.calls.clear();
        self.invokes.clear();
    }
}

impl ObjectFinalize for NativeEngine {
    fn finalize(mut self, env: Env) -> Result<()> {
        // A wrapper that is collected without closing still settles its calls: no promise is
        // left pending forever and no reference leaks.
        self.close(env, Some("the connection was garbage-collected".into()));
        if let Some(f) = self.unpack.take() {
            f.release(env.raw());
        }
        if let Some(f) = self.make_error.take() {
            f.release(env.raw());
        }
        Ok(())
    }
}
