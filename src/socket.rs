//! The native socket: a connection's Unix socket watched by libuv on Node's own event loop.
//!
//! There is no thread between a call and the socket. `uv_poll` tells the JS thread when the
//! socket is readable; Rust reads, decodes and hands the answers to JS there and then. Frames
//! queued by calls go out in one `send` per loop turn, from a `uv_prepare` handle (run just
//! before the loop blocks), or at once after a read's callbacks ran, since that is when a
//! sequential caller has queued its next call.
//!
//! Lifetime: while the socket is open, a strong reference to the `NativeEngine` JS object keeps
//! the engine (whose address the handles carry) alive. Closing stops the handles; the
//! references are released in the poll handle's close callback, after any callback on the
//! stack has returned.

use std::ffi::{c_int, c_void};
use std::io;
use std::ptr;

use napi::sys;
use socket2::Socket;

use crate::raw::FnRef;
use crate::uv;

/// A write to a socket the peer closed fails with `EPIPE` instead of raising `SIGPIPE` (Node
/// ignores the signal, an embedder might not).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: c_int = 0;

/// References released once libuv has closed the poll handle.
struct Release {
    env: sys::napi_env,
    this_ref: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    hook: FnRef,
}

pub(crate) struct NativeSocket {
    pub sock: Socket,
    poll: uv::Handle,
    prepare: uv::Handle,
    pub env: sys::napi_env,
    this_ref: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    /// `onSocket(kind, arg)` in the wrapper.
    pub hook: FnRef,
    /// Bytes accepted from the engine but not yet written (the socket was full).
    pub wbuf: Vec<u8>,
    pub wpos: usize,
    events: c_int,
    prepare_active: bool,
    refed: bool,
    /// The wrapper asked to close once the queued bytes are written.
    pub ending: bool,
    cleanup: *mut c_void,
}

/// A handle scope plus a callback scope: what calling JS from a libuv callback needs. Closing
/// the outermost callback scope runs `process.nextTick` callbacks and microtasks, so promise
/// continuations of the answers delivered inside it run before it returns.
pub(crate) struct JsScope {
    env: sys::napi_env,
    handles: sys::napi_handle_scope,
    callback: sys::napi_callback_scope,
}

impl JsScope {
    /// # Safety
    /// On the JS thread of `env`, outside any JS call.
    pub unsafe fn open(s: &NativeSocket) -> JsScope {
        let env = s.env;
        let mut handles = ptr::null_mut();
        sys::napi_open_handle_scope(env, &mut handles);
        let mut resource = ptr::null_mut();
        sys::napi_get_reference_value(env, s.this_ref, &mut resource);
        let mut callback = ptr::null_mut();
        sys::napi_open_callback_scope(env, resource, s.async_ctx, &mut callback);
        JsScope {
            env,
            handles,
            callback,
        }
    }
}

impl Drop for JsScope {
    fn drop(&mut self) {
        unsafe {
            sys::napi_close_callback_scope(self.env, self.callback);
            sys::napi_close_handle_scope(self.env, self.handles);
        }
    }
}

/// Callbacks into the engine that owns the socket (see `engine.rs`).
pub(crate) trait Driver {
    /// # Safety
    /// `this` is the live engine the handle belongs to; called from libuv on the JS thread.
    unsafe fn on_poll(this: *mut Self, status: c_int, events: c_int);
    /// # Safety
    /// As `on_poll`.
    unsafe fn on_prepare(this: *mut Self);
    /// # Safety
    /// Called while the environment is being torn down: no JS may run.
    unsafe fn on_teardown(this: *mut Self);
}

unsafe extern "C" fn poll_cb<D: Driver>(handle: uv::Handle, status: c_int, events: c_int) {
    let this = uv::uv_handle_get_data(handle) as *mut D;
    if !this.is_null() {
        D::on_poll(this, status, events);
    }
}

unsafe extern "C" fn prepare_cb<D: Driver>(handle: uv::Handle) {
    let this = uv::uv_handle_get_data(handle) as *mut D;
    if !this.is_null() {
        D::on_prepare(this);
    }
}

unsafe extern "C" fn teardown_cb<D: Driver>(arg: *mut c_void) {
    D::on_teardown(arg as *mut D);
}

unsafe extern "C" fn poll_closed(handle: uv::Handle) {
    let release = uv::uv_handle_get_data(handle) as *mut Release;
    uv::free_uninit(handle, uv::UV_POLL);
    if release.is_null() {
        return;
    }
    let r = Box::from_raw(release);
    let mut scope = ptr::null_mut();
    sys::napi_open_handle_scope(r.env, &mut scope);
    sys::napi_async_destroy(r.env, r.async_ctx);
    r.hook.release(r.env);
    sys::napi_delete_reference(r.env, r.this_ref);
    sys::napi_close_handle_scope(r.env, scope);
}

unsafe extern "C" fn prepare_closed(handle: uv::Handle) {
    uv::free_uninit(handle, uv::UV_PREPARE);
}

fn check(status: sys::napi_status, what: &str) -> napi::Result<()> {
    crate::raw::check(status, what)
}

impl NativeSocket {
    /// Starts watching `sock` on the loop of `env`. `this` is the engine's JS object and
    /// `owner` its Rust address, which the handles carry.
    ///
    /// # Safety
    /// On the JS thread of `env`; `owner` stays valid while `this` is alive.
    pub unsafe fn open<D: Driver>(
        env: sys::napi_env,
        this: sys::napi_value,
        owner: *mut D,
        sock: Socket,
        hook: FnRef,
    ) -> napi::Result<NativeSocket> {
        use std::os::fd::AsRawFd;
        let mut lp = ptr::null_mut();
        check(
            sys::napi_get_uv_event_loop(env, &mut lp),
            "napi_get_uv_event_loop",
        )?;
        let poll = uv::alloc_handle(uv::UV_POLL);
        let rc = uv::uv_poll_init(lp, poll, sock.as_raw_fd());
        if rc != 0 {
            uv::free_uninit(poll, uv::UV_POLL);
            hook.release(env);
            return Err(napi::Error::from_reason(format!(
                "uv_poll_init failed ({rc})"
            )));
        }
        let prepare = uv::alloc_handle(uv::UV_PREPARE);
        uv::uv_prepare_init(lp, prepare);
        uv::uv_handle_set_data(poll, owner.cast());
        uv::uv_handle_set_data(prepare, owner.cast());
        // Neither handle holds the process open by itself: `set_ref` decides.
        uv::uv_unref(poll);
        uv::uv_unref(prepare);
        uv::uv_poll_start(poll, uv::UV_READABLE, poll_cb::<D>);

        let mut this_ref = ptr::null_mut();
        sys::napi_create_reference(env, this, 1, &mut this_ref);
        let mut name = ptr::null_mut();
        let n = "FerrySocket";
        sys::napi_create_string_utf8(env, n.as_ptr().cast(), n.len() as isize, &mut name);
        let mut async_ctx = ptr::null_mut();
        sys::napi_async_init(env, this, name, &mut async_ctx);
        let cleanup = owner.cast::<c_void>();
        sys::napi_add_env_cleanup_hook(env, Some(teardown_cb::<D>), cleanup);
        Ok(NativeSocket {
            sock,
            poll,
            prepare,
            env,
            this_ref,
            async_ctx,
            hook,
            wbuf: Vec::new(),
            wpos: 0,
            events: uv::UV_READABLE,
            prepare_active: false,
            refed: false,
            ending: false,
            cleanup,
        })
    }

    /// Makes sure queued frames are written before the loop next blocks.
    #[inline]
    pub fn arm<D: Driver>(&mut self) {
        if !self.prepare_active {
            self.prepare_active = true;
            unsafe { uv::uv_prepare_start(self.prepare, prepare_cb::<D>) };
        }
    }

    pub fn disarm(&mut self) {
        if self.prepare_active {
            self.prepare_active = false;
            unsafe { uv::uv_prepare_stop(self.prepare) };
        }
    }

    /// Holds the process open (or not) while the socket is open.
    #[inline]
    pub fn set_ref(&mut self, on: bool) {
        if on != self.refed {
            self.refed = on;
            unsafe {
                if on {
                    uv::uv_ref(self.poll)
                } else {
                    uv::uv_unref(self.poll)
                }
            }
        }
    }

    fn set_events<D: Driver>(&mut self, events: c_int) {
        if events != self.events {
            self.events = events;
            unsafe {
                if events == 0 {
                    uv::uv_poll_stop(self.poll);
                } else {
                    uv::uv_poll_start(self.poll, events, poll_cb::<D>);
                }
            }
        }
    }

    /// Stops reading (the stream is untrusted or ending); writing goes on if needed.
    pub fn stop_reading<D: Driver>(&mut self) {
        self.set_events::<D>(self.events & !uv::UV_READABLE);
    }

    /// Writes `wbuf` until done or the socket is full (then waits to be writable).
    pub fn write_pending<D: Driver>(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self
                .sock
                .send_with_flags(&self.wbuf[self.wpos..], SEND_FLAGS)
            {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.set_events::<D>(self.events | uv::UV_WRITABLE);
                    return Ok(());
                }
                Err(e) => {
                    self.wbuf.clear();
                    self.wpos = 0;
                    return Err(e);
                }
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 4 << 20 {
            self.wbuf = Vec::new();
        }
        self.set_events::<D>(self.events & !uv::UV_WRITABLE);
        Ok(())
    }

    /// Writes `parts` in order with one `sendmsg`, straight from where they lie, when nothing
    /// is waiting to be written; whatever the socket does not take is copied to `wbuf` and
    /// written once the socket has room, as with [`NativeSocket::write_pending`].
    pub fn write_parts<D: Driver, const N: usize>(&mut self, parts: [&[u8]; N]) -> io::Result<()> {
        debug_assert!(!self.has_unwritten());
        let iov = parts.map(io::IoSlice::new);
        let mut sent = loop {
            match self.sock.send_vectored_with_flags(&iov, SEND_FLAGS) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) => return Err(e),
            }
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if sent == total {
            return Ok(());
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.wbuf.reserve(total - sent);
        for part in parts {
            let skip = sent.min(part.len());
            sent -= skip;
            self.wbuf.extend_from_slice(&part[skip..]);
        }
        self.write_pending::<D>()
    }

    /// Whether bytes are still waiting to be written.
    pub fn has_unwritten(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    /// Stops the handles and closes the socket. With `js`, the references are released once
    /// libuv has closed the poll handle; without (environment teardown), they are left.
    ///
    /// # Safety
    /// On the JS thread of the socket's environment.
    pub unsafe fn close<D: Driver>(self, js: bool) {
        let s = self;
        uv::uv_poll_stop(s.poll);
        // A no-op when the hook itself is running (Node removes hooks before running them).
        sys::napi_remove_env_cleanup_hook(s.env, Some(teardown_cb::<D>), s.cleanup);
        let release = if js {
            Box::into_raw(Box::new(Release {
                env: s.env,
                this_ref: s.this_ref,
                async_ctx: s.async_ctx,
                hook: s.hook,
            }))
        } else {
            ptr::null_mut()
        };
        uv::uv_handle_set_data(s.poll, release.cast());
        uv::uv_handle_set_data(s.prepare, ptr::null_mut());
        uv::uv_close(s.poll, poll_closed);
        uv::uv_close(s.prepare, prepare_closed);
        drop(s.sock);
    }
}
