//! Calls through `Connection` against an in-process `Server` over real Unix sockets: typed, raw
//! and binary functions, error kinds, panics, timeouts, concurrency, both directions on one
//! connection, and cancellation by dropping a call.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{within, TestServer};
use ferry_core::router::{Context, HttpRequest, HttpResponse, Value};
use ferry_core::{
    CallOptions, Connection, ConnectionConfig, EngineConfig, Error, ErrorType, IoMode, MsgpackOut,
    Payload, Rejection, Router,
};
use serde::{de::IgnoredAny, Deserialize};
use serde_json::json;
use tokio::sync::{mpsc, Notify};

// ---------------------------------------------------------------------------------------------
// A router mirroring the worker example's functions, plus a few for the tests below.

#[derive(Deserialize)]
struct Pair {
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct N {
    n: u64,
}

#[derive(Deserialize)]
struct Ms {
    ms: u64,
}

/// Whole numbers come back as integers, like the worker's.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.007_199_254_740_992e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn fibonacci(n: u64) -> Result<u64, Rejection> {
    if n > 93 {
        return Err(Rejection::invalid_params(
            "n must be at most 93 (fib(94) overflows u64)",
        ));
    }
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    Ok(a)
}

async fn panic_after_await(_: IgnoredAny) -> Result<(), String> {
    tokio::task::yield_now().await;
    panic!("async panic was called")
}

fn worker_router() -> Router {
    Router::new()
        .sync_fn("add", |p: Pair| Ok::<_, String>(number(p.a + p.b)))
        .sync_fn("fibonacci", |p: N| fibonacci(p.n))
        .async_fn("multiply_async", |p: Pair| async move {
            tokio::task::yield_now().await;
            Ok::<_, String>(number(p.a * p.b))
        })
        .async_fn("sleep", |p: Ms| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok::<_, String>(p.ms)
        })
        .raw_fn("echo", |_name, params| Ok(params))
        .raw_fn("whoami", |name, _params| Ok(Value::from(name)))
        .raw_fn("bytes", |_name, params| {
            let n = params.as_u64().unwrap_or(4);
            Ok(Value::Binary(
                (0..n).map(|i| (i * 37 % 256) as u8).collect(),
            ))
        })
        .raw_fn("raw_fail", |_name, _params| Err("raw failure".to_string()))
        .payload_fn("payload_echo", Ok::<_, String>)
        .msgpack_fn("msgpack_echo", |p: &[u8], out: &mut MsgpackOut<'_>| {
            out.extend_from_slice(p);
            Ok::<_, String>(())
        })
        // Answers its params' length, or writes what its params say to test the checks.
        .msgpack_fn(
            "msgpack_write",
            |p: &[u8], out: &mut MsgpackOut<'_>| match p {
                // "torn": a bin header announcing more bytes than follow.
                [0xa4, b't', b'o', b'r', b'n'] => {
                    out.extend_from_slice(&[0xc4, 9, 1, 2]);
                    Ok(())
                }
                // "two": two values.
                [0xa3, b't', b'w', b'o'] => {
                    out.extend_from_slice(&[0x01, 0x02]);
                    Ok(())
                }
                // "fail": an error after writing.
                [0xa4, b'f', b'a', b'i', b'l'] => {
                    out.push(0x07);
                    Err(Rejection::new(ErrorType::InvalidParams, "no"))
                }
                _ => {
                    rmp::encode::write_uint(out, p.len() as u64).unwrap();
                    Ok(())
                }
            },
        )
        .payload_fn("payload_len", |p: Payload| {
            if p.is_nil() {
                return Err(Rejection::new(ErrorType::InvalidParams, "params required"));
            }
            Payload::encode(&p.as_bytes().len()).map_err(Rejection::handler)
        })
        .sync_fn("unit", |_: ()| Ok::<_, String>("got unit"))
        .sync_fn("maybe_add", |p: Option<Pair>| {
            Ok::<_, String>(p.map(|p| number(p.a + p.b)))
        })
        .sync_fn("fail", |_: IgnoredAny| {
            Err::<(), _>("fail was called: this function always fails")
        })
        .sync_fn("teapot", |_: IgnoredAny| {
            Err::<(), _>(Rejection::new(
                ErrorType::Other("Teapot".into()),
                "short and stout",
            ))
        })
        .async_fn("panic_async", panic_after_await)
        .sync_fn("panic", |_: IgnoredAny| -> Result<(), String> {
            panic!("panic was called")
        })
        .raw_fn("panic_raw", |_name, _params| -> Result<Value, String> {
            panic!("raw panic was called")
        })
}

async fn start() -> (TestServer, Connection) {
    let server = TestServer::start(worker_router()).await;
    let conn = Connection::connect(&server.path).await.expect("connect");
    (server, conn)
}

/// Checks that `conn` still answers a simple call.
async fn assert_serves(conn: &Connection) {
    let sum: i64 = conn
        .call("add", &json!({"a": 40, "b": 2}))
        .await
        .expect("the connection still serves calls");
    assert_eq!(sum, 42);
}

/// Events reported by gated handlers.
type Events = mpsc::UnboundedReceiver<&'static str>;

/// Sends an event when dropped, unless disarmed: tells whether a handler was aborted.
struct DropSignal {
    tx: Option<mpsc::UnboundedSender<&'static str>>,
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send("dropped");
        }
    }
}

/// Adds `gated`: reports "started", waits for `gate`, reports "finished" and returns
/// "opened"; reports "dropped" if it is aborted before that.
fn with_gated(router: Router, gate: Arc<Notify>) -> (Router, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = router.async_fn("gated", move |_: IgnoredAny| {
        let gate = gate.clone();
        let tx = tx.clone();
        async move {
            let _ = tx.send("started");
            let mut guard = DropSignal {
                tx: Some(tx.clone()),
            };
            gate.notified().await;
            guard.tx = None;
            let _ = tx.send("finished");
            Ok::<_, String>("opened")
        }
    });
    (router, rx)
}

// ---------------------------------------------------------------------------------------------
// 1. Typed, raw and binary functions; nil and absent params

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typed_sync_and_async_functions() {
    within(async {
        let (_server, conn) = start().await;

        let sum: i64 = conn.call("add", &json!({"a": 2, "b": 3})).await.unwrap();
        assert_eq!(sum, 5);
        let sum: f64 = conn
            .call("add", &json!({"a": 0.5, "b": 0.25}))
            .await
            .unwrap();
        assert_eq!(sum, 0.75);
        let fib: u64 = conn.call("fibonacci", &json!({"n": 90})).await.unwrap();
        assert_eq!(fib, 2_880_067_194_370_816_120);

        let product: i64 = conn
            .call("multiply_async", &json!({"a": 6, "b": 7}))
            .await
            .unwrap();
        assert_eq!(product, 42);
        let slept: u64 = conn.call("sleep", &json!({"ms": 1})).await.unwrap();
        assert_eq!(slept, 1);

        // Params may be any serializable value, such as a struct of our own.
        #[derive(serde::Serialize)]
        struct MyPair {
            a: i32,
            b: i32,
        }
        let sum: i64 = conn.call("add", &MyPair { a: -5, b: 3 }).await.unwrap();
        assert_eq!(sum, -2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_functions_get_their_name_and_any_value() {
    within(async {
        let (_server, conn) = start().await;

        let name: String = conn.call("whoami", &()).await.unwrap();
        assert_eq!(name, "whoami");

        let nested = json!({"s": "x", "n": -3, "f": 1.5, "l": [true, null, {"k": "v"}]});
        let back: serde_json::Value = conn.call("echo", &nested).await.unwrap();
        assert_eq!(back, nested);

        // The raw call form hands back exactly the bytes the function produced.
        let params = common::encode(&Value::Array(vec![
            Value::from(1),
            Value::from("two"),
            Value::Nil,
        ]));
        let result = conn
            .call_raw("echo", &params, CallOptions::default())
            .await
            .unwrap();
        assert_eq!(result.as_bytes(), &params[..]);

        let err = conn.call::<_, ()>("raw_fail", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_HANDLER");
        assert_eq!(err.error_type(), Some("HandlerError"));
        assert_eq!(err.to_string(), "raw failure");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn msgpack_functions_answer_the_bytes_they_write_and_refuse_broken_ones() {
    within(async {
        let (_server, conn) = start().await;
        // As for payload functions: bytes no decode and re-encode would keep.
        let params = [
            0x92, 0xcf, 0, 0, 0, 0, 0, 0, 0, 5, 0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0,
        ];
        let result = conn
            .call_raw("msgpack_echo", &params, CallOptions::default())
            .await
            .unwrap();
        assert_eq!(result.as_bytes(), &params[..]);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let back: serde_bytes::ByteBuf = conn
            .call("msgpack_echo", serde_bytes::Bytes::new(&big))
            .await
            .unwrap();
        assert_eq!(back.as_slice(), &big[..]);
        let len: u64 = conn.call("msgpack_write", "abcdef").await.unwrap();
        assert_eq!(len, 7);
        for (what, code) in [
            ("torn", "Internal"),
            ("two", "Internal"),
            ("fail", "InvalidParams"),
        ] {
            let err = conn
                .call::<_, u64>("msgpack_write", what)
                .await
                .unwrap_err();
            assert_eq!(err.error_type(), Some(code), "{what}: {err}");
        }
        // Made together (usually answered from one read): a refused result leaves nothing
        // behind for the next.
        let (a, b, c) = tokio::join!(
            conn.call::<_, u64>("msgpack_write", "two"),
            conn.call::<_, u64>("msgpack_write", "abc"),
            conn.call::<_, u64>("msgpack_write", "fail"),
        );
        assert_eq!(a.unwrap_err().error_type(), Some("Internal"));
        assert_eq!(b.unwrap(), 4);
        assert_eq!(c.unwrap_err().error_type(), Some("InvalidParams"));
        assert_serves(&conn).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payload_functions_get_and_give_the_exact_bytes() {
    within(async {
        let (_server, conn) = start().await;
        // 5 as `uint 64` and 1.0 as `float 64`: any decode and re-encode would shorten them.
        let params = [
            0x92, 0xcf, 0, 0, 0, 0, 0, 0, 0, 5, 0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0,
        ];
        let result = conn
            .call_raw("payload_echo", &params, CallOptions::default())
            .await
            .unwrap();
        assert_eq!(result.as_bytes(), &params[..]);

        let len: usize = conn.call("payload_len", "abc").await.unwrap();
        assert_eq!(len, 4, "fixstr marker + 3 bytes");
        let err = conn.call::<_, usize>("payload_len", &()).await.unwrap_err();
        assert_eq!(err.error_type(), Some("InvalidParams"));
        assert_eq!(err.to_string(), "params required");
        assert_serves(&conn).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_values_travel_as_msgpack_bin() {
    within(async {
        let (_server, conn) = start().await;
        let expected: Vec<u8> = (0..300u64).map(|i| (i * 37 % 256) as u8).collect();

        let result = conn
            .call_raw(
                "bytes",
                &common::encode(&Value::from(300)),
                CallOptions::default(),
            )
            .await
            .unwrap();
        // bin 16: marker 0xc5, then the length.
        assert_eq!(result.as_bytes()[..3], [0xc5, 0x01, 0x2c]);
        assert_eq!(result.to_value(), Value::Binary(expected.clone()));

        let typed: Value = conn.call("bytes", &300).await.unwrap();
        assert_eq!(typed, Value::Binary(expected));

        // Binary params reach the function as binary, and come back byte for byte.
        let blob = Value::Binary(vec![0, 1, 2, 0xc1, 0xff]);
        let params = common::encode(&blob);
        assert_eq!(params[0], 0xc4, "bin 8");
        let back = conn
            .call_raw("echo", &params, CallOptions::default())
            .await
            .unwrap();
        assert_eq!(back.as_bytes(), &params[..]);
        assert_eq!(back.to_value(), blob);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payloads_larger_than_the_socket_buffer_arrive_whole_both_ways() {
    within(async {
        let (server, _conn) = start().await;
        // Both ways of waiting for room: the socket registered for writing all along, or
        // only while a write waits.
        for early_wake in [ferry_core::EarlyWake::On, ferry_core::EarlyWake::Off] {
            let config = ConnectionConfig {
                early_wake,
                ..ConnectionConfig::default()
            };
            let conn = Connection::connect_with(&server.path, Router::new(), config)
                .await
                .unwrap();
            common::echo_large_payloads(&conn).await;
            assert_serves(&conn).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_answered_timed_out_or_dropped_in_any_mix_each_get_their_own_outcome() {
    within(async {
        let (_server, conn) = start().await;
        // xorshift64: a fixed, varied mix without a random-number dependency.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let calls = (0..3000u64).map(|i| {
            let conn = conn.clone();
            let r = next();
            async move {
                match r % 4 {
                    // Answered at once: its own value comes back (never another call's).
                    0 | 1 => {
                        let v: u64 = conn.call("echo", &i).await.unwrap();
                        assert_eq!(v, i);
                    }
                    // Answered after a few ms, or timed out first: nothing else.
                    2 => {
                        let ms = (r >> 8) % 4;
                        let timeout = Duration::from_millis((r >> 16) % 4 + 1);
                        let options = CallOptions::timeout(timeout);
                        match conn
                            .call_with::<_, u64>("sleep", &json!({ "ms": ms }), options)
                            .await
                        {
                            Ok(got) => assert_eq!(got, ms),
                            Err(e) => assert_eq!(e.code(), "ERR_FERRY_TIMEOUT", "{e}"),
                        }
                    }
                    // Given up on (dropped) before or after its answer arrives.
                    _ => {
                        let wait = Duration::from_micros((r >> 8) % 1000);
                        if let Ok(r) =
                            tokio::time::timeout(wait, conn.call::<_, u64>("echo", &i)).await
                        {
                            assert_eq!(r.unwrap(), i);
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(calls).await;
        assert_eq!(conn.pending_calls(), 0);
        assert_serves(&conn).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nil_params() {
    within(async {
        let (_server, conn) = start().await;

        let got: String = conn.call("unit", &()).await.unwrap();
        assert_eq!(got, "got unit");
        let raw = conn
            .call_raw("unit", &[0xc0], CallOptions::default())
            .await
            .unwrap();
        assert_eq!(raw.decode::<String>().unwrap(), "got unit");

        let none: Option<i64> = conn.call("maybe_add", &()).await.unwrap();
        assert_eq!(none, None);
        let some: Option<i64> = conn
            .call("maybe_add", &json!({"a": 1, "b": 2}))
            .await
            .unwrap();
        assert_eq!(some, Some(3));

        let echoed = conn
            .call_raw("echo", &[0xc0], CallOptions::default())
            .await
            .unwrap();
        assert!(echoed.is_nil());

        // A function that needs fields cannot take nil.
        let err = conn.call::<_, i64>("add", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_INVALID_PARAMS");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 2. Error kinds and panics

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_kinds_map_to_stable_codes() {
    within(async {
        let (_server, conn) = start().await;

        let err = conn.call::<_, ()>("no_such_fn", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_NOT_FOUND");
        assert_eq!(err.error_type(), Some("NotFound"));
        assert!(
            matches!(&err, Error::Remote { kind: ErrorType::NotFound, message } if message == "no function named `no_such_fn`"),
            "{err:?}"
        );

        for wrong in [
            json!({"a": "two", "b": 3}),
            json!({"a": 1}),
            json!("add me"),
            json!([1, 2, 3, 4]),
        ] {
            let err = conn.call::<_, i64>("add", &wrong).await.unwrap_err();
            assert_eq!(err.code(), "ERR_FERRY_INVALID_PARAMS", "params {wrong}");
            assert_eq!(err.error_type(), Some("InvalidParams"));
            assert!(
                err.to_string().starts_with("params do not match: "),
                "{err}"
            );
        }
        // A function may reject its params itself.
        let err = conn
            .call::<_, u64>("fibonacci", &json!({"n": 94}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_INVALID_PARAMS");
        assert!(err.to_string().contains("at most 93"), "{err}");

        let err = conn.call::<_, ()>("fail", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_HANDLER");
        assert_eq!(err.error_type(), Some("HandlerError"));
        assert_eq!(
            err.to_string(),
            "fail was called: this function always fails"
        );

        let err = conn.call::<_, ()>("teapot", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_REMOTE");
        assert_eq!(err.error_type(), Some("Teapot"));
        assert_eq!(err.to_string(), "short and stout");

        // A result of the wrong type is a local decode error, not the peer's.
        let err = conn
            .call::<_, String>("add", &json!({"a": 1, "b": 1}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_DECODE");
        assert_eq!(err.error_type(), None);

        assert_serves(&conn).await;
        assert_eq!(conn.pending_calls(), 0);
    })
    .await
}

/// Calls `name` (a panicking function) and checks that it is answered with `Internal` and that
/// the connection, and a second one, still serve afterwards.
async fn check_panic_is_internal(name: &str) {
    let (server, conn) = start().await;
    let other = Connection::connect(&server.path).await.unwrap();
    assert_serves(&other).await;

    // Bounded well below the test limit, so a missing answer fails with a clear message.
    let err = conn
        .call_with::<_, ()>(name, &(), CallOptions::timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        "ERR_FERRY_INTERNAL",
        "a panicking `{name}` must be answered with Internal; got {err:?}"
    );
    assert_eq!(err.error_type(), Some("Internal"));
    assert!(
        err.to_string()
            .starts_with(&format!("function `{name}` panicked: ")),
        "{err}"
    );
    assert!(err.to_string().contains("panic was called"), "{err}");

    assert_serves(&conn).await;
    assert_serves(&other).await;
    let third = Connection::connect(&server.path).await.unwrap();
    assert_serves(&third).await;
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_panic_is_internal_and_connections_survive() {
    within(check_panic_is_internal("panic_async")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_panic_is_internal_and_connections_survive() {
    within(check_panic_is_internal("panic")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_panic_is_internal_and_connections_survive() {
    within(check_panic_is_internal("panic_raw")).await
}

// ---------------------------------------------------------------------------------------------
// 3. Timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeout_fails_the_call_and_the_connection_goes_on() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, _events) = with_gated(worker_router(), gate.clone());
        let server = TestServer::start(router).await;
        let conn = Connection::connect(&server.path).await.unwrap();

        let timeout = Duration::from_millis(50);
        let err = conn
            .call_with::<_, String>("gated", &(), CallOptions::timeout(timeout))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        assert!(matches!(err, Error::Timeout(t) if t == timeout), "{err:?}");
        assert_eq!(err.error_type(), None);
        assert_eq!(conn.pending_calls(), 0);

        assert_serves(&conn).await;
        // A call with a roomy timeout of its own is not affected.
        let slept: u64 = conn
            .call_with(
                "sleep",
                &json!({"ms": 1}),
                CallOptions::timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert_eq!(slept, 1);
        gate.notify_one();
    })
    .await
}

/// The connection keeps one timer, asleep until the earliest deadline: a call with a shorter
/// timeout than the pending ones must wake it, and no timeout may fire early.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_timeouts_fire_while_a_longer_one_is_pending() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, _events) = with_gated(worker_router(), gate.clone());
        let server = TestServer::start(router).await;
        let conn = Connection::connect(&server.path).await.unwrap();

        // Longer than the test's own limit: if only its deadline woke the timer, the test
        // would fail by timing out.
        let long = tokio::spawn({
            let conn = conn.clone();
            async move {
                conn.call_with::<_, String>(
                    "gated",
                    &(),
                    CallOptions::timeout(Duration::from_secs(60)),
                )
                .await
            }
        });
        common::wait_until("the long call is pending", || conn.pending_calls() == 1).await;

        let timed = |ms: u64| {
            let conn = conn.clone();
            async move {
                let start = std::time::Instant::now();
                let r = conn
                    .call_with::<_, String>(
                        "gated",
                        &(),
                        CallOptions::timeout(Duration::from_millis(ms)),
                    )
                    .await;
                (r, start.elapsed())
            }
        };
        let ((a, a_took), (b, b_took)) = tokio::join!(timed(200), timed(50));
        assert!(
            matches!(a, Err(Error::Timeout(t)) if t == Duration::from_millis(200)),
            "{a:?}"
        );
        assert!(
            matches!(b, Err(Error::Timeout(t)) if t == Duration::from_millis(50)),
            "{b:?}"
        );
        assert!(a_took >= Duration::from_millis(200), "{a_took:?}");
        assert!(b_took >= Duration::from_millis(50), "{b_took:?}");

        // The long call is untouched and still answered.
        assert_eq!(conn.pending_calls(), 1);
        gate.notify_waiters();
        assert_eq!(long.await.unwrap().unwrap(), "opened");
    })
    .await
}

/// Deadlines follow tokio's clock: with the clock paused (as tests of timeouts do), a call's
/// timeout fires when the runtime advances to it, without waiting in real time and without the
/// connection's timer spinning. Runs on its own thread so that a regression fails instead of
/// hanging the suite.
#[test]
fn timeouts_follow_a_paused_tokio_clock() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let stuck = "a timeout on a paused clock must fire once the runtime advances to it";
    let outcome = common::on_own_thread(runtime, stuck, async {
        let gate = Arc::new(Notify::new());
        let (router, _events) = with_gated(worker_router(), gate);
        let server = TestServer::start(router).await;
        let conn = Connection::connect(&server.path).await.unwrap();
        conn.call_with::<_, String>("gated", &(), CallOptions::timeout(Duration::from_secs(600)))
            .await
    });
    assert!(
        matches!(outcome, Err(Error::Timeout(t)) if t == Duration::from_secs(600)),
        "{outcome:?}"
    );
}

/// Timeouts too large for the clock mean no deadline: the call is simply made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_beyond_the_clock_mean_no_deadline() {
    within(async {
        let server = TestServer::start(worker_router()).await;
        let config = ConnectionConfig {
            default_timeout: Some(Duration::MAX),
            ..Default::default()
        };
        let conn = Connection::connect_with(&server.path, Router::new(), config)
            .await
            .unwrap();
        let sum: i64 = conn.call("add", &json!({"a": 1, "b": 2})).await.unwrap();
        assert_eq!(sum, 3);
        let sum: i64 = conn
            .call_with(
                "add",
                &json!({"a": 2, "b": 2}),
                CallOptions::timeout(Duration::from_secs(u64::MAX)),
            )
            .await
            .unwrap();
        assert_eq!(sum, 4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_default_timeout_applies() {
    within(async {
        let server = TestServer::start(worker_router()).await;
        let config = ConnectionConfig {
            default_timeout: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        let conn = Connection::connect_with(&server.path, Router::new(), config)
            .await
            .unwrap();
        let err = conn
            .call::<_, u64>("sleep", &json!({"ms": 10_000}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        assert!(
            matches!(err, Error::Timeout(t) if t == Duration::from_millis(50)),
            "{err:?}"
        );
        // A per-call timeout overrides the default: this call outlives 50 ms and succeeds.
        let slept: u64 = conn
            .call_with(
                "sleep",
                &json!({"ms": 100}),
                CallOptions::timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert_eq!(slept, 100);
        assert_eq!(conn.pending_calls(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_answer_after_timeout_is_ignored() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, mut events) = with_gated(worker_router(), gate.clone());
        let server = TestServer::start(router).await;
        // Without `cancel`, the server keeps running the call and answers it late.
        let config = ConnectionConfig {
            engine: EngineConfig {
                send_cancel: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let conn = Connection::connect_with(&server.path, Router::new(), config)
            .await
            .unwrap();

        let err = conn
            .call_with::<_, String>(
                "gated",
                &(),
                CallOptions::timeout(Duration::from_millis(50)),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        assert_eq!(conn.pending_calls(), 0);

        assert_eq!(events.recv().await, Some("started"));
        gate.notify_one();
        assert_eq!(events.recv().await, Some("finished"));

        // The late `rpc_response` reaches us around now; it must not be taken for the answer
        // of a later call, nor break the connection.
        for i in 0..20i64 {
            let sum: i64 = conn.call("add", &json!({"a": i, "b": 1})).await.unwrap();
            assert_eq!(sum, i + 1);
        }
        assert_eq!(conn.pending_calls(), 0);
        assert!(!conn.is_closed());
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. Many concurrent calls answered out of order

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_calls_answered_out_of_order() {
    within(async {
        let finished = Arc::new(Mutex::new(Vec::new()));
        let log = finished.clone();
        let router = Router::new().async_fn("jitter", move |n: u64| {
            let log = log.clone();
            async move {
                // 0-20 ms, pseudo-random but fixed per input.
                let ms = n.wrapping_mul(2_654_435_761) % 21;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.lock().unwrap().push(n);
                Ok::<_, String>(n * 3 + 1)
            }
        });
        let server = TestServer::start(router).await;
        let conn = Connection::connect(&server.path).await.unwrap();

        let results = futures_util::future::join_all((0..1000u64).map(|n| {
            let conn = &conn;
            async move { (n, conn.call::<_, u64>("jitter", &n).await) }
        }))
        .await;
        for (n, r) in results {
            assert_eq!(r.unwrap(), n * 3 + 1, "result of call {n}");
        }
        assert_eq!(conn.pending_calls(), 0);

        let finished = finished.lock().unwrap().clone();
        assert_eq!(finished.len(), 1000);
        assert!(
            finished.windows(2).any(|w| w[0] > w[1]),
            "the handlers should have finished out of order"
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 5. Both directions on one connection

#[derive(Deserialize)]
struct CallPeer {
    function_name: String,
    #[serde(default)]
    params: Option<Value>,
}

#[derive(Deserialize)]
struct InvokePeer {
    handler_id: String,
    request: HttpRequest,
}

fn server_router() -> Router {
    Router::new()
        .async_fn_ctx("call_peer", |ctx: Context, p: CallPeer| async move {
            ctx.connection
                .call::<_, Value>(&p.function_name, &p.params.unwrap_or(Value::Nil))
                .await
        })
        // Answers with the peer's result, or rejects with "<code> <error_type>".
        .async_fn_ctx("invoke_peer", |ctx: Context, p: InvokePeer| async move {
            ctx.connection
                .invoke_handler(&p.handler_id, &p.request)
                .await
                .map_err(|e| {
                    Rejection::handler(format!("{} {}", e.code(), e.error_type().unwrap_or("-")))
                })
        })
        .async_fn_ctx("ping", |ctx: Context, n: u64| async move {
            if n == 0 {
                return Ok::<_, ferry_core::Error>(0);
            }
            Ok(ctx.connection.call::<_, u64>("pong", &(n - 1)).await? + 1)
        })
        .async_fn_ctx(
            "request_id_of_call",
            |ctx: Context, _: IgnoredAny| async move {
                Ok::<_, String>(ctx.request_id.map(|id| id.to_string()))
            },
        )
        .route("server_status", |_ctx, req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 200,
                headers: [("content-type".to_string(), "text/plain".to_string())].into(),
                body: Value::from(format!("server ok: {} {}", req.method, req.path)),
            })
        })
        .route("server_fail", |_ctx, _req: HttpRequest| async move {
            Err::<HttpResponse, _>("the route failed")
        })
}

fn client_router() -> Router {
    Router::new()
        .sync_fn("client_double", |n: i64| Ok::<_, String>(n * 2))
        .async_fn_ctx("pong", |ctx: Context, n: u64| async move {
            if n == 0 {
                return Ok::<_, ferry_core::Error>(0);
            }
            Ok(ctx.connection.call::<_, u64>("ping", &(n - 1)).await? + 1)
        })
        .route("client_status", |_ctx, req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 201,
                headers: [("x-side".to_string(), "client".to_string())].into(),
                body: Value::from(format!(
                    "client ok: {} {} {:?}",
                    req.method, req.path, req.query
                )),
            })
        })
}

fn get(path: &str) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: path.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_directions_on_one_connection() {
    within(async {
        let server = TestServer::start(server_router()).await;
        let conn =
            Connection::connect_with(&server.path, client_router(), ConnectionConfig::default())
                .await
                .unwrap();

        // The server calls the client back while serving the client's call.
        let doubled: i64 = conn
            .call(
                "call_peer",
                &json!({"function_name": "client_double", "params": 21}),
            )
            .await
            .unwrap();
        assert_eq!(doubled, 42);

        // Calls nested back and forth on the same connection.
        let depth: u64 = conn.call("ping", &7u64).await.unwrap();
        assert_eq!(depth, 7);

        // The server's call of a function the client lacks fails there; the server's function
        // turns that into a HandlerError for us.
        let err = conn
            .call::<_, Value>("call_peer", &json!({"function_name": "nope"}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_HANDLER");
        assert!(err.to_string().contains("nope"), "{err}");

        // Our integer request ids reach the server's Context.
        let id: Option<String> = conn.call("request_id_of_call", &()).await.unwrap();
        let id = id.expect("a call has a request id");
        assert!(id.parse::<u64>().is_ok(), "{id}");

        // invoke_handler, client to server.
        let resp = conn
            .invoke_handler("server_status", &get("/status"))
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.headers["content-type"], "text/plain");
        assert_eq!(resp.body, Value::from("server ok: GET /status"));

        let err = conn
            .invoke_handler("missing_route", &get("/"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_NOT_FOUND");
        assert_eq!(err.error_type(), Some("HANDLER_NOT_FOUND"));
        assert!(matches!(err, Error::Peer { status: 404, .. }), "{err:?}");

        let err = conn
            .invoke_handler("server_fail", &get("/"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_HANDLER");
        assert_eq!(err.error_type(), Some("HANDLER_EXECUTION_ERROR"));
        assert!(err.to_string().contains("the route failed"), "{err}");

        // A request that does not decode into the route's type is an execution error too.
        let err = conn
            .invoke_handler("server_status", &json!({"no": "method"}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_HANDLER");

        // invoke_handler, server to client.
        let mut req = get("/from/server");
        req.query = Some([("q".to_string(), "1".to_string())].into());
        let resp: HttpResponse = conn
            .call(
                "invoke_peer",
                &json!({"handler_id": "client_status", "request": req}),
            )
            .await
            .unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.headers["x-side"], "client");
        assert_eq!(
            resp.body,
            Value::from(r#"client ok: GET /from/server Some({"q": "1"})"#)
        );

        let err = conn
            .call::<_, HttpResponse>(
                "invoke_peer",
                &json!({"handler_id": "no_client_route", "request": get("/")}),
            )
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "ERR_FERRY_NOT_FOUND HANDLER_NOT_FOUND");

        assert_eq!(conn.pending_calls(), 0);
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 8. Dropping a call future cancels it

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_call_cancels_it_on_both_sides() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, mut events) = with_gated(worker_router(), gate.clone());
        let server = TestServer::start(router).await;
        let conn = Connection::connect(&server.path).await.unwrap();
        assert_eq!(conn.pending_calls(), 0);

        let mut call = Box::pin(conn.call::<_, String>("gated", &()));
        assert!(futures_util::poll!(&mut call).is_pending());
        assert_eq!(conn.pending_calls(), 1);
        assert_eq!(events.recv().await, Some("started"));

        drop(call);
        assert_eq!(conn.pending_calls(), 0);
        // The peer was told, and aborted the handler.
        assert_eq!(events.recv().await, Some("dropped"));

        // Many calls dropped at once (by a losing select) leave nothing pending.
        let calls =
            futures_util::future::join_all((0..50).map(|_| conn.call::<_, String>("gated", &())));
        tokio::select! {
            _ = calls => panic!("gated calls cannot finish"),
            _ = async {
                common::wait_until("50 calls pending", || conn.pending_calls() == 50).await;
            } => {}
        }
        assert_eq!(conn.pending_calls(), 0);
        assert_serves(&conn).await;
    })
    .await
}

/// Busy-polling connections in every I/O mode, on a current-thread runtime (where the reactor's
/// polling must let the callers and the writer run, or nothing is sent while it polls): calls
/// both ways, nested calls back and forth, large payloads and many calls in flight.
#[test]
fn busy_polling_connections_serve_calls_both_ways() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::on_own_thread(runtime, "busy polling stalled a connection", async {
        let busy = |io| ConnectionConfig {
            io,
            busy_poll: Duration::from_micros(200),
            ..ConnectionConfig::default()
        };
        for server_io in [IoMode::Reactor, IoMode::Threads] {
            let router = server_router()
                .sync_fn("add", |p: Pair| Ok::<_, String>(number(p.a + p.b)))
                .payload_fn("echo", Ok::<_, String>);
            let server = TestServer::start_with(router, busy(server_io), None).await;
            for client_io in [IoMode::Reactor, IoMode::Threads] {
                let conn = Connection::connect_with(&server.path, client_router(), busy(client_io))
                    .await
                    .unwrap();
                for i in 0..200i64 {
                    let doubled: i64 = conn
                        .call(
                            "call_peer",
                            &json!({"function_name": "client_double", "params": i}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(doubled, 2 * i);
                }
                // Ten calls nested each way.
                let depth: u64 = conn.call("ping", &20u64).await.unwrap();
                assert_eq!(depth, 20);
                let sums = (0..500i64).map(|i| {
                    let conn = conn.clone();
                    async move {
                        let sum: i64 = conn.call("add", &json!({"a": i, "b": 1})).await.unwrap();
                        assert_eq!(sum, i + 1);
                    }
                });
                futures_util::future::join_all(sums).await;
                common::echo_large_payloads(&conn).await;
                conn.close();
            }
        }
    });
}
