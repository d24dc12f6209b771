//! The floor of a Rust client that makes each call from a task: the least such a client does
//! per call, against `floor-server`, with no protocol.
//!
//! ```text
//! floor-tasks --socket P --scenario latency|throughput|echo|first [options]
//! ```
//!
//! Like `ferry-client`, each call in flight is a task on a current-thread tokio runtime that
//! awaits its answer (throughput and echo keep `--inflight` lanes calling one after another).
//! A call queues a pre-built frame (a 24-byte body, or `--size` bytes for echo) and a reply
//! slot holding its task's waker under one lock, and wakes the writer task once per batch;
//! the reader task counts whole replies as they arrive (checking each, as `floor-client`
//! does), marks the oldest slots answered (the floor server answers in order) and wakes their
//! tasks. So it pays what any async caller pays per call (its task woken and polled, a lock,
//! a slot) and nothing else: no encoding, no request ids, no deadlines. The gap between this
//! and `floor-client` is the cost of a task per call; the gap between this and Ferry's Rust
//! client is the protocol's and Ferry's own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Instant;

use ferry_bench::{
    echo_result, first_result, latency_result, make_frame, run_tokio_client, throughput_result,
    ClientArgs, EchoCounter, Scenario, SMALL_BODY,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Slot {
    answered: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    /// Frames queued and not yet taken by the writer.
    out: Vec<u8>,
    /// The slots of the calls sent, oldest first.
    order: VecDeque<usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    writer_woken: bool,
    /// Why the connection ended, if it did: every call then fails with it.
    failed: Option<String>,
}

struct Client {
    state: Mutex<State>,
    wake_writer: tokio::sync::Notify,
    frame: Vec<u8>,
}

impl Client {
    fn fail_all(&self, why: String) {
        let wakers: Vec<Waker> = {
            let mut st = self.state.lock().unwrap();
            st.failed.get_or_insert(why);
            st.slots
                .iter_mut()
                .flatten()
                .filter_map(|s| s.waker.take())
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// One call: its frame queued, then its answer awaited.
    async fn call(&self) -> Result<(), String> {
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let (slot, wake) = {
            let mut st = self.state.lock().unwrap();
            if let Some(why) = &st.failed {
                return Err(why.clone());
            }
            st.out.extend_from_slice(&self.frame);
            let s = Slot {
                answered: false,
                waker: Some(waker),
            };
            let slot = match st.free.pop() {
                Some(i) => {
                    st.slots[i] = Some(s);
                    i
                }
                None => {
                    st.slots.push(Some(s));
                    st.slots.len() - 1
                }
            };
            st.order.push_back(slot);
            (slot, !std::mem::replace(&mut st.writer_woken, true))
        };
        if wake {
            self.wake_writer.notify_one();
        }
        // The waker is stored already: the first poll has nothing to check.
        let mut first = true;
        std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                return Poll::Pending;
            }
            let mut st = self.state.lock().unwrap();
            let st = &mut *st;
            let s = st.slots[slot]
                .as_mut()
                .expect("a call's slot lives until it ends");
            if s.answered {
                st.slots[slot] = None;
                st.free.push(slot);
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &st.failed {
                return Poll::Ready(Err(why.clone()));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

async fn writer(client: Arc<Client>, mut wr: tokio::net::unix::OwnedWriteHalf) {
    let mut buf = Vec::new();
    loop {
        client.wake_writer.notified().await;
        {
            let mut st = client.state.lock().unwrap();
            std::mem::swap(&mut buf, &mut st.out);
            st.writer_woken = false;
        }
        if let Err(e) = wr.write_all(&buf).await {
            return client.fail_all(format!("write failed: {e}"));
        }
        buf.clear();
    }
}

async fn reader(client: Arc<Client>, mut rd: tokio::net::unix::OwnedReadHalf) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut counter = EchoCounter::new(&client.frame);
    let mut wakers = Vec::new();
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => return client.fail_all("the server closed the connection".into()),
            Ok(n) => n,
            Err(e) => return client.fail_all(format!("read failed: {e}")),
        };
        let k = match counter.feed(&buf[..n]) {
            Ok(k) => k,
            Err(e) => return client.fail_all(e),
        };
        let unmatched = {
            let mut st = client.state.lock().unwrap();
            let st = &mut *st;
            (0..k).any(|_| match st.order.pop_front() {
                Some(slot) => {
                    let s = st.slots[slot].as_mut().expect("sent calls have slots");
                    s.answered = true;
                    wakers.extend(s.waker.take());
                    false
                }
                None => true,
            })
        };
        wakers.drain(..).for_each(Waker::wake);
        if unmatched {
            return client.fail_all("a reply to no call".into());
        }
    }
}

async fn connect(path: &str, frame: Vec<u8>) -> Result<Arc<Client>, String> {
    let s = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot connect to {path}: {e}"))?;
    let (rd, wr) = s.into_split();
    let client = Arc::new(Client {
        state: Mutex::new(State::default()),
        wake_writer: tokio::sync::Notify::new(),
        frame,
    });
    tokio::spawn(writer(client.clone(), wr));
    tokio::spawn(reader(client.clone(), rd));
    Ok(client)
}

/// `inflight` lanes calling one after another; counts the calls answered in the window.
async fn lanes(
    client: Arc<Client>,
    args: &ClientArgs,
) -> Result<(u64, std::time::Duration), String> {
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..args.inflight)
        .map(|_| {
            let (client, count) = (client.clone(), count.clone());
            tokio::spawn(async move {
                loop {
                    client.call().await?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect::<Vec<tokio::task::JoinHandle<Result<(), String>>>>();
    tokio::time::sleep(args.warmup_time).await;
    let (before, t0) = (count.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(args.duration).await;
    let calls = count.load(Ordering::Relaxed) - before;
    let elapsed = t0.elapsed();
    // A lane only ends by failing: report the first one's error (lanes still calling are
    // left to the process's exit, never awaited).
    for t in tasks.into_iter().filter(|t| t.is_finished()) {
        t.await.map_err(|e| format!("lane failed: {e}"))??;
    }
    if calls == 0 {
        return Err("no completions were measured".into());
    }
    Ok((calls, elapsed))
}

async fn run(args: ClientArgs) -> Result<serde_json::Value, String> {
    let small = make_frame(SMALL_BODY);
    match args.scenario {
        Scenario::Latency => {
            let client = connect(&args.socket, small).await?;
            let mut samples = Vec::with_capacity(args.n);
            for i in 0..args.warmup + args.n {
                let t = Instant::now();
                client.call().await?;
                if i >= args.warmup {
                    samples.push(t.elapsed());
                }
            }
            Ok(latency_result(samples))
        }
        Scenario::First => {
            let t = Instant::now();
            let client = connect(&args.socket, small).await?;
            client.call().await?;
            Ok(first_result(t.elapsed()))
        }
        Scenario::Throughput => {
            let client = connect(&args.socket, small).await?;
            let (calls, elapsed) = lanes(client, &args).await?;
            Ok(throughput_result(calls, elapsed, args.inflight))
        }
        Scenario::Echo => {
            let client = connect(&args.socket, make_frame(args.size)).await?;
            let (echoes, elapsed) = lanes(client, &args).await?;
            Ok(echo_result(echoes, args.size, elapsed))
        }
        Scenario::Memory => Ok(serde_json::json!({"skipped": "a floor keeps no call state"})),
    }
}

fn main() {
    run_tokio_client(run(ClientArgs::from_env()))
}
