//! Shared pieces of Ferry's Rust benchmark programs (see benches/README.md for the contract):
//! argument parsing, result lines, percentiles, RSS, frame checks and socket set-up.
//!
//! Units and rounding match the Node peers (benches/peers/common.cjs), so ratios hold: `_us`
//! microseconds, `first_ms` milliseconds, `mb_per_s` in MB (10^6 bytes) of payload one way,
//! `rss_mb` in MiB (2^20 bytes); percentiles are nearest-rank.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

/// A small call of the floors: a frame whose body is this many bytes.
pub const SMALL_BODY: usize = 24;

const MB: f64 = 1e6;
const MIB: f64 = 1024.0 * 1024.0;

/// Prints `message` on stderr and exits with status 1 (a failed run).
pub fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("{}: {message}", program());
    std::process::exit(1)
}

/// Runs a client's `run` in a task spawned on a current-thread tokio runtime (see
/// `ferry-client` for why spawned), prints its result line or fails, and exits at once: calls
/// still outstanding (held sleeps, lanes still calling) are abandoned, not awaited.
pub fn run_tokio_client<F>(run: F) -> !
where
    F: std::future::Future<Output = Result<serde_json::Value, String>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("cannot start tokio: {e}")));
    let r = rt.block_on(async move {
        tokio::spawn(run)
            .await
            .unwrap_or_else(|e| Err(format!("client task failed: {e}")))
    });
    match r {
        Ok(v) => print_result(v),
        Err(e) => fail(e),
    }
    std::process::exit(0)
}

/// Prints a usage error on stderr and exits with status 2.
pub fn usage(message: impl std::fmt::Display) -> ! {
    eprintln!("{}: {message}", program());
    std::process::exit(2)
}

fn program() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "bench".into())
}

/// The scenarios of the client contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Latency,
    Throughput,
    Echo,
    First,
    Memory,
}

/// A client's command line: `[positional...] --socket P --scenario S [--option value ...]`.
#[derive(Debug, Clone)]
pub struct ClientArgs {
    pub positional: Vec<String>,
    pub socket: String,
    pub scenario: Scenario,
    pub n: usize,
    pub warmup: usize,
    pub inflight: usize,
    pub duration: Duration,
    pub size: usize,
    pub pending: usize,
    /// Throughput/echo warm-up (`--warmup-ms`, beyond the contract like the Node peers').
    pub warmup_time: Duration,
}

impl ClientArgs {
    /// The measuring window of a throughput or echo run, starting now.
    pub fn window(&self) -> Window {
        Window::new(self.warmup_time, self.duration)
    }

    /// Parses the process's arguments; exits with status 2 on a malformed command line.
    pub fn from_env() -> ClientArgs {
        match ClientArgs::parse(std::env::args().skip(1)) {
            Ok(a) => a,
            Err(e) => usage(e),
        }
    }

    /// Parses arguments (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<ClientArgs, String> {
        let mut positional = Vec::new();
        let mut options: HashMap<String, String> = HashMap::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            match a.strip_prefix("--") {
                Some(key) => {
                    let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                    options.insert(key.to_string(), value);
                }
                None => positional.push(a),
            }
        }
        let mut take = |key: &str| options.remove(key);
        let socket = take("socket").ok_or("--socket is required")?;
        let scenario = match take("scenario").as_deref() {
            Some("latency") => Scenario::Latency,
            Some("throughput") => Scenario::Throughput,
            Some("echo") => Scenario::Echo,
            Some("first") => Scenario::First,
            Some("memory") => Scenario::Memory,
            Some(other) => return Err(format!("unknown scenario `{other}`")),
            None => return Err("--scenario is required".into()),
        };
        fn num(v: Option<String>, key: &str, default: usize) -> Result<usize, String> {
            match v {
                None => Ok(default),
                Some(s) => s
                    .parse()
                    .map_err(|_| format!("--{key} wants a whole number, got `{s}`")),
            }
        }
        let default_inflight = if scenario == Scenario::Echo { 4 } else { 64 };
        let parsed = ClientArgs {
            positional,
            socket,
            scenario,
            n: num(take("n"), "n", 20_000)?,
            warmup: num(take("warmup"), "warmup", 2_000)?,
            inflight: num(take("inflight"), "inflight", default_inflight)?,
            duration: Duration::from_millis(num(take("duration-ms"), "duration-ms", 3_000)? as u64),
            size: num(take("size"), "size", 65_536)?,
            pending: num(take("pending"), "pending", 10_000)?,
            warmup_time: Duration::from_millis(num(take("warmup-ms"), "warmup-ms", 300)? as u64),
        };
        if let Some(key) = options.keys().next() {
            return Err(format!("unknown option --{key}"));
        }
        if parsed.n == 0 || parsed.inflight == 0 {
            return Err("--n and --inflight must be at least 1".into());
        }
        Ok(parsed)
    }
}

/// Prints the one result line on stdout.
pub fn print_result(value: serde_json::Value) {
    println!("{value}");
}

/// `{"p50_us","p99_us","mean_us","n"}` from per-call durations.
pub fn latency_result(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort_unstable();
    let n = samples.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Nearest rank: the smallest sample with at least a fraction `q` of samples at or below.
    let at = |q: f64| us(samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64;
    serde_json::json!({
        "p50_us": round2(at(0.50)),
        "p99_us": round2(at(0.99)),
        "mean_us": round2(mean),
        "n": n,
    })
}

/// `{"calls_per_s","inflight"}`.
pub fn throughput_result(calls: u64, elapsed: Duration, inflight: usize) -> serde_json::Value {
    serde_json::json!({
        "calls_per_s": (calls as f64 / elapsed.as_secs_f64()).round() as u64,
        "inflight": inflight,
    })
}

/// `{"mb_per_s","size"}`: payload bytes one way per second, in MB.
pub fn echo_result(echoes: u64, size: usize, elapsed: Duration) -> serde_json::Value {
    let bytes = echoes as f64 * size as f64;
    serde_json::json!({
        "mb_per_s": round2(bytes / MB / elapsed.as_secs_f64()),
        "size": size,
    })
}

/// `{"first_ms"}`.
pub fn first_result(elapsed: Duration) -> serde_json::Value {
    serde_json::json!({ "first_ms": round3(elapsed.as_secs_f64() * 1e3) })
}

/// `{"rss_mb","pending"}`.
pub fn memory_result(rss_bytes: u64, pending: usize) -> serde_json::Value {
    serde_json::json!({
        "rss_mb": round2(rss_bytes as f64 / MIB),
        "pending": pending,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// This process's resident set size in bytes, from /proc/self/statm.
pub fn rss_bytes() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/statm"))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * page.max(1) as u64)
}

/// Counts the measured completions of a throughput or echo run: completions after the
/// warm-up and before its end, and the time between the first and the last instant counted.
#[derive(Debug)]
pub struct Window {
    measure_from: std::time::Instant,
    end: std::time::Instant,
    started: Option<std::time::Instant>,
    count: u64,
    last: std::time::Instant,
}

impl Window {
    /// A window that starts after `warmup` and lasts `duration`.
    pub fn new(warmup: Duration, duration: Duration) -> Window {
        let now = std::time::Instant::now();
        Window {
            measure_from: now + warmup,
            end: now + warmup + duration,
            started: None,
            count: 0,
            last: now,
        }
    }

    /// Records `k` completions now; returns false once the window is over (stop issuing).
    pub fn record(&mut self, k: u64) -> bool {
        let now = std::time::Instant::now();
        if now < self.measure_from {
            return true;
        }
        if now >= self.end {
            return false;
        }
        match self.started {
            // The first batch after the warm-up marks the start; it is not counted.
            None => self.started = Some(now),
            Some(_) => self.count += k,
        }
        self.last = now;
        true
    }

    /// Completions counted and the time they took.
    pub fn finish(&self) -> (u64, Duration) {
        match self.started {
            Some(s) if self.last > s => (self.count, self.last - s),
            _ => fail("no completions were measured (is the duration too short?)"),
        }
    }
}

/// One length-prefixed frame: 4-byte big-endian length, then a body of `body_len` bytes with a
/// recognizable pattern.
pub fn make_frame(body_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + body_len);
    f.extend_from_slice(&(body_len as u32).to_be_bytes());
    f.extend((0..body_len).map(|i| (i % 251) as u8 ^ 0x5a));
    f
}

/// The payload of a binary echo: `size` bytes with a recognizable pattern.
pub fn make_payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8 ^ 0xa5).collect()
}

/// Whether an echoed payload is the one sent: same length, same first and last 16 bytes
/// (a full comparison would cost a visible share of a large echo).
pub fn payload_matches(got: &[u8], sent: &[u8]) -> bool {
    let k = 16.min(sent.len());
    got.len() == sent.len()
        && got[..k] == sent[..k]
        && got[got.len() - k..] == sent[sent.len() - k..]
}

/// Counts echoed frames in a stream of bytes without buffering whole frames, checking each
/// reply's length prefix and the first and last bytes of its body against the frame sent.
#[derive(Debug)]
pub struct EchoCounter {
    expected: Vec<u8>,
    pos: usize,
}

impl EchoCounter {
    pub fn new(expected: &[u8]) -> EchoCounter {
        EchoCounter {
            expected: expected.to_vec(),
            pos: 0,
        }
    }

    /// Consumes a chunk read from the socket; returns how many frames it completed, or an
    /// error naming the first mismatching byte offset.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<u64, String> {
        let len = self.expected.len();
        // Checked ranges of a frame: the prefix and 16 body bytes, and the last 16 bytes.
        let head = 20.min(len);
        let tail = len.saturating_sub(16);
        let mut frames = 0;
        while !chunk.is_empty() {
            let take = chunk.len().min(len - self.pos);
            let (part, rest) = chunk.split_at(take);
            let (from, to) = (self.pos, self.pos + take);
            for (lo, hi) in [(0, head), (tail, len)] {
                let (a, b) = (from.max(lo), to.min(hi));
                if a < b && part[a - from..b - from] != self.expected[a..b] {
                    return Err(format!("echoed frame differs near byte {a}"));
                }
            }
            self.pos = to;
            if self.pos == len {
                self.pos = 0;
                frames += 1;
            }
            chunk = rest;
        }
        Ok(frames)
    }
}

/// Makes `path` free to bind: removes a stale socket file nobody listens on. Refuses a path
/// that exists and is not a socket, or where a server answers.
pub fn prepare_socket_path(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a live server is listening there",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_counter_splits_anywhere() {
        let frame = make_frame(100);
        let stream: Vec<u8> = frame.iter().chain(&frame).chain(&frame).copied().collect();
        for cut in 1..stream.len() {
            let mut c = EchoCounter::new(&frame);
            let n = c.feed(&stream[..cut]).unwrap() + c.feed(&stream[cut..]).unwrap();
            assert_eq!(n, 3);
        }
        let mut bad = stream.clone();
        bad[4 + 100 + 4 + 99] ^= 1;
        assert!(EchoCounter::new(&frame).feed(&bad).is_err());
    }

    #[test]
    fn percentiles() {
        let r = latency_result((1..=100).map(Duration::from_micros).collect());
        assert_eq!(r["p50_us"], 50.0);
        assert_eq!(r["p99_us"], 99.0);
        assert_eq!(r["n"], 100);
    }

    #[test]
    fn args() {
        let a = ClientArgs::parse(
            ["std", "--socket", "s", "--scenario", "echo", "--size", "10"].map(String::from),
        )
        .unwrap();
        assert_eq!(a.positional, ["std"]);
        assert_eq!((a.scenario, a.size, a.inflight), (Scenario::Echo, 10, 4));
        assert!(ClientArgs::parse(["--socket", "s", "--scenario", "x"].map(String::from)).is_err());
        assert!(ClientArgs::parse(
            ["--socket", "s", "--scenario", "first", "--bogus", "1"].map(String::from)
        )
        .is_err());
    }
}
