//! Raw N-API entry points for the per-call hot path.
//!
//! A napi-rs class method costs 350-420 ns per call from JS on these machines (receiver
//! unwrap with class-identity checks, argument conversion with a heap `String`); a raw
//! callback doing the same work costs about 100 ns. `call` is the one crossing every RPC
//! makes, so it gets raw twins, made per engine by `NativeEngine#fastFunctions()`:
//! `call(name, buffer, start, end, timeoutMs)`, `callNamed(nameId, buffer, start, end,
//! timeoutMs)` and `reply(token, buffer, start, end)`. Each is created with its engine's
//! pointer as the callback data, so a call finds its engine without any lookup or check
//! (checking a type-tagged handle cost about 6% of calls/s), and each holds its engine's JS
//! object in a read-only, non-configurable property, so the engine lives as long as any of its
//! functions does. The params are `buffer[start..end]`: msgpackr packs them into its own
//! reused buffer, so no Buffer object is made per call.

use std::ffi::c_void;
use std::ptr;

use napi::bindgen_prelude::*;
use napi::sys;

use crate::engine::NativeEngine;

unsafe fn throw(env: sys::napi_env, msg: &str) -> sys::napi_value {
    let mut m = Vec::with_capacity(msg.len() + 1);
    m.extend_from_slice(msg.as_bytes());
    m.push(0);
    sys::napi_throw_type_error(env, ptr::null(), m.as_ptr().cast());
    ptr::null_mut()
}

/// The engine a function made by `fast_functions` belongs to, and the first `N` arguments of
/// the call, or `None` (with a TypeError naming `usage` thrown) when fewer were passed.
unsafe fn args<'a, const N: usize>(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    usage: &str,
) -> Option<(&'a mut NativeEngine, [sys::napi_value; N])> {
    let mut argc = N;
    let mut argv = [ptr::null_mut(); N];
    let mut data: *mut c_void = ptr::null_mut();
    sys::napi_get_cb_info(
        env,
        info,
        &mut argc,
        argv.as_mut_ptr(),
        ptr::null_mut(),
        &mut data,
    );
    if argc < N {
        throw(env, usage);
        return None;
    }
    // SAFETY: only `fast_functions` makes functions with these callbacks, each with the
    // pointer of a live engine as its data and that engine's JS object in a non-configurable
    // property, so the engine outlives the function. No borrow of the engine is live when JS
    // runs (see the note on `impl Driver` in engine.rs): handlers run from `onSocket` may call
    // in at once.
    Some((&mut *(data as *mut NativeEngine), argv))
}

/// The bytes `buffer[start..end]` of the arguments at `at`, `at + 1`, `at + 2`, or `None`
/// (with a TypeError thrown) if they are not a Buffer and a range within it.
unsafe fn byte_range<'a>(
    env: sys::napi_env,
    argv: &[sys::napi_value],
    at: usize,
    what: &str,
) -> Option<&'a mut [u8]> {
    let mut data: *mut c_void = ptr::null_mut();
    let mut len = 0usize;
    if sys::napi_get_buffer_info(env, argv[at], &mut data, &mut len) != sys::Status::napi_ok {
        throw(env, &format!("{what}: params must be a Buffer"));
        return None;
    }
    let (mut start, mut end) = (0u32, 0u32);
    if sys::napi_get_value_uint32(env, argv[at + 1], &mut start) != sys::Status::napi_ok
        || sys::napi_get_value_uint32(env, argv[at + 2], &mut end) != sys::Status::napi_ok
        || start > end
        || end as usize > len
    {
        throw(
            env,
            &format!("{what}: start and end must delimit bytes of the buffer"),
        );
        return None;
    }
    if start == end {
        return Some(&mut []);
    }
    // SAFETY: `start..end` lies within the buffer's `len` bytes (checked above), which stay
    // alive and unaliased by Rust for the duration of this synchronous call.
    Some(std::slice::from_raw_parts_mut(
        data.cast::<u8>().add(start as usize),
        (end - start) as usize,
    ))
}

/// `reply(token, buffer, start, end)`: `NativeEngine#reply` with the result
/// `buffer[start..end]`, without napi-rs's per-call overhead (the answer to every call the
/// peer makes crosses here). Throws like `reply` for a token that is not pending.
unsafe extern "C" fn fast_reply(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    reply_with(
        env,
        info,
        ("reply", "reply(token, buffer, start, end)"),
        NativeEngine::reply_raw,
    )
}

/// `replyBin(token, buffer, start, end)`: `reply` with the result the MessagePack `bin` of
/// `buffer[start..end]` (what msgpackr makes of a Uint8Array a handler returned), written into
/// the frame straight from the handler's bytes.
unsafe extern "C" fn fast_reply_bin(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    reply_with(
        env,
        info,
        ("replyBin", "replyBin(token, buffer, start, end)"),
        |engine, token, bytes| engine.reply_bin(token, bytes),
    )
}

/// The body of `reply` and `replyBin` (`what`, and its usage for too few arguments): reads
/// `(token, buffer, start, end)` and answers with `reply`, throwing its error.
unsafe fn reply_with(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    (what, usage): (&str, &str),
    reply: impl FnOnce(&mut NativeEngine, u32, &mut [u8]) -> napi::Result<()>,
) -> sys::napi_value {
    let Some((engine, argv)) = args::<4>(env, info, usage) else {
        return ptr::null_mut();
    };
    let mut token = 0u32;
    if sys::napi_get_value_uint32(env, argv[0], &mut token) != sys::Status::napi_ok {
        return throw(env, &format!("{what}: token must be a number"));
    }
    let Some(result) = byte_range(env, &argv, 1, what) else {
        return ptr::null_mut();
    };
    if let Err(e) = reply(engine, token, result) {
        let mut m = Vec::with_capacity(e.reason.len() + 1);
        m.extend_from_slice(e.reason.as_bytes());
        m.push(0);
        sys::napi_throw_error(env, ptr::null(), m.as_ptr().cast());
    }
    ptr::null_mut()
}

/// `call(name, buffer, start, end, timeoutMs)`: `NativeEngine#call` with the params
/// `buffer[start..end]`, without napi-rs's per-call overhead. Returns the call id, or 0 when
/// the call failed at once.
unsafe extern "C" fn fast_call(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    let Some((engine, argv)) = args::<5>(env, info, "call(name, buffer, start, end, timeoutMs)")
    else {
        return ptr::null_mut();
    };

    // The name: copied onto the stack in one call. V8 never writes part of a character, so a
    // copy that stopped within 4 bytes of the end may be cut short: only then is the name
    // measured and copied again onto the heap.
    let mut stack = [0u8; 128];
    let mut copied = 0usize;
    if sys::napi_get_value_string_utf8(
        env,
        argv[0],
        stack.as_mut_ptr().cast(),
        stack.len(),
        &mut copied,
    ) != sys::Status::napi_ok
    {
        return throw(env, "call: name must be a string");
    }
    let mut heap = Vec::new();
    let buf: &[u8] = if copied + 4 < stack.len() {
        &stack[..]
    } else {
        let mut len = 0usize;
        sys::napi_get_value_string_utf8(env, argv[0], ptr::null_mut(), 0, &mut len);
        heap.resize(len + 1, 0);
        sys::napi_get_value_string_utf8(
            env,
            argv[0],
            heap.as_mut_ptr().cast(),
            heap.len(),
            &mut copied,
        );
        &heap[..]
    };
    let name = std::str::from_utf8_unchecked(&buf[..copied]);

    let Some(params) = byte_range(env, &argv, 1, "call") else {
        return ptr::null_mut();
    };
    let mut timeout_ms = 0f64;
    sys::napi_get_value_double(env, argv[4], &mut timeout_ms);

    let id = engine.call_raw(name, params, timeout_ms);
    let mut out = ptr::null_mut();
    sys::napi_create_double(env, id, &mut out);
    out
}

/// `callNamed(nameId, buffer, start, end, timeoutMs)`: `call` with the function name given by
/// the id `NativeEngine#internName` returned for it, which saves copying the name out of its
/// JS string on every call. Throws for an id the engine did not give.
unsafe extern "C" fn fast_call_named(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    call_by_name_id(
        env,
        info,
        (
            "callNamed",
            "callNamed(nameId, buffer, start, end, timeoutMs)",
        ),
        NativeEngine::call_interned,
    )
}

/// `callBinNamed(nameId, buffer, start, end, timeoutMs)`: `callNamed` with the params the
/// MessagePack `bin` of `buffer[start..end]` (what msgpackr makes of a Uint8Array), written
/// into the frame straight from the caller's bytes.
unsafe extern "C" fn fast_call_bin_named(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    call_by_name_id(
        env,
        info,
        (
            "callBinNamed",
            "callBinNamed(nameId, buffer, start, end, timeoutMs)",
        ),
        |engine, name_id, bytes, timeout_ms| engine.call_interned_bin(name_id, bytes, timeout_ms),
    )
}

/// The body of `callNamed` and `callBinNamed` (`what`, and its usage for too few arguments):
/// reads `(nameId, buffer, start, end, timeoutMs)` and makes the call with `call`, which gives
/// `None` for an unknown name id.
unsafe fn call_by_name_id(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    (what, usage): (&str, &str),
    call: impl FnOnce(&mut NativeEngine, u32, &mut [u8], f64) -> Option<f64>,
) -> sys::napi_value {
    let Some((engine, argv)) = args::<5>(env, info, usage) else {
        return ptr::null_mut();
    };
    let mut name_id = 0u32;
    if sys::napi_get_value_uint32(env, argv[0], &mut name_id) != sys::Status::napi_ok {
        return throw(env, &format!("{what}: nameId must be a number"));
    }
    let Some(params) = byte_range(env, &argv, 1, what) else {
        return ptr::null_mut();
    };
    let mut timeout_ms = 0f64;
    sys::napi_get_value_double(env, argv[4], &mut timeout_ms);

    let Some(id) = call(engine, name_id, params, timeout_ms) else {
        return throw(env, &format!("{what}: unknown nameId"));
    };
    let mut out = ptr::null_mut();
    sys::napi_create_double(env, id, &mut out);
    out
}

/// The raw entry points of `engine`, whose JS object is `this`: an object with the functions
/// `call`, `callNamed` and `reply` described above, each holding `this` in its read-only,
/// non-configurable `engine` property.
///
/// # Safety
/// `engine` must be the engine `this` wraps, and `env` the current environment.
pub(crate) unsafe fn fast_functions(
    env: sys::napi_env,
    this: sys::napi_value,
    engine: *mut NativeEngine,
) -> Result<sys::napi_value> {
    type Callback = unsafe extern "C" fn(sys::napi_env, sys::napi_callback_info) -> sys::napi_value;
    let entries: [(&std::ffi::CStr, Callback); 5] = [
        (c"call", fast_call),
        (c"callNamed", fast_call_named),
        (c"callBinNamed", fast_call_bin_named),
        (c"reply", fast_reply),
        (c"replyBin", fast_reply_bin),
    ];
    // Properties are defined, never set: a set would run any setter user code put on the
    // prototype chain, while this engine is borrowed.
    let mut out = ptr::null_mut();
    crate::raw::check(sys::napi_create_object(env, &mut out), "napi_create_object")?;
    for (name, callback) in entries {
        let mut f = ptr::null_mut();
        crate::raw::check(
            sys::napi_create_function(
                env,
                name.as_ptr(),
                name.count_bytes() as isize,
                Some(callback),
                engine.cast(),
                &mut f,
            ),
            "napi_create_function",
        )?;
        // The function keeps its engine alive: a property of the default attributes can be
        // neither changed nor deleted.
        define(env, f, c"engine", this)?;
        define(env, out, name, f)?;
    }
    Ok(out)
}

/// Defines the read-only, non-enumerable, non-configurable property `name` of `object`.
unsafe fn define(
    env: sys::napi_env,
    object: sys::napi_value,
    name: &std::ffi::CStr,
    value: sys::napi_value,
) -> Result<()> {
    let property = sys::napi_property_descriptor {
        utf8name: name.as_ptr(),
        name: ptr::null_mut(),
        method: None,
        getter: None,
        setter: None,
        value,
        attributes: sys::PropertyAttributes::default,
        data: ptr::null_mut(),
    };
    crate::raw::check(
        sys::napi_define_properties(env, object, 1, &property),
        "napi_define_properties",
    )
}
