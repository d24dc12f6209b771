//! The transport floor's server: echoes length-prefixed frames (4-byte big-endian length, then
//! the body) back unchanged, with no decoding and no state. Nothing over a Unix socket can
//! answer faster, so it bounds what any RPC layer could reach.
//!
//! ```text
//! floor-server <std|tokio> <socket-path>
//! ```
//!
//! Prints `ready <socket-path>` once it accepts connections; SIGTERM (or SIGINT) removes the
//! socket file and exits 0.
//!
//! - `std`: a thread per connection, blocking reads through a `BufReader` and writes through a
//!   `BufWriter`, flushed only when no further whole frame is buffered, so pipelined requests
//!   get their replies in one write.
//! - `tokio`: a task per connection on a 2-worker multi-thread runtime (measured faster than a
//!   current-thread one, see `main`); each read's whole frames go back in one write.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use ferry_bench::{fail, prepare_socket_path, usage};

/// Frames above this are refused (Ferry's own limit is 16 MiB).
const MAX_BODY: usize = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, path] = args.as_slice() else {
        usage("usage: floor-server <std|tokio> <socket-path>");
    };
    let path = PathBuf::from(path);
    if let Err(e) = prepare_socket_path(&path) {
        fail(format!("cannot listen on {}: {e}", path.display()));
    }
    match mode.as_str() {
        "std" => run_std(&path),
        // Runtime chosen by measurement (2-core machine, std client, medians of 4 runs):
        // a 2-worker multi-thread runtime beat a current-thread one on throughput (pinned
        // 2.97M vs 2.71M calls/s) and echo (1085 vs 999 MiB/s), latency within noise.
        "tokio" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(format!("cannot start tokio: {e}")))
            .block_on(run_tokio(&path)),
        other => usage(format!("unknown mode `{other}` (want std or tokio)")),
    }
}

fn run_std(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path)
        .unwrap_or_else(|e| fail(format!("cannot listen on {}: {e}", path.display())));
    stop_on_signal_thread(path.to_path_buf());
    println!("ready {}", path.display());
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve_std(stream) {
                        if !is_hang_up(&e) {
                            eprintln!("floor-server: connection failed: {e}");
                        }
                    }
                });
            }
            Err(e) => eprintln!("floor-server: accept failed: {e}"),
        }
    }
}

fn serve_std(stream: std::os::unix::net::UnixStream) -> io::Result<()> {
    let mut rd = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(64 * 1024, stream);
    let mut body = Vec::new();
    loop {
        let mut header = [0u8; 4];
        match rd.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = body_len(header)?;
        body.resize(len, 0);
        rd.read_exact(&mut body)?;
        wr.write_all(&header)?;
        wr.write_all(&body)?;
        if whole_frames(rd.buffer()) == 0 {
            wr.flush()?;
        }
    }
}

async fn run_tokio(path: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::UnixListener::bind(path)
        .unwrap_or_else(|e| fail(format!("cannot listen on {}: {e}", path.display())));
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    println!("ready {}", path.display());
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve_tokio(stream).await {
                            if !is_hang_up(&e) {
                                eprintln!("floor-server: connection failed: {e}");
                            }
                        }
                    });
                }
                Err(e) => eprintln!("floor-server: accept failed: {e}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = std::fs::remove_file(path);
}

async fn serve_tokio(mut stream: tokio::net::UnixStream) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        // Room for at least the rest of the frame being read, so a large frame needs few reads.
        let want = match buf.get(..4) {
            Some(h) => (4 + body_len(h.try_into().unwrap())?).saturating_sub(buf.len()),
            None => 0,
        };
        buf.reserve(want.max(64 * 1024));
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let whole = whole_frames(&buf);
        if whole > 0 {
            // Echo: the reply to every whole frame is the frame itself, in one write.
            let out = buf.split_to(whole);
            stream.write_all(&out).await?;
        }
    }
}

fn body_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit"),
        ));
    }
    Ok(len)
}

/// The length of the longest prefix of `buf` made of whole frames.
fn whole_frames(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some(h) = buf.get(at..at + 4) {
        let end = at + 4 + u32::from_be_bytes(h.try_into().unwrap()) as usize;
        if end > buf.len() {
            break;
        }
        at = end;
    }
    at
}

/// The peer went away (a client may exit with replies still owed to it).
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

/// For the blocking server: a thread that waits for SIGTERM or SIGINT, removes the socket file
/// and exits. Returns once the handlers are installed, so the ready line can follow.
fn stop_on_signal_thread(path: PathBuf) {
    let (installed_tx, installed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let _ = installed_tx.send(());
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let _ = std::fs::remove_file(&path);
        std::process::exit(0);
    });
    let _ = installed_rx.recv();
}
