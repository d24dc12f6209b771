//! The tokio driver: runs an [`Engine`](crate::Engine) over a Unix socket.
//!
//! A [`Connection`] owns two tasks: a reader that feeds the engine and dispatches the peer's
//! calls to the [`Router`](crate::Router) (each on its own task, so a slow call never holds
//! back a fast one), and a writer that sends everything queued since its last write in one
//! `write` (calls made in a burst share a syscall). A [`Server`] accepts connections and gives
//! each one a `Connection` with the server's router.

mod connection;
mod server;

pub use connection::{CallOptions, Connection, ConnectionConfig, IoMode};
pub use server::Server;
