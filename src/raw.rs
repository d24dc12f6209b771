//! Raw N-API helpers: persistent function references, buffers, numbers, strings.
//! Everything here runs on the JS thread that owns the `napi_env`.

use std::ffi::c_void;
use std::ptr;

use napi::bindgen_prelude::*;
use napi::sys;

pub fn check(status: sys::napi_status, what: &str) -> Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(Error::new(Status::from(status), format!("{what} failed")))
    }
}

/// A strong reference to a JS function, released by [`FnRef::release`].
pub struct FnRef(sys::napi_ref);

impl FnRef {
    pub fn new(env: sys::napi_env, value: sys::napi_value) -> Result<FnRef> {
        let mut ty = 0;
        check(
            unsafe { sys::napi_typeof(env, value, &mut ty) },
            "napi_typeof",
        )?;
        if ty != sys::ValueType::napi_function {
            return Err(Error::new(Status::InvalidArg, "expected a function"));
        }
        let mut r = ptr::null_mut();
        check(
            unsafe { sys::napi_create_reference(env, value, 1, &mut r) },
            "napi_create_reference",
        )?;
        Ok(FnRef(r))
    }

    /// Calls the function with `undefined` as `this`. A thrown exception is caught and
    /// returned as `Err(exception)`.
    pub fn call(
        &self,
        env: sys::napi_env,
        args: &[sys::napi_value],
    ) -> std::result::Result<sys::napi_value, sys::napi_value> {
        unsafe {
            let mut f = ptr::null_mut();
            let mut undefined = ptr::null_mut();
            sys::napi_get_reference_value(env, self.0, &mut f);
            sys::napi_get_undefined(env, &mut undefined);
            let mut out = ptr::null_mut();
            let status =
                sys::napi_call_function(env, undefined, f, args.len(), args.as_ptr(), &mut out);
            if status == sys::Status::napi_ok {
                return Ok(out);
            }
            let mut exception = ptr::null_mut();
            sys::napi_get_and_clear_last_exception(env, &mut exception);
            Err(exception)
        }
    }

    /// A copy that does not own the reference (for calling without borrowing the owner).
    pub fn clone_raw(&self) -> FnRef {
        FnRef(self.0)
    }

    pub fn release(self, env: sys::napi_env) {
        unsafe { sys::napi_delete_reference(env, self.0) };
    }
}

pub fn buffer_copy(env: sys::napi_env, data: &[u8]) -> Result<sys::napi_value> {
    let mut out = ptr::null_mut();
    let mut dst = ptr::null_mut();
    check(
        unsafe {
            sys::napi_create_buffer_copy(env, data.len(), data.as_ptr().cast(), &mut dst, &mut out)
        },
        "napi_create_buffer_copy",
    )?;
    Ok(out)
}

unsafe extern "C" fn free_vec(_env: sys::napi_env, _data: *mut c_void, hint: *mut c_void) {
    drop(Box::from_raw(hint as *mut Vec<u8>));
}

/// A Buffer over `v`'s bytes without copying them (freed when the Buffer is collected), or a
/// copy where external buffers are not allowed. Also returns where the bytes are.
pub fn buffer_from_vec(
    env: sys::napi_env,
    v: Vec<u8>,
) -> Result<(sys::napi_value, *const u8, usize)> {
    let len = v.len();
    let boxed = Box::new(v);
    let data = boxed.as_ptr() as *mut c_void;
    let hint = Box::into_raw(boxed);
    let mut out = ptr::null_mut();
    let status = unsafe {
        sys::napi_create_external_buffer(env, len, data, Some(free_vec), hint.cast(), &mut out)
    };
    if status == sys::Status::napi_ok {
        return Ok((out, data as *const u8, len));
    }
    if status != sys::Status::napi_no_external_buffers_allowed {
        // On some failures Node has already run the finalizer: leak rather than free twice.
        return Err(Error::new(
            Status::from(status),
            "napi_create_external_buffer failed",
        ));
    }
    // SAFETY: refused before being handed over (no finalizer ran): still ours.
    let v = unsafe { Box::from_raw(hint) };
    let mut dst = ptr::null_mut();
    check(
        unsafe { sys::napi_create_buffer_copy(env, len, v.as_ptr().cast(), &mut dst, &mut out) },
        "napi_create_buffer_copy",
    )?;
    Ok((out, dst as *const u8, len))
}

pub fn string(env: sys::napi_env, s: &str) -> Result<sys::napi_value> {
    let mut out = ptr::null_mut();
    check(
        unsafe { sys::napi_create_string_utf8(env, s.as_ptr().cast(), s.len() as isize, &mut out) },
        "napi_create_string_utf8",
    )?;
    Ok(out)
}

pub fn undefined(env: sys::napi_env) -> sys::napi_value {
    let mut out = ptr::null_mut();
    unsafe { sys::napi_get_undefined(env, &mut out) };
    out
}

pub fn double(env: sys::napi_env, n: f64) -> Result<sys::napi_value> {
    let mut out = ptr::null_mut();
    check(
        unsafe { sys::napi_create_double(env, n, &mut out) },
        "napi_create_double",
    )?;
    Ok(out)
}

pub fn uint(env: sys::napi_env, n: u32) -> Result<sys::napi_value> {
    let mut out = ptr::null_mut();
    check(
        unsafe { sys::napi_create_uint32(env, n, &mut out) },
        "napi_create_uint32",
    )?;
    Ok(out)
}

/// A raw JS value returned from a `#[napi]` method as is.
pub struct RawValue(pub sys::napi_value);

impl ToNapiValue for RawValue {
    unsafe fn to_napi_value(_env: sys::napi_env, val: Self) -> Result<sys::napi_value> {
        Ok(val.0)
    }
}

impl TypeName for RawValue {
    fn type_name() -> &'static str {
        "unknown"
    }

    fn value_type() -> ValueType {
        ValueType::Unknown
    }
}
