//! Ferry's Rust client: calls a Ferry peer through `ferry_core::Connection`, the way a Rust
//! user would (typed params and results, the connection's default settings).
//!
//! ```text
//! ferry-client --socket P --scenario latency|throughput|echo|first|memory [options]
//! ```
//!
//! Works against any Ferry server with `add`, `echo` and `sleep`: the Rust example worker
//! (Rust→Rust) or a Node Ferry server (Rust calling JavaScript handlers).
//! - small call: `add {a: 1, b: 2}`, answered by 3;
//! - echo: `echo` with a MessagePack `bin` of `--size` bytes as its params, answered by the
//!   same `bin`;
//! - memory: `--pending` calls of `sleep {ms: 60000}`, then this process's RSS.
//!
//! A wrong answer or a failed call exits 1. Prints one JSON line (benches/README.md).
//!
//! Throughput and echo keep `--inflight` calls outstanding in as many lanes (tasks that each make
//! one call after another), like the Node peers. The runtime is current-thread, chosen by
//! measurement against the example worker on the 2-core machine (medians of 3 runs, pinned): a
//! 2-worker multi-thread runtime was slower in every scenario, whether the calls ran in `block_on`
//! (p50 70 vs 28 µs, 150K vs 400K calls/s) or in a task spawned onto a worker (p50 27 vs 26 µs,
//! 375K vs 448K calls/s, echo 491 vs 537 MiB/s). The calls run in a spawned task rather than in
//! `block_on` itself: waking the `block_on` future makes the current-thread scheduler poll the
//! reactor once more (an `epoll_wait` with a zero timeout per call, seen with strace); from a
//! spawned task, one call costs the client `sendto`, `epoll_wait` and `recvfrom` only (hand-run
//! A/B, pinned, 3 runs each: p50 22.2 vs 23.9 µs, 571K vs 525K calls/s).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_bench::{
    echo_result, first_result, latency_result, make_payload, memory_result, payload_matches,
    rss_bytes, run_tokio_client, throughput_result, ClientArgs, Scenario,
};
use ferry_core::Connection;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use serde_bytes::{ByteBuf, Bytes};

#[derive(Serialize)]
struct Add {
    a: i64,
    b: i64,
}

const ADD: Add = Add { a: 1, b: 2 };

#[derive(Serialize)]
struct Sleep {
    ms: u64,
}

fn main() {
    let args = ClientArgs::from_env();
    run_tokio_client(async move { run(&args).await })
}

async fn connect(path: &str) -> Result<Connection, String> {
    Connection::connect(path).await.map_err(|e| e.to_string())
}

/// One small call, checked.
async fn add(conn: &Connection) -> Result<(), String> {
    // Accepts 3 sent as an integer or as a float.
    let sum: f64 = conn
        .call("add", &ADD)
        .await
        .map_err(|e| format!("add failed: {e}"))?;
    if sum != 3.0 {
        return Err(format!("add answered {sum}, not 3"));
    }
    Ok(())
}

/// One binary echo, checked.
async fn echo(conn: &Connection, payload: &[u8]) -> Result<(), String> {
    let back: ByteBuf = conn
        .call("echo", Bytes::new(payload))
        .await
        .map_err(|e| format!("echo failed: {e}"))?;
    if !payload_matches(&back, payload) {
        return Err(format!(
            "echo answered {} bytes that differ from the {} sent",
            back.len(),
            payload.len()
        ));
    }
    Ok(())
}

async fn run(args: &ClientArgs) -> Result<serde_json::Value, String> {
    match args.scenario {
        Scenario::Latency => {
            let conn = connect(&args.socket).await?;
            let mut samples = Vec::with_capacity(args.n);
            for i in 0..args.warmup + args.n {
                let t = Instant::now();
                add(&conn).await?;
                if i >= args.warmup {
                    samples.push(t.elapsed());
                }
            }
            Ok(latency_result(samples))
        }
        Scenario::First => {
            let t = Instant::now();
            let conn = connect(&args.socket).await?;
            add(&conn).await?;
            Ok(first_result(t.elapsed()))
        }
        Scenario::Throughput => {
            let conn = connect(&args.socket).await?;
            let (calls, elapsed) =
                closed_loop(args.inflight, args.warmup_time, args.duration, move || {
                    let conn = conn.clone();
                    async move { add(&conn).await }
                })
                .await?;
            Ok(throughput_result(calls, elapsed, args.inflight))
        }
        Scenario::Echo => {
            let conn = connect(&args.socket).await?;
            let payload = Arc::new(make_payload(args.size));
            let (echoes, elapsed) =
                closed_loop(args.inflight, args.warmup_time, args.duration, move || {
                    let (conn, payload) = (conn.clone(), payload.clone());
                    async move { echo(&conn, &payload).await }
                })
                .await?;
            Ok(echo_result(echoes, args.size, elapsed))
        }
        Scenario::Memory => {
            let conn = connect(&args.socket).await?;
            let sleep = Sleep { ms: 60_000 };
            let mut sleeps: FuturesUnordered<_> = (0..args.pending)
                .map(|_| conn.call::<_, serde::de::IgnoredAny>("sleep", &sleep))
                .collect();
            // Poll the sleeps until every one is queued (tokio's co-operative budget can make
            // one poll stop early); the answer to an `add` queued after them then proves they
            // were all written (and read by the server).
            while conn.pending_calls() < args.pending {
                if let std::task::Poll::Ready(r) = futures_util::poll!(sleeps.next()) {
                    return Err(match r {
                        Some(Err(e)) => format!("sleep failed: {e}"),
                        _ => "a sleep ended early".into(),
                    });
                }
                tokio::task::yield_now().await;
            }
            add(&conn).await?;
            let rss = rss_bytes().map_err(|e| format!("cannot read RSS: {e}"))?;
            if conn.pending_calls() != args.pending {
                return Err(format!(
                    "{} calls pending, not {}",
                    conn.pending_calls(),
                    args.pending
                ));
            }
            Ok(memory_result(rss, args.pending))
        }
    }
}

/// Keeps `inflight` calls outstanding through the warm-up and `duration`, the way the Node
/// peers do (common.cjs `closedLoop`): `inflight` lanes, each a task that makes one call after
/// another with `call`. Counts the completions inside the measured window; returns them and
/// the window's length. Lanes rather than one `FuturesUnordered` of call futures: a lane's
/// task is allocated once, where `FuturesUnordered` allocates, moves and frees a task per
/// call (the client's instructions per call, callgrind, pinned: 2,656 → 2,273).
async fn closed_loop<F, Fut>(
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Result<(u64, Duration), String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    const WARMUP: u8 = 0;
    const MEASURING: u8 = 1;
    const STOPPING: u8 = 2;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let count = Arc::new(AtomicU64::new(0));
    let lanes: Vec<_> = (0..inflight)
        .map(|_| {
            let (call, phase, count) = (call.clone(), phase.clone(), count.clone());
            tokio::spawn(async move {
                while phase.load(Ordering::Relaxed) != STOPPING {
                    if let Err(e) = call().await {
                        phase.store(STOPPING, Ordering::Relaxed);
                        return Err(e);
                    }
                    if phase.load(Ordering::Relaxed) == MEASURING {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    // A lane that failed during the warm-up stopped them all: report its error now.
    let failed = phase
        .compare_exchange(WARMUP, MEASURING, Ordering::Relaxed, Ordering::Relaxed)
        .is_err();
    let t0 = Instant::now();
    if !failed {
        tokio::time::sleep(duration).await;
    }
    let counted = count.load(Ordering::Relaxed);
    let elapsed = t0.elapsed();
    phase.store(STOPPING, Ordering::Relaxed);
    for lane in lanes {
        lane.await
            .unwrap_or_else(|e| Err(format!("lane failed: {e}")))?;
    }
    if counted == 0 {
        return Err("no completions were measured (is the duration too short?)".into());
    }
    Ok((counted, elapsed))
}
