//! Early writes (`ferry_core::EarlyWrites`): calls made in one turn of the runtime reach the
//! peer while that turn is still running, once enough are queued, in a process that may run on
//! more than one CPU; on one CPU they wait for the writer's turn. The peer is a plain socket
//! read by a thread, which counts the frames and checks their order.

mod common;

use std::future::Future;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::Duration;

use common::{socket_path, TEST_LIMIT};
use ferry_core::engine::runs_on_many_cpus;
use ferry_core::message::{decode, Message, RequestId};
use ferry_core::{CallOptions, Connection, ConnectionConfig, IoMode, Router};

/// Frames the peer has read, and whether their request ids came in order.
#[derive(Default)]
struct Seen {
    frames: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Seen {
    /// Blocks this thread until the peer has read more than `n` frames, or `limit` passed.
    fn wait_beyond(&self, n: usize, limit: Duration) -> (usize, bool) {
        let guard = self.frames.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, limit, |(seen, _)| *seen <= n)
            .unwrap();
        *guard
    }
}

/// A peer that reads frames and answers nothing.
fn silent_peer(listener: std::os::unix::net::UnixListener, seen: Arc<Seen>) {
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut next = 1u64;
        let mut head = [0u8; 4];
        while sock.read_exact(&mut head).is_ok() {
            let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
            if sock.read_exact(&mut body).is_err() {
                break;
            }
            let in_order = matches!(
                decode(&body),
                Ok(Message::RpcCall { request_id: RequestId::Int(id), .. }) if id == next
            );
            next += 1;
            let mut f = seen.frames.lock().unwrap();
            f.0 += 1;
            f.1 &= in_order;
            seen.changed.notify_all();
        }
    });
}

#[test]
fn calls_of_one_turn_reach_the_peer_before_it_ends_on_many_cpus() {
    const N: usize = 200;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stuck = "the peer never got every frame";
    let (many, early, all) = common::on_own_thread(runtime, stuck, async {
        let (_dir, path) = socket_path();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Seen {
            frames: Mutex::new((0, true)),
            ..Default::default()
        });
        silent_peer(listener, seen.clone());
        // The reactor's writer is a task, which runs only in a later turn (a writer thread
        // would write whenever it is woken, turn or not).
        let config = ConnectionConfig {
            io: IoMode::Reactor,
            ..Default::default()
        };
        let conn = Connection::connect_with(&path, Router::new(), config)
            .await
            .unwrap();
        let params = rmp_serde::to_vec(&"x".repeat(100)).unwrap();
        let calls: Vec<_> = (0..N)
            .map(|_| Box::pin(conn.call_raw("echo", &params, CallOptions::default())))
            .collect();
        let calls = Arc::new(Mutex::new(calls));
        let polled = AtomicUsize::new(0);
        let many = runs_on_many_cpus();
        // One poll starts every call (each queues its frame), and in that same turn of the
        // runtime, before the writer task can run, this thread waits for the peer.
        let early = std::future::poll_fn(|cx| {
            for call in calls.lock().unwrap().iter_mut() {
                assert!(call.as_mut().poll(cx).is_pending());
                polled.fetch_add(1, Ordering::Relaxed);
            }
            let limit = if many {
                TEST_LIMIT / 2
            } else {
                Duration::from_millis(300)
            };
            Poll::Ready(seen.wait_beyond(0, limit).0)
        })
        .await;
        assert_eq!(polled.load(Ordering::Relaxed), N);
        // The writer's turn sends the rest.
        let all = loop {
            let (n, in_order) = seen.wait_beyond(0, Duration::ZERO);
            if n == N {
                break (n, in_order);
            }
            tokio::task::yield_now().await;
            let _ = seen.wait_beyond(n, Duration::from_millis(20));
        };
        assert_eq!(conn.pending_calls(), N);
        (many, early, all)
    });
    if many {
        assert!(early > 0, "no frame reached the peer before the turn ended");
        assert!(
            early < N,
            "all {early} frames went out early, not only the first"
        );
    } else {
        assert_eq!(early, 0, "frames went out early on a process with one CPU");
    }
    assert_eq!(all, (N, true), "frames lost, repeated or out of order");
}
