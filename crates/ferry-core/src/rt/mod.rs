//! The tokio driver: runs an [`Engine`](crate::Engine) over a Unix socket.
//!
//! A [`Connection`] has a reader that feeds the engine and answers the peer's calls (a
//! synchronous function in place, an async one polled once in place and, if it is not done,
//! on its own task, so a slow call never holds back a fast one), a writer that sends
//! everything queued since its last write at once (calls made in a burst share a syscall), and
//! a timer task for the calls' deadlines. Reader and writer are tasks on tokio's reactor
//! ([`IoMode::Reactor`], the default) or threads of the connection's own
//! ([`IoMode::Threads`]). A [`Server`] accepts connections and gives each one a `Connection`
//! with the server's router.

mod connection;
mod server;

pub use connection::{CallOptions, Connection, ConnectionConfig, EarlyWake, IoMode};
pub use server::Server;
