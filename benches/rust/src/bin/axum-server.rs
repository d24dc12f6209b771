//! An HTTP/1.1 server over a Unix socket with axum: the "plain HTTP to a Rust service" way for
//! Node to reach Rust, for comparison with Ferry.
//!
//! ```text
//! axum-server <socket-path>
//! ```
//!
//! Routes:
//! - `POST /add`: request body JSON `{"a": 1, "b": 2}` (numbers), response `200`,
//!   `content-type: application/json`, body `3` (the sum; whole sums are written as integers).
//!   A body that is not such JSON gets a 4xx.
//! - `POST /echo`: request body any bytes (send `content-type: application/octet-stream`),
//!   response `200`, `content-type: application/octet-stream`, the same bytes. Bodies up to
//!   64 MiB.
//!
//! Connections are kept alive (HTTP/1.1 default). Prints `ready <socket-path>` once it
//! accepts connections; SIGTERM (or SIGINT) stops accepting, closes idle connections,
//! removes the socket file and exits 0.

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use ferry_bench::{fail, prepare_socket_path, usage};
use serde::Deserialize;

#[derive(Deserialize)]
struct Pair {
    a: f64,
    b: f64,
}

async fn add(Json(p): Json<Pair>) -> Json<serde_json::Value> {
    let sum = p.a + p.b;
    Json(
        if sum.fract() == 0.0 && sum.abs() < 9.007_199_254_740_992e15 {
            serde_json::Value::from(sum as i64)
        } else {
            serde_json::Value::from(sum)
        },
    )
}

async fn echo(body: Bytes) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/octet-stream")], body)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        usage("usage: axum-server <socket-path>");
    };
    let path = PathBuf::from(path);
    // Current-thread runtime, chosen by measurement against `#[tokio::main]`'s 2-worker
    // multi-thread one with a keep-alive node:http client (medians of 3 runs): p50 186 vs
    // 190 µs pinned, 259 vs 324 µs unpinned; 32 concurrent requests 4.8K vs 3.9K req/s pinned,
    // 6.2K vs 5.2K unpinned. The Node client is the bottleneck either way.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("cannot start tokio: {e}")))
        .block_on(serve(path));
}

async fn serve(path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    if let Err(e) = prepare_socket_path(&path) {
        fail(format!("cannot listen on {}: {e}", path.display()));
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .unwrap_or_else(|e| fail(format!("cannot listen on {}: {e}", path.display())));
    let app = Router::new()
        .route("/add", post(add))
        .route("/echo", post(echo))
        .layer(DefaultBodyLimit::max(64 << 20));
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    println!("ready {}", path.display());
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await;
    let _ = std::fs::remove_file(&path);
    if let Err(e) = served {
        fail(format!("server failed: {e}"));
    }
}
