//! Named Rust functions that answer the peer's `rpc_call`s, and route handlers that answer its
//! `invoke_handler`s.
//!
//! Register typed functions (`P: Deserialize`, `R: Serialize`) sync or async, or the raw form
//! `Fn(String, Value) -> Result<Value, String>`. Params that do not decode into `P` are
//! answered with `InvalidParams`; an `Err` from the function with `HandlerError` (or the
//! [`ErrorType`] of a returned [`Rejection`]); a panic with `Internal` by the driver.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::ErrorType;
use std::borrow::Cow;

use crate::message::{Payload, RequestId};
use crate::rt::Connection;

/// A dynamic MessagePack value, as the raw function form receives and returns it.
pub use rmpv::Value;

/// Why a function did not produce a result; becomes an `rpc_error` (or, for routes, an
/// `error` message with `code`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The wire `error_type`.
    pub kind: ErrorType,
    /// The message sent to the caller.
    pub message: String,
}

impl Rejection {
    /// A rejection of the given kind.
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Rejection {
        Rejection {
            kind,
            message: message.into(),
        }
    }

    /// `HandlerError`: the function ran and failed.
    pub fn handler(message: impl Display) -> Rejection {
        Rejection::new(ErrorType::HandlerError, message.to_string())
    }

    /// `InvalidParams`: the arguments are wrong.
    pub fn invalid_params(message: impl Display) -> Rejection {
        Rejection::new(ErrorType::InvalidParams, message.to_string())
    }
}

/// Errors a typed function may return: any `Display` error becomes `HandlerError`; return a
/// [`Rejection`] to choose the type.
pub trait IntoRejection {
    /// The rejection sent to the caller.
    fn into_rejection(self) -> Rejection;
}

impl IntoRejection for Rejection {
    fn into_rejection(self) -> Rejection {
        self
    }
}

impl IntoRejection for String {
    fn into_rejection(self) -> Rejection {
        Rejection::handler(self)
    }
}

impl IntoRejection for &str {
    fn into_rejection(self) -> Rejection {
        Rejection::handler(self)
    }
}

impl IntoRejection for crate::Error {
    fn into_rejection(self) -> Rejection {
        Rejection::handler(self)
    }
}

impl IntoRejection for std::io::Error {
    fn into_rejection(self) -> Rejection {
        Rejection::handler(self)
    }
}

impl IntoRejection for std::convert::Infallible {
    fn into_rejection(self) -> Rejection {
        match self {}
    }
}

/// Where a [`Router::msgpack_fn`] writes its result: the end of the buffer that holds the
/// answers to one read, right after its own answer's header. It only appends (the bytes
/// before the function's own belong to other answers), as `Vec<u8>` methods of the same
/// names and as a [`std::io::Write`], so `rmp::encode` and `rmp_serde::encode::write` can
/// write into it.
#[derive(Debug)]
pub struct MsgpackOut<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl MsgpackOut<'_> {
    /// Appends bytes.
    #[inline]
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends one byte.
    #[inline]
    pub fn push(&mut self, byte: u8) {
        self.buf.push(byte);
    }

    /// Makes room for at least `additional` more bytes.
    #[inline]
    pub fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
    }

    /// The bytes this function has written so far.
    #[inline]
    pub fn written(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// How many bytes this function has written so far.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether this function has written nothing yet.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` bytes this function wrote (no effect if it wrote fewer).
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(self.start.saturating_add(len));
    }
}

impl std::io::Write for MsgpackOut<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    #[inline]
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a handler knows about the call it serves.
#[derive(Clone)]
pub struct Context {
    /// The connection the call arrived on: a handler may call the peer back on it.
    pub connection: Connection,
    /// The peer's id for this call (`None` for an id-less `invoke_handler`).
    pub request_id: Option<RequestId>,
}

/// An HTTP-like request, as `invoke_handler` carries it (ZapJS's shape).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request path.
    pub path: String,
    /// Header names to values (nil or absent on the wire reads as empty).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub headers: HashMap<String, String>,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<HashMap<String, String>>,
    /// Path parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<HashMap<String, String>>,
    /// The body, if any (usually a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

fn not_found(name: &str) -> Rejection {
    Rejection::new(ErrorType::NotFound, format!("no function named `{name}`"))
}

/// Reads nil (or an absent field) as the type's default.
fn nil_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An HTTP-like response, as `handler_response` carries it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HttpResponse {
    /// HTTP status.
    pub status: u16,
    /// Header names to values (nil or absent on the wire reads as empty).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub headers: HashMap<String, String>,
    /// The body (usually a string; nil when absent).
    #[serde(default = "nil")]
    pub body: Value,
}

fn nil() -> Value {
    Value::Nil
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The future of one dispatched call.
pub type CallFuture = BoxFuture<Result<Payload, Rejection>>;
type CallFn = dyn Fn(Context, Payload) -> BoxFuture<Result<Payload, Rejection>> + Send + Sync;
/// A synchronous function: runs at once and appends its encoded result to the buffer.
type SyncFn = dyn Fn(&[u8], &mut Vec<u8>) -> Result<(), Rejection> + Send + Sync;
type RouteFn = dyn Fn(Context, Payload) -> BoxFuture<Result<HttpResponse, Rejection>> + Send + Sync;

/// A function over raw MessagePack: its result is spliced into the answer without a copy.
type PayloadFn = dyn Fn(Payload) -> Result<Payload, Rejection> + Send + Sync;

#[derive(Clone)]
enum Function {
    /// Called in place by [`Router::dispatch_into`]: no future, no allocation of its own.
    Sync(Arc<SyncFn>),
    /// Called in place too; its result goes out as it is.
    Payload(Arc<PayloadFn>),
    Async(Arc<CallFn>),
}

/// How a call handed to [`Router::dispatch_into`] goes on.
pub enum Dispatched {
    /// The function ran to completion; on `Ok` its MessagePack result was appended to the
    /// buffer, on `Err` the buffer is as it was.
    Done(Result<(), Rejection>),
    /// A [`Router::payload_fn`] ran to completion and returned these bytes (the buffer is
    /// untouched).
    Value(Payload),
    /// The function is asynchronous: this future (not polled yet) produces the result.
    Future(CallFuture),
}

/// A table of functions and route handlers. Cheap to clone; build it before serving.
#[derive(Clone, Default)]
pub struct Router {
    functions: FxHashMap<String, Function>,
    routes: FxHashMap<String, Arc<RouteFn>>,
}

fn decode_params<P: DeserializeOwned>(params: &[u8]) -> Result<P, Rejection> {
    crate::fast_de::from_slice(params).or_else(|e| {
        if matches!(e, rmp_serde::decode::Error::DepthLimitExceeded) {
            return Err(Rejection::invalid_params(format!(
                "params do not match: {e}"
            )));
        }
        // JavaScript numbers are doubles: msgpack encoders in JS write whole numbers beyond
        // 32 bits as float64. Retry with whole floats as integers, so `{n: 2**40}` fits a
        // `u64` field. Only the failure path pays for this.
        let mut value = crate::message::value_within_limit(params).unwrap_or(Value::Nil);
        if integralize(&mut value) {
            if let Ok(p) = Payload::from_value(&value).decode() {
                return Ok(p);
            }
        }
        Err(Rejection::invalid_params(format!(
            "params do not match: {e}"
        )))
    })
}

/// Replaces floats that hold whole numbers within the 64-bit integer range by integers.
/// Returns whether anything changed.
fn integralize(v: &mut Value) -> bool {
    match v {
        Value::F64(x) if x.fract() == 0.0 && *x >= i64::MIN as f64 && *x < 2f64.powi(64) => {
            *v = if *x < 0.0 {
                Value::from(*x as i64)
            } else {
                Value::from(*x as u64)
            };
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| integralize(i) | changed),
        Value::Map(entries) => entries
            .iter_mut()
            .fold(false, |changed, (_, i)| integralize(i) | changed),
        _ => false,
    }
}

fn encode_result<R: Serialize>(r: &R) -> Result<Payload, Rejection> {
    Payload::encode(r).map_err(|e| Rejection::new(ErrorType::Internal, e.to_string()))
}

fn encode_result_into<R: Serialize>(r: &R, out: &mut Vec<u8>) -> Result<(), Rejection> {
    Payload::encode_into(r, out).map_err(|e| Rejection::new(ErrorType::Internal, e.to_string()))
}

impl Router {
    /// An empty router.
    pub fn new() -> Router {
        Router::default()
    }

    /// Registers an async function that also receives the call's [`Context`].
    pub fn async_fn_ctx<P, R, E, F, Fut>(mut self, name: &str, f: F) -> Router
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: IntoRejection + Send + 'static,
        F: Fn(Context, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.functions.insert(
            name.to_owned(),
            Function::Async(Arc::new(move |ctx, params: Payload| {
                let f = f.clone();
                Box::pin(async move {
                    let p = decode_params::<P>(params.as_bytes())?;
                    let r = f(ctx, p).await.map_err(IntoRejection::into_rejection)?;
                    encode_result(&r)
                })
            })),
        );
        self
    }

    /// Registers an async function `async fn(P) -> Result<R, E>`.
    pub fn async_fn<P, R, E, F, Fut>(self, name: &str, f: F) -> Router
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: IntoRejection + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        self.async_fn_ctx(name, move |_ctx, p| f(p))
    }

    /// Registers a sync function `fn(P) -> Result<R, E>`. It runs on a runtime thread: keep
    /// it short, or use [`Router::async_fn`] with `spawn_blocking` for heavy work.
    pub fn sync_fn<P, R, E, F>(mut self, name: &str, f: F) -> Router
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: IntoRejection + Send + 'static,
        F: Fn(P) -> Result<R, E> + Send + Sync + 'static,
    {
        self.functions.insert(
            name.to_owned(),
            Function::Sync(Arc::new(move |params: &[u8], out: &mut Vec<u8>| {
                let p = decode_params::<P>(params)?;
                let r = f(p).map_err(IntoRejection::into_rejection)?;
                encode_result_into(&r, out)
            })),
        );
        self
    }

    /// Registers a function in the raw form `Fn(name, params) -> Result<value, message>`;
    /// errors become `HandlerError`.
    pub fn raw_fn<F>(mut self, name: &str, f: F) -> Router
    where
        F: Fn(String, Value) -> Result<Value, String> + Send + Sync + 'static,
    {
        let owned = name.to_owned();
        self.functions.insert(
            name.to_owned(),
            Function::Sync(Arc::new(move |params: &[u8], out: &mut Vec<u8>| {
                let Some(params) = crate::message::value_within_limit(params) else {
                    return Err(Rejection::invalid_params(
                        "params do not match: depth limit exceeded",
                    ));
                };
                let v = f(owned.clone(), params).map_err(Rejection::handler)?;
                rmpv::encode::write_value(out, &v).expect("writing to a Vec cannot fail");
                Ok(())
            })),
        );
        self
    }

    /// Registers a function over raw MessagePack: it gets the params exactly as received (one
    /// validated value, copied out of the read buffer once) and returns its result
    /// encoded, which is spliced into the answer as is. For proxies, caches and byte-heavy
    /// functions that gain nothing from decoding; see [`Payload::decode`] and
    /// [`Payload::encode`] to work with the bytes. `Err` is answered like [`Router::sync_fn`]'s.
    pub fn payload_fn<E, F>(mut self, name: &str, f: F) -> Router
    where
        E: IntoRejection + Send + 'static,
        F: Fn(Payload) -> Result<Payload, E> + Send + Sync + 'static,
    {
        self.functions.insert(
            name.to_owned(),
            Function::Payload(Arc::new(move |params: Payload| {
                f(params).map_err(IntoRejection::into_rejection)
            })),
        );
        self
    }

    /// Registers a function over raw MessagePack that works in place: `f(params, out)` gets
    /// the params exactly as received (one validated value, borrowed from the read buffer
    /// for the duration of the call) and writes its result, one MessagePack value, to `out`
    /// (a [`MsgpackOut`]: appends only, straight into the frame that answers the call),
    /// which is answered as is. Nothing is copied or allocated for the call beyond what `f`
    /// writes, which makes it the cheapest way to move bytes (an echo, a transform of a
    /// binary, a lookup answered from memory). Use [`Router::payload_fn`] to keep the params
    /// past the call. A result that is not exactly one MessagePack value is answered with an
    /// `Internal` error instead; `Err` is answered like [`Router::sync_fn`]'s (either way,
    /// whatever `f` wrote is dropped).
    pub fn msgpack_fn<E, F>(mut self, name: &str, f: F) -> Router
    where
        E: IntoRejection + Send + 'static,
        F: Fn(&[u8], &mut MsgpackOut<'_>) -> Result<(), E> + Send + Sync + 'static,
    {
        let name_for_errors = name.to_owned();
        self.functions.insert(
            name.to_owned(),
            Function::Sync(Arc::new(move |params: &[u8], out: &mut Vec<u8>| {
                let start = out.len();
                let r = f(params, &mut MsgpackOut { buf: out, start })
                    .map_err(IntoRejection::into_rejection);
                if r.is_ok() {
                    if let Err(e) = crate::message::validate_value(&out[start..]) {
                        out.truncate(start);
                        return Err(Rejection::new(
                            ErrorType::Internal,
                            format!(
                                "function `{name_for_errors}` returned bytes that are not one \
                                 MessagePack value: {e}"
                            ),
                        ));
                    }
                }
                r
            })),
        );
        self
    }

    /// Registers a route handler for `invoke_handler` with this `handler_id`. Its request is
    /// decoded into `Req` (use [`HttpRequest`] for ZapJS's shape); a failed decode or an `Err`
    /// is answered with `error {code: HANDLER_EXECUTION_ERROR}`.
    pub fn route<Req, E, F, Fut>(mut self, handler_id: &str, f: F) -> Router
    where
        Req: DeserializeOwned + Send + 'static,
        E: IntoRejection + Send + 'static,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HttpResponse, E>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.routes.insert(
            handler_id.to_owned(),
            Arc::new(move |ctx, request: Payload| {
                let f = f.clone();
                Box::pin(async move {
                    let req = decode_params::<Req>(request.as_bytes())?;
                    f(ctx, req).await.map_err(IntoRejection::into_rejection)
                })
            }),
        );
        self
    }

    /// Whether a function of this name is registered.
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// Runs the named function. No user code runs before the future is polled (so a panic
    /// surfaces from `poll`, where drivers catch it); the future is `'static` so drivers can
    /// spawn it. [`Router::dispatch_into`] is the cheaper form for drivers.
    pub fn dispatch(
        &self,
        ctx: Context,
        name: &str,
        params: Payload,
    ) -> BoxFuture<Result<Payload, Rejection>> {
        match self.functions.get(name) {
            Some(Function::Async(f)) => f(ctx, params),
            Some(Function::Sync(f)) => {
                let f = f.clone();
                Box::pin(async move {
                    let mut out = Vec::new();
                    f(params.as_bytes(), &mut out)?;
                    Ok(Payload::from_encoded(out))
                })
            }
            Some(Function::Payload(f)) => {
                let f = f.clone();
                Box::pin(async move { f(params) })
            }
            None => Box::pin(std::future::ready(Err(not_found(name)))),
        }
    }

    /// Runs the named function as cheaply as it can be run, on `params` (one MessagePack
    /// value's bytes, borrowed from the frame they came in): a synchronous one (registered
    /// with [`Router::sync_fn`] or [`Router::raw_fn`]) runs right here on the borrowed bytes
    /// and appends its encoded result to `out`, with no future and no allocation of its own;
    /// a [`Router::payload_fn`] runs right here (on a copy of borrowed params) and its result
    /// is returned as is; an asynchronous one gets its [`Context`] from `ctx` and a copy of
    /// borrowed params, and is returned as a future, not polled yet. User code may panic
    /// inside this call: drivers catch it (and then cut `out` back to its length before the
    /// call).
    pub fn dispatch_into(
        &self,
        name: &str,
        params: Cow<'_, [u8]>,
        ctx: impl FnOnce() -> Context,
        out: &mut Vec<u8>,
    ) -> Dispatched {
        match self.functions.get(name) {
            Some(Function::Sync(f)) => {
                let start = out.len();
                let r = f(&params, out);
                if r.is_err() {
                    out.truncate(start);
                }
                Dispatched::Done(r)
            }
            Some(Function::Payload(f)) => match f(Payload::from_cow(params)) {
                Ok(result) => Dispatched::Value(result),
                Err(rejection) => Dispatched::Done(Err(rejection)),
            },
            Some(Function::Async(f)) => Dispatched::Future(f(ctx(), Payload::from_cow(params))),
            None => Dispatched::Done(Err(not_found(name))),
        }
    }

    /// Runs the route handler with this id; `None` when there is none.
    pub fn dispatch_route(
        &self,
        ctx: Context,
        handler_id: &str,
        request: Payload,
    ) -> Option<BoxFuture<Result<HttpResponse, Rejection>>> {
        self.routes.get(handler_id).map(|f| f(ctx, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug, PartialEq)]
    struct N {
        n: u64,
        list: Vec<i64>,
    }

    #[test]
    fn whole_floats_decode_into_integer_fields() {
        let p = Payload::from_value(&Value::Map(vec![
            (Value::from("n"), Value::F64(2f64.powi(40))),
            (
                Value::from("list"),
                Value::Array(vec![Value::F64(-3.0), Value::from(4)]),
            ),
        ]));
        assert_eq!(
            decode_params::<N>(p.as_bytes()).unwrap(),
            N {
                n: 1 << 40,
                list: vec![-3, 4]
            }
        );
        let frac = Payload::from_value(&Value::Map(vec![
            (Value::from("n"), Value::F64(1.5)),
            (Value::from("list"), Value::Array(vec![])),
        ]));
        assert_eq!(
            decode_params::<N>(frac.as_bytes()).unwrap_err().kind,
            ErrorType::InvalidParams
        );
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    enum Nest {
        Leaf,
        Node(Box<Nest>),
    }

    /// Params nested far deeper than the decoding limit, given to functions that take a
    /// recursive type or a dynamic value, are refused with InvalidParams on a thread's default
    /// stack: every path that reads them (the typed decode, its retry with whole floats as
    /// integers, the dynamic value) would otherwise recurse once per level.
    #[test]
    fn params_nested_too_deep_are_invalid_params_not_a_stack_overflow() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let router = Router::new()
                    .sync_fn("nest", |_: Nest| Ok::<_, String>(0))
                    .sync_fn("value", |_: Value| Ok::<_, String>(0))
                    .raw_fn("raw", |_, v| Ok(v));
                let variants = [b"\x81\xa4Node".repeat(100_000), b"\xa4Leaf".to_vec()].concat();
                let arrays = [vec![0x91; 100_000], vec![0xc0]].concat();
                for (name, bytes) in [("nest", &variants), ("value", &arrays), ("raw", &arrays)] {
                    let params = Cow::Borrowed(&bytes[..]);
                    let mut out = Vec::new();
                    // Synchronous functions take no context.
                    let ctx = || -> Context { unreachable!() };
                    match router.dispatch_into(name, params, ctx, &mut out) {
                        Dispatched::Done(Err(r)) => {
                            assert_eq!(r.kind, ErrorType::InvalidParams, "{name}: {}", r.message);
                            assert!(r.message.contains("depth limit"), "{name}: {}", r.message);
                        }
                        _ => panic!("{name}: deep params were not refused"),
                    }
                }
                assert_eq!(Payload::from_encoded(arrays).to_value(), Value::Nil);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
