//! A busy-polling connection stops polling once nothing has come for `busy_poll`, and at once
//! when it is closed: an idle or closed connection costs no CPU. A test binary of its own,
//! because it reads the CPU time of the whole process, which tests running beside it would add
//! to.

mod common;

use std::time::Duration;

use common::TestServer;
use ferry_core::router::Value;
use ferry_core::{CallOptions, Connection, ConnectionConfig, IoMode, Router};

/// The tests of this binary run one at a time: each reads the CPU time of the whole process.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn an_idle_busy_polling_connection_stops_polling() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::on_own_thread(runtime, "the idle check did not finish", async {
        for io in [IoMode::Reactor, IoMode::Threads] {
            let config = ConnectionConfig {
                io,
                busy_poll: Duration::from_millis(20),
                ..ConnectionConfig::default()
            };
            let router = Router::new().sync_fn("inc", |n: u64| Ok::<_, String>(n + 1));
            let server = TestServer::start_with(router, config.clone(), None).await;
            let conn = Connection::connect_with(&server.path, Router::new(), config)
                .await
                .unwrap();
            for i in 0..50u64 {
                assert_eq!(conn.call::<_, u64>("inc", &i).await.unwrap(), i + 1);
            }
            // Idle: each end polls for at most 20 ms after what it last read, then waits
            // without using the CPU. Polling that went on would burn most of these 400 ms on
            // each end.
            let before = cpu_time();
            tokio::time::sleep(Duration::from_millis(400)).await;
            let used = cpu_time() - before;
            assert!(
                used < Duration::from_millis(200),
                "{io:?}: {used:?} of CPU while idle for 400 ms"
            );
            conn.close();
        }
    });
}

/// CPU used by this process while `body` runs.
async fn cpu_during(body: impl std::future::Future<Output = ()>) -> Duration {
    let before = cpu_time();
    body.await;
    cpu_time() - before
}

#[test]
fn a_closed_busy_polling_connection_stops_polling_while_it_still_flushes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::on_own_thread(runtime, "the close check did not finish", async {
        for io in [IoMode::Reactor, IoMode::Threads] {
            // Polling far longer than the test, and a flush after close that outlasts it: only
            // the close itself can end the polling in time.
            let config = ConnectionConfig {
                io,
                busy_poll: Duration::from_secs(60),
                close_flush: Duration::from_secs(60),
                ..ConnectionConfig::default()
            };
            let (_dir, path) = common::socket_path();
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let conn = Connection::connect_with(&path, Router::new(), config)
                .await
                .unwrap();
            let (peer, _) = listener.accept().await.unwrap();
            let mut peer = common::RawClient { stream: peer };
            // One call answered, so the reader has read and polls after it.
            let first = tokio::spawn({
                let conn = conn.clone();
                async move { conn.call::<_, Value>("f", &1).await }
            });
            let sent = peer.recv().await;
            let answer = common::map(vec![
                ("type", Value::from("rpc_response")),
                ("request_id", sent["request_id"].clone()),
                ("result", Value::from(2)),
            ]);
            peer.send_bytes(&common::frame(&common::encode(&answer)))
                .await;
            assert_eq!(first.await.unwrap().unwrap(), Value::from(2));
            // More than the socket holds, to a peer that never reads: the close keeps flushing.
            let big = common::encode(&Value::Binary(vec![7; 4 * 1024 * 1024]));
            let stuck = tokio::spawn({
                let conn = conn.clone();
                async move { conn.call_raw("f", &big, CallOptions::default()).await }
            });
            tokio::task::yield_now().await;
            conn.close();
            let used = cpu_during(tokio::time::sleep(Duration::from_millis(400))).await;
            assert!(
                used < Duration::from_millis(200),
                "{io:?}: {used:?} of CPU in 400 ms after close"
            );
            assert!(stuck.await.unwrap().is_err());
            drop(peer);
        }
    });
}
