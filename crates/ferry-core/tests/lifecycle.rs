//! Server and connection lifecycle: binding over stale, live and foreign files, graceful
//! shutdown, calls that outlive the server, and closing a connection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{socket_path, wait_until, within, TestServer};
use ferry_core::router::{HttpRequest, HttpResponse, Value};
use ferry_core::{Connection, ConnectionConfig, Error, Router, Server};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, Notify};

#[derive(Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

/// `add`, and `gated`, which reports "started" and then answers "opened" once `gate` is
/// notified (or reports "dropped" if aborted first).
fn router(gate: Arc<Notify>) -> (Router, mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new()
        .sync_fn("add", |p: Pair| Ok::<_, String>(p.a + p.b))
        .route("status", |_ctx, req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 200,
                headers: Default::default(),
                body: Value::from(req.path),
            })
        })
        .async_fn("gated", move |_: IgnoredAny| {
            let gate = gate.clone();
            let tx = tx.clone();
            async move {
                struct Dropped(Option<mpsc::UnboundedSender<&'static str>>);
                impl Drop for Dropped {
                    fn drop(&mut self) {
                        if let Some(tx) = self.0.take() {
                            let _ = tx.send("dropped");
                        }
                    }
                }
                let _ = tx.send("started");
                let mut guard = Dropped(Some(tx));
                gate.notified().await;
                guard.0 = None;
                Ok::<_, String>("opened")
            }
        });
    (router, rx)
}

fn plain_router() -> Router {
    router(Arc::new(Notify::new())).0
}

async fn assert_serves(conn: &Connection) {
    let sum: i64 = conn
        .call("add", &json!({"a": 40, "b": 2}))
        .await
        .expect("the connection serves calls");
    assert_eq!(sum, 42);
}

fn no_timeout() -> ConnectionConfig {
    ConnectionConfig {
        default_timeout: None,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Binding

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bind_replaces_a_stale_socket_file() {
    within(async {
        let (_dir, path) = socket_path();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(
            path.exists(),
            "test setup: the stale socket file is left behind"
        );

        let mut server = TestServer::start_at(&path, plain_router(), Default::default(), None)
            .await
            .expect("binding over a stale socket succeeds");
        let conn = Connection::connect(&path).await.unwrap();
        assert_serves(&conn).await;
        server.stop().await.unwrap();
        assert!(!path.exists());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bind_refuses_a_live_server_and_leaves_it_working() {
    within(async {
        let server = TestServer::start(plain_router()).await;
        let before = Connection::connect(&server.path).await.unwrap();

        let err = Server::bind(&server.path, plain_router())
            .await
            .err()
            .expect("binding over a live server must fail");
        assert_eq!(err.code(), "ERR_FERRY_IO");
        let Error::Io { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{err}");

        assert!(server.path.exists());
        assert_serves(&before).await;
        let after = Connection::connect(&server.path).await.unwrap();
        assert_serves(&after).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bind_refuses_a_regular_file_and_keeps_it() {
    within(async {
        let (_dir, path) = socket_path();
        std::fs::write(&path, b"precious data").unwrap();

        let err = Server::bind(&path, plain_router())
            .await
            .err()
            .expect("binding over a regular file must fail");
        assert_eq!(err.code(), "ERR_FERRY_IO");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious data");

        // A directory is not a socket either.
        let dir_path = path.with_file_name("a-dir");
        std::fs::create_dir(&dir_path).unwrap();
        let err = Server::bind(&dir_path, plain_router()).await.err();
        assert_eq!(err.map(|e| e.code()), Some("ERR_FERRY_IO"));
        assert!(dir_path.is_dir());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_removes_only_its_own_socket_file() {
    within(async {
        let (_dir, path) = socket_path();
        let mut first = TestServer::start_at(&path, plain_router(), Default::default(), None)
            .await
            .unwrap();
        // Someone removes the file and a second server takes the path.
        std::fs::remove_file(&path).unwrap();
        let mut second = TestServer::start_at(&path, plain_router(), Default::default(), None)
            .await
            .unwrap();

        first.stop().await.unwrap();
        assert!(
            path.exists(),
            "the first server removed the second's socket"
        );
        let conn = Connection::connect(&path).await.unwrap();
        assert_serves(&conn).await;
        second.stop().await.unwrap();
        assert!(!path.exists());
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_answers_the_running_call_then_removes_the_socket() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, mut events) = router(gate.clone());
        let mut server = TestServer::start(router).await;
        let path = server.path.clone();
        let conn = Connection::connect_with(&path, Router::new(), no_timeout())
            .await
            .unwrap();
        let idle = Connection::connect(&path).await.unwrap();
        assert_serves(&idle).await;

        let slow = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("gated", &()).await }
        });
        assert_eq!(events.recv().await, Some("started"));

        server.signal_stop();
        // Once the socket file is gone the server has stopped accepting...
        wait_until("the socket file is removed", || !path.exists()).await;
        assert!(Connection::connect(&path).await.is_err());
        // ...and is waiting for the running call: it cannot have finished.
        assert!(!server.is_finished(), "shutdown did not wait for the call");

        // New calls on the draining connection are refused, not run.
        let refused = loop {
            match conn.call::<_, i64>("add", &json!({"a": 1, "b": 1})).await {
                Ok(2) => tokio::time::sleep(Duration::from_millis(2)).await,
                other => break other,
            }
        };
        let err = refused.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_INTERNAL", "{err:?}");
        assert_eq!(err.to_string(), "the server is shutting down");
        // Route invocations are still served while draining.
        let resp = conn
            .invoke_handler("status", &json!({"method": "GET", "path": "/draining"}))
            .await
            .unwrap();
        assert_eq!(resp.body, Value::from("/draining"));
        assert!(!server.is_finished());

        gate.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), "opened");
        server.stop().await.unwrap();
        assert!(!path.exists());

        // Both connections end.
        conn.closed().await;
        idle.closed().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_fail_with_connection_lost_when_the_server_goes_away() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, mut events) = router(gate.clone());
        // A short grace period: the running call is abandoned.
        let mut server =
            TestServer::start_with(router, ConnectionConfig::default(), Some(Duration::ZERO)).await;
        let conn = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        let idle = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        assert_serves(&idle).await;

        let pending = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("gated", &()).await }
        });
        assert_eq!(events.recv().await, Some("started"));

        server.stop().await.unwrap();
        assert_eq!(events.recv().await, Some("dropped"));

        let err = pending.await.unwrap().unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{err:?}");
        conn.closed().await;
        assert!(conn.is_closed());
        assert_eq!(conn.pending_calls(), 0);
        let err = conn.call::<_, i64>("add", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST");

        // A call on a connection that may not have noticed yet fails the same way.
        let err = idle
            .call::<_, i64>("add", &json!({"a": 1, "b": 2}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{err:?}");
        idle.closed().await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Closing a connection

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_settles_pending_calls_with_closed() {
    within(async {
        let gate = Arc::new(Notify::new());
        let (router, mut events) = router(gate.clone());
        let server = TestServer::start(router).await;
        let conn = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();

        let calls: Vec<_> = (0..3)
            .map(|_| {
                let conn = conn.clone();
                tokio::spawn(async move { conn.call::<_, String>("gated", &()).await })
            })
            .collect();
        for _ in 0..3 {
            assert_eq!(events.recv().await, Some("started"));
        }
        assert_eq!(conn.pending_calls(), 3);

        conn.close();
        assert!(conn.is_closed());
        for call in calls {
            let err = call.await.unwrap().unwrap_err();
            assert_eq!(err.code(), "ERR_FERRY_CLOSED", "{err:?}");
        }
        assert_eq!(conn.pending_calls(), 0);
        conn.closed().await;

        let err = conn.call::<_, i64>("add", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CLOSED");
        let err = conn
            .invoke_handler("any", &json!({"method": "GET", "path": "/"}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CLOSED");
        conn.close();

        // The server noticed the hang-up (its handlers were abandoned) and serves others.
        for _ in 0..3 {
            assert_eq!(events.recv().await, Some("dropped"));
        }
        let other = Connection::connect(&server.path).await.unwrap();
        assert_serves(&other).await;
    })
    .await
}

/// Graceful shutdown waits for a synchronous function that is running (it runs on the
/// connection's reader, with no task of its own) and sends its answer before closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_waits_for_a_running_sync_function() {
    within(async {
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, gate_rx) = (
            std::sync::Mutex::new(started_tx),
            std::sync::Mutex::new(gate_rx),
        );
        let router = plain_router().sync_fn("blocking", move |_: IgnoredAny| {
            let _ = started_tx.lock().unwrap().send(());
            let _ = gate_rx.lock().unwrap().recv();
            Ok::<_, String>("done")
        });
        let mut server = TestServer::start_with(
            router,
            ConnectionConfig::default(),
            Some(Duration::from_secs(10)),
        )
        .await;
        let conn = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        assert_serves(&conn).await;
        let other = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        assert_serves(&other).await;

        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call::<_, String>("blocking", &()).await }
        });
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        server.signal_stop();
        // The server shuts its connections down in the order it accepted them: once the later,
        // idle one refuses calls or is closed, the first is waiting for its running call (or,
        // wrongly, closed already).
        while other
            .call::<_, i64>("add", &json!({"a": 1, "b": 1}))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        gate_tx.send(()).unwrap();
        assert_eq!(call.await.unwrap().unwrap(), "done");
        server.stop().await.unwrap();
    })
    .await
}

/// A server whose tokio runtime goes away ends its connections (in either I/O mode): a call
/// it was running is not left waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_runtime_that_shuts_down_ends_its_connections() {
    within(async {
        for io in [ferry_core::IoMode::Reactor, ferry_core::IoMode::Threads] {
            let (dir, path) = socket_path();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let server_path = path.clone();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let (router, _events) = router(Arc::new(Notify::new()));
                let config = ConnectionConfig {
                    io,
                    ..Default::default()
                };
                let server = Server::bind_with(&server_path, router, config)
                    .await
                    .unwrap();
                let _ = ready_tx.send(());
                server.run_until(std::future::pending::<()>()).await
            });
            ready_rx.await.unwrap();
            let conn = Connection::connect_with(&path, Router::new(), no_timeout())
                .await
                .unwrap();
            assert_serves(&conn).await;
            let held = tokio::spawn({
                let conn = conn.clone();
                async move { conn.call::<_, String>("gated", &()).await }
            });
            wait_until("the call is pending", || conn.pending_calls() == 1).await;
            rt.shutdown_background();
            let err = held.await.unwrap().unwrap_err();
            assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{io:?}: {err:?}");
            drop(dir);
        }
    })
    .await
}

/// A handler that closes its own connection while a call it made is pending, then waits: the
/// connection drops the handler (and with it the call, which cancels itself, taking the
/// connection's lock) without deadlocking, and the server keeps serving and shuts down. Runs
/// on its own thread so that a deadlock fails the test instead of hanging the suite.
#[test]
fn a_handler_that_closes_its_connection_mid_call_is_dropped_cleanly() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let stuck = "the server deadlocked dropping a handler whose connection it closed";
    common::on_own_thread(runtime, stuck, async {
        let router = plain_router().async_fn_ctx(
            "close_mid_call",
            |ctx: ferry_core::Context, _: IgnoredAny| async move {
                let call = ctx.connection.call::<_, Value>("anything", &());
                tokio::pin!(call);
                // Registered with the engine: dropping it now cancels it.
                assert!(futures_util::poll!(call.as_mut()).is_pending());
                ctx.connection.close();
                std::future::pending::<()>().await;
                Ok::<_, String>(())
            },
        );
        let mut server = TestServer::start(router).await;
        let conn = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        let err = conn.call::<_, ()>("close_mid_call", &()).await.unwrap_err();
        assert_eq!(err.code(), "ERR_FERRY_CONNECTION_LOST", "{err:?}");
        // The server still serves other connections, and stops.
        let other = Connection::connect_with(&server.path, Router::new(), no_timeout())
            .await
            .unwrap();
        assert_serves(&other).await;
        server.stop().await.unwrap();
    });
}
