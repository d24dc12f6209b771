use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use parking_lot::{Condvar, Mutex};
use serde::{de::DeserializeOwned, Serialize};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::engine::{
    readable_now, runs_on_many_cpus, Deadline, EarlyWrites, Engine, EngineConfig, Event,
    InvokeOutcome, InvokeReply,
};
use crate::error::{Error, ErrorType, Result};
use crate::frame::{FrameDecoder, Frames};
use crate::message::{codes, Payload, RequestId};
use crate::router::{Context, Dispatched, HttpResponse, Router};

/// The engine's token for one of our pending calls: its slot in [`State::replies`].
type Reply = usize;

/// Where the answer to one of our calls waits for its caller. Slots are reused, so a call
/// allocates nothing to be answered (no channel per call), and everything about it, the
/// engine's entry and this slot, changes under the state lock.
struct Slot {
    result: Option<Result<Answered>>,
    waker: Option<Waker>,
}

/// Results up to this many bytes are kept in the caller's slot itself.
const INLINE_RESULT: usize = 54;

/// A call's result as it waits for its caller, copied out of the read buffer: small ones
/// (most) inline, so that answering a call allocates nothing.
enum Answered {
    Inline { len: u8, bytes: [u8; INLINE_RESULT] },
    Heap(Payload),
}

impl Answered {
    fn new(value: Cow<'_, [u8]>) -> Answered {
        match value {
            Cow::Borrowed(b) if b.len() <= INLINE_RESULT => {
                let mut bytes = [0; INLINE_RESULT];
                bytes[..b.len()].copy_from_slice(b);
                Answered::Inline {
                    len: b.len() as u8,
                    bytes,
                }
            }
            value => Answered::Heap(Payload::from_cow(value)),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Answered::Inline { len, bytes } => &bytes[..*len as usize],
            Answered::Heap(p) => p.as_bytes(),
        }
    }

    fn into_payload(self) -> Payload {
        match self {
            Answered::Inline { .. } => Payload::from_cow(Cow::Borrowed(self.as_bytes())),
            Answered::Heap(p) => p,
        }
    }
}

/// Settings of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Frame limits. Default: 16 MiB frames, cancel messages on.
    pub engine: EngineConfig,
    /// Timeout of a call that does not set its own; `None` waits forever. Default: 30 s.
    pub default_timeout: Option<Duration>,
    /// How the connection waits for its socket. Default: [`IoMode::Reactor`].
    pub io: IoMode,
    /// How long a closed connection keeps trying to write what is queued to a peer that does
    /// not read (or reads too slowly), from the close, before it gives up and shuts the
    /// socket. Default: 5 s.
    pub close_flush: Duration,
    /// With [`IoMode::Reactor`]: whether the socket is registered for writing as well as
    /// reading, so that the reactor also wakes when the peer reads what we sent (see
    /// [`EarlyWake`]). Default: [`EarlyWake::Auto`], on when this process may run on more
    /// than one CPU.
    pub early_wake: EarlyWake,
    /// Busy-polling: before the connection's reader waits for the socket after it had
    /// something to do, it keeps checking the socket for up to this long (or until the
    /// connection is closed), yielding the CPU
    /// between checks (to the runtime's other tasks and to other threads), so that an answer or
    /// call that follows soon is read by a thread that never went to sleep. On machines whose
    /// idle cores wake slowly (VMs) this removes most of a round trip's latency: measured on
    /// a 2-core VM with both ends polling for 50 µs, unpinned, the Node client's median call
    /// went from 80-100 to 12-20 µs (docs/benchmarks.md). It costs CPU: up to this long
    /// per wait, on a core that would otherwise idle, and a few percent of latency when both
    /// processes share one core. With [`IoMode::Reactor`] the polling runs on the runtime's
    /// thread, between its other tasks. Zero turns it off. Default: zero.
    pub busy_poll: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            engine: EngineConfig::default(),
            default_timeout: Some(Duration::from_secs(30)),
            io: IoMode::Reactor,
            close_flush: Duration::from_secs(5),
            early_wake: EarlyWake::Auto,
            busy_poll: Duration::ZERO,
        }
    }
}

/// Whether an [`IoMode::Reactor`] connection keeps its socket registered for writing as well
/// as reading, as tokio's own streams do ([`ConnectionConfig::early_wake`]). The reactor then
/// also wakes each time the peer reads what we sent. That wake-up finds nothing to do, but it
/// tells an idle core that an answer is on its way: on a machine whose idle cores wake slowly
/// it is awake when the answer comes. Measured on a 2-core VM (docs/benchmarks.md),
/// unpinned: 10-25% lower latency and up to 40% more small calls per second. With both
/// processes on one core there is no idle core to wake, only two context switches per call
/// for nothing (a Rust caller's sequential latency against a Node server, both on one core,
/// went 10.4 -> 8.7 µs without them), and large payloads gained about 15% without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyWake {
    /// [`EarlyWake::On`] when this process may run on more than one CPU
    /// ([`runs_on_many_cpus`](crate::engine::runs_on_many_cpus)), else [`EarlyWake::Off`].
    /// The default.
    #[default]
    Auto,
    /// Registered for reading and writing.
    On,
    /// Registered for reading only (and for writing only while a write waits for room), like
    /// libuv's streams.
    Off,
}

impl EarlyWake {
    /// Whether the socket is registered for writing too, in this process.
    pub fn is_on(self) -> bool {
        match self {
            EarlyWake::Auto => crate::engine::runs_on_many_cpus(),
            EarlyWake::On => true,
            EarlyWake::Off => false,
        }
    }
}

/// How a connection waits for its socket and writes to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Two tasks on the tokio runtime, woken by its reactor (`epoll`): a reader, and a writer
    /// that sends everything queued since its last write at once, so the calls a program makes
    /// in one turn share a system call. See [`ConnectionConfig::early_wake`] for how the
    /// socket is registered. Suits clients and servers with many peers. The default.
    #[default]
    Reactor,
    /// Two threads of the connection's own: a reader blocked in `read`, which answers the
    /// peer's calls as it reads them and writes the answers at once, and a writer for what the
    /// socket could not take at once and for calls made from tasks. Waking a blocked `read` is
    /// one system call per read less than a reactor's `epoll_wait` then `read`: a server's
    /// sequential round trip takes about a quarter less time on a 2-core machine (see
    /// docs/benchmarks.md). In a process that may run on one CPU only
    /// ([`runs_on_many_cpus`](crate::engine::runs_on_many_cpus)), the reader waits in `poll`
    /// before each `read` instead, which the peer's reading of our answers does not wake.
    /// Costs two OS threads per connection, so it suits servers with a few peers, like a
    /// worker process serving its Node front. Async functions and route
    /// handlers still run on the runtime that made the connection.
    Threads,
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Overrides the connection's default timeout. Default: `None` (use the connection's).
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options with this timeout.
    pub fn timeout(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout: Some(timeout),
        }
    }
}

struct State {
    engine: Engine<Reply>,
    /// Bytes taken from the engine and not yet written (the socket was full); `sent` of them
    /// are gone already. Everything is written under the state lock, so frames keep order;
    /// except by the writer thread of [`IoMode::Threads`], which takes `unsent` and writes it
    /// outside the lock with `writing` set, while nobody else writes.
    unsent: Vec<u8>,
    writing: bool,
    /// Set by a call that woke the writer, cleared by the writer when it takes what is queued:
    /// while set, further calls need not wake it again (one wake-up per batch of calls).
    writer_woken: bool,
    /// When calls made in one turn of the runtime are written before the writer's turn (see
    /// [`EarlyWrites`]); the writer starts the count over each time it takes what is queued.
    early: EarlyWrites,
    sent: usize,
    spare: Vec<u8>,
    /// Tasks running the peer's calls, by the peer's id, so `cancel` can stop them.
    running: HashMap<RequestId, AbortHandle>,
    /// Set by graceful shutdown: new calls from the peer are refused.
    draining: bool,
    /// The deadline the timer task sleeps until (`None`: no deadline, it waits to be told).
    /// A call with an earlier deadline wakes it; the usual call, made with the same timeout
    /// as the ones before it, does not.
    timer_at: Option<Instant>,
    /// The answers of our calls, by the token the engine holds for each pending call. A
    /// slot is filled when its call settles and freed by its caller's future, when that
    /// takes the answer or is dropped.
    replies: Slab<Slot>,
}

impl State {
    /// Stores the outcome of the call whose token is `slot`; returns the caller's waker, to
    /// be woken once the lock is released.
    fn fill(&mut self, slot: Reply, result: Result<Answered>) -> Option<Waker> {
        let s = self
            .replies
            .get_mut(slot)
            .expect("a pending call's reply slot is only freed once the engine forgot the call");
        s.result = Some(result);
        s.waker.take()
    }

    /// Frees a call's slot (its caller took the answer or gave up) and returns it, to be
    /// dropped once the lock is released (a waker's drop is the executor's code).
    fn free(&mut self, slot: Reply) -> Slot {
        let s = self.replies.remove(slot);
        // Do not keep the room of a burst of calls once they are all answered.
        if self.replies.is_empty() && self.replies.capacity() > 4096 {
            self.replies = Slab::new();
        }
        s
    }
}

/// The socket, as each [`IoMode`] uses it.
enum Io {
    /// Non-blocking, registered with tokio's reactor for reading, and for writing too when
    /// `writable` ([`EarlyWake::is_on`]); otherwise writes that the socket cannot
    /// take wait for room through a registration of their own (see [`wait_writable`]).
    Reactor {
        fd: AsyncFd<std::os::unix::net::UnixStream>,
        writable: bool,
    },
    /// The socket could not be registered (see [`reactor_io`]): the connection ends at once.
    Failed(String),
    /// Blocking (reads and the writer thread wait in the kernel; other writes pass
    /// `MSG_DONTWAIT`), and the writer thread's wake-up.
    Threads {
        sock: std::os::unix::net::UnixStream,
        wake: Condvar,
    },
}

struct Shared {
    io: Io,
    state: Mutex<State>,
    wake_writer: Notify,
    wake_timer: Notify,
    /// Fires once the connection is finished (closed by either side).
    done: CancellationToken,
    /// Fires once the writer has flushed what was queued at close and shut the socket down
    /// (or at once, for a socket that could not be registered).
    flushed: CancellationToken,
    router: Router,
    default_timeout: Option<Duration>,
    close_flush: Duration,
    /// [`ConnectionConfig::busy_poll`].
    busy_poll: Duration,
    /// The engine's frame limit, for answers encoded without the engine (see [`run_call`]).
    max_frame: usize,
    handlers: TaskTracker,
}

/// One connection, both directions: call the peer's functions and serve its calls to ours.
///
/// Cheap to clone; every clone is the same connection. Dropping the handles does not close it:
/// call [`Connection::close`], or it ends when the peer hangs up.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// Connects to a listening peer with default settings and no functions of our own.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Connection> {
        Connection::connect_with(path, Router::new(), ConnectionConfig::default()).await
    }

    /// Connects to a listening peer, serving `router`'s functions on the same connection.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        router: Router,
        config: ConnectionConfig,
    ) -> Result<Connection> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("cannot connect to {}", path.display()), e))?;
        Ok(Connection::from_stream(stream, router, config))
    }

    /// Runs the protocol over an already-connected stream. Must be called inside a tokio
    /// runtime with I/O enabled.
    pub fn from_stream(stream: UnixStream, router: Router, config: ConnectionConfig) -> Connection {
        let early_wake = config.early_wake.is_on();
        let io = match config.io {
            IoMode::Reactor => reactor_io(stream, early_wake),
            // The reactor's registration goes with `stream`; the threads use a duplicate,
            // made blocking. Without a descriptor to spare, the connection stays on the reactor.
            IoMode::Threads => match socket2::SockRef::from(&stream)
                .try_clone()
                .and_then(|sock| sock.set_nonblocking(false).map(|()| sock))
            {
                Ok(sock) => {
                    drop(stream);
                    Io::Threads {
                        sock: std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(
                            sock,
                        )),
                        wake: Condvar::new(),
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        "ferry: no descriptor for the I/O threads, using the reactor: {e}"
                    );
                    reactor_io(stream, early_wake)
                }
            },
        };
        Connection::from_stream_io(io, router, config)
    }

    fn from_stream_io(io: Io, router: Router, config: ConnectionConfig) -> Connection {
        let max_frame = config.engine.max_frame;
        let shared = Arc::new(Shared {
            io,
            state: Mutex::new(State {
                engine: Engine::new(config.engine),
                unsent: Vec::new(),
                writing: false,
                writer_woken: false,
                early: EarlyWrites::new(),
                sent: 0,
                spare: Vec::new(),
                running: HashMap::new(),
                draining: false,
                timer_at: None,
                replies: Slab::new(),
            }),
            wake_writer: Notify::new(),
            wake_timer: Notify::new(),
            done: CancellationToken::new(),
            flushed: CancellationToken::new(),
            router,
            default_timeout: config.default_timeout,
            close_flush: config.close_flush,
            busy_poll: config.busy_poll,
            max_frame,
            handlers: TaskTracker::new(),
        });
        match shared.io {
            Io::Reactor { .. } | Io::Failed(_) => {
                tokio::spawn(read_loop(shared.clone()));
                tokio::spawn(write_loop(shared.clone()));
            }
            Io::Threads { .. } => spawn_threads(&shared),
        }
        tokio::spawn(timer_loop(shared.clone()));
        Connection { shared }
    }

    /// Calls the peer's function `name` and decodes its result, with the default timeout.
    pub async fn call<P, R>(&self, name: &str, params: &P) -> Result<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(name, params, CallOptions::default()).await
    }

    /// Like [`Connection::call`], with options.
    pub async fn call_with<P, R>(&self, name: &str, params: &P, options: CallOptions) -> Result<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let waker = current_waker().await;
        let answer = with_scratch(|buf| {
            Payload::encode_into(params, buf)?;
            self.start(options, waker, |engine, deadline, slot| {
                engine.call(name, buf, deadline, slot)
            })
        })?;
        let result = answer.await?;
        crate::fast_de::from_slice(result.as_bytes()).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Calls with params already encoded as one MessagePack value; returns the raw result.
    /// Dropping the future cancels the call (and tells the peer).
    pub async fn call_raw(
        &self,
        name: &str,
        params: &[u8],
        options: CallOptions,
    ) -> Result<Payload> {
        let waker = current_waker().await;
        let answer = self.start(options, waker, |engine, deadline, slot| {
            engine.call(name, params, deadline, slot)
        })?;
        answer.await.map(Answered::into_payload)
    }

    /// Invokes the peer's route handler `handler_id` with an HTTP-like request (such as
    /// [`crate::router::HttpRequest`]).
    pub async fn invoke_handler<Req: Serialize + ?Sized>(
        &self,
        handler_id: &str,
        request: &Req,
    ) -> Result<HttpResponse> {
        let request = Payload::encode(request)?;
        let waker = current_waker().await;
        let answer = self.start(CallOptions::default(), waker, |engine, deadline, slot| {
            engine.invoke(handler_id, request.as_bytes(), deadline, slot)
        })?;
        let result = answer.await?;
        crate::fast_de::from_slice(result.as_bytes()).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Registers a call with the engine (its frame queued, the writer woken). Its deadline is
    /// kept by the engine and enforced by the connection's one timer task (which settles it
    /// with [`Error::Timeout`]), not by a timer per call.
    ///
    /// `waker` is the calling task's: it is stored with the call under the same lock, so the
    /// caller's first wait for the answer need not take the lock again. That is why the
    /// returned [`Answer`] must be awaited in the same poll of the same task that took the
    /// waker (as every caller here does: `current_waker()`, `start`, then `.await`); awaited
    /// later, an answer that arrived in between would have spent the waker.
    fn start(
        &self,
        options: CallOptions,
        waker: Waker,
        start: impl FnOnce(
            &mut Engine<Reply>,
            Option<Deadline>,
            Reply,
        ) -> std::result::Result<u64, (Error, Reply)>,
    ) -> Result<Answer<'_>> {
        // On tokio's clock, like the timer that enforces it (so a paused test clock works).
        let deadline = options
            .timeout
            .or(self.shared.default_timeout)
            .and_then(|t| Deadline::after(now(), t));
        let answer = {
            let mut st = self.shared.state.lock();
            let slot = st.replies.insert(Slot {
                result: None,
                waker: Some(waker),
            });
            let id = match start(&mut st.engine, deadline, slot) {
                Ok(id) => id,
                Err((e, slot)) => {
                    let slot = st.free(slot);
                    drop(st);
                    drop(slot);
                    return Err(e);
                }
            };
            if let Some(d) = deadline {
                if st.timer_at.is_none_or(|at| d.at < at) {
                    st.timer_at = Some(d.at);
                    self.shared.wake_timer.notify_one();
                }
            }
            let queued = st.engine.output_len();
            if st.early.due(queued) {
                // The peer starts on these while the tasks of this turn queue more. An error is
                // left in place for the writer (woken by this batch's first call), which meets
                // it again and ends the connection.
                let _ = try_flush(&self.shared.io, &mut st);
                st.early.wrote(queued);
            }
            let wake = !std::mem::replace(&mut st.writer_woken, true);
            (
                Answer {
                    shared: &self.shared,
                    id,
                    slot,
                    state: AnswerState::Registered,
                },
                wake,
            )
        };
        let (answer, wake) = answer;
        if wake {
            self.shared.wake_writer();
        }
        Ok(answer)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.done.is_cancelled()
    }

    /// Resolves once the connection has ended, by either side.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await
    }

    /// The number of our calls awaiting an answer.
    pub fn pending_calls(&self) -> usize {
        self.shared.state.lock().engine.pending_len()
    }

    /// Closes now: pending calls fail with [`Error::Closed`], queued frames are flushed, the
    /// peer's calls still running are abandoned.
    pub fn close(&self) {
        finish(&self.shared, None);
    }

    /// Closes gracefully: refuses new calls from the peer, waits up to `grace` for the ones
    /// running to be answered, closes, and waits (up to `grace` again) until the answers are
    /// written out, so a process may exit right after.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.state.lock().draining = true;
        self.shared.handlers.close();
        let _ = tokio::time::timeout(grace, self.shared.handlers.wait()).await;
        self.close();
        let _ = tokio::time::timeout(grace, self.shared.flushed.cancelled()).await;
    }
}

/// The calling task's waker (for [`Connection::start`]).
async fn current_waker() -> Waker {
    std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await
}

/// A call registered with the engine, awaiting its answer in its [`Slot`]. Dropped before the
/// answer, it cancels the call (and tells the peer).
struct Answer<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    slot: Reply,
    state: AnswerState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AnswerState {
    /// Just started, in this same poll of the caller's task: the slot holds this poll's
    /// waker, so there is nothing to check yet (an answer arriving meanwhile wakes the task).
    Registered,
    Waiting,
    Done,
}

impl Future for Answer<'_> {
    type Output = Result<Answered>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.state {
            AnswerState::Registered => {
                self.state = AnswerState::Waiting;
                return Poll::Pending;
            }
            AnswerState::Waiting => {}
            AnswerState::Done => panic!("a call's answer polled after it completed"),
        }
        let mut st = self.shared.state.lock();
        let slot = &mut st.replies[self.slot];
        if slot.result.is_none() {
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                let old = slot.waker.replace(cx.waker().clone());
                drop(st);
                drop(old);
            }
            return Poll::Pending;
        }
        let slot = st.free(self.slot);
        drop(st);
        self.state = AnswerState::Done;
        Poll::Ready(slot.result.expect("checked above"))
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if self.state == AnswerState::Done {
            return;
        }
        let (cancelled, slot) = {
            let mut st = self.shared.state.lock();
            let cancelled = st.engine.cancel(self.id);
            (cancelled, st.free(self.slot))
        };
        // An answer that arrived unread, or the waker, is dropped outside the lock.
        drop(slot);
        if cancelled.is_some() {
            self.shared.wake_writer();
        }
    }
}

/// Runs `f` with this thread's empty scratch buffer (or a new one, if it is in use), so that
/// encoding a call's params allocates nothing. User code (a `Serialize` impl) runs in `f`,
/// never under the connection's lock.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            buf.clear();
            // Do not keep a large buffer around after one large call.
            if buf.capacity() > 64 * 1024 {
                *buf = Vec::new();
            }
            r
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// Ends the connection once: settles pending calls, stops handlers, wakes both tasks.
fn finish(shared: &Arc<Shared>, lost: Option<String>) {
    let wakers: Vec<Waker> = {
        let mut st = shared.state.lock();
        if st.engine.is_closed() {
            return;
        }
        for (_, h) in st.running.drain() {
            h.abort();
        }
        let settled = st.engine.close(lost);
        settled
            .into_iter()
            .filter_map(|(slot, e)| st.fill(slot, Err(e)))
            .collect()
    };
    wakers.into_iter().for_each(Waker::wake);
    shared.done.cancel();
    // With `IoMode::Threads`, the writer thread flushes what is queued, then shuts the socket
    // down, which wakes the reader thread from its `read`. (Shutting the read side at once
    // would make the peer's writes fail before it has read our last answers.)
    shared.wake_writer();
}

impl Shared {
    /// Tells the writer that bytes are queued (or that the connection closed).
    fn wake_writer(&self) {
        match &self.io {
            Io::Reactor { .. } | Io::Failed(_) => self.wake_writer.notify_one(),
            Io::Threads { wake, .. } => {
                // Under the lock: the writer checks for work and starts waiting under it, so
                // the wake-up cannot fall between the two.
                let _st = self.state.lock();
                wake.notify_one();
            }
        }
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Writes what the engine has queued, without waiting. Returns `Ok(false)` when the socket
/// is full (or the writer thread is busy) and bytes remain for the writer.
fn try_flush(io: &Io, st: &mut State) -> std::io::Result<bool> {
    if st.writing {
        return Ok(false);
    }
    take_output(st);
    while st.sent < st.unsent.len() {
        let wrote = match io {
            Io::Reactor { fd, .. } => socket2::SockRef::from(fd.get_ref()).send_with_flags(
                &st.unsent[st.sent..],
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            ),
            Io::Threads { sock, .. } => socket2::SockRef::from(sock).send_with_flags(
                &st.unsent[st.sent..],
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            ),
            Io::Failed(e) => return Err(std::io::Error::other(e.clone())),
        };
        match wrote {
            Ok(n) => st.sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    written(st);
    Ok(true)
}

/// Moves what the engine has queued behind the bytes not yet written.
fn take_output(st: &mut State) {
    if st.engine.has_output() {
        let spare = std::mem::take(&mut st.spare);
        if st.unsent.is_empty() {
            st.spare = std::mem::replace(&mut st.unsent, st.engine.take_output(spare));
        } else {
            let more = st.engine.take_output(spare);
            st.unsent.extend_from_slice(&more);
            st.spare = more;
        }
    }
}

/// Clears `unsent` once all of it is written.
fn written(st: &mut State) {
    st.sent = 0;
    st.unsent.clear();
    // Do not keep a huge buffer around after one large message.
    if st.unsent.capacity() > 1 << 20 {
        st.unsent = Vec::new();
    }
}

/// The socket registered with the reactor for reading, and for writing too if `writable` (see
/// [`ConnectionConfig::early_wake`]). Should that fail (the kernel out of memory for epoll),
/// the connection ends at once with the error.
fn reactor_io(stream: UnixStream, writable: bool) -> Io {
    let interest = if writable {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    match stream.into_std().and_then(|std| register(std, interest)) {
        Ok(fd) => Io::Reactor { fd, writable },
        // Only when the reactor is out of resources; the reader then ends the connection.
        Err(e) => Io::Failed(e.to_string()),
    }
}

/// Registers an owned socket with the reactor for `interest`.
fn register(
    sock: std::os::unix::net::UnixStream,
    interest: Interest,
) -> std::io::Result<AsyncFd<std::os::unix::net::UnixStream>> {
    // SAFETY: the stream owns its descriptor, which stays open and the same until the
    // `AsyncFd` (which owns the stream) is dropped.
    unsafe { AsyncFd::register_with_interest(sock, interest) }.map_err(|e| e.into_parts().1)
}

/// Waits until the socket has room for more bytes: through its own registration if it is
/// registered for writing, else through a registration for writing made for this wait on a
/// duplicate of the descriptor (the reactor reports a socket that is writable when it is
/// registered, so room made since the write that failed is not missed). `slot` keeps that
/// registration while the writer keeps waiting; the writer drops it once it has written
/// everything queued. Without a descriptor to spare, it waits 5 ms instead.
async fn wait_writable(
    fd: &AsyncFd<std::os::unix::net::UnixStream>,
    registered_for_writing: bool,
    slot: &mut Option<AsyncFd<std::os::unix::net::UnixStream>>,
) -> std::io::Result<()> {
    if registered_for_writing {
        // As below: the next write tells whether there is room.
        fd.writable().await?.clear_ready();
        return Ok(());
    }
    if slot.is_none() {
        match fd
            .get_ref()
            .try_clone()
            .and_then(|dup| register(dup, Interest::WRITABLE))
        {
            Ok(registered) => *slot = Some(registered),
            Err(e) => {
                // No descriptor (or epoll room) to spare: a full socket must not end the
                // connection, so look again shortly instead.
                tracing::debug!("ferry: cannot wait for room to write, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
                return Ok(());
            }
        }
    }
    let w = slot.as_ref().expect("registered above");
    // The next write finds out whether there is room; clear the readiness so that, if there
    // is not, the wait after it waits for the reactor's next report.
    w.writable().await?.clear_ready();
    Ok(())
}

async fn read_loop(shared: Arc<Shared>) {
    let stream = match &shared.io {
        Io::Reactor { fd, .. } => fd,
        Io::Failed(e) => {
            finish(&shared, Some(format!("cannot register the socket: {e}")));
            return;
        }
        Io::Threads { .. } => return,
    };
    let mut input = FrameDecoder::new(shared.state.lock().engine.config().max_frame);
    let mut scratch = Scratch::default();
    // No polling before the first read: the connection has had nothing to do yet.
    let mut busy = false;
    let lost = loop {
        if busy {
            // The runtime's other tasks (callers, the writer) run at each `yield_now`, and its
            // reactor is polled without blocking when they are done.
            let until = std::time::Instant::now() + shared.busy_poll;
            while !readable_now(stream.as_raw_fd())
                && std::time::Instant::now() < until
                && !shared.done.is_cancelled()
            {
                yield_cpu();
                tokio::task::yield_now().await;
            }
        }
        busy = !shared.busy_poll.is_zero();
        let ready = tokio::select! {
            r = stream.readable() => r,
            _ = shared.done.cancelled() => return,
        };
        let mut ready = match ready {
            Ok(guard) => guard,
            Err(e) => break format!("read failed: {e}"),
        };
        let n = match read_drained(&mut ready, input.spare(READ_ROOM)) {
            Ok(0) => break hung_up(&input),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("read failed: {e}"),
        };
        input.filled(n);
        if let Some(fatal) = on_input(&shared, &mut input, &mut scratch) {
            break fatal;
        }
    };
    finish(&shared, Some(lost));
}

/// Blocks until `fd` has something to read, has hung up or has failed (the `read` that follows
/// tells which). Unlike a blocked `read`, a `poll` for POLLIN is not woken when the peer makes
/// room to write.
fn wait_readable(fd: std::os::fd::RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd. EINTR returns early, which only means one read that blocks.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// Offers the CPU to other threads between two checks of a busy-polled socket: with both
/// processes on one core, the peer must run for the answer to come at all.
fn yield_cpu() {
    // SAFETY: no arguments; it cannot fail on Linux.
    unsafe {
        libc::sched_yield();
    }
}

/// Why the connection ended when the peer hung up.
fn hung_up(input: &FrameDecoder) -> String {
    if input.buffered() > 0 {
        "peer closed the connection in the middle of a frame"
    } else {
        "peer closed the connection"
    }
    .to_string()
}

/// Reads what the socket holds. A read that does not fill `buf` has drained the socket, so
/// the readiness is cleared right away instead of by one more read that would fail with
/// `WouldBlock` (a system call per read saved). The guard's readiness is the snapshot taken
/// before the read, so data arriving after it is never missed.
fn read_drained(
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, std::os::unix::net::UnixStream>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    use std::io::{ErrorKind, Read};
    match ready.get_inner().read(buf) {
        Ok(n) if n > 0 && n < buf.len() => {
            ready.clear_ready();
            Ok(n)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            ready.clear_ready();
            Err(e)
        }
        r => r,
    }
}

/// The least room a read gets (more when a frame's start says it needs more).
const READ_ROOM: usize = 16 * 1024;

/// A call from the peer, borrowed from the frame it came in until it has run.
type IncomingCall<'a> = (RequestId, Cow<'a, str>, Cow<'a, [u8]>);

/// An emptied vector of borrowed items, ready for items of another lifetime: the same
/// allocation, reused (collecting into the vector an iterator of it reuses its memory).
fn recycle<A, B>(mut v: Vec<A>) -> Vec<B> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// Acts on the frames read so far and drops them from `input`. Returns a reason when the
/// connection must end.
fn on_input(
    shared: &Arc<Shared>,
    input: &mut FrameDecoder,
    scratch: &mut Scratch,
) -> Option<String> {
    let consumed;
    let fatal;
    {
        let frames = input.frames();
        (consumed, fatal) = on_frames(shared, frames, scratch);
    }
    // `None`: the connection is closed; what was read is dropped unread.
    input.consume(consumed.unwrap_or(input.buffered()));
    fatal
}

/// [`on_input`] over the frames of one read: the frames' bytes stay in the reader's buffer
/// while the calls they carry run, so names and params are never copied. Returns how many
/// bytes of frames were handled (`None` when the connection is closed: drop them all), and a
/// reason when the connection must end.
fn on_frames(
    shared: &Arc<Shared>,
    mut frames: Frames<'_>,
    scratch: &mut Scratch,
) -> (Option<usize>, Option<String>) {
    let Scratch {
        wakers,
        calls: call_storage,
        ran: ran_storage,
        results,
        pending,
    } = scratch;
    let mut calls: Vec<IncomingCall<'_>> = recycle(std::mem::take(call_storage));
    let mut ran: Vec<(RequestId, Cow<'_, str>, Ran)> = recycle(std::mem::take(ran_storage));
    let mut fatal = None;
    {
        let mut st = shared.state.lock();
        if st.engine.is_closed() {
            // Bytes read just before close(): start no more work.
            return (None, None);
        }
        for frame in frames.by_ref() {
            let Some(ev) = st.engine.on_decoded(frame) else {
                continue;
            };
            match ev {
                Event::Settled { token, result } => {
                    wakers.extend(st.fill(token, result.map(Answered::new)))
                }
                Event::Call {
                    request_id,
                    function_name,
                    params,
                } => {
                    if st.draining {
                        st.engine.respond(
                            &request_id,
                            Err(("the server is shutting down", &ErrorType::Internal)),
                        );
                        continue;
                    }
                    calls.push((request_id, function_name, params));
                }
                Event::Invoke { reply, request } => {
                    spawn_invoke(shared, reply, Payload::from_cow(request))
                }
                Event::Cancel { request_id } => {
                    if let Some(h) = st.running.remove(&request_id) {
                        h.abort();
                    }
                    // A call that arrived in this same read has not started yet: drop it.
                    if let Some(pos) = calls.iter().rposition(|(rid, _, _)| *rid == request_id) {
                        calls.remove(pos);
                    }
                }
                Event::Warning(e) => tracing::debug!("ferry: {e}"),
                Event::Fatal(e) => {
                    fatal = Some(e.to_string());
                    break;
                }
            }
        }
    }
    wakers.drain(..).for_each(Waker::wake);
    // Graceful shutdown waits for the calls of this read until they are answered.
    let running = (!calls.is_empty()).then(|| shared.handlers.token());
    // Handlers run without the state lock: one may call the peer back on this connection.
    // Synchronous ones write their answers' frames into `results`, queued below in one go.
    ran.extend(calls.drain(..).map(|(rid, name, params)| {
        let outcome = run_call(shared, &rid, &name, params, results);
        (rid, name, outcome)
    }));
    let flushed = {
        let mut st = shared.state.lock();
        // `results[..queued]` is queued; `results[..encoded]` holds the answers so far.
        let (mut queued, mut encoded) = (0, 0);
        for (rid, name, outcome) in ran.drain(..) {
            // The answers go out in the calls' order: the frames before another answer first
            // (a pending call answers later anyway).
            if matches!(outcome, Ran::Value(_) | Ran::Done(_)) && encoded > queued {
                st.engine.queue_frames_from(&results[queued..encoded]);
                queued = encoded;
            }
            match outcome {
                Ran::Encoded(end) => encoded = end,
                Ran::Value(result) => st.engine.respond(&rid, Ok(result.as_bytes())),
                Ran::Done(outcome) => respond_call(&mut st.engine, &rid, &name, outcome),
                Ran::Pending(fut, token) => pending.push((rid, name.into_owned(), fut, token)),
            }
        }
        // Usually every answer is here: the engine takes the buffer, with no copy.
        if queued == 0 {
            st.engine.queue_frames(results);
        } else {
            st.engine.queue_frames_from(&results[queued..]);
        }
        // Answers produced inline go out now, from this task: no hand-off to the writer.
        try_flush(&shared.io, &mut st)
    };
    drop(running);
    results.clear();
    if results.capacity() > 1 << 20 {
        *results = Vec::new();
    }
    *call_storage = recycle(calls);
    *ran_storage = recycle(ran);
    // Spawned without the lock: spawning onto a runtime that is shutting down drops the
    // future at once, and dropping a future may take the lock (a call it made cancels itself).
    for (rid, name, fut, token) in pending.drain(..) {
        spawn_call(shared, rid, name, fut, token);
    }
    let consumed = Some(frames.consumed());
    match flushed {
        Ok(true) => {}
        Ok(false) => shared.wake_writer(),
        Err(e) => return (consumed, Some(format!("write failed: {e}"))),
    }
    (consumed, fatal)
}

/// The per-read lists of [`on_input`], kept by the reader so that reads do not allocate them.
#[derive(Default)]
struct Scratch {
    /// The callers to wake: their calls were answered by this read.
    wakers: Vec<Waker>,
    /// Always empty between reads: the memory of each read's calls (see [`recycle`]).
    calls: Vec<IncomingCall<'static>>,
    /// Likewise, the calls of a read once run.
    ran: Vec<(RequestId, Cow<'static, str>, Ran)>,
    /// The answers of the synchronous functions run for one read, whole frames.
    results: Vec<u8>,
    /// Calls of one read that continue on their own task.
    pending: Vec<(
        RequestId,
        String,
        crate::router::CallFuture,
        TaskTrackerToken,
    )>,
}

type CallOutcome =
    std::result::Result<std::result::Result<Payload, crate::Rejection>, Box<dyn Any + Send>>;

enum Ran {
    /// A synchronous function's answer: a whole frame in the scratch `results`, ending here.
    Encoded(usize),
    /// A [`Router::payload_fn`]'s result, spliced into the answer as is.
    Value(Payload),
    Done(CallOutcome),
    /// Not finished on the first poll; the token keeps graceful shutdown waiting for it from
    /// before that poll until its task ends.
    Pending(crate::router::CallFuture, TaskTrackerToken),
}

/// Starts an `rpc_call` on the router, right here: a synchronous function runs at once and
/// leaves its answer, a whole frame, at the end of `results` (no future, no allocation); an asynchronous one is
/// polled once, so those that finish at once (most small ones) are answered inline too, with
/// no task spawned and no thread hand-off; the others continue on their own task.
fn run_call(
    shared: &Arc<Shared>,
    request_id: &RequestId,
    name: &str,
    params: Cow<'_, [u8]>,
    results: &mut Vec<u8>,
) -> Ran {
    // The answer's frame is begun before the function writes its result after it; any
    // outcome but a result removes it again.
    let at = crate::engine::begin_response(results, request_id);
    let ctx = || Context {
        connection: Connection {
            shared: shared.clone(),
        },
        request_id: Some(request_id.clone()),
    };
    let dispatched = std::panic::catch_unwind(AssertUnwindSafe(|| {
        shared.router.dispatch_into(name, params, ctx, results)
    }));
    if !matches!(dispatched, Ok(Dispatched::Done(Ok(())))) {
        results.truncate(at);
    }
    let mut fut = match dispatched {
        Ok(Dispatched::Done(Ok(()))) => {
            return match crate::engine::finish_response(shared.max_frame, results, at) {
                Ok(()) => Ran::Encoded(results.len()),
                // Removed from `results`: answered with the error instead, as `respond` does.
                Err(e) => Ran::Done(Ok(Err(crate::Rejection::new(
                    ErrorType::Internal,
                    format!("the answer could not be sent: {e}"),
                )))),
            };
        }
        Ok(Dispatched::Value(result)) => return Ran::Value(result),
        Ok(Dispatched::Done(Err(rejection))) => return Ran::Done(Ok(Err(rejection))),
        Ok(Dispatched::Future(fut)) => fut,
        Err(panic) => return Ran::Done(Err(panic)),
    };
    let token = shared.handlers.token();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(std::task::Poll::Ready(r)) => Ran::Done(Ok(r)),
        Ok(std::task::Poll::Pending) => Ran::Pending(fut, token),
        Err(panic) => Ran::Done(Err(panic)),
    }
}

fn respond_call(
    engine: &mut Engine<Reply>,
    rid: &RequestId,
    name: &str,
    outcome: std::result::Result<
        std::result::Result<Payload, crate::Rejection>,
        Box<dyn Any + Send>,
    >,
) {
    match outcome {
        Ok(Ok(result)) => engine.respond(rid, Ok(result.as_bytes())),
        Ok(Err(rej)) => engine.respond(rid, Err((&rej.message, &rej.kind))),
        Err(panic) => {
            let msg = format!("function `{name}` panicked: {}", panic_message(&*panic));
            engine.respond(rid, Err((&msg, &ErrorType::Internal)));
        }
    }
}

fn spawn_call(
    shared: &Arc<Shared>,
    request_id: RequestId,
    name: String,
    fut: crate::router::CallFuture,
    token: TaskTrackerToken,
) {
    if shared.done.is_cancelled() {
        // Closed while the first poll ran: nobody will read the answer.
        return;
    }
    let task_shared = shared.clone();
    let rid = request_id.clone();
    // Set under the lock when the task has answered, so that its `running` entry is only
    // inserted (below, under the lock too) while the task still runs.
    let answered = Arc::new(AtomicBool::new(false));
    let task_answered = answered.clone();
    let handle = tokio::spawn(async move {
        let _token = token;
        let outcome = AssertUnwindSafe(fut).catch_unwind().await;
        let mut st = task_shared.state.lock();
        task_answered.store(true, Ordering::Relaxed);
        // A peer may reuse an id; only remove the entry if it is still this task's.
        if st
            .running
            .get(&rid)
            .is_some_and(|h| h.id() == tokio::task::id())
        {
            st.running.remove(&rid);
        }
        respond_call(&mut st.engine, &rid, &name, outcome);
        drop(st);
        task_shared.wake_writer();
    });
    // The connection may have closed since the check above, before the entry below could be
    // found and aborted by `finish`: then the task is aborted here (outside the lock, like
    // every drop of a handler's future).
    let closed = {
        let mut st = shared.state.lock();
        let closed = st.engine.is_closed();
        if !closed && !answered.load(Ordering::Relaxed) {
            st.running.insert(request_id, handle.abort_handle());
        }
        closed
    };
    if closed {
        handle.abort();
    }
}

fn spawn_invoke(shared: &Arc<Shared>, reply: InvokeReply, request: Payload) {
    let ctx = Context {
        connection: Connection {
            shared: shared.clone(),
        },
        request_id: reply.request_id().cloned(),
    };
    let fut = shared
        .router
        .dispatch_route(ctx, reply.handler_id(), request);
    let task_shared = shared.clone();
    // Invocations are not abortable: id-less ones must be answered for later ones to go out.
    shared.handlers.spawn(async move {
        let outcome = match fut {
            None => Err((
                codes::HANDLER_NOT_FOUND,
                format!("no handler `{}`", reply.handler_id()),
                404,
            )),
            Some(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(rej)) => Err((codes::HANDLER_EXECUTION_ERROR, rej.message, 500)),
                Err(panic) => Err((codes::HANDLER_EXECUTION_ERROR, panic_message(&*panic), 500)),
            },
        };
        let encoded = outcome
            .as_ref()
            .ok()
            .map(|r| (Payload::encode(&r.headers), Payload::encode(&r.body)));
        let mut st = task_shared.state.lock();
        match (&outcome, encoded) {
            (Ok(resp), Some((Ok(h), Ok(b)))) => st.engine.respond_invoke(
                reply,
                InvokeOutcome::Response {
                    status: resp.status,
                    headers: h.as_bytes(),
                    body: b.as_bytes(),
                },
            ),
            (Err((code, message, status)), _) => st.engine.respond_invoke(
                reply,
                InvokeOutcome::Error {
                    code,
                    message,
                    status: *status,
                },
            ),
            _ => st.engine.respond_invoke(
                reply,
                InvokeOutcome::Error {
                    code: codes::HANDLER_EXECUTION_ERROR,
                    message: "response not encodable",
                    status: 500,
                },
            ),
        }
        drop(st);
        task_shared.wake_writer();
    });
}

/// Now, on tokio's clock (which a test may pause and advance), as a std `Instant`.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Settles the calls whose deadline passed with [`Error::Timeout`] (the engine queues their
/// `cancel`), sleeping until the earliest deadline of a pending call. One task per connection
/// instead of a timer per call: a call only wakes it when its deadline is earlier than the
/// one it sleeps until.
async fn timer_loop(shared: Arc<Shared>) {
    /// Ends the connection if the runtime drops this task (it is shutting down): with
    /// [`IoMode::Threads`] the threads would otherwise serve on with no timer and no runtime
    /// for async functions.
    struct EndWithRuntime(Arc<Shared>);
    impl Drop for EndWithRuntime {
        fn drop(&mut self) {
            if !self.0.done.is_cancelled() {
                finish(&self.0, Some("the tokio runtime shut down".into()));
            }
        }
    }
    let _end = EndWithRuntime(shared.clone());
    loop {
        let at = {
            let mut st = shared.state.lock();
            let at = st.engine.next_deadline();
            st.timer_at = at;
            at
        };
        let due = match at {
            None => tokio::select! {
                _ = shared.wake_timer.notified() => None,
                _ = shared.done.cancelled() => return,
            },
            Some(at) => tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => Some(at),
                _ = shared.wake_timer.notified() => None,
                _ = shared.done.cancelled() => return,
            },
        };
        if let Some(at) = due {
            // The timer fired for `at`: that deadline is due even if the clock reads a hair
            // earlier, or a paused test clock would make this loop spin.
            let (expired, wakers) = {
                let mut st = shared.state.lock();
                let timed_out = st.engine.expire(now().max(at));
                let expired = !timed_out.is_empty();
                let wakers: Vec<Waker> = timed_out
                    .into_iter()
                    .filter_map(|(slot, e)| st.fill(slot, Err(e)))
                    .collect();
                (expired, wakers)
            };
            if expired {
                // The engine queued a `cancel` for each.
                shared.wake_writer();
            }
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// Writes what others queued (calls, answers of spawned handlers), so a burst shares one
/// write, and whatever a full socket left behind. After close it flushes what is queued, then
/// shuts the socket down.
async fn write_loop(shared: Arc<Shared>) {
    let (stream, writable) = match &shared.io {
        Io::Reactor { fd, writable } => (fd, *writable),
        Io::Failed(_) => {
            shared.flushed.cancel();
            return;
        }
        Io::Threads { .. } => return,
    };
    // The registration for writing while the socket is full (see `wait_writable`).
    let mut waiting: Option<AsyncFd<std::os::unix::net::UnixStream>> = None;
    // When the flush after close must end, written or not (`close_flush` after the close).
    let mut give_up_at: Option<tokio::time::Instant> = None;
    loop {
        let closing = shared.done.is_cancelled();
        let flushed = {
            let mut st = shared.state.lock();
            st.writer_woken = false;
            st.early.end_batch();
            try_flush(&shared.io, &mut st)
        };
        if matches!(flushed, Ok(true)) {
            waiting = None;
        }
        match flushed {
            Ok(true) if closing => break,
            Ok(true) => {
                tokio::select! {
                    _ = shared.wake_writer.notified() => {}
                    _ = shared.done.cancelled() => {}
                }
            }
            Ok(false) if closing => {
                // A peer that stopped reading (or reads too slowly) must not keep a closed
                // connection alive forever: the whole flush gets `close_flush`, as with the
                // writer thread of `IoMode::Threads`.
                let deadline = *give_up_at
                    .get_or_insert_with(|| tokio::time::Instant::now() + shared.close_flush);
                match tokio::time::timeout_at(
                    deadline,
                    wait_writable(stream, writable, &mut waiting),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            Ok(false) => {
                tokio::select! {
                    r = wait_writable(stream, writable, &mut waiting) => if let Err(e) = r {
                        finish(&shared, Some(format!("write failed: {e}")));
                        break;
                    },
                    _ = shared.done.cancelled() => {}
                }
            }
            Err(e) => {
                finish(&shared, Some(format!("write failed: {e}")));
                break;
            }
        }
    }
    let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
    shared.flushed.cancel();
}

/// Starts the reader and writer threads of an [`IoMode::Threads`] connection. Both run with
/// the runtime of the caller entered, so that the reader can start the peer's async calls and
/// handlers on it.
fn spawn_threads(shared: &Arc<Shared>) {
    let handle = tokio::runtime::Handle::current();
    let (reader, writer) = (shared.clone(), shared.clone());
    let started = std::thread::Builder::new()
        .name("ferry-reader".into())
        .spawn(move || {
            let _rt = handle.enter();
            read_thread(reader)
        })
        .and_then(|_| {
            std::thread::Builder::new()
                .name("ferry-writer".into())
                .spawn(move || write_thread(writer))
        });
    if let Err(e) = started {
        finish(
            shared,
            Some(format!("cannot start the connection's threads: {e}")),
        );
        // Nobody will flush or shut the socket down.
        if let Io::Threads { sock, .. } = &shared.io {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        shared.flushed.cancel();
    }
}

/// [`read_loop`] for [`IoMode::Threads`]: blocks in `read` (in `poll` first, on one CPU),
/// handles what arrived at once.
fn read_thread(shared: Arc<Shared>) {
    use std::io::Read;
    let Io::Threads { sock, .. } = &shared.io else {
        return;
    };
    let mut input = FrameDecoder::new(shared.state.lock().engine.config().max_frame);
    let mut scratch = Scratch::default();
    // As in `read_loop`: no polling before the first read.
    let mut busy = false;
    // Whether the last read filled the room it had, so that more is likely waiting.
    let mut full = false;
    let wait_in_poll = !runs_on_many_cpus();
    let lost = loop {
        let mut ready = full;
        if busy && !ready {
            let until = std::time::Instant::now() + shared.busy_poll;
            loop {
                ready = readable_now(sock.as_raw_fd());
                if ready || std::time::Instant::now() >= until || shared.done.is_cancelled() {
                    break;
                }
                yield_cpu();
            }
        }
        busy = !shared.busy_poll.is_zero();
        // In a process that runs on one CPU, waits in `poll` for something to read rather than
        // in `read`: a thread blocked in `read` sleeps on the socket's wait queue without
        // saying what it waits for, so each time the peer reads our answers (making room to
        // write) the kernel wakes it for nothing, and on one core that costs two context
        // switches per round trip (with both processes pinned to one core, a sequential call
        // from Node: 11.1-11.7 -> 8.9-9.9 µs at the median over five interleaved pairs; 64 in
        // flight +3-10% calls/s; docs/benchmarks.md). With
        // more CPUs, the blocked `read` is kept: that wake-up comes as the peer takes its
        // answers, just before it sends more, and readies this thread's idle core for them
        // (unpinned, waiting in `poll` cost a third of the calls/s with 64 in flight and 5-15
        // µs at the median). After a read that filled the buffer, more is likely waiting.
        if !ready && wait_in_poll {
            wait_readable(sock.as_raw_fd());
        }
        let room = input.spare(READ_ROOM);
        let n = match (&*sock).read(room) {
            Ok(0) => break hung_up(&input),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("read failed: {e}"),
        };
        full = n == room.len();
        input.filled(n);
        if shared.done.is_cancelled() {
            return;
        }
        if let Some(fatal) = on_input(&shared, &mut input, &mut scratch) {
            break fatal;
        }
    };
    // After close(), the read side was shut down on purpose: not a loss.
    if !shared.done.is_cancelled() {
        finish(&shared, Some(lost));
    }
}

/// [`write_loop`] for [`IoMode::Threads`]: writes, blocking, what others could not write at
/// once, outside the state lock (with `writing` set so that nobody else writes meanwhile).
/// After close it flushes what is queued (giving up after `close_flush` on a peer that
/// does not read), then shuts the socket down.
fn write_thread(shared: Arc<Shared>) {
    let Io::Threads { sock, wake } = &shared.io else {
        return;
    };
    // Blocking writes wait at most this long at a time for room, so a close can stop waiting.
    let _ = sock.set_write_timeout(Some(Duration::from_millis(200)));
    // The most one blocking send may take, so that a slow reader cannot hold it for long.
    const WRITE_CHUNK: usize = 256 * 1024;
    let mut closed_at: Option<Instant> = None;
    let mut st = shared.state.lock();
    'serve: loop {
        st.writer_woken = false;
        st.early.end_batch();
        take_output(&mut st);
        if st.sent < st.unsent.len() {
            let bytes = std::mem::take(&mut st.unsent);
            let mut at = std::mem::take(&mut st.sent);
            st.writing = true;
            let failed = parking_lot::MutexGuard::unlocked(&mut st, || {
                while at < bytes.len() {
                    // After close, the whole flush gets `close_flush`, however slowly the peer
                    // reads. A blocking send returns once the write timeout passes without
                    // room, but a peer that keeps reading keeps it going, so each send is
                    // bounded to a chunk and the deadline checked between them.
                    if shared.done.is_cancelled()
                        && closed_at.get_or_insert_with(Instant::now).elapsed() > shared.close_flush
                    {
                        return Some(None);
                    }
                    let end = bytes.len().min(at + WRITE_CHUNK);
                    match socket2::SockRef::from(sock)
                        .send_with_flags(&bytes[at..end], libc::MSG_NOSIGNAL)
                    {
                        Ok(n) => at += n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Some(Some(format!("write failed: {e}"))),
                    }
                }
                None
            });
            st.writing = false;
            st.unsent = bytes;
            written(&mut st);
            match failed {
                None => continue 'serve,
                // A closed connection whose peer stopped reading: give up on the rest.
                Some(None) => break 'serve,
                Some(Some(why)) => {
                    drop(st);
                    finish(&shared, Some(why));
                    st = shared.state.lock();
                    break 'serve;
                }
            }
        }
        if shared.done.is_cancelled() {
            break;
        }
        wake.wait(&mut st);
    }
    drop(st);
    let _ = sock.shutdown(std::net::Shutdown::Both);
    shared.flushed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycling_a_vector_keeps_its_memory() {
        let text = String::from("a read buffer");
        let mut v: Vec<(u64, &str)> = Vec::with_capacity(64);
        v.push((1, &text));
        let (ptr, cap) = (v.as_ptr() as usize, v.capacity());
        let again: Vec<(u64, &'static str)> = recycle(v);
        assert!(again.is_empty());
        assert_eq!((again.as_ptr() as usize, again.capacity()), (ptr, cap));
    }

    #[test]
    fn results_up_to_the_inline_size_are_kept_inline_and_read_back_whole() {
        for len in [
            0,
            1,
            INLINE_RESULT - 1,
            INLINE_RESULT,
            INLINE_RESULT + 1,
            4096,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let a = Answered::new(Cow::Borrowed(&bytes));
            assert_eq!(
                matches!(a, Answered::Inline { .. }),
                len <= INLINE_RESULT,
                "{len}"
            );
            assert_eq!(a.as_bytes(), &bytes[..]);
            assert_eq!(a.into_payload().as_bytes(), &bytes[..]);
        }
        // A value the engine built is taken over as it is.
        let owned = Answered::new(Cow::Owned(vec![1, 2, 3]));
        assert!(matches!(owned, Answered::Heap(_)));
        assert_eq!(owned.as_bytes(), [1, 2, 3]);
    }
}
