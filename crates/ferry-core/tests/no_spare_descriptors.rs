//! A connection registered for reading only (`early_wake: EarlyWake::Off`) waits for room to write
//! through a duplicate descriptor. With no descriptor to spare, a full socket must still
//! drain: the writer looks again every few milliseconds instead of ending the connection.
//!
//! Its own test binary, since it lowers the process's descriptor limit.

mod common;

use common::{within, TestServer};
use ferry_core::router::Value;
use ferry_core::{CallOptions, Connection, ConnectionConfig, Router};

/// Lowers the soft descriptor limit so that no new descriptor can be opened; returns the
/// limit to restore.
fn exhaust_descriptors() -> libc::rlimit {
    // SAFETY: plain system calls on owned, valid arguments.
    unsafe {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        // The lowest free descriptor number: with the limit there, nothing new can open.
        let lowest = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        assert!(lowest >= 0);
        libc::close(lowest);
        let low = libc::rlimit {
            rlim_cur: lowest as libc::rlim_t,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
        assert!(
            libc::dup(0) < 0,
            "the limit must leave no descriptor to spare"
        );
        old
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_socket_drains_without_a_descriptor_to_spare() {
    within(async {
        let server = TestServer::start(Router::new().raw_fn("echo", |_name, p| Ok(p))).await;
        let config = ConnectionConfig {
            early_wake: ferry_core::EarlyWake::Off,
            ..ConnectionConfig::default()
        };
        let conn = Connection::connect_with(&server.path, Router::new(), config)
            .await
            .unwrap();
        // The server has accepted (and holds its descriptor) once a call is answered.
        let one: u64 = conn.call("echo", &1u64).await.unwrap();
        assert_eq!(one, 1);

        let old = exhaust_descriptors();
        // Far more than the socket buffers hold, each way at once.
        let calls = (0..4u64).map(|k| {
            let conn = conn.clone();
            async move {
                let blob: Vec<u8> = (0..2 * 1024 * 1024 + k)
                    .map(|i| (i * 7 + k) as u8)
                    .collect();
                let params = common::encode(&Value::Binary(blob));
                let back = conn.call_raw("echo", &params, CallOptions::default()).await;
                (params, back)
            }
        });
        let results = futures_util::future::join_all(calls).await;
        // SAFETY: restores the limit read above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
        for (k, (params, back)) in results.into_iter().enumerate() {
            let back = back.unwrap_or_else(|e| panic!("echo {k} failed: {e}"));
            assert!(back.as_bytes() == &params[..], "echo {k} came back altered");
        }
        assert!(!conn.is_closed());
    })
    .await
}
