//! Shared helpers for the integration tests: a test server on a temporary socket, a raw
//! frame-level client, and a time limit for every test body.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_core::router::Value;
use ferry_core::{ConnectionConfig, IoMode, Router, Server};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The limit for a whole test body: nothing may hang forever.
pub const TEST_LIMIT: Duration = Duration::from_secs(20);

/// Runs a test body, failing the test if it takes longer than [`TEST_LIMIT`].
pub async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("the test did not finish within its time limit")
}

/// Runs `body` on `runtime`, on a thread of its own, and returns its output: for tests whose
/// failure mode is a deadlock, which a timer inside the same runtime might never catch. A panic
/// in `body` fails the test with that panic; a body still running after [`TEST_LIMIT`] fails
/// it with `stuck`.
pub fn on_own_thread<T, F>(runtime: tokio::runtime::Runtime, stuck: &str, body: F) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(body)));
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(TEST_LIMIT) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{stuck}"),
    }
}

/// Waits until `cond` holds, re-checking every few milliseconds (bounded by the test limit).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TEST_LIMIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The I/O mode of the connections under test: `FERRY_TEST_IO=threads` runs the suites with
/// [`IoMode::Threads`] (`npm test` runs them both ways), anything else with the default.
pub fn io_mode() -> IoMode {
    match std::env::var("FERRY_TEST_IO").as_deref() {
        Ok("threads") => IoMode::Threads,
        _ => IoMode::Reactor,
    }
}

/// A fresh temporary directory and a socket path inside it.
pub fn socket_path() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("ferry-test")
        .tempdir()
        .expect("temporary directory");
    let path = dir.path().join("s.sock");
    (dir, path)
}

/// A `Server` running on its own task until [`TestServer::stop`] (or until dropped).
pub struct TestServer {
    pub path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<ferry_core::Result<()>>>,
    // Last, so the directory outlives everything that uses it.
    _dir: Option<TempDir>,
}

impl TestServer {
    /// Binds a server with default settings in a fresh temporary directory.
    pub async fn start(router: Router) -> TestServer {
        TestServer::start_with(router, ConnectionConfig::default(), None).await
    }

    /// Binds a server with these settings (and grace period, if given).
    pub async fn start_with(
        router: Router,
        config: ConnectionConfig,
        grace: Option<Duration>,
    ) -> TestServer {
        let (dir, path) = socket_path();
        let mut s = TestServer::start_at(&path, router, config, grace)
            .await
            .expect("bind the test server");
        s._dir = Some(dir);
        s
    }

    /// Binds a server at `path` (the caller owns the directory), its connections in the
    /// [`io_mode`] under test unless `config` asks for [`IoMode::Threads`].
    pub async fn start_at(
        path: &Path,
        router: Router,
        mut config: ConnectionConfig,
        grace: Option<Duration>,
    ) -> ferry_core::Result<TestServer> {
        if config.io == IoMode::Reactor {
            config.io = io_mode();
        }
        let mut server = Server::bind_with(path, router, config).await?;
        if let Some(g) = grace {
            server = server.with_grace(g);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = rx.await;
        }));
        Ok(TestServer {
            path: path.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
            _dir: None,
        })
    }

    /// Asks the server to shut down gracefully, without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `run_until` has returned.
    pub fn is_finished(&self) -> bool {
        match &self.task {
            Some(t) => t.is_finished(),
            None => true,
        }
    }

    /// Shuts down gracefully and waits for `run_until` to return.
    pub async fn stop(&mut self) -> ferry_core::Result<()> {
        self.signal_stop();
        match self.task.take() {
            Some(t) => t.await.expect("the server task panicked"),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw frames

/// `(key, value)` pairs to a MessagePack map value with string keys.
pub fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

/// The MessagePack encoding of a value.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("encode");
    out
}

/// A body with its 4-byte big-endian length prefix.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A frame-level client that writes hand-made frames and reads whole frames back.
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    pub async fn connect(path: &Path) -> RawClient {
        RawClient {
            stream: UnixStream::connect(path).await.expect("raw connect"),
        }
    }

    /// Writes bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
    }

    /// Writes one frame with this body.
    pub async fn send_body(&mut self, body: &[u8]) {
        self.send_bytes(&frame(body)).await;
    }

    /// Writes one MessagePack frame.
    pub async fn send(&mut self, v: &Value) {
        self.send_body(&encode(v)).await;
    }

    /// Reads one frame body.
    pub async fn recv_body(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .await
            .expect("read a frame header");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream
            .read_exact(&mut body)
            .await
            .expect("read a frame body");
        body
    }

    /// Reads one frame and decodes its MessagePack body.
    pub async fn recv(&mut self) -> Value {
        let body = self.recv_body().await;
        let mut slice = &body[..];
        let v = rmpv::decode::read_value(&mut slice).expect("the answer is MessagePack");
        assert!(slice.is_empty(), "trailing bytes after the answer's map");
        v
    }

    /// Reads until the peer closes the connection; returns the bytes that came before.
    /// A reset counts as closed (the peer may close with our bytes still unread).
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf).await {
                Ok(0) => return rest,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return rest,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

/// The string under `key` in a decoded message map.
pub fn str_field<'a>(msg: &'a Value, key: &str) -> &'a str {
    msg[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {msg}"))
}

/// The `type` of a decoded message.
pub fn msg_type(msg: &Value) -> &str {
    str_field(msg, "type")
}

/// Whether a decoded message map has this key at all.
pub fn has_key(msg: &Value, key: &str) -> bool {
    msg.as_map()
        .map(|m| m.iter().any(|(k, _)| k.as_str() == Some(key)))
        .unwrap_or(false)
}

/// Several MiB in flight each way at once: both writers find the socket full many times over
/// and must wait for room, while each side's reader keeps reading.
pub async fn echo_large_payloads(conn: &ferry_core::Connection) {
    let calls = (0..6u64).map(|k| async move {
        let blob: Vec<u8> = (0..3 * 1024 * 1024 + k)
            .map(|i| (i * 31 + k) as u8)
            .collect();
        let params = encode(&Value::Binary(blob));
        let back = conn
            .call_raw("echo", &params, ferry_core::CallOptions::default())
            .await
            .unwrap();
        assert!(back.as_bytes() == &params[..], "echo {k} came back altered");
    });
    futures_util::future::join_all(calls).await;
}
