//! `ferry-ipc`: the Node.js face of Ferry, a thin napi-rs layer over `ferry-core`.
//!
//! # Layout
//!
//! - [`engine`]: `NativeEngine`, one connection's protocol engine (framing, request ids,
//!   deadlines, envelopes, limits) and its socket, driven from the Node event loop.
//! - `socket`: the socket watched by libuv (`uv_poll`) on Node's own loop, through the
//!   libuv functions in `uv`: reads, decoding and promise resolution happen on the JS thread,
//!   so a call costs no thread hand-off.
//! - `fast`: the raw N-API entry points (`call`, `callNamed`, `reply`) of the per-call hot path.
//! - [`error`]: the single place where core errors become JS errors with a stable `code`.
//! - [`raw`]: the few raw N-API calls used for promises and callbacks.

pub mod engine;
pub mod error;
mod fast;
mod raw;
mod socket;
mod uv;
