//! The single place where `ferry_core::Error` becomes a JavaScript error.
//!
//! Errors are built by the wrapper's `makeError(code, message, errorType)` hook, so every
//! rejection is an `RpcError` instance with a stable `code` (`ERR_FERRY_*`) and, when the
//! failure came from the peer, the wire `errorType`. No code is ever parsed out of a message.

use napi::sys;

use crate::raw::{self, FnRef};

/// Builds the JS error for `err`. Never fails: if the hook itself throws, the thrown value is
/// used instead.
pub fn to_js(env: sys::napi_env, make_error: &FnRef, err: &ferry_core::Error) -> sys::napi_value {
    build(
        env,
        make_error,
        err.code(),
        &err.to_string(),
        err.error_type(),
    )
}

/// Builds a JS error from its parts.
pub fn build(
    env: sys::napi_env,
    make_error: &FnRef,
    code: &str,
    message: &str,
    error_type: Option<&str>,
) -> sys::napi_value {
    let args = [
        raw::string(env, code).unwrap_or_else(|_| raw::undefined(env)),
        raw::string(env, message).unwrap_or_else(|_| raw::undefined(env)),
        match error_type {
            Some(t) => raw::string(env, t).unwrap_or_else(|_| raw::undefined(env)),
            None => raw::undefined(env),
        },
    ];
    match make_error.call(env, &args) {
        Ok(v) | Err(v) => v,
    }
}
