//! The sans-IO protocol engine: one connection's protocol state, with no sockets and no clock.
//!
//! Frame bodies go in with [`Engine::on_frame`] (the driver reads into a
//! [`FrameDecoder`](crate::frame::FrameDecoder) and hands over the bodies it finds, which the
//! engine's events borrow: a call's name and params, an answer's value are not copied); frames
//! to send accumulate in an output buffer that the driver takes with [`Engine::take_output`] and
//! writes however it likes (one `write` per batch of calls, so many frames share a syscall).
//! Everything the driver must act on comes out of [`Engine::on_frame`] as an [`Event`]: answers
//! to our calls (carrying the driver's own token `T`, such as the slot where a Rust caller waits
//! or a JS promise's id), and calls or invocations from the peer, which the driver runs and
//! answers with [`Engine::respond`] / [`Engine::respond_invoke`].
//!
//! Deadlines are plain state: the driver asks [`Engine::next_deadline`] when to wake up and
//! calls [`Engine::expire`] then. The tokio driver and the Node addon drive this same type.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use std::borrow::Cow;

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorType};
use crate::frame::{begin_frame, finish_frame, OversizedFrame, DEFAULT_MAX_FRAME};
use crate::message::{self, codes, Message, MessageRef, RequestId};

/// Stale deadline entries tolerated beyond the pending calls before the heap is swept.
const STALE_SLACK: usize = 1024;

/// Limits and settings of one connection's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The largest frame body accepted or sent, in bytes. Default: 16 MiB.
    pub max_frame: usize,
    /// Whether a cancelled or timed-out call sends `cancel` to the peer. Default: true.
    pub send_cancel: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_frame: DEFAULT_MAX_FRAME,
            send_cancel: true,
        }
    }
}

/// A call's deadline: when it expires, and the timeout it was made with (for the error).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// When the call fails with [`Error::Timeout`].
    pub at: Instant,
    /// The timeout that was asked for.
    pub timeout: Duration,
}

impl Deadline {
    /// A deadline `timeout` after `now`; `None` when that instant is beyond what the clock can
    /// represent (a timeout that large means no deadline).
    pub fn after(now: Instant, timeout: Duration) -> Option<Deadline> {
        now.checked_add(timeout).map(|at| Deadline { at, timeout })
    }

    /// A deadline at least `timeout` from now, read cheaply: for timeouts of
    /// [`APPROX_MIN_TIMEOUT`] or more, from the kernel's coarse monotonic clock (Linux), which
    /// costs a fraction of a precise reading (about 5 against 30 ns on the VMs measured, where
    /// a call costs a few hundred), and may fall up to three of its ticks (a few ms) late,
    /// never early. Shorter timeouts, and systems without that clock, read the precise clock.
    /// For drivers on the real clock (not tokio's test clock, which may be paused).
    pub fn after_approx(timeout: Duration) -> Option<Deadline> {
        let now = if timeout >= APPROX_MIN_TIMEOUT {
            clock::approx_now()
        } else {
            Instant::now()
        };
        Deadline::after(now, timeout)
    }
}

/// Timeouts from this long on may use the coarse clock ([`Deadline::after_approx`]): 1 s.
pub const APPROX_MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// When a driver writes queued frames before the end of a batch (a loop turn of the Node
/// addon, a turn of the runtime's tasks for [`crate::Connection`]), so that the peer starts on
/// the first frames of a large batch while the rest are still being queued. Without it each
/// side idles while the other works through the whole batch; measured on a 2-core VM with the
/// processes on different cores, 64 calls in flight made about twice the calls per second with
/// early writes (docs/benchmarks.md).
///
/// The first early write comes once [`EarlyWrites::FIRST`] bytes are queued, each next one once
/// twice as many bytes as the last write are queued again (a batch of N bytes is written about
/// log2(N / FIRST) times early, then once at its end). With both processes on one CPU there is
/// nothing to overlap, and the extra writes cost about a quarter of the calls per second, so
/// [`EarlyWrites::new`] is off in a process that may run on one CPU only.
#[derive(Debug, Clone)]
pub struct EarlyWrites {
    enabled: bool,
    at: usize,
}

impl EarlyWrites {
    /// The bytes queued in a batch at which they are first written early: 512.
    pub const FIRST: usize = 512;

    /// On when this process may run on more than one CPU ([`runs_on_many_cpus`]).
    pub fn new() -> Self {
        EarlyWrites {
            enabled: runs_on_many_cpus(),
            at: Self::FIRST,
        }
    }

    /// Never writes early.
    pub fn disabled() -> Self {
        EarlyWrites {
            enabled: false,
            at: Self::FIRST,
        }
    }

    /// Whether the driver should write now, with `queued` bytes of frames waiting.
    #[inline]
    pub fn due(&self, queued: usize) -> bool {
        self.enabled && queued >= self.at
    }

    /// The driver wrote `len` bytes early: the next early write waits for twice as many.
    pub fn wrote(&mut self, len: usize) {
        self.at = len.max(Self::FIRST).saturating_mul(2);
    }

    /// The batch ended (the driver's regular write): the next batch starts over.
    #[inline]
    pub fn end_batch(&mut self) {
        self.at = Self::FIRST;
    }
}

impl Default for EarlyWrites {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts an answer to the peer's `rpc_call` at the end of `out`, a buffer of the
/// driver's own: the frame's header and the `rpc_response` body up to its result. The
/// driver then appends the result (one MessagePack value, not checked here) and ends the
/// frame with [`finish_response`]; the finished frames go out through
/// [`Engine::queue_frames`]. This lets handlers write their results straight into the
/// frames that are sent, without the engine (or the lock that guards it). Returns where
/// the frame starts.
pub fn begin_response(out: &mut Vec<u8>, request_id: &RequestId) -> usize {
    let at = begin_frame(out);
    message::encode_rpc_response_head(out, request_id);
    at
}

/// Ends a frame started at `at` by [`begin_response`]. Over the frame limit, the
/// frame is removed from `out` and the error returned: answer the call with it, as
/// [`Engine::respond`] would (an `Internal` error saying the answer could not be sent).
pub fn finish_response(max_frame: usize, out: &mut Vec<u8>, at: usize) -> Result<(), Error> {
    finish_frame(out, at, max_frame).map_err(|e| Error::FrameTooLarge {
        len: e.len,
        max: e.max,
    })
}

/// Whether this process may run on more than one CPU: on Linux, the affinity mask of the
/// thread that asks first (as Node's `os.availableParallelism()` reads it; a process pinned
/// with `taskset` pins all its threads), else [`std::thread::available_parallelism`]. Read
/// once per process.
pub fn runs_on_many_cpus() -> bool {
    static MANY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MANY.get_or_init(|| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // SAFETY: a zeroed cpu_set_t is a valid empty set, and the size given is its own.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
                {
                    return libc::CPU_COUNT(&set) > 1;
                }
            }
        }
        std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
    })
}

/// Whether `fd` has bytes to read (or a hang-up or error to report) right now: `poll` with a
/// zero timeout, for drivers that busy-poll their socket before they wait for it.
#[cfg(unix)]
pub fn readable_now(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a zero timeout: never blocks.
    unsafe { libc::poll(&mut pfd, 1, 0) != 0 }
}

mod clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// A precise instant and the coarse clock read right before it, and the slack that puts
    /// estimates at or after the true time.
    struct Base {
        instant: Instant,
        coarse: Duration,
        slack: Duration,
    }

    #[cfg(target_os = "linux")]
    fn read(
        clock: libc::clockid_t,
        get: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    ) -> Option<Duration> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a valid timespec to fill.
        if unsafe { get(clock, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(ts.tv_sec).ok()?,
            u32::try_from(ts.tv_nsec).ok()?,
        ))
    }

    #[cfg(target_os = "linux")]
    fn coarse() -> Option<Duration> {
        read(libc::CLOCK_MONOTONIC_COARSE, libc::clock_gettime)
    }

    #[cfg(not(target_os = "linux"))]
    fn coarse() -> Option<Duration> {
        None
    }

    fn base() -> Option<&'static Base> {
        static BASE: OnceLock<Option<Base>> = OnceLock::new();
        BASE.get_or_init(|| {
            #[cfg(target_os = "linux")]
            let res = read(libc::CLOCK_MONOTONIC_COARSE, libc::clock_getres)?;
            #[cfg(not(target_os = "linux"))]
            let res = Duration::ZERO;
            // A clock that ticks this seldom is not worth the error.
            if res > Duration::from_millis(10) {
                return None;
            }
            take_base(res, coarse, Instant::now)
        })
        .as_ref()
    }

    /// Pairs a reading of the coarse clock with an `Instant` taken after it. The coarse clock
    /// lags the precise one (which `Instant` reads) by less than a tick; read first, its value
    /// is at most the precise time at the `Instant`, so estimates made from the pair err late,
    /// never early, however long this thread is preempted between the two readings (read the
    /// other way round, such a preemption would make every estimate of the process early by
    /// its length). A second coarse reading bounds how late: when more than a tick passed
    /// between the readings, they are taken again (a few times at most; the last pair is kept,
    /// still late rather than early). Two ticks of slack cover the lag of the coarse clock.
    fn take_base(
        res: Duration,
        mut coarse: impl FnMut() -> Option<Duration>,
        mut now: impl FnMut() -> Instant,
    ) -> Option<Base> {
        let mut attempts = 0;
        loop {
            let before = coarse()?;
            let instant = now();
            let after = coarse()?;
            attempts += 1;
            if after.saturating_sub(before) <= res || attempts == 8 {
                return Some(Base {
                    instant,
                    coarse: before,
                    slack: 2 * res,
                });
            }
        }
    }

    /// The estimate of now from `base` and a coarse reading taken now.
    fn estimate(b: &Base, now: Duration) -> Instant {
        b.instant + now.saturating_sub(b.coarse) + b.slack
    }

    /// An instant at or after now (by at most about three ticks of the coarse clock).
    pub(super) fn approx_now() -> Instant {
        match base().and_then(|b| Some((b, coarse()?))) {
            Some((b, now)) => estimate(b, now),
            None => Instant::now(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// With a simulated clock, and this thread preempted between any two of the readings
        /// that make the base: estimates are never early, and late by a few ticks at most
        /// unless the preemption fell between the coarse reading and the `Instant`.
        #[test]
        fn a_preempted_base_errs_late_never_early() {
            use std::cell::Cell;
            let res = Duration::from_millis(4);
            let origin = Instant::now();
            // The coarse clock shows the last tick of the true time.
            let tick = |t: Duration| {
                let r = res.as_nanos();
                Duration::from_nanos((t.as_nanos() / r * r) as u64)
            };
            for start_us in [0u64, 1_000, 3_999, 4_000, 123_456] {
                for gap in [Duration::from_micros(1_300), res * 5, res * 100] {
                    for preempt_after in 0..3 {
                        let t = Cell::new(Duration::from_micros(start_us));
                        let reads = Cell::new(0);
                        let after_read = || {
                            if reads.get() == preempt_after {
                                t.set(t.get() + gap);
                            }
                            reads.set(reads.get() + 1);
                        };
                        let base = take_base(
                            res,
                            || {
                                let v = tick(t.get());
                                after_read();
                                Some(v)
                            },
                            || {
                                let v = origin + t.get();
                                after_read();
                                v
                            },
                        )
                        .unwrap();
                        for later_us in [0u64, 1, 2_500, 3_999, 4_000, 10_007, 1_000_000] {
                            let now = t.get() + Duration::from_micros(later_us);
                            let est = estimate(&base, tick(now));
                            let truth = origin + now;
                            assert!(
                                est >= truth,
                                "{:?} early (start {start_us} us, gap {gap:?}, preempted after read {preempt_after})",
                                truth - est
                            );
                            if preempt_after != 0 {
                                assert!(est <= truth + 3 * res, "{:?} late", est - truth);
                            }
                        }
                    }
                }
            }
        }

        /// Never before the precise clock, and never far after it.
        #[test]
        fn approx_now_is_at_or_after_now_and_close() {
            for _ in 0..20_000 {
                let before = Instant::now();
                let approx = approx_now();
                let after = Instant::now();
                assert!(approx >= before, "{:?} early", before - approx);
                // Three ticks of at most 10 ms, plus this loop's own delays on a busy machine.
                assert!(
                    approx <= after + Duration::from_millis(100),
                    "{:?} late",
                    approx - after
                );
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Invoke,
}

struct Pending<T> {
    token: T,
    kind: Kind,
    deadline: Option<Deadline>,
}

/// How to answer an incoming `invoke_handler`; pass it back to [`Engine::respond_invoke`].
#[derive(Debug)]
pub struct InvokeReply {
    handler_id: String,
    request_id: Option<RequestId>,
    /// For invocations without a request_id: the slot in the in-order reply queue.
    seq: Option<u64>,
}

impl InvokeReply {
    /// The invoked handler's id.
    pub fn handler_id(&self) -> &str {
        &self.handler_id
    }

    /// The invocation's request_id, when the peer sent one.
    pub fn request_id(&self) -> Option<&RequestId> {
        self.request_id.as_ref()
    }
}

/// The answer to an incoming `invoke_handler`.
#[derive(Debug, Clone, Copy)]
pub enum InvokeOutcome<'a> {
    /// `handler_response`.
    Response {
        /// HTTP status.
        status: u16,
        /// MessagePack map of headers.
        headers: &'a [u8],
        /// MessagePack body value.
        body: &'a [u8],
    },
    /// `error`.
    Error {
        /// Like `HANDLER_NOT_FOUND` or `HANDLER_EXECUTION_ERROR`.
        code: &'a str,
        /// A human-readable message.
        message: &'a str,
        /// HTTP-like status.
        status: u16,
    },
}

/// Something the driver must act on. Its strings and values borrow from the frame body it
/// came from (owned only when the body was JSON, or when the engine built the value).
#[derive(Debug)]
pub enum Event<'a, T> {
    /// One of our calls or invocations ended. Invocations resolve to the MessagePack map
    /// `{status, headers, body}`.
    Settled {
        /// The token given when the call was made.
        token: T,
        /// The result value (the MessagePack encoding of one value), or why there is none.
        result: Result<Cow<'a, [u8]>, Error>,
    },
    /// The peer calls one of our functions; answer with [`Engine::respond`].
    Call {
        /// Echo this in the answer.
        request_id: RequestId,
        /// The function's name.
        function_name: Cow<'a, str>,
        /// Its argument: the MessagePack encoding of one value (nil when absent).
        params: Cow<'a, [u8]>,
    },
    /// The peer invokes one of our route handlers; answer with [`Engine::respond_invoke`].
    Invoke {
        /// Where the answer goes.
        reply: InvokeReply,
        /// The request `{method, path, headers, query?, params?, body?}`, as MessagePack.
        request: Cow<'a, [u8]>,
    },
    /// The peer no longer wants the answer to one of its calls (the handler may stop early;
    /// an answer sent anyway is harmless).
    Cancel {
        /// The peer's id of the cancelled call.
        request_id: RequestId,
    },
    /// The peer reported an error not tied to any call of ours (or sent us a bad message,
    /// which the engine has already answered). For logging.
    Warning(Error),
    /// The stream can no longer be trusted (a length prefix over the limit: see
    /// [`Engine::frame_too_large`]). The engine has queued an error frame for the peer; flush
    /// the output, then close the connection.
    Fatal(Error),
}

#[derive(Debug, Clone)]
enum Closed {
    Local,
    Lost(String),
}

/// One connection's protocol state. `T` is the driver's token for a pending call.
pub struct Engine<T> {
    config: EngineConfig,
    out: Vec<u8>,
    next_id: u64,
    /// By id. Ids are sequential, so a multiplicative hash spreads them well and costs a
    /// fraction of SipHash (this map is touched twice per call).
    pending: FxHashMap<u64, Pending<T>>,
    /// Our invocations in send order, for peers that answer without echoing request_id.
    invoke_order: VecDeque<u64>,
    /// Set once the peer answered an invocation without a request_id (like ZapJS's
    /// IpcServer). Only then must a cancelled invocation keep its place in `invoke_order`,
    /// so that its late answer is matched to it and dropped.
    peer_answers_in_order: bool,
    /// The deadlines of pending calls, earliest first. Entries are not removed when their
    /// call settles (ids are never reused, so an entry whose id is no longer pending is
    /// stale): a call then costs one push, usually O(1) as deadlines mostly grow. Stale
    /// entries are dropped when they reach the top, and all at once when they outnumber the
    /// pending calls, so the heap stays within twice the pending calls (plus a constant).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Encoded answers to the peer's id-less invocations, held until every earlier one is done.
    ordered: VecDeque<Option<Vec<u8>>>,
    ordered_base: u64,
    failed: bool,
    closed: Option<Closed>,
}

impl<T> Engine<T> {
    /// A fresh engine.
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            out: Vec::with_capacity(64 * 1024),
            next_id: 1,
            pending: FxHashMap::default(),
            invoke_order: VecDeque::new(),
            peer_answers_in_order: false,
            deadlines: BinaryHeap::new(),
            ordered: VecDeque::new(),
            ordered_base: 0,
            failed: false,
            closed: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn closed_error(&self) -> Option<Error> {
        self.closed.as_ref().map(|c| match c {
            Closed::Local => Error::Closed,
            Closed::Lost(why) => Error::ConnectionLost(why.clone()),
        })
    }

    fn frame(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
        let at = begin_frame(&mut self.out);
        write(&mut self.out);
        finish_frame(&mut self.out, at, self.config.max_frame).map_err(|e| Error::FrameTooLarge {
            len: e.len,
            max: e.max,
        })
    }

    /// Queues a protocol error frame. Not held to `max_frame`: it is small, and a peer that
    /// must be told its frame was too big may have set a tiny limit.
    fn error_frame(
        &mut self,
        code: &str,
        message: &str,
        status: u16,
        request_id: Option<&RequestId>,
    ) {
        let at = begin_frame(&mut self.out);
        message::encode_error(&mut self.out, code, message, status, None, request_id);
        let _ = finish_frame(&mut self.out, at, usize::MAX);
    }

    fn register(&mut self, id: u64, kind: Kind, deadline: Option<Deadline>, token: T) {
        if let Some(d) = deadline {
            if self.deadlines.len() >= 2 * self.pending.len() + STALE_SLACK {
                let pending = &self.pending;
                self.deadlines
                    .retain(|Reverse((_, id))| pending.contains_key(id));
            }
            self.deadlines.push(Reverse((d.at, id)));
        }
        self.pending.insert(
            id,
            Pending {
                token,
                kind,
                deadline,
            },
        );
    }

    /// Queues an `rpc_call`. Returns its id, or the error with the token given back.
    pub fn call(
        &mut self,
        function_name: &str,
        params: &[u8],
        deadline: Option<Deadline>,
        token: T,
    ) -> Result<u64, (Error, T)> {
        self.call_parts(function_name, &[params], deadline, token)
    }

    /// [`Engine::call`] with params given in pieces that together make one MessagePack value
    /// (such as a `bin` header and the caller's bytes, which are then copied once, straight
    /// into the frame). The pieces are not checked.
    pub fn call_parts(
        &mut self,
        function_name: &str,
        params: &[&[u8]],
        deadline: Option<Deadline>,
        token: T,
    ) -> Result<u64, (Error, T)> {
        if let Some(e) = self.closed_error() {
            return Err((e, token));
        }
        let id = self.next_id;
        let rid = RequestId::Int(id);
        if let Err(e) =
            self.frame(|out| message::encode_rpc_call_parts(out, function_name, params, &rid))
        {
            return Err((e, token));
        }
        self.next_id += 1;
        self.register(id, Kind::Call, deadline, token);
        Ok(id)
    }

    /// Queues an `rpc_call` whose token is its own id (for drivers that keep their own table
    /// of pending calls by id).
    pub fn call_with_id(
        &mut self,
        function_name: &str,
        params: &[u8],
        deadline: Option<Deadline>,
    ) -> Result<u64, (Error, u64)>
    where
        T: From<u64>,
    {
        self.call_parts_with_id(function_name, &[params], deadline)
    }

    /// [`Engine::call_parts`] whose token is its own id.
    pub fn call_parts_with_id(
        &mut self,
        function_name: &str,
        params: &[&[u8]],
        deadline: Option<Deadline>,
    ) -> Result<u64, (Error, u64)>
    where
        T: From<u64>,
    {
        let id = self.next_id;
        self.call_parts(function_name, params, deadline, T::from(id))
            .map_err(|(e, _)| (e, id))
    }

    /// [`Engine::call_parts_with_id`] for params whose last part the driver sends itself,
    /// from where it lies, rather than have it copied into the output: the frame is queued up
    /// to that part (`external`, which is not read), and the bytes that follow it in the
    /// frame (the call's request_id) are written to `rest`. The driver must then send, in
    /// this order and before anything else is queued, the output ([`Engine::take_output`]),
    /// `external` and `rest`. The frame limit applies to the whole frame, as for any call.
    pub fn call_split_with_id(
        &mut self,
        function_name: &str,
        params_head: &[&[u8]],
        external: &[u8],
        rest: &mut Vec<u8>,
        deadline: Option<Deadline>,
    ) -> Result<u64, (Error, u64)>
    where
        T: From<u64>,
    {
        let id = self.next_id;
        if let Some(e) = self.closed_error() {
            return Err((e, id));
        }
        let rid = RequestId::Int(id);
        let tail_at = rest.len();
        message::encode_rpc_call_tail(rest, &rid);
        let at = begin_frame(&mut self.out);
        message::encode_rpc_call_head(&mut self.out, function_name);
        for part in params_head {
            self.out.extend_from_slice(part);
        }
        let len =
            self.out.len() - at - crate::frame::HEADER_LEN + external.len() + rest.len() - tail_at;
        if len > self.config.max_frame || len > u32::MAX as usize {
            self.out.truncate(at);
            rest.truncate(tail_at);
            let e = Error::FrameTooLarge {
                len,
                max: self.config.max_frame,
            };
            return Err((e, id));
        }
        self.out[at..at + crate::frame::HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        self.next_id += 1;
        self.register(id, Kind::Call, deadline, T::from(id));
        Ok(id)
    }

    /// Queues an `invoke_handler` whose token is its own id.
    pub fn invoke_with_id(
        &mut self,
        handler_id: &str,
        request: &[u8],
        deadline: Option<Deadline>,
    ) -> Result<u64, (Error, u64)>
    where
        T: From<u64>,
    {
        let id = self.next_id;
        self.invoke(handler_id, request, deadline, T::from(id))
            .map_err(|(e, _)| (e, id))
    }

    /// Queues an `invoke_handler` (with a request_id). Returns its id, or the error with the
    /// token given back.
    pub fn invoke(
        &mut self,
        handler_id: &str,
        request: &[u8],
        deadline: Option<Deadline>,
        token: T,
    ) -> Result<u64, (Error, T)> {
        if let Some(e) = self.closed_error() {
            return Err((e, token));
        }
        let id = self.next_id;
        let rid = RequestId::Int(id);
        if let Err(e) =
            self.frame(|out| message::encode_invoke_handler(out, handler_id, request, Some(&rid)))
        {
            return Err((e, token));
        }
        self.next_id += 1;
        self.invoke_order.push_back(id);
        self.register(id, Kind::Invoke, deadline, token);
        Ok(id)
    }

    /// Queues a `health_check`.
    pub fn health_check(&mut self) {
        let _ = self.frame(|out| Message::HealthCheck.encode(out));
    }

    fn take_pending(&mut self, id: u64) -> Option<Pending<T>> {
        // Its deadline entry, if any, is now stale (see `deadlines`).
        self.pending.remove(&id)
    }

    /// Forgets a pending call and returns its token (the driver settles it, usually with
    /// [`Error::Cancelled`]). Tells the peer with `cancel` unless disabled in the config.
    pub fn cancel(&mut self, id: u64) -> Option<T> {
        let p = self.take_pending(id)?;
        if p.kind == Kind::Invoke {
            self.forget_invoke(id);
        }
        if self.config.send_cancel && self.closed.is_none() {
            let _ = self.frame(|out| message::encode_cancel(out, &RequestId::Int(id)));
        }
        Some(p.token)
    }

    /// The number of our calls awaiting an answer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The earliest deadline of a pending call.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if self.pending.contains_key(&id) {
                return Some(at);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Removes every call whose deadline is at or before `now` and returns its token with
    /// the [`Error::Timeout`] to settle it with.
    pub fn expire(&mut self, now: Instant) -> Vec<(T, Error)> {
        let mut expired = Vec::new();
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(p) = self.pending.remove(&id) {
                if p.kind == Kind::Invoke {
                    self.forget_invoke(id);
                }
                if self.config.send_cancel && self.closed.is_none() {
                    let _ = self.frame(|out| message::encode_cancel(out, &RequestId::Int(id)));
                }
                let timeout = p.deadline.map(|d| d.timeout).unwrap_or_default();
                expired.push((p.token, Error::Timeout(timeout)));
            }
        }
        expired
    }

    /// Answers the peer's `rpc_call`: `Ok(result bytes)` or `Err((message, error_type))`.
    pub fn respond(&mut self, request_id: &RequestId, result: Result<&[u8], (&str, &ErrorType)>) {
        if self.closed.is_some() {
            return;
        }
        let r = match result {
            Ok(value) => return self.respond_parts(request_id, &[value]),
            Err((msg, kind)) => {
                self.frame(|out| message::encode_rpc_error(out, request_id, msg, kind.as_str()))
            }
        };
        if let Err(e) = r {
            let msg = format!("the answer could not be sent: {e}");
            let _ = self.frame(|out| message::encode_rpc_error(out, request_id, &msg, "Internal"));
        }
    }

    /// Answers the peer's `rpc_call` with a result given in pieces that together make one
    /// MessagePack value (such as a `bin` header and the handler's bytes, then copied once,
    /// straight into the frame). The pieces are not checked. A result over the frame limit is
    /// answered with an `Internal` error, as with [`Engine::respond`].
    pub fn respond_parts(&mut self, request_id: &RequestId, result: &[&[u8]]) {
        if self.closed.is_some() {
            return;
        }
        let r = self.frame(|out| message::encode_rpc_response_parts(out, request_id, result));
        if let Err(e) = r {
            let msg = format!("the answer could not be sent: {e}");
            let _ = self.frame(|out| message::encode_rpc_error(out, request_id, &msg, "Internal"));
        }
    }

    /// Queues whole frames made by the driver (see [`begin_response`]) after what is
    /// already queued, leaving `frames` empty. When nothing is queued, the engine takes
    /// `frames`' buffer as its own and leaves its empty one in `frames`: the frames are not
    /// copied. Dropped once the engine is closed, like every answer.
    pub fn queue_frames(&mut self, frames: &mut Vec<u8>) {
        if self.closed.is_some() {
            frames.clear();
        } else if self.out.is_empty() {
            std::mem::swap(&mut self.out, frames);
            frames.clear();
        } else {
            self.out.extend_from_slice(frames);
            frames.clear();
        }
    }

    /// Like [`Engine::queue_frames`], for frames the driver keeps: always copied.
    pub fn queue_frames_from(&mut self, frames: &[u8]) {
        if self.closed.is_none() {
            self.out.extend_from_slice(frames);
        }
    }

    /// [`Engine::respond_parts`] for a result whose last part the driver sends itself, from
    /// where it lies, rather than have it copied into the output: the answer's frame is
    /// queued up to that part (`external`, which is not read). Returns whether the driver
    /// must now send `external`, right after the output ([`Engine::take_output`]) and before
    /// anything else is queued. `false` when the engine is closed (nothing queued) or the
    /// whole answer is over the frame limit (an `Internal` error is queued instead, as
    /// [`Engine::respond_parts`] would).
    pub fn respond_split(
        &mut self,
        request_id: &RequestId,
        result_head: &[&[u8]],
        external: &[u8],
    ) -> bool {
        if self.closed.is_some() {
            return false;
        }
        let at = begin_frame(&mut self.out);
        message::encode_rpc_response_head(&mut self.out, request_id);
        for part in result_head {
            self.out.extend_from_slice(part);
        }
        let len = self.out.len() - at - crate::frame::HEADER_LEN + external.len();
        if len > self.config.max_frame || len > u32::MAX as usize {
            self.out.truncate(at);
            let e = Error::FrameTooLarge {
                len,
                max: self.config.max_frame,
            };
            let msg = format!("the answer could not be sent: {e}");
            let _ = self.frame(|out| message::encode_rpc_error(out, request_id, &msg, "Internal"));
            return false;
        }
        self.out[at..at + crate::frame::HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        true
    }

    /// Answers the peer's `invoke_handler`. Answers to invocations without a request_id are
    /// sent in the order the invocations arrived.
    pub fn respond_invoke(&mut self, reply: InvokeReply, outcome: InvokeOutcome<'_>) {
        if self.closed.is_some() {
            return;
        }
        let rid = reply.request_id.as_ref();
        let mut buf = Vec::new();
        let encode = |out: &mut Vec<u8>, outcome: InvokeOutcome<'_>| match outcome {
            InvokeOutcome::Response {
                status,
                headers,
                body,
            } => {
                message::encode_handler_response(out, &reply.handler_id, status, headers, body, rid)
            }
            InvokeOutcome::Error {
                code,
                message,
                status,
            } => message::encode_error(out, code, message, status, None, rid),
        };
        let at = begin_frame(&mut buf);
        encode(&mut buf, outcome);
        if let Err(e) = finish_frame(&mut buf, at, self.config.max_frame) {
            let msg = format!(
                "the handler's response could not be sent: {}",
                Error::FrameTooLarge {
                    len: e.len,
                    max: e.max
                }
            );
            let at = begin_frame(&mut buf);
            encode(
                &mut buf,
                InvokeOutcome::Error {
                    code: codes::HANDLER_EXECUTION_ERROR,
                    message: &msg,
                    status: 500,
                },
            );
            let _ = finish_frame(&mut buf, at, usize::MAX);
        }
        match reply.seq {
            None => self.out.extend_from_slice(&buf),
            Some(seq) => {
                let Some(slot) = seq
                    .checked_sub(self.ordered_base)
                    .and_then(|i| self.ordered.get_mut(i as usize))
                else {
                    return;
                };
                *slot = Some(buf);
                while let Some(Some(_)) = self.ordered.front() {
                    let done = self.ordered.pop_front().flatten().unwrap_or_default();
                    self.out.extend_from_slice(&done);
                    self.ordered_base += 1;
                }
            }
        }
    }

    /// Whether frames are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// How many bytes of frames are waiting to be written.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// Takes the frames waiting to be written, leaving `spare` (cleared) in their place so the
    /// two buffers can be reused turn about.
    pub fn take_output(&mut self, mut spare: Vec<u8>) -> Vec<u8> {
        spare.clear();
        std::mem::replace(&mut self.out, spare)
    }

    /// Acts on one frame body received from the peer (see [`FrameDecoder`]): answers what
    /// the engine answers itself (health checks, bad messages) and returns what the driver
    /// must act on, if anything. After a fatal event, frames are ignored.
    ///
    /// [`FrameDecoder`]: crate::frame::FrameDecoder
    pub fn on_frame<'a>(&mut self, body: &'a [u8]) -> Option<Event<'a, T>> {
        if self.failed {
            return None;
        }
        match message::decode_ref(body) {
            Ok(msg) => self.on_message(msg),
            Err(e) => self.on_bad_message(e),
        }
    }

    /// Acts on one item of [`Frames`](crate::frame::Frames): a body goes to
    /// [`Engine::on_frame`], a length prefix over the limit to [`Engine::frame_too_large`].
    pub fn on_decoded<'a>(
        &mut self,
        frame: Result<&'a [u8], OversizedFrame>,
    ) -> Option<Event<'a, T>> {
        match frame {
            Ok(body) => self.on_frame(body),
            Err(e) => Some(self.frame_too_large(e)),
        }
    }

    /// Acts on a length prefix over the limit (reported by the
    /// [`FrameDecoder`](crate::frame::FrameDecoder)): queues a `FRAME_TOO_LARGE` error frame
    /// for the peer (once) and returns the [`Event::Fatal`] to act on; later frames are
    /// ignored.
    pub fn frame_too_large(&mut self, e: OversizedFrame) -> Event<'static, T> {
        let msg = format!(
            "frame of {} bytes exceeds the limit of {} bytes",
            e.len, e.max
        );
        // Told once, even if a driver reports the same prefix again.
        if !std::mem::replace(&mut self.failed, true) {
            self.error_frame(codes::FRAME_TOO_LARGE, &msg, 413, None);
        }
        Event::Fatal(Error::FrameTooLarge {
            len: e.len,
            max: e.max,
        })
    }

    /// Drops an ended invocation from `invoke_order`, unless the peer answers in order and
    /// may still send its (id-less) answer.
    fn forget_invoke(&mut self, id: u64) {
        if !self.peer_answers_in_order {
            self.remove_from_invoke_order(id);
        }
    }

    fn remove_from_invoke_order(&mut self, id: u64) {
        if let Some(pos) = self.invoke_order.iter().position(|&x| x == id) {
            self.invoke_order.remove(pos);
        }
    }

    fn settle<'a>(
        &mut self,
        id: u64,
        result: Result<Cow<'a, [u8]>, Error>,
    ) -> Option<Event<'a, T>> {
        // An answer naming an invocation ends its place in the order, even if the call was
        // already cancelled.
        let Some(p) = self.take_pending(id) else {
            self.remove_from_invoke_order(id);
            return None;
        };
        if p.kind == Kind::Invoke {
            self.remove_from_invoke_order(id);
        }
        Some(Event::Settled {
            token: p.token,
            result,
        })
    }

    /// An answer that names no request: it belongs to our oldest invocation (which may have
    /// been cancelled already, in which case the answer is dropped).
    fn settle_oldest_invoke<'a>(
        &mut self,
        result: Result<Cow<'a, [u8]>, Error>,
    ) -> Option<Event<'a, T>> {
        self.peer_answers_in_order = true;
        let id = self.invoke_order.pop_front()?;
        let p = self.take_pending(id)?;
        Some(Event::Settled {
            token: p.token,
            result,
        })
    }

    fn our_id(id: &RequestId) -> Option<u64> {
        match id {
            RequestId::Int(n) => Some(*n),
            RequestId::Str(_) => None,
        }
    }

    fn on_message<'a>(&mut self, msg: MessageRef<'a>) -> Option<Event<'a, T>> {
        match msg {
            MessageRef::RpcCall {
                function_name,
                params,
                request_id,
            } => Some(Event::Call {
                request_id,
                function_name,
                params,
            }),
            MessageRef::InvokeHandler {
                handler_id,
                request,
                request_id,
            } => {
                let seq = if request_id.is_none() {
                    self.ordered.push_back(None);
                    Some(self.ordered_base + self.ordered.len() as u64 - 1)
                } else {
                    None
                };
                Some(Event::Invoke {
                    reply: InvokeReply {
                        handler_id: handler_id.into_owned(),
                        request_id,
                        seq,
                    },
                    request,
                })
            }
            MessageRef::RpcResponse { request_id, result } => {
                self.settle(Self::our_id(&request_id)?, Ok(result))
            }
            MessageRef::RpcError {
                request_id,
                error,
                error_type,
            } => self.settle(
                Self::our_id(&request_id)?,
                Err(Error::Remote {
                    kind: ErrorType::parse(&error_type),
                    message: error.into_owned(),
                }),
            ),
            MessageRef::HandlerResponse {
                status,
                headers,
                body,
                request_id,
                ..
            } => {
                let result = Ok(Cow::Owned(message::handler_result_bytes(
                    status, &headers, &body,
                )));
                match request_id {
                    Some(id) => self.settle(Self::our_id(&id)?, result),
                    None => self.settle_oldest_invoke(result),
                }
            }
            MessageRef::Error {
                code,
                message,
                status,
                request_id,
                ..
            } => {
                let err = Error::Peer {
                    code: code.into_owned(),
                    message: message.into_owned(),
                    status,
                };
                match request_id {
                    Some(id) => match Self::our_id(&id).filter(|n| self.pending.contains_key(n)) {
                        Some(n) => self.settle(n, Err(err)),
                        None => Some(Event::Warning(err)),
                    },
                    // Protocol complaints name no invocation: they are about some frame of ours.
                    None if !self.invoke_order.is_empty() && !is_protocol_code(&err) => {
                        self.settle_oldest_invoke(Err(err))
                    }
                    None => Some(Event::Warning(err)),
                }
            }
            MessageRef::HealthCheck => {
                let _ = self.frame(|out| Message::HealthCheckResponse.encode(out));
                None
            }
            MessageRef::HealthCheckResponse => None,
            MessageRef::Cancel { request_id } => Some(Event::Cancel { request_id }),
        }
    }

    fn on_bad_message(&mut self, e: message::DecodeError) -> Option<Event<'static, T>> {
        let is_answer = matches!(
            e.message_type.as_deref(),
            Some("rpc_response" | "rpc_error" | "handler_response" | "error")
        );
        if is_answer {
            // A malformed answer to one of our calls still ends that call; an id-less
            // malformed handler_response still takes its place in the order.
            let err = Error::Protocol(e.message.clone());
            let ev = match (&e.request_id, e.message_type.as_deref()) {
                (Some(id), _) => Self::our_id(id).and_then(|id| self.settle(id, Err(err))),
                (None, Some("handler_response")) => self.settle_oldest_invoke(Err(err)),
                _ => None,
            };
            if ev.is_some() {
                return ev;
            }
        }
        if e.message_type.as_deref() != Some("error") {
            // Never answer an error with an error: two confused peers would loop forever.
            self.error_frame(e.code(), &e.message, 400, e.request_id.as_ref());
        }
        Some(Event::Warning(Error::Protocol(e.message)))
    }

    /// Marks the connection closed and gives back every pending call's token with the error
    /// to settle it with: [`Error::Closed`] when `lost` is `None`, else
    /// [`Error::ConnectionLost`]. Later calls fail the same way.
    pub fn close(&mut self, lost: Option<String>) -> Vec<(T, Error)> {
        if self.closed.is_none() {
            self.closed = Some(match lost {
                None => Closed::Local,
                Some(why) => Closed::Lost(why),
            });
        }
        self.deadlines.clear();
        self.invoke_order.clear();
        let mut out = Vec::with_capacity(self.pending.len());
        let err = self.closed_error().expect("closed");
        let mut ids: Vec<u64> = self.pending.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(p) = self.pending.remove(&id) {
                out.push((p.token, clone_close(&err)));
            }
        }
        out
    }

    /// Whether [`Engine::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

fn is_protocol_code(e: &Error) -> bool {
    matches!(e, Error::Peer { code, .. }
        if code == codes::BAD_MESSAGE || code == codes::UNKNOWN_MESSAGE_TYPE || code == codes::FRAME_TOO_LARGE)
}

fn clone_close(e: &Error) -> Error {
    match e {
        Error::ConnectionLost(s) => Error::ConnectionLost(s.clone()),
        _ => Error::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::message::{decode, Payload};

    fn frames(bytes: &[u8]) -> Vec<Message> {
        let mut d = FrameDecoder::new(usize::MAX);
        d.extend(bytes);
        d.frames().map(|f| decode(f.unwrap()).unwrap()).collect()
    }

    #[test]
    fn a_call_in_parts_is_the_call_of_the_parts_joined() {
        let mut whole: Engine<u64> = Engine::new(EngineConfig::default());
        let mut parts: Engine<u64> = Engine::new(EngineConfig::default());
        let bytes: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut head = [0; 5];
        let head = message::bin_header(bytes.len(), &mut head).unwrap();
        let joined = [head, &bytes[..]].concat();
        assert!(matches!(whole.call_with_id("echo", &joined, None), Ok(1)));
        assert!(matches!(
            parts.call_parts_with_id("echo", &[head, &bytes], None),
            Ok(1)
        ));
        assert_eq!(parts.pending_len(), 1);
        assert_eq!(whole.take_output(Vec::new()), parts.take_output(Vec::new()));
        // The frame limit holds for the joined size.
        let mut small: Engine<u64> = Engine::new(EngineConfig {
            max_frame: 2048,
            ..EngineConfig::default()
        });
        assert!(matches!(
            small.call_parts_with_id("echo", &[head, &bytes], None),
            Err((Error::FrameTooLarge { .. }, 1))
        ));
        assert!(!small.has_output());
        assert_eq!(small.pending_len(), 0);
    }

    #[test]
    fn a_split_call_sends_the_same_frame_as_a_whole_one() {
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut head = [0; 5];
        let head = message::bin_header(bytes.len(), &mut head).unwrap();
        let mut whole: Engine<u64> = Engine::new(EngineConfig::default());
        let mut split: Engine<u64> = Engine::new(EngineConfig::default());
        // A call queued before: the split call's frame follows it.
        for e in [&mut whole, &mut split] {
            assert!(matches!(e.call_with_id("first", &[0xc0], None), Ok(1)));
        }
        assert!(matches!(
            whole.call_parts_with_id("echo", &[head, &bytes], None),
            Ok(2)
        ));
        let mut rest = vec![0xee]; // appended to, not replaced
        assert!(matches!(
            split.call_split_with_id("echo", &[head], &bytes, &mut rest, None),
            Ok(2)
        ));
        assert_eq!(split.pending_len(), 2);
        let sent = [
            split.take_output(Vec::new()),
            bytes.clone(),
            rest[1..].to_vec(),
        ]
        .concat();
        assert_eq!(whole.take_output(Vec::new()), sent);
        // The next call gets the next id.
        assert!(matches!(split.call_with_id("next", &[0xc0], None), Ok(3)));

        // The frame limit holds for the whole frame; nothing is queued or kept.
        let mut small: Engine<u64> = Engine::new(EngineConfig {
            max_frame: bytes.len() + 16,
            ..EngineConfig::default()
        });
        let mut rest = Vec::new();
        assert!(matches!(
            small.call_split_with_id("echo", &[head], &bytes, &mut rest, None),
            Err((Error::FrameTooLarge { .. }, 1))
        ));
        assert!(!small.has_output() && rest.is_empty());
        assert_eq!(small.pending_len(), 0);
        // A closed engine queues nothing.
        small.close(None);
        assert!(small
            .call_split_with_id("echo", &[head], &bytes[..10], &mut rest, None)
            .is_err());
        assert!(!small.has_output() && rest.is_empty());
    }

    #[test]
    fn a_split_answer_sends_the_same_frame_as_a_whole_one() {
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        let mut head = [0; 5];
        let head = message::bin_header(bytes.len(), &mut head).unwrap();
        let rid = RequestId::Int(7);
        let mut whole: Engine<u64> = Engine::new(EngineConfig::default());
        let mut split: Engine<u64> = Engine::new(EngineConfig::default());
        whole.respond_parts(&rid, &[head, &bytes]);
        assert!(split.respond_split(&rid, &[head], &bytes));
        let sent = [split.take_output(Vec::new()), bytes.clone()].concat();
        assert_eq!(whole.take_output(Vec::new()), sent);

        // Over the frame limit: the same Internal error as a whole answer's, and nothing to send.
        let config = EngineConfig {
            max_frame: bytes.len(),
            ..EngineConfig::default()
        };
        let mut whole: Engine<u64> = Engine::new(config.clone());
        let mut split: Engine<u64> = Engine::new(config);
        whole.respond_parts(&rid, &[head, &bytes]);
        assert!(!split.respond_split(&rid, &[head], &bytes));
        let error = split.take_output(Vec::new());
        assert!(!error.is_empty());
        assert_eq!(whole.take_output(Vec::new()), error);
        // Closed: nothing.
        split.close(None);
        assert!(!split.respond_split(&rid, &[head], &bytes));
        assert!(!split.has_output());
    }

    /// An engine with the frame decoder a driver gives it; its events come out owned.
    struct Driven<T> {
        e: Engine<T>,
        d: FrameDecoder,
        /// Set by a fatal event: drivers read no more.
        stopped: bool,
    }

    impl<T> Driven<T> {
        fn new(config: EngineConfig) -> Self {
            Driven {
                d: FrameDecoder::new(config.max_frame),
                e: Engine::new(config),
                stopped: false,
            }
        }

        fn feed(&mut self, bytes: &[u8]) {
            self.d.extend(bytes);
        }

        fn poll_event(&mut self) -> Option<Event<'static, T>> {
            while !self.stopped {
                let (ev, n) = {
                    let mut frames = self.d.frames();
                    let ev = self.e.on_decoded(frames.next()?).map(owned);
                    (ev, frames.consumed())
                };
                self.d.consume(n);
                self.stopped = matches!(ev, Some(Event::Fatal(_)));
                if ev.is_some() {
                    return ev;
                }
            }
            None
        }
    }

    impl<T> std::ops::Deref for Driven<T> {
        type Target = Engine<T>;
        fn deref(&self) -> &Engine<T> {
            &self.e
        }
    }

    impl<T> std::ops::DerefMut for Driven<T> {
        fn deref_mut(&mut self) -> &mut Engine<T> {
            &mut self.e
        }
    }

    fn owned<T>(ev: Event<'_, T>) -> Event<'static, T> {
        let bytes = |c: Cow<'_, [u8]>| Cow::Owned(c.into_owned());
        match ev {
            Event::Settled { token, result } => Event::Settled {
                token,
                result: result.map(bytes),
            },
            Event::Call {
                request_id,
                function_name,
                params,
            } => Event::Call {
                request_id,
                function_name: Cow::Owned(function_name.into_owned()),
                params: bytes(params),
            },
            Event::Invoke { reply, request } => Event::Invoke {
                reply,
                request: bytes(request),
            },
            Event::Cancel { request_id } => Event::Cancel { request_id },
            Event::Warning(e) => Event::Warning(e),
            Event::Fatal(e) => Event::Fatal(e),
        }
    }

    fn wire(m: Message) -> Vec<u8> {
        m.to_frame()
    }

    /// A deadline `ms` milliseconds after `now`.
    fn deadline_in(now: Instant, ms: u64) -> Option<Deadline> {
        Deadline::after(now, Duration::from_millis(ms))
    }

    #[test]
    fn calls_settle_out_of_order_and_by_id() {
        let mut e: Driven<&str> = Driven::new(EngineConfig::default());
        let a = e.call("a", &[0xc0], None, "A").unwrap();
        let b = e.call("b", &[0x01], None, "B").unwrap();
        assert_eq!(frames(&e.take_output(Vec::new())).len(), 2);
        e.feed(&wire(Message::RpcResponse {
            request_id: b.into(),
            result: Payload::nil(),
        }));
        e.feed(&wire(Message::RpcError {
            request_id: a.into(),
            error: "x".into(),
            error_type: "NotFound".into(),
        }));
        let Some(Event::Settled {
            token: "B",
            result: Ok(_),
        }) = e.poll_event()
        else {
            panic!()
        };
        let Some(Event::Settled {
            token: "A",
            result: Err(err),
        }) = e.poll_event()
        else {
            panic!()
        };
        assert_eq!(err.code(), "ERR_FERRY_NOT_FOUND");
        assert!(e.poll_event().is_none());
        assert_eq!(e.pending_len(), 0);
    }

    #[test]
    fn deadlines_expire_and_send_cancel() {
        let mut e: Driven<u8> = Driven::new(EngineConfig::default());
        let now = Instant::now();
        let d = |ms| deadline_in(now, ms);
        e.call("slow", &[0xc0], d(10), 1).unwrap();
        e.call("slower", &[0xc0], d(20), 2).unwrap();
        e.take_output(Vec::new());
        assert_eq!(e.next_deadline(), Some(now + Duration::from_millis(10)));
        let expired = e.expire(now + Duration::from_millis(15));
        assert!(matches!(expired[..], [(1, Error::Timeout(_))]));
        assert!(e.poll_event().is_none());
        assert_eq!(
            frames(&e.take_output(Vec::new())),
            vec![Message::Cancel {
                request_id: 1.into()
            }]
        );
        // A late answer to the expired call is ignored.
        e.feed(&wire(Message::RpcResponse {
            request_id: 1.into(),
            result: Payload::nil(),
        }));
        assert!(e.poll_event().is_none());
        assert_eq!(e.pending_len(), 1);
    }

    #[test]
    fn settled_calls_leave_no_deadline_behind() {
        let mut e: Driven<u64> = Driven::new(EngineConfig::default());
        let now = Instant::now();
        let d = |ms| deadline_in(now, ms);
        // One call that stays pending, then many that settle (answered or cancelled).
        let long = e.call("long", &[0xc0], d(60_000), 0).unwrap();
        for i in 1..=20_000u64 {
            let id = e.call("quick", &[0xc0], d(i), i).unwrap();
            if i % 2 == 0 {
                assert_eq!(e.cancel(id), Some(i));
            } else {
                e.feed(&wire(Message::RpcResponse {
                    request_id: id.into(),
                    result: Payload::nil(),
                }));
                assert!(matches!(e.poll_event(), Some(Event::Settled { token, .. }) if token == i));
            }
            assert!(e.deadlines.len() <= 2 * e.pending_len() + STALE_SLACK + 1);
        }
        // The earliest deadline is the pending call's, not a settled call's.
        assert_eq!(e.next_deadline(), Some(now + Duration::from_millis(60_000)));
        assert!(e.expire(now + Duration::from_millis(30_000)).is_empty());
        let expired = e.expire(now + Duration::from_millis(60_000));
        assert!(matches!(expired[..], [(0, Error::Timeout(t))] if t == Duration::from_secs(60)));
        assert_eq!(e.next_deadline(), None);
        assert!(e.cancel(long).is_none());
    }

    #[test]
    fn idless_invocations_are_answered_in_order() {
        let mut e: Driven<()> = Driven::new(EngineConfig::default());
        for _ in 0..2 {
            e.feed(&wire(Message::InvokeHandler {
                handler_id: "h".into(),
                request: Payload::nil(),
                request_id: None,
            }));
        }
        let Some(Event::Invoke { reply: first, .. }) = e.poll_event() else {
            panic!()
        };
        let Some(Event::Invoke { reply: second, .. }) = e.poll_event() else {
            panic!()
        };
        e.respond_invoke(
            second,
            InvokeOutcome::Response {
                status: 202,
                headers: &[0x80],
                body: &[0xc0],
            },
        );
        assert!(!e.has_output(), "must wait for the first answer");
        e.respond_invoke(
            first,
            InvokeOutcome::Error {
                code: "HANDLER_EXECUTION_ERROR",
                message: "boom",
                status: 500,
            },
        );
        let out = frames(&e.take_output(Vec::new()));
        assert!(matches!(out[0], Message::Error { .. }));
        assert!(matches!(
            out[1],
            Message::HandlerResponse { status: 202, .. }
        ));
    }

    #[test]
    fn idless_answers_match_oldest_invocation() {
        let mut e: Driven<u8> = Driven::new(EngineConfig::default());
        e.invoke("h1", &[0x80], None, 1).unwrap();
        e.invoke("h2", &[0x80], None, 2).unwrap();
        let hr = |status| Message::HandlerResponse {
            handler_id: "h".into(),
            status,
            headers: Payload::nil(),
            body: Payload::nil(),
            request_id: None,
        };
        e.feed(&wire(hr(200)));
        e.feed(&wire(Message::Error {
            code: "HANDLER_NOT_FOUND".into(),
            message: "m".into(),
            status: 404,
            digest: None,
            request_id: None,
        }));
        let Some(Event::Settled {
            token: 1,
            result: Ok(p),
        }) = e.poll_event()
        else {
            panic!()
        };
        assert_eq!(
            Payload::from_cow(p).to_value()["status"],
            rmpv::Value::from(200)
        );
        let Some(Event::Settled {
            token: 2,
            result: Err(err),
        }) = e.poll_event()
        else {
            panic!()
        };
        assert_eq!(err.code(), "ERR_FERRY_NOT_FOUND");
    }

    #[test]
    fn cancelled_invocations_do_not_steal_later_answers() {
        let hr = |status, request_id: Option<RequestId>| Message::HandlerResponse {
            handler_id: "h".into(),
            status,
            headers: Payload::nil(),
            body: Payload::nil(),
            request_id,
        };
        // A peer that echoes ids: a cancelled invocation leaves the order at once.
        let mut e: Driven<u8> = Driven::new(EngineConfig::default());
        let a = e.invoke("h", &[0x80], None, 1).unwrap();
        e.invoke("h", &[0x80], None, 2).unwrap();
        e.cancel(a);
        e.feed(&wire(hr(200, Some(a.into()))));
        e.feed(&wire(hr(201, None)));
        let Some(Event::Settled {
            token: 2,
            result: Ok(_),
        }) = e.poll_event()
        else {
            panic!()
        };
        // A peer that answers in order: a cancelled invocation's late answer is dropped.
        let mut e: Driven<u8> = Driven::new(EngineConfig::default());
        e.invoke("h", &[0x80], None, 1).unwrap();
        e.feed(&wire(hr(200, None)));
        assert!(matches!(
            e.poll_event(),
            Some(Event::Settled { token: 1, .. })
        ));
        let c = e.invoke("h", &[0x80], None, 3).unwrap();
        e.invoke("h", &[0x80], None, 4).unwrap();
        e.cancel(c);
        e.feed(&wire(hr(500, None)));
        e.feed(&wire(hr(204, None)));
        let Some(Event::Settled {
            token: 4,
            result: Ok(p),
        }) = e.poll_event()
        else {
            panic!()
        };
        assert_eq!(
            Payload::from_cow(p).to_value()["status"],
            rmpv::Value::from(204)
        );
        // A protocol complaint without an id does not fail an invocation.
        e.invoke("h", &[0x80], None, 5).unwrap();
        e.feed(&wire(Message::Error {
            code: "UNKNOWN_MESSAGE_TYPE".into(),
            message: "?".into(),
            status: 400,
            digest: None,
            request_id: None,
        }));
        assert!(matches!(e.poll_event(), Some(Event::Warning(_))));
        assert_eq!(e.pending_len(), 1);
    }

    #[test]
    fn bad_messages_get_error_replies_and_the_stream_goes_on() {
        let mut e: Driven<()> = Driven::new(EngineConfig::default());
        e.feed(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]);
        e.feed(&wire(Message::HealthCheck));
        e.feed(br#"{"type":"what"}"#.len().to_be_bytes()[4..].as_ref());
        e.feed(br#"{"type":"what"}"#);
        assert!(matches!(e.poll_event(), Some(Event::Warning(_))));
        assert!(matches!(e.poll_event(), Some(Event::Warning(_))));
        assert!(e.poll_event().is_none());
        let out = frames(&e.take_output(Vec::new()));
        let codes: Vec<_> = out
            .iter()
            .map(|m| match m {
                Message::Error { code, .. } => code.as_str(),
                Message::HealthCheckResponse => "pong",
                _ => "?",
            })
            .collect();
        assert_eq!(codes, ["BAD_MESSAGE", "pong", "UNKNOWN_MESSAGE_TYPE"]);
    }

    #[test]
    fn oversized_frame_is_fatal() {
        let mut e: Driven<()> = Driven::new(EngineConfig {
            max_frame: 8,
            ..Default::default()
        });
        e.feed(&100u32.to_be_bytes());
        assert!(matches!(
            e.poll_event(),
            Some(Event::Fatal(Error::FrameTooLarge { len: 100, max: 8 }))
        ));
        assert!(e.poll_event().is_none());
        assert!(e.has_output());
        // A driver that reports the same prefix again gets the event, not a second frame.
        let queued = e.output_len();
        let again = e.frame_too_large(OversizedFrame { len: 100, max: 8 });
        assert!(matches!(again, Event::Fatal(Error::FrameTooLarge { .. })));
        assert_eq!(e.output_len(), queued);
        let big = vec![0xc0; 9];
        let Err((Error::FrameTooLarge { .. }, ())) = e.call("f", &big, None, ()) else {
            panic!()
        };
    }

    #[test]
    fn close_settles_everything() {
        let mut e: Driven<u8> = Driven::new(EngineConfig::default());
        e.call(
            "a",
            &[0xc0],
            Deadline::after(Instant::now(), Duration::from_secs(1)),
            1,
        )
        .unwrap();
        e.invoke("h", &[0x80], None, 2).unwrap();
        let settled = e.close(Some("peer hung up".into()));
        assert_eq!(settled.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [1, 2]);
        assert!(settled
            .iter()
            .all(|(_, e)| e.code() == "ERR_FERRY_CONNECTION_LOST"));
        assert_eq!(e.next_deadline(), None);
        let Err((Error::ConnectionLost(_), 3)) = e.call("b", &[0xc0], None, 3) else {
            panic!()
        };
    }
}
