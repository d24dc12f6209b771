//! A process that may run on one CPU only (as under `taskset -c 0`). A test binary of its own:
//! its test pins its thread to one CPU before anything else runs, every thread started after
//! inherits that, and `runs_on_many_cpus` is read once per process.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::{encode, frame, map, TestServer};
use ferry_core::engine::runs_on_many_cpus;
use ferry_core::router::Value;
use ferry_core::{Connection, ConnectionConfig, IoMode, Router};

/// Restricts the calling thread, and the threads it starts from now on, to one of its CPUs.
fn pin_to_one_cpu() {
    // SAFETY: zeroed cpu_set_t values are valid empty sets; the sizes given are their own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .expect("a CPU to run on");
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut one);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one),
            0
        );
    }
}

/// The ids of this process's threads named `name`.
fn threads_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect()
}

/// The tests of this binary run one at a time: the first counts a thread's sleeps.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How many times thread `tid` gave up the CPU to wait.
fn voluntary_switches(tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .expect("voluntary_ctxt_switches in status")
        .trim()
        .parse()
        .unwrap()
}

/// Waits, yielding this thread's CPU, until thread `tid` is asleep (state S).
fn wait_asleep(tid: &str) {
    let deadline = std::time::Instant::now() + common::TEST_LIMIT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let state = stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap();
        if state == 'S' {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "thread {tid} never slept"
        );
        std::thread::yield_now();
    }
}

/// Blocks until `sock` has something to read (failing the test after the test limit).
fn wait_readable(sock: &UnixStream) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let limit = common::TEST_LIMIT.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd.
    assert_eq!(
        unsafe { libc::poll(&mut pfd, 1, limit) },
        1,
        "no answer came"
    );
}

fn call_inc(sock: &mut UnixStream, id: u64) {
    let call = map(vec![
        ("type", Value::from("rpc_call")),
        ("function_name", Value::from("inc")),
        ("params", Value::from(id)),
        ("request_id", Value::from(id)),
    ]);
    sock.write_all(&frame(&encode(&call))).unwrap();
}

fn answer(sock: &mut UnixStream) -> Value {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    sock.read_exact(&mut body).unwrap();
    rmpv::decode::read_value(&mut &body[..]).unwrap()
}

/// A reader thread blocked in `read` is woken each time the peer reads its answers, because
/// that makes room to write: on one CPU, two context switches per round trip for nothing. On
/// one CPU, the [`IoMode::Threads`] reader waits in `poll` for input only, so it wakes once per
/// call. Each round trip here lets the reader fall asleep before its answer is read.
#[test]
fn on_one_cpu_a_threads_reader_sleeps_once_per_call() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    pin_to_one_cpu();
    assert!(!runs_on_many_cpus());

    let (path_tx, path_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let config = ConnectionConfig {
                io: IoMode::Threads,
                ..ConnectionConfig::default()
            };
            let router = Router::new().sync_fn("inc", |n: u64| Ok::<_, String>(n + 1));
            let server = TestServer::start_with(router, config, None).await;
            path_tx.send(server.path.clone()).unwrap();
            let _ = stop_rx.await;
        });
    });
    let path = path_rx
        .recv_timeout(common::TEST_LIMIT)
        .expect("the server started");
    let readers_before = threads_named("ferry-reader");
    let mut sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(common::TEST_LIMIT)).unwrap();

    // The first call starts the connection's threads.
    call_inc(&mut sock, 0);
    assert_eq!(answer(&mut sock)["result"], Value::from(1));
    let mut new: Vec<String> = threads_named("ferry-reader")
        .into_iter()
        .filter(|t| !readers_before.contains(t))
        .collect();
    assert_eq!(new.len(), 1, "new reader threads: {new:?}");
    let reader = new.pop().unwrap();
    wait_asleep(&reader);

    const N: u64 = 200;
    let before = voluntary_switches(&reader);
    for id in 1..=N {
        call_inc(&mut sock, id);
        wait_readable(&sock);
        // The answer is here; the reader has gone back to wait for more.
        wait_asleep(&reader);
        assert_eq!(answer(&mut sock)["result"], Value::from(id + 1));
        // A reader woken by that read runs, finds nothing and sleeps again, which counts.
        wait_asleep(&reader);
    }
    let switches = voluntary_switches(&reader) - before;
    assert!(
        switches <= N + N / 4,
        "the reader slept {switches} times in {N} round trips"
    );

    drop(sock);
    let _ = stop_tx.send(());
    server.join().unwrap();
}

/// On one CPU, a [`IoMode::Reactor`] connection with the default `early_wake`
/// ([`EarlyWake::Auto`](ferry_core::EarlyWake::Auto)) is registered for reading only: the peer's reading of its calls does not wake the reactor (on one CPU,
/// two context switches per call for nothing), so a caller making one call after another
/// sleeps once per call. Each round trip here lets the caller fall asleep before its call is
/// read, and again before its answer is written.
#[test]
fn on_one_cpu_a_reactor_caller_sleeps_once_per_call() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    pin_to_one_cpu();
    assert!(!runs_on_many_cpus());
    assert_eq!(
        ConnectionConfig::default().early_wake,
        ferry_core::EarlyWake::Auto
    );
    assert!(!ferry_core::EarlyWake::Auto.is_on());
    let n = 200;
    let switches = caller_sleeps(ferry_core::EarlyWake::Auto, n);
    assert!(
        switches <= n + n / 4,
        "the caller slept {switches} times in {n} round trips"
    );
    // Asked for explicitly, the wake-up stays, one CPU or not: the peer's read of each call
    // wakes the caller once more.
    let switches = caller_sleeps(ferry_core::EarlyWake::On, n);
    assert!(
        switches >= n + n / 2,
        "with EarlyWake::On the caller slept only {switches} times in {n} round trips"
    );
}

/// How many times a caller on a current-thread runtime, making `n` + 1 calls one after
/// another over a Reactor connection with `early_wake`, went to sleep between its wait for
/// answer 1 and its wait for answer `n`, counted after the peer let it fall asleep before
/// reading each call and again before answering it (`n` - 1 sleeps, plus any after a read).
fn caller_sleeps(early_wake: ferry_core::EarlyWake, n: u64) -> u64 {
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let name = format!("caller-{early_wake:?}");
    let caller = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let stream = tokio::net::UnixStream::from_std(theirs).unwrap();
                let config = ConnectionConfig {
                    early_wake,
                    ..ConnectionConfig::default()
                };
                let conn = Connection::from_stream(stream, Router::new(), config);
                for i in 0..=n {
                    assert_eq!(conn.call::<_, u64>("inc", &i).await.unwrap(), i + 1);
                }
            })
        })
        .unwrap();
    let tid = loop {
        // The thread is named before it runs; wait until /proc shows it.
        if let Some(t) = threads_named(&name).pop() {
            break t;
        }
        assert!(!caller.is_finished(), "the caller ended early");
        std::thread::yield_now();
    };
    let mut sock = ours;
    sock.set_read_timeout(Some(common::TEST_LIMIT)).unwrap();

    let (mut before, mut after) = (0, 0);
    for i in 0..=n {
        wait_readable(&sock);
        // The call is here, unread; the caller waits for its answer.
        wait_asleep(&tid);
        if i == 1 {
            before = voluntary_switches(&tid);
        }
        let call = answer(&mut sock);
        assert_eq!(call["params"], Value::from(i));
        // A caller woken by that read runs, finds nothing and sleeps again, which counts.
        wait_asleep(&tid);
        if i == n {
            after = voluntary_switches(&tid);
        }
        let reply = map(vec![
            ("type", Value::from("rpc_response")),
            ("request_id", call["request_id"].clone()),
            ("result", Value::from(i + 1)),
        ]);
        sock.write_all(&frame(&encode(&reply))).unwrap();
    }
    caller.join().unwrap();
    after - before
}

/// On one CPU, two [`IoMode::Threads`] connections (their readers waiting in `poll`), and
/// two [`IoMode::Reactor`] ones (registered for reading only, so a write that finds the
/// socket full waits through a registration of its own), carry payloads larger than the
/// socket and their read buffers, and many calls in flight, and each sees the other go away.
#[test]
fn on_one_cpu_connections_carry_everything_and_see_hang_ups() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    pin_to_one_cpu();
    assert!(!runs_on_many_cpus());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::on_own_thread(runtime, "the one-CPU connections got stuck", async {
        for io in [IoMode::Threads, IoMode::Reactor] {
            let config = ConnectionConfig {
                io,
                ..ConnectionConfig::default()
            };
            let router = || {
                Router::new()
                    .sync_fn("inc", |n: u64| Ok::<_, String>(n + 1))
                    .sync_fn("echo", |v: Value| Ok::<_, String>(v))
            };
            let pair = || {
                let (a, b) = tokio::net::UnixStream::pair().unwrap();
                (
                    Connection::from_stream(a, router(), config.clone()),
                    Connection::from_stream(b, router(), config.clone()),
                )
            };

            let (server, client) = pair();
            // Larger than the 64 KiB read buffer and than the socket: reads that fill the buffer,
            // writers that wait for room.
            common::echo_large_payloads(&client).await;

            let incs = (0..500u64).map(|n| {
                let client = &client;
                async move { assert_eq!(client.call::<_, u64>("inc", &n).await.unwrap(), n + 1) }
            });
            futures_util::future::join_all(incs).await;
            // Both ways on one connection.
            assert_eq!(server.call::<_, u64>("inc", &41u64).await.unwrap(), 42);
            // The client goes: the server's reader sees it.
            client.close();
            server.closed().await;
            // And every thread of both connections ends: none is left waiting in `poll`.
            let deadline = std::time::Instant::now() + common::TEST_LIMIT;
            while !threads_named("ferry-reader").is_empty()
                || !threads_named("ferry-writer").is_empty()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the connections' threads did not end"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }

            // The server goes while a call waits: the call ends, and the client's reader sees the
            // hang-up.
            let (server, client) = pair();
            let (outcome, ()) = futures_util::join!(client.call::<_, u64>("inc", &1u64), async {
                server.close()
            });
            assert!(matches!(outcome, Ok(2) | Err(_)), "{outcome:?}");
            client.closed().await;
        }
    });
}
