//! Raw N-API entry points for the per-call hot path.
//!
//! A napi-rs class method costs 350-420 ns per call from JS on these machines (receiver
//! unwrap with class-identity checks, argument conversion with a heap `String`); a raw
//! callback doing the same work costs about 100 ns. `call` is the one crossing every RPC
//! makes, so it gets a raw twin: `fastCall(handle, name, buffer, start, end, timeoutMs)`,
//! where `handle` is an external made by `NativeEngine#fastHandle()` and type-tagged, so a
//! foreign object can never be taken for an engine, and the params are `buffer[start..end]`:
//! msgpackr packs them into its own reused buffer, so no Buffer object is made per call.

// napi-rs registers module exports only outside `cfg(test)`.
#![cfg_attr(test, allow(dead_code))]

use std::ffi::c_void;
use std::ptr;

use napi::bindgen_prelude::*;
use napi::sys;
use napi_derive::napi;

use crate::engine::NativeEngine;

/// Marks externals that point at a live `NativeEngine`.
pub(crate) const ENGINE_TAG: sys::napi_type_tag = sys::napi_type_tag {
    lower: 0x6665_7272_7969_7063,
    upper: 0x656e_6769_6e65_0001,
};

unsafe fn throw(env: sys::napi_env, msg: &str) -> sys::napi_value {
    let mut m = Vec::with_capacity(msg.len() + 1);
    m.extend_from_slice(msg.as_bytes());
    m.push(0);
    sys::napi_throw_type_error(env, ptr::null(), m.as_ptr().cast());
    ptr::null_mut()
}

/// The first `N` arguments of a call, or `None` (with a TypeError naming `usage` thrown) when
/// fewer were passed.
unsafe fn args<const N: usize>(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    usage: &str,
) -> Option<[sys::napi_value; N]> {
    let mut argc = N;
    let mut argv = [ptr::null_mut(); N];
    sys::napi_get_cb_info(
        env,
        info,
        &mut argc,
        argv.as_mut_ptr(),
        ptr::null_mut(),
        ptr::null_mut(),
    );
    if argc < N {
        throw(env, usage);
        return None;
    }
    Some(argv)
}

/// The engine behind a type-tagged handle, or `None` (with a TypeError thrown) for anything
/// else.
unsafe fn engine_of<'a>(
    env: sys::napi_env,
    handle: sys::napi_value,
    what: &str,
) -> Option<&'a mut NativeEngine> {
    let mut tagged = false;
    if sys::napi_check_object_type_tag(env, handle, &ENGINE_TAG, &mut tagged)
        != sys::Status::napi_ok
        || !tagged
    {
        throw(env, &format!("{what}: not an engine handle"));
        return None;
    }
    let mut data: *mut c_void = ptr::null_mut();
    sys::napi_get_value_external(env, handle, &mut data);
    // SAFETY: only `make_handle` tags externals with ENGINE_TAG, over a live engine. The
    // wrapper keeps the NativeEngine object alive as long as it uses the handle, and no borrow
    // of the engine is live when JS runs (see the note on `impl Driver` in engine.rs):
    // handlers run from `onSocket` may call in at once.
    Some(&mut *(data as *mut NativeEngine))
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

/// `fastReply(handle, token, buffer, start, end)`: `NativeEngine#reply` with the result
/// `buffer[start..end]`, without napi-rs's per-call overhead (the answer to every call the
/// peer makes crosses here). Throws like `reply` for a token that is not pending.
unsafe extern "C" fn fast_reply(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    let Some(argv) = args::<5>(env, info, "fastReply(handle, token, buffer, start, end)") else {
        return ptr::null_mut();
    };
    let Some(engine) = engine_of(env, argv[0], "fastReply") else {
        return ptr::null_mut();
    };
    let mut token = 0u32;
    if sys::napi_get_value_uint32(env, argv[1], &mut token) != sys::Status::napi_ok {
        return throw(env, "fastReply: token must be a number");
    }
    let Some(result) = byte_range(env, &argv, 2, "fastReply") else {
        return ptr::null_mut();
    };
    if let Err(e) = engine.reply_raw(token, result) {
        let mut m = Vec::with_capacity(e.reason.len() + 1);
        m.extend_from_slice(e.reason.as_bytes());
        m.push(0);
        sys::napi_throw_error(env, ptr::null(), m.as_ptr().cast());
    }
    ptr::null_mut()
}

/// `fastCall(handle, name, buffer, start, end, timeoutMs)`: `NativeEngine#call` with the
/// params `buffer[start..end]`, without napi-rs's per-call overhead. Returns the call id, or 0
/// when the call failed at once.
unsafe extern "C" fn fast_call(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    let Some(argv) = args::<6>(
        env,
        info,
        "fastCall(handle, name, buffer, start, end, timeoutMs)",
    ) else {
        return ptr::null_mut();
    };
    let Some(engine) = engine_of(env, argv[0], "fastCall") else {
        return ptr::null_mut();
    };

    // The name: copied onto the stack in one call. V8 never writes part of a character, so a
    // copy that stopped within 4 bytes of the end may be cut short: only then is the name
    // measured and copied again onto the heap.
    let mut stack = [0u8; 128];
    let mut copied = 0usize;
    if sys::napi_get_value_string_utf8(
        env,
        argv[1],
        stack.as_mut_ptr().cast(),
        stack.len(),
        &mut copied,
    ) != sys::Status::napi_ok
    {
        return throw(env, "fastCall: name must be a string");
    }
    let mut heap = Vec::new();
    let buf: &[u8] = if copied + 4 < stack.len() {
        &stack[..]
    } else {
        let mut len = 0usize;
        sys::napi_get_value_string_utf8(env, argv[1], ptr::null_mut(), 0, &mut len);
        heap.resize(len + 1, 0);
        sys::napi_get_value_string_utf8(
            env,
            argv[1],
            heap.as_mut_ptr().cast(),
            heap.len(),
            &mut copied,
        );
        &heap[..]
    };
    let name = std::str::from_utf8_unchecked(&buf[..copied]);

    let Some(params) = byte_range(env, &argv, 2, "fastCall") else {
        return ptr::null_mut();
    };
    let mut timeout_ms = 0f64;
    sys::napi_get_value_double(env, argv[5], &mut timeout_ms);

    let id = engine.call_raw(name, params, timeout_ms);
    let mut out = ptr::null_mut();
    sys::napi_create_double(env, id, &mut out);
    out
}

/// `fastCallNamed(handle, nameId, buffer, start, end, timeoutMs)`: `fastCall` with the function
/// name given by the id `NativeEngine#internName` returned for it, which saves copying the name
/// out of its JS string on every call. Throws for an id that engine did not give.
unsafe extern "C" fn fast_call_named(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    let Some(argv) = args::<6>(
        env,
        info,
        "fastCallNamed(handle, nameId, buffer, start, end, timeoutMs)",
    ) else {
        return ptr::null_mut();
    };
    let Some(engine) = engine_of(env, argv[0], "fastCallNamed") else {
        return ptr::null_mut();
    };
    let mut name_id = 0u32;
    if sys::napi_get_value_uint32(env, argv[1], &mut name_id) != sys::Status::napi_ok {
        return throw(env, "fastCallNamed: nameId must be a number");
    }
    let Some(params) = byte_range(env, &argv, 2, "fastCallNamed") else {
        return ptr::null_mut();
    };
    let mut timeout_ms = 0f64;
    sys::napi_get_value_double(env, argv[5], &mut timeout_ms);

    let Some(id) = engine.call_interned(name_id, params, timeout_ms) else {
        return throw(env, "fastCallNamed: unknown nameId");
    };
    let mut out = ptr::null_mut();
    sys::napi_create_double(env, id, &mut out);
    out
}

/// Makes the type-tagged external handle of `engine` that `fastCall` takes.
pub(crate) fn make_handle(
    env: sys::napi_env,
    engine: *mut NativeEngine,
) -> Result<sys::napi_value> {
    let mut ext = ptr::null_mut();
    crate::raw::check(
        unsafe { sys::napi_create_external(env, engine.cast(), None, ptr::null_mut(), &mut ext) },
        "napi_create_external",
    )?;
    crate::raw::check(
        unsafe { sys::napi_type_tag_object(env, ext, &ENGINE_TAG) },
        "napi_type_tag_object",
    )?;
    Ok(ext)
}

#[napi(module_exports)]
pub fn init(mut exports: Object, env: Env) -> Result<()> {
    type Callback = unsafe extern "C" fn(sys::napi_env, sys::napi_callback_info) -> sys::napi_value;
    let entries: [(&str, Callback); 3] = [
        ("fastCall", fast_call),
        ("fastCallNamed", fast_call_named),
        ("fastReply", fast_reply),
    ];
    for (name, callback) in entries {
        let mut f = ptr::null_mut();
        crate::raw::check(
            unsafe {
                sys::napi_create_function(
                    env.raw(),
                    name.as_ptr().cast(),
                    name.len() as isize,
                    Some(callback),
                    ptr::null_mut(),
                    &mut f,
                )
            },
            "napi_create_function",
        )?;
        exports.set_named_property(name, unsafe { Unknown::from_raw_unchecked(env.raw(), f) })?;
    }
    Ok(())
}
