//! The few libuv functions the native socket needs, from the libuv that Node itself runs.
//!
//! Node exports its libuv symbols to addons (napi-sys declares `uv_run` the same way), so
//! these resolve against the running `node` when the addon is loaded. Handles are allocated
//! here with the size libuv reports at run time (`uv_handle_size`), so no struct layout is
//! assumed beyond the opaque pointer.

#![allow(non_camel_case_types)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_int, c_void};

use napi::sys::uv_loop_s;

/// `uv_handle_t*`, `uv_poll_t*` and `uv_prepare_t*` alike: opaque.
pub type Handle = *mut c_void;

pub type PollCb = unsafe extern "C" fn(handle: Handle, status: c_int, events: c_int);
pub type PrepareCb = unsafe extern "C" fn(handle: Handle);
pub type CloseCb = unsafe extern "C" fn(handle: Handle);

/// `uv_handle_type` values (stable since libuv 1.0).
pub const UV_POLL: c_int = 8;
pub const UV_PREPARE: c_int = 9;

/// `uv_poll_event` bits.
pub const UV_READABLE: c_int = 1;
pub const UV_WRITABLE: c_int = 2;

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    pub fn uv_handle_set_data(handle: Handle, data: *mut c_void);
    pub fn uv_handle_get_data(handle: Handle) -> *mut c_void;
    pub fn uv_poll_init(lp: *mut uv_loop_s, handle: Handle, fd: c_int) -> c_int;
    pub fn uv_poll_start(handle: Handle, events: c_int, cb: PollCb) -> c_int;
    pub fn uv_poll_stop(handle: Handle) -> c_int;
    pub fn uv_prepare_init(lp: *mut uv_loop_s, handle: Handle) -> c_int;
    pub fn uv_prepare_start(handle: Handle, cb: PrepareCb) -> c_int;
    pub fn uv_prepare_stop(handle: Handle) -> c_int;
    pub fn uv_ref(handle: Handle);
    pub fn uv_unref(handle: Handle);
    pub fn uv_close(handle: Handle, cb: CloseCb);
}

fn layout(kind: c_int) -> Layout {
    // 16 bytes covers every alignment libuv handles need.
    Layout::from_size_align(unsafe { uv_handle_size(kind) }.max(1), 16).expect("handle layout")
}

/// Allocates zeroed memory for a handle of `kind`; freed by [`free_uninit`] in its close
/// callback.
pub fn alloc_handle(kind: c_int) -> Handle {
    let p = unsafe { alloc_zeroed(layout(kind)) };
    assert!(!p.is_null(), "out of memory for a libuv handle");
    p.cast()
}

/// Frees a handle that was never initialized.
///
/// # Safety
/// `handle` came from [`alloc_handle`] with the same `kind` and libuv does not know it.
pub unsafe fn free_uninit(handle: Handle, kind: c_int) {
    dealloc(handle.cast(), layout(kind));
}
