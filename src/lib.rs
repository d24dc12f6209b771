//! `ferry-ipc`: the Node.js face of Ferry, a thin napi-rs layer over `ferry-core`.
//!
//! # Layout
//!
//! - [`engine`]: `NativeEngine`, one connection's protocol engine (framing, request ids,
//!   deadlines, envelopes, limits) driven from the Node event loop. The socket itself is a
//!   `net.Socket` owned by the JavaScript wrapper (index.js), which only moves opaque bytes:
//!   the client's hot path never leaves the JS thread, so a call costs no thread hand-off.
//! - [`error`]: the single place where core errors become JS errors with a stable `code`.
//! - [`raw`]: the few raw N-API calls used for promises and callbacks.

pub mod engine;
pub mod error;
mod fast;
mod raw;
