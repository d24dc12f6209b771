//! Ferry's core: ZapJS-compatible RPC over length-prefixed MessagePack frames on Unix sockets.
//!
//! Either end of a connection can call functions on the other (`rpc_call`), invoke HTTP-like
//! route handlers (`invoke_handler`), and answer the same; "client" and "server" only say who
//! listened. The wire format is specified in docs/protocol.md.
//!
//! # Layout
//!
//! - [`frame`]: the 4-byte big-endian length prefix, limits.
//! - [`message`]: the wire messages and their hand-written MessagePack/JSON codec.
//! - [`engine`]: the sans-IO protocol state of one connection (pending calls, ids, deadlines,
//!   in-order answers). The tokio driver here and the Node addon both drive it.
//! - [`router`]: named Rust functions that serve incoming calls.
//! - [`rt`]: the tokio driver: [`Connection`] (call and serve on one socket), [`Server`].
//! - [`error`]: the one error enum, with stable codes.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> ferry_core::Result<()> {
//! use ferry_core::{Connection, Router, Server};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! let router = Router::new().sync_fn("add", |p: Add| Ok::<_, String>(p.a + p.b));
//! let server = Server::bind("/tmp/ferry-demo.sock", router).await?;
//! tokio::spawn(server.run_until(std::future::pending::<()>()));
//!
//! let conn = Connection::connect("/tmp/ferry-demo.sock").await?;
//! let sum: i64 = conn.call("add", &serde_json::json!({"a": 2, "b": 3})).await?;
//! assert_eq!(sum, 5);
//! # Ok(()) }
//! ```

pub mod engine;
pub mod error;
mod fast_de;
pub mod frame;
pub mod message;
pub mod router;
pub mod rt;

pub use engine::{Deadline, EarlyWrites, Engine, EngineConfig, Event, InvokeOutcome, InvokeReply};
pub use error::{Error, ErrorType, Result};
pub use message::{Message, Payload, RequestId};
pub use router::{Context, MsgpackOut, Rejection, Router};
pub use rt::{CallOptions, Connection, ConnectionConfig, EarlyWake, IoMode, Server};
