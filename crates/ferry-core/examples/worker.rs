//! A Rust peer for tests, benchmarks and the quick start.
//!
//! ```text
//! cargo run --release -p ferry-core --example worker -- <socket-path> [--busy-poll-us N]
//! ```
//!
//! `--busy-poll-us N` sets [`ConnectionConfig::busy_poll`] on every connection (default 0: off).
//!
//! Prints `ready <socket-path>` once listening; on SIGINT or SIGTERM it stops accepting, lets
//! running calls finish, removes its socket file and exits 0.

use std::time::Duration;

use ferry_core::router::{Context, HttpRequest, HttpResponse, Value};
use ferry_core::{ConnectionConfig, IoMode, MsgpackOut, Rejection, Router, Server};
use serde::{de::IgnoredAny, Deserialize, Serialize};

#[derive(Deserialize)]
struct Pair {
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct N {
    n: u64,
}

#[derive(Deserialize)]
struct Values {
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct Ms {
    ms: u64,
}

#[derive(Serialize)]
struct Benchmarks {
    runtime: &'static str,
    version: &'static str,
    functions: Vec<&'static str>,
    pid: u32,
}

#[derive(Deserialize)]
struct CallPeer {
    function_name: String,
    #[serde(default)]
    params: Option<Value>,
}

#[derive(Deserialize)]
struct InvokePeer {
    handler_id: String,
    request: HttpRequest,
}

const FUNCTIONS: &[&str] = &[
    "add",
    "multiply",
    "fibonacci",
    "is_prime",
    "sum_array",
    "echo",
    "get_benchmarks",
    "sleep",
    "fail",
    "panic",
    "call_peer",
    "invoke_peer",
];

/// A number as it goes back: whole numbers as integers, so `add {a: 2, b: 3}` answers `5`,
/// not `5.0`. A typed result rather than a dynamic `Value`: nothing to allocate or drop.
#[derive(Serialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

fn number(x: f64) -> Number {
    if x.fract() == 0.0 && x.abs() < 9.007_199_254_740_992e15 {
        Number::Int(x as i64)
    } else {
        Number::Float(x)
    }
}

fn fibonacci(n: u64) -> Result<u64, Rejection> {
    if n > 93 {
        return Err(Rejection::invalid_params(
            "n must be at most 93 (fib(94) overflows u64)",
        ));
    }
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    Ok(a)
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn router() -> Router {
    Router::new()
        .sync_fn("add", |p: Pair| Ok::<_, String>(number(p.a + p.b)))
        .sync_fn("multiply", |p: Pair| Ok::<_, String>(number(p.a * p.b)))
        .sync_fn("fibonacci", |p: N| fibonacci(p.n))
        // Trial division up to sqrt(n): run off the reactor so a big prime never stalls I/O.
        .async_fn("is_prime", |p: N| async move {
            tokio::task::spawn_blocking(move || is_prime(p.n))
                .await
                .map_err(|e| e.to_string())
        })
        .sync_fn("sum_array", |p: Values| {
            Ok::<_, String>(number(p.values.iter().sum()))
        })
        // The params go back byte for byte, never decoded, written straight from the read
        // buffer into the answer.
        .msgpack_fn("echo", |params: &[u8], out: &mut MsgpackOut<'_>| {
            out.extend_from_slice(params);
            Ok::<_, String>(())
        })
        .sync_fn("get_benchmarks", |_: IgnoredAny| {
            Ok::<_, String>(Benchmarks {
                runtime: "ferry-core",
                version: env!("CARGO_PKG_VERSION"),
                functions: FUNCTIONS.to_vec(),
                pid: std::process::id(),
            })
        })
        .async_fn("sleep", |p: Ms| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok::<_, String>(p.ms)
        })
        .sync_fn("fail", |_: IgnoredAny| {
            Err::<(), _>("fail was called: this function always fails")
        })
        .sync_fn("panic", |_: IgnoredAny| -> Result<(), String> {
            panic!("panic was called")
        })
        // Calls a function of the caller back on the same connection and returns its answer.
        .async_fn_ctx("call_peer", |ctx: Context, p: CallPeer| async move {
            ctx.connection
                .call::<_, Value>(&p.function_name, &p.params.unwrap_or(Value::Nil))
                .await
        })
        // Invokes a route handler of the caller on the same connection.
        .async_fn_ctx("invoke_peer", |ctx: Context, p: InvokePeer| async move {
            ctx.connection
                .invoke_handler(&p.handler_id, &p.request)
                .await
        })
        .route("worker_status", |_ctx, req: HttpRequest| async move {
            Ok::<_, String>(HttpResponse {
                status: 200,
                headers: [("content-type".to_string(), "text/plain".to_string())].into(),
                body: Value::from(format!("worker ok: {} {}", req.method, req.path)),
            })
        })
}

#[tokio::main]
async fn main() {
    let usage = || -> ! {
        eprintln!("usage: worker <socket-path> [--busy-poll-us N]");
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    let (mut path, mut busy_poll) = (None, Duration::ZERO);
    while let Some(arg) = args.next() {
        if arg == "--busy-poll-us" {
            match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(us) => busy_poll = Duration::from_micros(us),
                None => usage(),
            }
        } else if path.is_none() && !arg.starts_with("--") {
            path = Some(arg);
        } else {
            usage();
        }
    }
    let Some(path) = path else { usage() };
    // Keep panic output short: `panic {}` is called on purpose by the tests.
    std::panic::set_hook(Box::new(|info| eprintln!("worker: {info}")));
    // A blocked reader thread per connection answers a round trip about a quarter faster than
    // the reactor on a 2-core machine (docs/benchmarks.md); a worker has few peers.
    let config = ConnectionConfig {
        io: IoMode::Threads,
        busy_poll,
        ..ConnectionConfig::default()
    };
    let server = match Server::bind_with(&path, router(), config).await {
        Ok(s) => s.with_grace(Duration::from_secs(5)),
        Err(e) => {
            eprintln!("worker: {e}");
            std::process::exit(1);
        }
    };
    // Install the handlers before announcing readiness, so an early SIGTERM is never fatal.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    println!("ready {path}");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    if let Err(e) = server.run_until(shutdown).await {
        eprintln!("worker: {e}");
        std::process::exit(1);
    }
}
