//! Frame-level tests: hand-made frames against a `Server` (what a ZapJS peer or a confused peer
//! sends), and a hand-made peer against a `Connection` (answers that come late or name no call).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{has_key, map, msg_type, str_field, within, RawClient, TestServer};
use ferry_core::router::{Context, HttpRequest, HttpResponse, Value};
use ferry_core::{CallOptions, Connection, ConnectionConfig, EngineConfig, MsgpackOut, Router};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Notify};

#[derive(Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

fn request(path: &str) -> Value {
    map(vec![
        ("method", Value::from("GET")),
        ("path", Value::from(path)),
        ("headers", Value::Map(vec![])),
    ])
}

fn route_response(name: &str, req: &HttpRequest) -> HttpResponse {
    HttpResponse {
        status: 200,
        headers: [("x-route".to_string(), name.to_string())].into(),
        body: Value::from(format!("{name}: {} {}", req.method, req.path)),
    }
}

/// A result that fails (or panics) halfway through being encoded, after some bytes are out.
struct HalfEncoded {
    panic: bool,
}

impl Serialize for HalfEncoded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = s.serialize_seq(Some(2))?;
        seq.serialize_element("written before the failure")?;
        if self.panic {
            panic!("panicked while encoding")
        }
        Err(S::Error::custom("cannot encode the second element"))
    }
}

async fn panic_route(_ctx: Context, _req: HttpRequest) -> Result<HttpResponse, String> {
    tokio::task::yield_now().await;
    panic!("route panic was called")
}

/// A router for the wire tests. `slow_route` waits until `fast_route` has finished, so their
/// answers are ready in the opposite order of their invocations. `hang` never returns and
/// reports "started" then, when aborted, "dropped".
fn wire_router() -> (Router, mpsc::UnboundedReceiver<&'static str>) {
    let fast_done = Arc::new(Notify::new());
    let fast_done2 = fast_done.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new()
        .sync_fn("add", |p: Pair| Ok::<_, String>(p.a + p.b))
        .raw_fn("echo", |_name, params| Ok(params))
        .sync_fn("grow", |n: usize| Ok::<_, String>("x".repeat(n)))
        .sync_fn("encode_fails", |_: serde::de::IgnoredAny| {
            Ok::<_, String>(HalfEncoded { panic: false })
        })
        .sync_fn("encode_panics", |_: serde::de::IgnoredAny| {
            Ok::<_, String>(HalfEncoded { panic: true })
        })
        .async_fn("hang", move |_: serde::de::IgnoredAny| {
            let tx = tx.clone();
            async move {
                struct Dropped(mpsc::UnboundedSender<&'static str>);
                impl Drop for Dropped {
                    fn drop(&mut self) {
                        let _ = self.0.send("dropped");
                    }
                }
                let _ = tx.send("started");
                let _guard = Dropped(tx);
                std::future::pending::<()>().await;
                Ok::<(), String>(())
            }
        })
        .route("panic_route", panic_route)
        .route("big_route", |_ctx: Context, _req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 200,
                headers: HashMap::new(),
                body: Value::from("b".repeat(5000)),
            })
        })
        .route("ctx_route", |ctx: Context, _req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 200,
                headers: HashMap::new(),
                body: ctx
                    .request_id
                    .map_or(Value::Nil, |id| Value::from(id.to_string())),
            })
        })
        .route("slow_route", move |_ctx: Context, req: HttpRequest| {
            let fast_done = fast_done.clone();
            async move {
                fast_done.notified().await;
                Ok::<_, String>(route_response("slow_route", &req))
            }
        })
        .route("fast_route", move |_ctx: Context, req: HttpRequest| {
            let fast_done = fast_done2.clone();
            async move {
                let resp = route_response("fast_route", &req);
                fast_done.notify_one();
                Ok::<_, String>(resp)
            }
        });
    (router, rx)
}

async fn start() -> (TestServer, RawClient) {
    let (router, _events) = wire_router();
    let server = TestServer::start(router).await;
    let raw = RawClient::connect(&server.path).await;
    (server, raw)
}

fn rpc_call(function_name: &str, params: Value, request_id: Value) -> Value {
    map(vec![
        ("type", Value::from("rpc_call")),
        ("function_name", Value::from(function_name)),
        ("params", params),
        ("request_id", request_id),
    ])
}

fn add_params(a: i64, b: i64) -> Value {
    map(vec![("a", Value::from(a)), ("b", Value::from(b))])
}

/// Sends a valid call on `raw` and checks its answer: the connection still serves.
async fn assert_serves(raw: &mut RawClient) {
    raw.send(&rpc_call("add", add_params(40, 2), Value::from("still_ok")))
        .await;
    let msg = raw.recv().await;
    assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
    assert_eq!(msg["request_id"], Value::from("still_ok"));
    assert_eq!(msg["result"], Value::from(42));
}

fn assert_error(msg: &Value, code: &str, status: u64) {
    assert_eq!(msg_type(msg), "error", "{msg}");
    assert_eq!(str_field(msg, "code"), code, "{msg}");
    assert_eq!(msg["status"].as_u64(), Some(status), "{msg}");
    assert!(!str_field(msg, "message").is_empty(), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// request_id echoing

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn string_request_id_is_echoed_as_a_string() {
    within(async {
        let (_server, mut raw) = start().await;

        // Exactly what a serde-derived ZapJS peer writes.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum ZapOut {
            RpcCall {
                function_name: String,
                params: serde_json::Value,
                request_id: String,
            },
        }
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum ZapIn {
            RpcResponse {
                request_id: String,
                result: serde_json::Value,
            },
            RpcError {
                request_id: String,
                error: String,
                error_type: String,
            },
        }

        let body = rmp_serde::to_vec_named(&ZapOut::RpcCall {
            function_name: "add".into(),
            params: serde_json::json!({"a": 2, "b": 3}),
            request_id: "req_1732000000000_0".into(),
        })
        .unwrap();
        raw.send_body(&body).await;
        let answer = raw.recv_body().await;
        let msg: Value = rmpv::decode::read_value(&mut &answer[..]).unwrap();
        assert!(msg["request_id"].is_str(), "{msg}");
        assert_eq!(
            rmp_serde::from_slice::<ZapIn>(&answer).unwrap(),
            ZapIn::RpcResponse {
                request_id: "req_1732000000000_0".into(),
                result: serde_json::json!(5),
            }
        );

        let body = rmp_serde::to_vec_named(&ZapOut::RpcCall {
            function_name: "nope".into(),
            params: serde_json::Value::Null,
            request_id: "req_1732000000000_1".into(),
        })
        .unwrap();
        raw.send_body(&body).await;
        let ZapIn::RpcError {
            request_id,
            error_type,
            ..
        } = rmp_serde::from_slice::<ZapIn>(&raw.recv_body().await).unwrap()
        else {
            panic!("expected rpc_error")
        };
        assert_eq!(request_id, "req_1732000000000_1");
        assert_eq!(error_type, "NotFound");

        // Odd but valid strings come back unchanged too (a str 8 one, UTF-8, empty).
        let long = "r".repeat(200);
        for id in ["", "ünïcödé 🚢", long.as_str(), "42"] {
            raw.send(&rpc_call("add", add_params(1, 1), Value::from(id)))
                .await;
            let msg = raw.recv().await;
            assert_eq!(msg["request_id"], Value::from(id), "{msg}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integer_request_ids_are_echoed_as_integers() {
    within(async {
        let (_server, mut raw) = start().await;
        let ids = [
            0u64,
            7,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        // All calls in one write: frames may share a read; answers come in any order.
        let mut bytes = Vec::new();
        for id in ids {
            bytes.extend(common::frame(&common::encode(&rpc_call(
                "echo",
                Value::from(id),
                Value::from(id),
            ))));
        }
        raw.send_bytes(&bytes).await;
        let mut seen = HashMap::new();
        for _ in ids {
            let msg = raw.recv().await;
            assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
            let Value::Integer(id) = &msg["request_id"] else {
                panic!("request_id must stay an integer: {msg}")
            };
            let id = id.as_u64().expect("unsigned");
            assert_eq!(msg["result"], Value::from(id), "{msg}");
            assert!(seen.insert(id, ()).is_none(), "answered twice: {id}");
        }
        assert_eq!(seen.len(), ids.len());

        // u64::MAX is written as uint 64 and comes back as the same bytes, in an error too.
        raw.send(&rpc_call("nope", Value::Nil, Value::from(u64::MAX)))
            .await;
        let answer = raw.recv_body().await;
        let needle = [&b"\xaarequest_id\xcf"[..], &[0xff; 8]].concat();
        assert!(
            answer.windows(needle.len()).any(|w| w == needle),
            "{answer:x?}"
        );
        let msg: Value = rmpv::decode::read_value(&mut &answer[..]).unwrap();
        assert_eq!(msg_type(&msg), "rpc_error");
        assert_eq!(str_field(&msg, "error_type"), "NotFound");

        // An integer written in a wider encoding than needed is still an integer.
        let mut body = Vec::new();
        rmp::encode::write_map_len(&mut body, 4).unwrap();
        for (k, v) in [("type", "rpc_call"), ("function_name", "echo")] {
            rmp::encode::write_str(&mut body, k).unwrap();
            rmp::encode::write_str(&mut body, v).unwrap();
        }
        rmp::encode::write_str(&mut body, "params").unwrap();
        rmp::encode::write_nil(&mut body).unwrap();
        rmp::encode::write_str(&mut body, "request_id").unwrap();
        rmp::encode::write_u32(&mut body, 9).unwrap();
        raw.send_body(&body).await;
        let msg = raw.recv().await;
        assert_eq!(msg["request_id"], Value::from(9u64), "{msg}");
        assert!(msg["request_id"].is_u64());
    })
    .await
}

/// Synchronous functions answer a read's calls from one shared buffer: a function that fails
/// or panics halfway through encoding its result must leave no bytes in the answers of the
/// calls around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_result_in_a_batch_leaves_the_other_answers_whole() {
    within(async {
        let (_server, mut raw) = start().await;
        let calls = [
            ("add", add_params(1, 2), "a"),
            ("encode_fails", Value::Nil, "b"),
            ("add", add_params(3, 4), "c"),
            ("encode_panics", Value::Nil, "d"),
            ("echo", Value::from("five"), "e"),
            ("nope", Value::Nil, "f"),
            ("add", Value::from("not a pair"), "g"),
            ("add", add_params(5, 6), "h"),
        ];
        let mut bytes = Vec::new();
        for (name, params, id) in &calls {
            bytes.extend(common::frame(&common::encode(&rpc_call(
                name,
                params.clone(),
                Value::from(*id),
            ))));
        }
        raw.send_bytes(&bytes).await;
        let mut answers = HashMap::new();
        for _ in calls {
            let msg = raw.recv().await;
            answers.insert(str_field(&msg, "request_id").to_string(), msg);
        }
        for (id, sum) in [("a", 3), ("c", 7), ("h", 11)] {
            assert_eq!(msg_type(&answers[id]), "rpc_response", "{}", answers[id]);
            assert_eq!(answers[id]["result"], Value::from(sum), "{}", answers[id]);
        }
        assert_eq!(answers["e"]["result"], Value::from("five"));
        for (id, kind, text) in [
            ("b", "Internal", "cannot encode the second element"),
            ("d", "Internal", "panicked while encoding"),
            ("f", "NotFound", "nope"),
            ("g", "InvalidParams", "params"),
        ] {
            let msg = &answers[id];
            assert_eq!(msg_type(msg), "rpc_error", "{msg}");
            assert_eq!(str_field(msg, "error_type"), kind, "{msg}");
            assert!(str_field(msg, "error").contains(text), "{msg}");
        }
        assert_serves(&mut raw).await;
    })
    .await
}

/// 200 `grow` calls in one buffer, call `i` (also its id) asking for `size(i)` bytes.
fn grow_calls(size: impl Fn(u64) -> u64) -> Vec<u8> {
    (0..200u64)
        .flat_map(|i| {
            common::frame(&common::encode(&rpc_call(
                "grow",
                Value::from(size(i)),
                Value::from(i),
            )))
        })
        .collect()
}

fn threads() -> ConnectionConfig {
    ConnectionConfig {
        io: ferry_core::IoMode::Threads,
        ..ConnectionConfig::default()
    }
}

/// With `IoMode::Threads`, answers the socket cannot take at once go to the writer thread:
/// a peer that reads late still gets every answer, whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_mode_answers_a_peer_that_reads_late_in_order() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start_with(router, threads(), None).await;
        let mut raw = RawClient::connect(&server.path).await;
        // About 13 MB of answers, far beyond the socket buffers, before reading any.
        raw.send_bytes(&grow_calls(|i| 64 * 1024 + i)).await;
        for i in 0..200u64 {
            let msg = raw.recv().await;
            assert_eq!(
                msg["request_id"],
                Value::from(i),
                "answers keep their order"
            );
            assert_eq!(
                msg["result"].as_str().map(str::len),
                Some(64 * 1024 + i as usize)
            );
        }
        assert_serves(&mut raw).await;
    })
    .await
}

/// A closed connection whose peer never reads gives up flushing after `close_flush` and shuts
/// the socket (in both I/O modes, and with the reactor's either registration): nothing waits
/// for such a peer forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_gives_up_on_a_peer_that_never_reads() {
    use ferry_core::IoMode;
    use tokio::io::AsyncWriteExt;
    within(async {
        let modes = [
            (IoMode::Reactor, ferry_core::EarlyWake::On),
            (IoMode::Reactor, ferry_core::EarlyWake::Off),
            (IoMode::Threads, ferry_core::EarlyWake::On),
        ];
        for (io, early_wake) in modes {
            let (router, _events) = wire_router();
            let config = ConnectionConfig {
                io,
                early_wake,
                close_flush: Duration::from_millis(100),
                ..ConnectionConfig::default()
            };
            let mut server = TestServer::start_with(router, config, Some(Duration::ZERO)).await;
            let mut raw = RawClient::connect(&server.path).await;
            // About 13 MB of answers, far beyond the socket buffers; never read until the end.
            raw.send_bytes(&grow_calls(|_| 64 * 1024)).await;
            // Once the first answer arrives, the server has run the whole read of calls and
            // queued all the answers; the socket holds a few hundred KiB of them at most.
            raw.stream.readable().await.unwrap();
            server.stop().await.unwrap();
            // Once the server gives up, it shuts the socket and our writes fail.
            while raw.stream.write_all(&[0]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // What it wrote before giving up is whole frames, fewer than all the answers.
            let rest = raw.read_to_close().await;
            let mut at = 0;
            let mut frames = 0;
            while at + 4 <= rest.len() {
                let len = u32::from_be_bytes(rest[at..at + 4].try_into().unwrap()) as usize;
                if at + 4 + len > rest.len() {
                    break;
                }
                at += 4 + len;
                frames += 1;
            }
            assert!(
                frames < 200,
                "{io:?} (early_wake {early_wake:?}): all {frames} answers flushed to a peer that never read"
            );
            assert!(
                rest.len() - at < 4 + 64 * 1024 + 64,
                "{io:?} (early_wake {early_wake:?}): only the last frame may be cut"
            );
        }
    })
    .await
}

/// `close_flush` bounds the whole flush after close, not each wait for room: a peer that keeps
/// reading, but too slowly to take what is queued in time, is given up on too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_gives_up_on_a_peer_that_reads_too_slowly() {
    use ferry_core::IoMode;
    use tokio::io::AsyncReadExt;
    within(async {
        let modes = [
            (IoMode::Reactor, ferry_core::EarlyWake::On),
            (IoMode::Reactor, ferry_core::EarlyWake::Off),
            (IoMode::Threads, ferry_core::EarlyWake::On),
        ];
        for (io, early_wake) in modes {
            let (router, _events) = wire_router();
            let config = ConnectionConfig {
                io,
                early_wake,
                close_flush: Duration::from_millis(100),
                ..ConnectionConfig::default()
            };
            let mut server = TestServer::start_with(router, config, Some(Duration::ZERO)).await;
            let mut raw = RawClient::connect(&server.path).await;
            // About 13 MB of answers; read at up to 6.4 MB/s, they would take two seconds or
            // more, where the flush may take 100 ms.
            raw.send_bytes(&grow_calls(|_| 64 * 1024)).await;
            raw.stream.readable().await.unwrap();
            server.stop().await.unwrap();
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match raw.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
                // The slow reader's pace, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                total < 8 << 20,
                "{io:?} (early_wake {early_wake:?}): {total} bytes flushed to a slow reader"
            );
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// JSON bodies, bad bodies, unknown types

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_bodies_are_answered() {
    within(async {
        let (_server, mut raw) = start().await;

        raw.send_body(
            br#"{"type":"rpc_call","function_name":"add","params":{"a":2,"b":3},"request_id":"json_1"}"#,
        )
        .await;
        let msg = raw.recv().await;
        assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
        assert_eq!(msg["request_id"], Value::from("json_1"));
        assert_eq!(msg["result"], Value::from(5));

        raw.send_body(
            br#"{"type":"rpc_call","function_name":"echo","params":[1,"x",null],"request_id":18446744073709551615}"#,
        )
        .await;
        let msg = raw.recv().await;
        assert_eq!(msg["request_id"], Value::from(u64::MAX), "{msg}");
        assert_eq!(
            msg["result"],
            Value::Array(vec![Value::from(1), Value::from("x"), Value::Nil])
        );

        // Absent params are nil.
        raw.send_body(br#"{"type":"rpc_call","function_name":"echo","request_id":3}"#)
            .await;
        let msg = raw.recv().await;
        assert_eq!(msg["request_id"], Value::from(3), "{msg}");
        assert_eq!(msg["result"], Value::Nil);

        raw.send_body(br#"{"type":"health_check"}"#).await;
        assert_eq!(msg_type(&raw.recv().await), "health_check_response");

        raw.send_body(br#"{"type":"rpc_call","request_id":"j2"}"#)
            .await;
        let msg = raw.recv().await;
        assert_error(&msg, "BAD_MESSAGE", 400);
        assert_eq!(msg["request_id"], Value::from("j2"));

        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_bodies_get_bad_message_and_the_connection_keeps_serving() {
    within(async {
        let (_server, mut raw) = start().await;
        let garbage: [&[u8]; 7] = [
            b"\xc1\xff\x00\x13\x37 junk",
            b"{not json at all",
            b"\x93\x01\x02\x03",
            b"\x81\xa4type",
            b"",
            b"\x81\xa4type\xa8rpc_call trailing",
            b"\xdf\xff\xff\xff\xff",
        ];
        for body in garbage {
            raw.send_body(body).await;
            let msg = raw.recv().await;
            assert_error(&msg, "BAD_MESSAGE", 400);
            assert!(!has_key(&msg, "request_id"), "{msg}");
            assert_serves(&mut raw).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_type_gets_unknown_message_type() {
    within(async {
        let (_server, mut raw) = start().await;
        raw.send(&map(vec![
            ("type", Value::from("teleport")),
            ("request_id", Value::from("r9")),
        ]))
        .await;
        let msg = raw.recv().await;
        assert_error(&msg, "UNKNOWN_MESSAGE_TYPE", 400);
        assert_eq!(msg["request_id"], Value::from("r9"));
        assert_serves(&mut raw).await;

        raw.send(&map(vec![("type", Value::from("teleport"))]))
            .await;
        let msg = raw.recv().await;
        assert_error(&msg, "UNKNOWN_MESSAGE_TYPE", 400);
        assert!(!has_key(&msg, "request_id"), "{msg}");
        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpc_call_without_function_name_is_bad_message_naming_the_call() {
    within(async {
        let (_server, mut raw) = start().await;
        for id in [Value::from("req_x"), Value::from(42u64)] {
            raw.send(&map(vec![
                ("type", Value::from("rpc_call")),
                ("params", Value::Nil),
                ("request_id", id.clone()),
            ]))
            .await;
            let msg = raw.recv().await;
            assert_error(&msg, "BAD_MESSAGE", 400);
            assert_eq!(msg["request_id"], id, "{msg}");
        }
        assert_serves(&mut raw).await;
    })
    .await
}

/// Writes a JSON body as it is.
fn json(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Sends a health check and checks that it is the next answer: nothing was sent before it.
async fn assert_nothing_sent(raw: &mut RawClient) {
    raw.send(&map(vec![("type", Value::from("health_check"))]))
        .await;
    let msg = raw.recv().await;
    assert_eq!(msg_type(&msg), "health_check_response", "unexpected: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_cases_of_the_protocol_spec() {
    within(async {
        let (_server, mut raw) = start().await;

        // docs/protocol.md 9.3, one row at a time: (body, code, request_id in the reply).
        let cases: Vec<(Vec<u8>, &str, Option<Value>)> = vec![
            (
                json(r#"{"type":"ping","request_id":7}"#),
                "UNKNOWN_MESSAGE_TYPE",
                Some(Value::from(7)),
            ),
            (
                json(r#"{"type":"rpc_call","request_id":"a"}"#),
                "BAD_MESSAGE",
                Some(Value::from("a")),
            ),
            (
                json(r#"{"function_name":"f","request_id":3}"#),
                "BAD_MESSAGE",
                Some(Value::from(3)),
            ),
            (
                json(r#"{"type":"rpc_call","function_name":"f","request_id":-1}"#),
                "BAD_MESSAGE",
                None,
            ),
            (
                json(r#"{"type":"rpc_error","request_id":9,"error":"x","error_type":null}"#),
                "BAD_MESSAGE",
                None,
            ),
            (
                json(r#"{"type":"rpc_error","request_id":9}"#),
                "BAD_MESSAGE",
                Some(Value::from(9)),
            ),
            (
                json(r#"{"type":"handler_response","handler_id":"h"}"#),
                "BAD_MESSAGE",
                None,
            ),
            (Vec::new(), "BAD_MESSAGE", None),
            (vec![0xc1], "BAD_MESSAGE", None),
            (vec![0x92, 0x01, 0x02], "BAD_MESSAGE", None),
            (json(r#"{"type": "rpc_call",}"#), "BAD_MESSAGE", None),
            // 4.4: a reserved key of the wrong kind spoils any message, and its id is not read.
            (
                json(r#"{"type":"health_check","code":1}"#),
                "BAD_MESSAGE",
                None,
            ),
            (
                json(r#"{"type":"rpc_call","function_name":5,"request_id":"j4"}"#),
                "BAD_MESSAGE",
                None,
            ),
            (
                common::encode(&map(vec![
                    ("request_id", Value::from("r4")),
                    ("type", Value::from("rpc_call")),
                    ("function_name", Value::from(5)),
                ])),
                "BAD_MESSAGE",
                None,
            ),
            (
                common::encode(&map(vec![
                    ("type", Value::from("rpc_call")),
                    ("function_name", Value::from("echo")),
                    ("request_id", Value::F64(1.0)),
                ])),
                "BAD_MESSAGE",
                None,
            ),
            (
                common::encode(&map(vec![
                    ("type", Value::from("rpc_call")),
                    ("function_name", Value::from("echo")),
                    ("request_id", Value::Binary(b"id".to_vec())),
                ])),
                "BAD_MESSAGE",
                None,
            ),
            // 4.6: only integers without fraction or exponent are uints.
            (
                json(r#"{"type":"rpc_call","function_name":"echo","request_id":1.0}"#),
                "BAD_MESSAGE",
                None,
            ),
            (
                json(r#"{"type":"rpc_call","function_name":"echo","request_id":18446744073709551616}"#),
                "BAD_MESSAGE",
                None,
            ),
            // 4.1: JSON only when `{` is the very first byte.
            (
                json(r#" {"type":"health_check"}"#),
                "BAD_MESSAGE",
                None,
            ),
            // 4.3: keys must be str.
            (
                common::encode(&Value::Map(vec![
                    (Value::from("type"), Value::from("health_check")),
                    (Value::from(1), Value::from(2)),
                ])),
                "BAD_MESSAGE",
                None,
            ),
        ];
        for (body, code, id) in cases {
            raw.send_body(&body).await;
            let msg = raw.recv().await;
            assert_error(&msg, code, 400);
            match &id {
                Some(id) => assert_eq!(&msg["request_id"], id, "{msg} for {body:x?}"),
                None => assert!(!has_key(&msg, "request_id"), "{msg} for {body:x?}"),
            }
        }

        // A malformed `error` is never answered.
        raw.send_body(&json(r#"{"type":"error","request_id":9}"#))
            .await;
        assert_nothing_sent(&mut raw).await;
        // Nor is a well-formed one naming no call of ours.
        raw.send_body(&json(
            r#"{"type":"error","code":"X","message":"m","status":500,"request_id":1}"#,
        ))
        .await;
        assert_nothing_sent(&mut raw).await;
        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lenient_input_of_the_protocol_spec() {
    within(async {
        let (_server, mut raw) = start().await;

        // 5: a signed encoding of a non-negative id is that uint, echoed in the shortest form.
        let mut body = Vec::new();
        rmp::encode::write_map_len(&mut body, 3).unwrap();
        for (k, v) in [("type", "rpc_call"), ("function_name", "echo")] {
            rmp::encode::write_str(&mut body, k).unwrap();
            rmp::encode::write_str(&mut body, v).unwrap();
        }
        rmp::encode::write_str(&mut body, "request_id").unwrap();
        rmp::encode::write_i8(&mut body, 5).unwrap();
        assert_eq!(body[body.len() - 2..], [0xd0, 0x05]);
        raw.send_body(&body).await;
        let answer = raw.recv_body().await;
        assert!(
            answer.ends_with(b"\xaarequest_id\x05\xa6result\xc0"),
            "{answer:x?}"
        );

        // 4.2: key order does not matter, unknown keys are skipped whatever they hold, and the
        // last of duplicate keys wins.
        raw.send(&Value::Map(vec![
            (Value::from("request_id"), Value::from("k1")),
            (
                Value::from("x-extension"),
                map(vec![("nested", Value::Array(vec![Value::Binary(vec![1])]))]),
            ),
            (Value::from("function_name"), Value::from("nope")),
            (Value::from("params"), add_params(1, 2)),
            (Value::from("function_name"), Value::from("add")),
            (Value::from("type"), Value::from("rpc_call")),
        ]))
        .await;
        let msg = raw.recv().await;
        assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
        assert_eq!(msg["request_id"], Value::from("k1"));
        assert_eq!(msg["result"], Value::from(3));

        // 4.6: whitespace after a JSON object is fine.
        raw.send_body(&json("{\"type\":\"health_check\"}  \n"))
            .await;
        assert_eq!(msg_type(&raw.recv().await), "health_check_response");

        // 4.4: nil request_id is the same as absent; nil digest too.
        raw.send_body(&json(
            r#"{"type":"rpc_call","function_name":"echo","request_id":null}"#,
        ))
        .await;
        let msg = raw.recv().await;
        assert_error(&msg, "BAD_MESSAGE", 400);
        assert!(!has_key(&msg, "request_id"), "{msg}");
        raw.send_body(&json(r#"{"type":"error","code":"X","digest":null}"#))
            .await;
        assert_nothing_sent(&mut raw).await;

        // 6.7: a health check's extra keys, even a request_id, are not echoed.
        raw.send_body(&json(r#"{"type":"health_check","request_id":"h1"}"#))
            .await;
        assert_eq!(
            raw.recv().await,
            map(vec![("type", Value::from("health_check_response"))])
        );
        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_check_is_answered() {
    within(async {
        let (_server, mut raw) = start().await;
        for _ in 0..3 {
            raw.send(&map(vec![("type", Value::from("health_check"))]))
                .await;
            let msg = raw.recv().await;
            assert_eq!(
                msg,
                map(vec![("type", Value::from("health_check_response"))])
            );
        }
        // Unknown keys are ignored.
        raw.send(&map(vec![
            ("type", Value::from("health_check")),
            ("ts", Value::from(1_732_000_000_000u64)),
        ]))
        .await;
        assert_eq!(msg_type(&raw.recv().await), "health_check_response");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Broken streams

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_frame_then_close_leaves_the_server_serving() {
    within(async {
        let (server, mut before) = start().await;
        let conn = Connection::connect(&server.path).await.unwrap();

        let mut raw = RawClient::connect(&server.path).await;
        raw.send_bytes(&100u32.to_be_bytes()).await;
        raw.send_bytes(&[0x85; 10]).await;
        drop(raw);
        // Hanging up inside the length prefix too.
        let mut raw = RawClient::connect(&server.path).await;
        raw.send_bytes(&[0, 0]).await;
        drop(raw);

        assert_serves(&mut before).await;
        let mut after = RawClient::connect(&server.path).await;
        assert_serves(&mut after).await;
        let sum: i64 = conn
            .call("add", &serde_json::json!({"a": 1, "b": 2}))
            .await
            .unwrap();
        assert_eq!(sum, 3);
    })
    .await
}

fn small_frames() -> ConnectionConfig {
    ConnectionConfig {
        engine: EngineConfig {
            max_frame: 1024,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_frame_gets_frame_too_large_then_close() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start_with(router, small_frames(), None).await;
        let mut other = RawClient::connect(&server.path).await;

        // A body of exactly the limit is fine.
        let body = (0..1024)
            .map(|k| {
                common::encode(&rpc_call(
                    "echo",
                    Value::from("p".repeat(k)),
                    Value::from("at_limit"),
                ))
            })
            .find(|b| b.len() == 1024)
            .expect("some padding makes the body exactly 1024 bytes");
        other.send_body(&body).await;
        let msg = other.recv().await;
        assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
        assert_eq!(msg["request_id"], Value::from("at_limit"));

        // One byte over: the prefix alone is enough to be refused, then the connection ends.
        let mut raw = RawClient::connect(&server.path).await;
        raw.send_bytes(&1025u32.to_be_bytes()).await;
        let msg = raw.recv().await;
        assert_error(&msg, "FRAME_TOO_LARGE", 413);
        assert!(!has_key(&msg, "request_id"), "{msg}");
        assert_eq!(
            str_field(&msg, "message"),
            "frame of 1025 bytes exceeds the limit of 1024 bytes"
        );
        let rest = raw.read_to_close().await;
        assert!(rest.is_empty(), "nothing may follow the error: {rest:x?}");

        // Same with a huge prefix and some body bytes behind it.
        let mut raw = RawClient::connect(&server.path).await;
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xc0; 64]);
        raw.send_bytes(&bytes).await;
        assert_error(&raw.recv().await, "FRAME_TOO_LARGE", 413);
        raw.read_to_close().await;

        assert_serves(&mut other).await;
        let mut fresh = RawClient::connect(&server.path).await;
        assert_serves(&mut fresh).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answer_over_the_limit_becomes_an_internal_error() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start_with(router, small_frames(), None).await;
        let mut raw = RawClient::connect(&server.path).await;
        raw.send(&rpc_call("grow", Value::from(5000), Value::from("big")))
            .await;
        let msg = raw.recv().await;
        assert_eq!(msg_type(&msg), "rpc_error", "{msg}");
        assert_eq!(msg["request_id"], Value::from("big"));
        assert_eq!(str_field(&msg, "error_type"), "Internal");
        let text = str_field(&msg, "error");
        assert!(
            text.starts_with("the answer could not be sent: frame of ")
                && text.ends_with(" bytes exceeds the limit of 1024 bytes"),
            "{text}"
        );
        assert_serves(&mut raw).await;

        // A route's response over the limit becomes HANDLER_EXECUTION_ERROR.
        raw.send(&invoke("big_route", "/", Some(Value::from("bigr"))))
            .await;
        let msg = raw.recv().await;
        assert_error(&msg, "HANDLER_EXECUTION_ERROR", 500);
        assert_eq!(msg["request_id"], Value::from("bigr"));
        assert!(
            str_field(&msg, "message").starts_with("the handler's response could not be sent"),
            "{msg}"
        );
        assert_serves(&mut raw).await;

        // Through a Connection, that is ERR_FERRY_INTERNAL.
        let conn = Connection::connect(&server.path).await.unwrap();
        let err = conn.call::<_, String>("grow", &5000).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_INTERNAL");
        let small: String = conn.call("grow", &5).await.unwrap();
        assert_eq!(small, "xxxxx");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_over_our_own_limit_fails_locally() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start(router).await;
        let conn = Connection::connect_with(&server.path, Router::new(), small_frames())
            .await
            .unwrap();
        let err = conn
            .call::<_, String>("echo", &"y".repeat(2000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_FRAME_TOO_LARGE");
        assert!(
            matches!(err, ferry_core::Error::FrameTooLarge { max: 1024, .. }),
            "{err:?}"
        );
        assert_eq!(conn.pending_calls(), 0);
        let back: String = conn.call("echo", &"y".repeat(100)).await.unwrap();
        assert_eq!(back.len(), 100);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_over_the_servers_limit_ends_the_connection_without_hanging() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start_with(router, small_frames(), None).await;
        let conn = Connection::connect(&server.path).await.unwrap();
        let err = conn
            .call::<_, String>("echo", &"y".repeat(2000))
            .await
            .unwrap_err();
        // The server refuses the frame and hangs up; the call cannot be answered.
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{err:?}");
        conn.closed().await;
        let other = Connection::connect(&server.path).await.unwrap();
        let back: String = other.call("echo", &"y".repeat(100)).await.unwrap();
        assert_eq!(back.len(), 100);
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// invoke_handler and cancel

fn invoke(handler_id: &str, path: &str, request_id: Option<Value>) -> Value {
    let mut pairs = vec![
        ("type", Value::from("invoke_handler")),
        ("handler_id", Value::from(handler_id)),
        ("request", request(path)),
    ];
    if let Some(id) = request_id {
        pairs.push(("request_id", id));
    }
    map(pairs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idless_invocations_are_answered_in_order() {
    within(async {
        let (_server, mut raw) = start().await;
        // `slow_route` cannot finish before `fast_route` has: its answer must still go first,
        // as must the (immediate) error for the missing handler between them.
        let mut bytes = Vec::new();
        for m in [
            invoke("slow_route", "/1", None),
            invoke("missing_route", "/2", None),
            invoke("fast_route", "/3", None),
        ] {
            bytes.extend(common::frame(&common::encode(&m)));
        }
        raw.send_bytes(&bytes).await;

        let first = raw.recv().await;
        assert_eq!(msg_type(&first), "handler_response", "{first}");
        assert_eq!(str_field(&first, "handler_id"), "slow_route");
        assert_eq!(first["status"].as_u64(), Some(200));
        assert_eq!(first["body"], Value::from("slow_route: GET /1"));
        assert_eq!(
            first["headers"],
            map(vec![("x-route", Value::from("slow_route"))])
        );
        assert!(!has_key(&first, "request_id"), "{first}");

        let second = raw.recv().await;
        assert_error(&second, "HANDLER_NOT_FOUND", 404);
        assert_eq!(str_field(&second, "message"), "no handler `missing_route`");
        assert!(!has_key(&second, "request_id"), "{second}");

        let third = raw.recv().await;
        assert_eq!(msg_type(&third), "handler_response", "{third}");
        assert_eq!(str_field(&third, "handler_id"), "fast_route");
        assert_eq!(third["body"], Value::from("fast_route: GET /3"));
        assert!(!has_key(&third, "request_id"), "{third}");

        // A panicking handler is answered too, in its turn, so later answers are not held.
        let mut bytes = Vec::new();
        for m in [
            invoke("slow_route", "/p1", None),
            invoke("panic_route", "/p2", None),
            invoke("fast_route", "/p3", None),
        ] {
            bytes.extend(common::frame(&common::encode(&m)));
        }
        raw.send_bytes(&bytes).await;
        let msg = raw.recv().await;
        assert_eq!(str_field(&msg, "handler_id"), "slow_route", "{msg}");
        let msg = raw.recv().await;
        assert_error(&msg, "HANDLER_EXECUTION_ERROR", 500);
        assert!(str_field(&msg, "message").contains("route panic"), "{msg}");
        let msg = raw.recv().await;
        assert_eq!(str_field(&msg, "handler_id"), "fast_route", "{msg}");

        // With request ids, each answer names its invocation.
        raw.send(&invoke("fast_route", "/4", Some(Value::from("inv_1"))))
            .await;
        let msg = raw.recv().await;
        assert_eq!(msg_type(&msg), "handler_response", "{msg}");
        assert_eq!(msg["request_id"], Value::from("inv_1"));
        raw.send(&invoke("missing_route", "/5", Some(Value::from(77u64))))
            .await;
        let msg = raw.recv().await;
        assert_error(&msg, "HANDLER_NOT_FOUND", 404);
        assert_eq!(msg["request_id"], Value::from(77u64));

        // A request that is not an HTTP request fails the handler.
        raw.send(&map(vec![
            ("type", Value::from("invoke_handler")),
            ("handler_id", Value::from("fast_route")),
            ("request", Value::from(12)),
            ("request_id", Value::from("inv_2")),
        ]))
        .await;
        let msg = raw.recv().await;
        assert_error(&msg, "HANDLER_EXECUTION_ERROR", 500);
        assert_eq!(msg["request_id"], Value::from("inv_2"));

        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_context_carries_the_invocation_request_id() {
    within(async {
        let (_server, mut raw) = start().await;
        // `Context::request_id` is documented as the peer's id for this call, `None` only for
        // an id-less invoke_handler.
        raw.send(&invoke("ctx_route", "/", None)).await;
        let msg = raw.recv().await;
        assert_eq!(msg["body"], Value::Nil, "{msg}");
        raw.send(&invoke("ctx_route", "/", Some(Value::from("inv_ctx"))))
            .await;
        let msg = raw.recv().await;
        assert_eq!(msg["request_id"], Value::from("inv_ctx"), "{msg}");
        assert_eq!(
            msg["body"],
            Value::from("inv_ctx"),
            "the route's Context.request_id should be the invocation's id: {msg}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_aborts_the_running_call_without_an_answer() {
    within(async {
        let (router, mut events) = wire_router();
        let server = TestServer::start(router).await;
        let mut raw = RawClient::connect(&server.path).await;

        raw.send(&rpc_call("hang", Value::Nil, Value::from("c1")))
            .await;
        assert_eq!(events.recv().await, Some("started"));
        raw.send(&map(vec![
            ("type", Value::from("cancel")),
            ("request_id", Value::from("c1")),
        ]))
        .await;
        assert_eq!(events.recv().await, Some("dropped"));
        // Cancelling an unknown call is harmless.
        raw.send(&map(vec![
            ("type", Value::from("cancel")),
            ("request_id", Value::from(12345u64)),
        ]))
        .await;
        // The next frame is the health check's answer: nothing was sent for c1.
        raw.send(&map(vec![("type", Value::from("health_check"))]))
            .await;
        assert_eq!(msg_type(&raw.recv().await), "health_check_response");
        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_read_together_with_its_call_stops_it() {
    within(async {
        let (router, _events) = wire_router();
        let server = TestServer::start(router).await;
        let mut raw = RawClient::connect(&server.path).await;

        // The call and its cancel arrive in one read: the call must never run or be answered
        // (echo would answer at once if it ran).
        let mut bytes = common::frame(&common::encode(&rpc_call(
            "echo",
            Value::from("x"),
            Value::from("c2"),
        )));
        bytes.extend(common::frame(&common::encode(&map(vec![
            ("type", Value::from("cancel")),
            ("request_id", Value::from("c2")),
        ]))));
        raw.send_bytes(&bytes).await;
        raw.send(&map(vec![("type", Value::from("health_check"))]))
            .await;
        assert_eq!(msg_type(&raw.recv().await), "health_check_response");
        assert_serves(&mut raw).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_of_a_duplicate_id_reaches_the_most_recent_call() {
    within(async {
        let (router, mut events) = wire_router();
        let server = TestServer::start(router).await;
        let mut raw = RawClient::connect(&server.path).await;

        // docs/protocol.md 5: "two calls with the same id both run and are both answered with
        // that id, and a `cancel` for that id reaches only the most recent one." Both calls go
        // out in one write, so they are read together.
        let mut bytes = common::frame(&common::encode(&rpc_call(
            "echo",
            Value::from("first"),
            Value::from("dup"),
        )));
        bytes.extend(common::frame(&common::encode(&rpc_call(
            "hang",
            Value::Nil,
            Value::from("dup"),
        ))));
        raw.send_bytes(&bytes).await;
        let msg = raw.recv().await;
        assert_eq!(msg["request_id"], Value::from("dup"), "{msg}");
        assert_eq!(msg["result"], Value::from("first"));
        assert_eq!(events.recv().await, Some("started"));

        raw.send(&map(vec![
            ("type", Value::from("cancel")),
            ("request_id", Value::from("dup")),
        ]))
        .await;
        let dropped = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            dropped,
            Ok(Some("dropped")),
            "the cancel must abort the still-running most recent call with that id"
        );
        assert_nothing_sent(&mut raw).await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A hand-made peer against a Connection

/// Accepts one connection on a fresh socket and hands back a raw client over it, with a
/// `Connection` connected to it.
async fn fake_peer(mut config: ConnectionConfig) -> (tempfile::TempDir, RawClient, Connection) {
    config.io = common::io_mode();
    let (dir, path) = common::socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let conn = Connection::connect_with(&path, Router::new(), config)
        .await
        .unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    (dir, RawClient { stream }, conn)
}

fn response(request_id: &Value, result: Value) -> Vec<u8> {
    common::frame(&common::encode(&map(vec![
        ("type", Value::from("rpc_response")),
        ("request_id", request_id.clone()),
        ("result", result),
    ])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_and_stray_answers_are_ignored_by_the_caller() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(ConnectionConfig::default()).await;

        let timeout = Duration::from_millis(50);
        let err = conn
            .call_with::<_, String>("slow", &1, CallOptions::timeout(timeout))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        assert_eq!(conn.pending_calls(), 0);

        let first = peer.recv().await;
        assert_eq!(msg_type(&first), "rpc_call", "{first}");
        assert_eq!(str_field(&first, "function_name"), "slow");
        assert_eq!(first["params"], Value::from(1));
        let first_id = first["request_id"].clone();
        assert!(first_id.is_u64(), "Ferry sends integer ids: {first}");
        // The timed-out call was cancelled on the wire.
        let cancel = peer.recv().await;
        assert_eq!(msg_type(&cancel), "cancel", "{cancel}");
        assert_eq!(cancel["request_id"], first_id);

        let second = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("fast", &2).await }
        });
        let msg = peer.recv().await;
        assert_eq!(str_field(&msg, "function_name"), "fast");
        let second_id = msg["request_id"].clone();
        assert_ne!(second_id, first_id);

        // Late answer for the first call, answers naming no call of ours, a complaint naming
        // none, then the real answer: all in one write.
        let mut bytes = response(&first_id, Value::from("late"));
        bytes.extend(response(&Value::from(987_654u64), Value::from("stray")));
        bytes.extend(response(&Value::from("req_1_0"), Value::from("stray")));
        bytes.extend(common::frame(&common::encode(&map(vec![
            ("type", Value::from("error")),
            ("code", Value::from("SOMETHING")),
            ("message", Value::from("not about a call")),
            ("status", Value::from(500)),
        ]))));
        bytes.extend(response(&second_id, Value::from("right")));
        peer.send_bytes(&bytes).await;
        assert_eq!(second.await.unwrap().unwrap(), "right");
        assert_eq!(conn.pending_calls(), 0);

        // The caller answers our health check, and still calls fine.
        peer.send(&map(vec![("type", Value::from("health_check"))]))
            .await;
        assert_eq!(msg_type(&peer.recv().await), "health_check_response");
        let third = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, i64>("third", &()).await }
        });
        let msg = peer.recv().await;
        assert_eq!(msg["params"], Value::Nil);
        peer.send_bytes(&response(&msg["request_id"], Value::from(3)))
            .await;
        assert_eq!(third.await.unwrap().unwrap(), 3);
        assert!(!conn.is_closed());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_waits_for_its_caller_and_goes_with_it_when_dropped() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(ConnectionConfig::default()).await;

        // Two calls started (polled once) and then left alone while their answers arrive.
        let mut kept = Box::pin(conn.call::<_, String>("kept", &()));
        let mut dropped = Box::pin(conn.call::<_, String>("dropped", &()));
        assert!(futures_util::poll!(kept.as_mut()).is_pending());
        assert!(futures_util::poll!(dropped.as_mut()).is_pending());
        let mut ids = HashMap::new();
        for _ in 0..2 {
            let msg = peer.recv().await;
            ids.insert(
                str_field(&msg, "function_name").to_string(),
                msg["request_id"].clone(),
            );
        }
        let mut bytes = response(&ids["kept"], Value::from("for kept"));
        bytes.extend(response(&ids["dropped"], Value::from("for dropped")));
        peer.send_bytes(&bytes).await;
        common::wait_until("both answers read", || conn.pending_calls() == 0).await;

        // Dropping a call whose answer is in sends no cancel (the peer is done with it), and
        // its answer goes with it: later calls, which reuse its place, get their own.
        drop(dropped);
        let next = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("next", &()).await }
        });
        let msg = peer.recv().await;
        assert_eq!(msg_type(&msg), "rpc_call", "no cancel before it: {msg}");
        assert_eq!(str_field(&msg, "function_name"), "next");
        peer.send_bytes(&response(&msg["request_id"], Value::from("for next")))
            .await;
        assert_eq!(next.await.unwrap().unwrap(), "for next");

        // The answer that came while nobody polled is still there for its caller.
        assert_eq!(kept.await.unwrap(), "for kept");
        assert_nothing_sent(&mut peer).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_errors_naming_a_call_fail_it() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(ConnectionConfig::default()).await;
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, ()>("f", &()).await }
        });
        let msg = peer.recv().await;
        peer.send(&map(vec![
            ("type", Value::from("error")),
            ("code", Value::from("BAD_MESSAGE")),
            ("message", Value::from("what was that")),
            ("status", Value::from(400)),
            ("request_id", msg["request_id"].clone()),
        ]))
        .await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_BAD_MESSAGE");
        assert_eq!(err.error_type(), Some("BAD_MESSAGE"));

        // An rpc_error without error_type counts as Internal.
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, ()>("g", &()).await }
        });
        let msg = peer.recv().await;
        peer.send(&map(vec![
            ("type", Value::from("rpc_error")),
            ("request_id", msg["request_id"].clone()),
            ("error", Value::from("it broke")),
        ]))
        .await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_INTERNAL");
        assert_eq!(err.to_string(), "it broke");

        // A malformed answer (a required field missing) still ends the call it names.
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, ()>("g2", &()).await }
        });
        let msg = peer.recv().await;
        peer.send(&map(vec![
            ("type", Value::from("rpc_error")),
            ("request_id", msg["request_id"].clone()),
        ]))
        .await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_PROTOCOL", "{err:?}");
        assert_eq!(conn.pending_calls(), 0);

        // The peer hanging up fails a pending call with CONNECTION_LOST.
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, ()>("h", &()).await }
        });
        peer.recv().await;
        drop(peer);
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST");
        conn.closed().await;
        let err = conn.call::<_, ()>("i", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_frame_from_the_peer_ends_the_connection() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(small_frames()).await;
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("f", &()).await }
        });
        let msg = peer.recv().await;
        // An answer over the caller's limit: it reports FRAME_TOO_LARGE and hangs up.
        peer.send_bytes(&response(&msg["request_id"], Value::from("z".repeat(2000))))
            .await;
        let complaint = peer.recv().await;
        assert_error(&complaint, "FRAME_TOO_LARGE", 413);
        peer.read_to_close().await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{err:?}");
        assert!(err.to_string().contains("exceeds"), "{err}");
        conn.closed().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_with_a_field_of_the_wrong_kind_is_refused_and_the_call_goes_on() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(ConnectionConfig::default()).await;
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("f", &()).await }
        });
        let msg = peer.recv().await;
        let id = msg["request_id"].clone();
        // `error` must be a str: a stage-1 failure (docs/protocol.md 9.1), so neither its type
        // nor its id are known; the caller complains without an id and keeps the call.
        peer.send(&map(vec![
            ("type", Value::from("rpc_error")),
            ("request_id", id.clone()),
            ("error", Value::from(404)),
        ]))
        .await;
        let complaint = peer.recv().await;
        assert_error(&complaint, "BAD_MESSAGE", 400);
        assert!(!has_key(&complaint, "request_id"), "{complaint}");
        assert_eq!(conn.pending_calls(), 1);

        // A malformed answer whose fields are all of the right kind ends the call it names,
        // and nothing is sent back (9.3).
        peer.send(&map(vec![
            ("type", Value::from("rpc_error")),
            ("request_id", id),
        ]))
        .await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_PROTOCOL", "{err:?}");
        assert_eq!(conn.pending_calls(), 0);
        assert_nothing_sent(&mut peer).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_count_up_from_one_across_calls_and_invocations() {
    within(async {
        let config = ConnectionConfig {
            default_timeout: Some(Duration::from_millis(50)),
            ..small_frames()
        };
        let (_dir, mut peer, conn) = fake_peer(config).await;
        // A call too large to send consumes no id (3.2).
        let err = conn
            .call::<_, ()>("big", &"b".repeat(2000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_FRAME_TOO_LARGE");

        // A timed-out invocation is cancelled on the wire like a call (11.1).
        let err = conn.invoke_handler("h", &request("/")).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        let msg = peer.recv().await;
        assert_eq!(msg_type(&msg), "invoke_handler", "{msg}");
        assert_eq!(str_field(&msg, "handler_id"), "h");
        assert_eq!(msg["request"], request("/"));
        assert_eq!(msg["request_id"], Value::from(1u64), "{msg}");
        let msg = peer.recv().await;
        assert_eq!(msg_type(&msg), "cancel", "{msg}");
        assert_eq!(msg["request_id"], Value::from(1u64));

        let err = conn.call::<_, ()>("f", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_TIMEOUT");
        let msg = peer.recv().await;
        assert_eq!(msg_type(&msg), "rpc_call", "{msg}");
        assert_eq!(msg["request_id"], Value::from(2u64), "{msg}");
        assert_eq!(msg_type(&peer.recv().await), "cancel");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invocations_answered_without_ids_zapjs_style() {
    within(async {
        let (_dir, mut peer, conn) = fake_peer(ConnectionConfig::default()).await;
        let first = tokio::spawn({
            let conn = conn.clone();
            async move { conn.invoke_handler("api_users_get", &request("/api/users")).await }
        });
        let msg = peer.recv().await;
        assert_eq!(str_field(&msg, "handler_id"), "api_users_get");
        let second = tokio::spawn({
            let conn = conn.clone();
            async move { conn.invoke_handler("nope", &request("/")).await }
        });
        peer.recv().await;

        // An `error` naming no pending call never falls back to the oldest invocation (8.2).
        peer.send(&map(vec![
            ("type", Value::from("error")),
            ("code", Value::from("HANDLER_NOT_FOUND")),
            ("request_id", Value::from(999u64)),
        ]))
        .await;
        // Id-less answers settle the oldest invocations, in order.
        peer.send(&map(vec![
            ("type", Value::from("handler_response")),
            ("handler_id", Value::from("api_users_get")),
            ("status", Value::from(200)),
            (
                "headers",
                map(vec![("content-type", Value::from("text/plain"))]),
            ),
            ("body", Value::from("ok")),
        ]))
        .await;
        peer.send(&map(vec![
            ("type", Value::from("error")),
            ("code", Value::from("HANDLER_NOT_FOUND")),
            ("message", Value::from("no handler `nope`")),
            ("status", Value::from(404)),
        ]))
        .await;
        let resp = first.await.unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.headers["content-type"], "text/plain");
        assert_eq!(resp.body, Value::from("ok"));
        let err = second.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_NOT_FOUND");
        assert_eq!(err.error_type(), Some("HANDLER_NOT_FOUND"));
        assert!(
            matches!(&err, ferry_core::Error::Peer { status: 404, message, .. } if message == "no handler `nope`"),
            "{err:?}"
        );
        assert_eq!(conn.pending_calls(), 0);
    })
    .await
}

#[tokio::test]
async fn a_busy_polling_connection_sees_the_peer_hang_up_while_it_polls() {
    within(async {
        // Polling for longer than the test may take: only a poll that reports the hang-up
        // ends the connection in time.
        let config = ConnectionConfig {
            busy_poll: Duration::from_secs(60),
            ..ConnectionConfig::default()
        };
        let (_dir, mut raw, conn) = fake_peer(config).await;
        // One call answered, so the connection has read something and polls for more.
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, Value>("f", &1).await }
        });
        let sent = raw.recv().await;
        raw.send_bytes(&response(&sent["request_id"], Value::from(2)))
            .await;
        assert_eq!(call.await.unwrap().unwrap(), Value::from(2));
        drop(raw);
        conn.closed().await;
    })
    .await
}

/// The answers to the calls of one read go out in the calls' order, whatever mix of results,
/// errors and answers made elsewhere (a `payload_fn`'s value, an answer over the frame limit,
/// a function that wrote part of a result and then failed) the read holds; each answer is
/// whole. An asynchronous function's answer comes when it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_to_one_read_keep_the_calls_order() {
    within(async {
        let router = Router::new()
            .sync_fn("add", |p: Pair| Ok::<_, String>(p.a + p.b))
            .sync_fn("grow", |n: usize| Ok::<_, String>("x".repeat(n)))
            .sync_fn("encode_fails", |_: serde::de::IgnoredAny| {
                Ok::<_, String>(HalfEncoded { panic: false })
            })
            .sync_fn("panics", |_: serde::de::IgnoredAny| -> Result<(), String> {
                panic!("on purpose")
            })
            .payload_fn("payload_echo", Ok::<_, String>)
            .msgpack_fn("fail_after_write", |_: &[u8], out: &mut MsgpackOut<'_>| {
                out.extend_from_slice(&[0xc4, 3, 1]);
                Err::<(), _>("failed after writing")
            })
            .msgpack_fn(
                "panic_after_write",
                |_: &[u8], out: &mut MsgpackOut<'_>| -> Result<(), String> {
                    out.extend_from_slice(&[0xc4, 3, 1]);
                    panic!("on purpose, after writing")
                },
            )
            .async_fn("later", |n: u64| async move {
                tokio::task::yield_now().await;
                Ok::<_, String>(n)
            });
        let server = TestServer::start_with(router, small_frames(), None).await;
        let mut raw = RawClient::connect(&server.path).await;

        let calls: Vec<(&str, Value)> = vec![
            ("add", add_params(1, 2)),
            ("grow", Value::from(10)),
            ("grow", Value::from(5000)),
            ("add", add_params(3, 4)),
            ("payload_echo", Value::from("pe")),
            ("add", add_params(5, 6)),
            ("encode_fails", Value::Nil),
            ("fail_after_write", Value::Nil),
            ("panics", Value::Nil),
            ("no_such_function", Value::Nil),
            ("later", Value::from(11)),
            ("add", add_params(7, 8)),
            ("panic_after_write", Value::Nil),
            ("add", add_params(9, 10)),
        ];
        // All in one write, so the server reads them together.
        let mut bytes = Vec::new();
        for (i, (name, params)) in calls.iter().enumerate() {
            let call = rpc_call(name, params.clone(), Value::from(i as u64 + 1));
            bytes.extend_from_slice(&common::frame(&common::encode(&call)));
        }
        raw.send_bytes(&bytes).await;

        let mut answers = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..calls.len() {
            let msg = raw.recv().await;
            let id = msg["request_id"].as_u64().expect("a numeric request_id");
            order.push(id);
            answers.insert(id, msg);
        }
        let inline: Vec<u64> = order.iter().copied().filter(|&id| id != 11).collect();
        assert_eq!(
            inline,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14],
            "{order:?}"
        );

        let result = |id: u64| {
            let msg = &answers[&id];
            assert_eq!(msg_type(msg), "rpc_response", "{msg}");
            msg["result"].clone()
        };
        let error = |id: u64| {
            let msg = &answers[&id];
            assert_eq!(msg_type(msg), "rpc_error", "{msg}");
            (
                str_field(msg, "error_type").to_owned(),
                str_field(msg, "error").to_owned(),
            )
        };
        assert_eq!(result(1), Value::from(3));
        assert_eq!(result(2), Value::from("x".repeat(10)));
        let (kind, text) = error(3);
        assert_eq!(kind, "Internal");
        assert!(
            text.starts_with("the answer could not be sent: frame of "),
            "{text}"
        );
        assert_eq!(result(4), Value::from(7));
        assert_eq!(result(5), Value::from("pe"));
        assert_eq!(result(6), Value::from(11));
        error(7);
        assert_eq!(error(8).1, "failed after writing");
        let (kind, text) = error(9);
        assert_eq!(kind, "Internal");
        assert!(text.contains("on purpose"), "{text}");
        error(10);
        assert_eq!(result(11), Value::from(11));
        assert_eq!(result(12), Value::from(15));
        let (kind, text) = error(13);
        assert_eq!(kind, "Internal");
        assert!(text.contains("after writing"), "{text}");
        assert_eq!(result(14), Value::from(19));

        // A read whose first answer is made elsewhere (a `payload_fn`'s value), then only
        // answers written in place: those join the engine's queue behind it.
        let mut bytes = Vec::new();
        let batch = [
            ("payload_echo", Value::from("first")),
            ("add", add_params(1, 1)),
            ("add", add_params(2, 2)),
        ];
        for (i, (name, params)) in batch.iter().enumerate() {
            let call = rpc_call(name, params.clone(), Value::from(i as u64 + 100));
            bytes.extend_from_slice(&common::frame(&common::encode(&call)));
        }
        raw.send_bytes(&bytes).await;
        let mut got = Vec::new();
        for _ in 0..batch.len() {
            let msg = raw.recv().await;
            assert_eq!(msg_type(&msg), "rpc_response", "{msg}");
            got.push((msg["request_id"].as_u64().unwrap(), msg["result"].clone()));
        }
        assert_eq!(
            got,
            vec![
                (100, Value::from("first")),
                (101, Value::from(2)),
                (102, Value::from(4)),
            ]
        );
        assert_serves(&mut raw).await;
    })
    .await
}
