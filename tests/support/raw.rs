//! The unsafe plumbing of the event-contract tests: libvirt's public event API
//! (`virEventAddHandle`, `virEventAddTimeout` and friends) driven with our own
//! `extern "C"` callbacks and free callbacks, behind a small safe interface.
//!
//! Every registration gets its own [`Recorder`], which owns the test's closure and
//! counts what the implementation under test does with the registration: callback
//! calls (with ids, fds, events, times and threads), free calls, and contract
//! violations (a free callback that runs inside a remove call or while a callback of
//! the same registration is in flight, a callback after the free, two callbacks of one
//! registration at once).
//!
//! The opaque pointer handed to libvirt is a strong `Arc<Recorder>` reference that is
//! deliberately never released. So the recorder outlives anything a broken
//! implementation might do (call back after the free, free twice): such mistakes are
//! recorded, not undefined behaviour. The closure inside is dropped by the free
//! callback, as libvirt's opaque data would be.
#![allow(unsafe_code)]
#![allow(dead_code)]

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, ThreadId};
use std::time::Instant;

use virt::sys;

/// `VIR_EVENT_HANDLE_READABLE`.
pub const READABLE: i32 = sys::VIR_EVENT_HANDLE_READABLE as i32;
/// `VIR_EVENT_HANDLE_WRITABLE`.
pub const WRITABLE: i32 = sys::VIR_EVENT_HANDLE_WRITABLE as i32;
/// `VIR_EVENT_HANDLE_ERROR`.
pub const ERROR: i32 = sys::VIR_EVENT_HANDLE_ERROR as i32;
/// `VIR_EVENT_HANDLE_HANGUP`.
pub const HANGUP: i32 = sys::VIR_EVENT_HANDLE_HANGUP as i32;

/// At most this many calls are kept in a recorder's history (counters stay exact),
/// so a 0 ms timer spinning for seconds does not eat the machine's memory.
const HISTORY_CAP: usize = 100_000;

thread_local! {
    /// How many `virEventRemove*` calls this thread is inside right now.
    static INSIDE_REMOVE: Cell<u32> = const { Cell::new(0) };
}

/// One callback invocation, as the implementation made it.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// The watch or timer id the callback was given.
    pub id: i32,
    /// The fd it was given (-1 for timers).
    pub fd: RawFd,
    /// The event bits it was given (0 for timers).
    pub events: i32,
    /// When the callback was entered.
    pub at: Instant,
    /// The thread it ran on.
    pub thread: ThreadId,
}

enum Body {
    Handle(Box<dyn FnMut(i32, RawFd, i32) + Send>),
    Timer(Box<dyn FnMut(i32) + Send>),
}

/// Everything one registration saw. Shared between the test and the callbacks.
pub struct Recorder {
    body: Mutex<Option<Body>>,
    on_free: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    history: Mutex<Vec<Call>>,
    calls: AtomicUsize,
    returns: AtomicUsize,
    frees: AtomicUsize,
    in_flight: AtomicBool,
    free_overlapped_callback: AtomicBool,
    free_inside_remove: AtomicBool,
    concurrent_calls: AtomicBool,
    calls_after_free: AtomicUsize,
    free_thread: Mutex<Option<ThreadId>>,
    free_at: Mutex<Option<Instant>>,
    last_return: Mutex<Option<Instant>>,
}

/// Locks `mutex`, recovering it from poisoning (a test thread that panicked while
/// holding it has already failed the test): the tests' one lock helper.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Recorder {
    fn new(body: Body, on_free: Box<dyn FnOnce() + Send>) -> Arc<Recorder> {
        Arc::new(Recorder {
            body: Mutex::new(Some(body)),
            on_free: Mutex::new(Some(on_free)),
            history: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            returns: AtomicUsize::new(0),
            frees: AtomicUsize::new(0),
            in_flight: AtomicBool::new(false),
            free_overlapped_callback: AtomicBool::new(false),
            free_inside_remove: AtomicBool::new(false),
            concurrent_calls: AtomicBool::new(false),
            calls_after_free: AtomicUsize::new(0),
            free_thread: Mutex::new(None),
            free_at: Mutex::new(None),
            last_return: Mutex::new(None),
        })
    }

    /// Callbacks entered so far.
    pub fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    /// Callbacks that have returned so far.
    pub fn returns(&self) -> usize {
        self.returns.load(SeqCst)
    }

    /// Free-callback invocations so far (the contract: exactly one, eventually).
    pub fn frees(&self) -> usize {
        self.frees.load(SeqCst)
    }

    /// The recorded calls, oldest first (the first [`HISTORY_CAP`] of them).
    pub fn history(&self) -> Vec<Call> {
        lock(&self.history).clone()
    }

    /// The event bits of every recorded call.
    pub fn events(&self) -> Vec<i32> {
        lock(&self.history).iter().map(|c| c.events).collect()
    }

    /// Whether a callback of this registration is running right now.
    pub fn in_flight(&self) -> bool {
        self.in_flight.load(SeqCst)
    }

    /// Whether the free callback ran while a callback of this registration was in
    /// flight (the opaque would have been freed under the callback's feet).
    pub fn free_overlapped_callback(&self) -> bool {
        self.free_overlapped_callback.load(SeqCst)
    }

    /// Whether the free callback ran inside a `virEventRemove*` call on its thread.
    pub fn free_inside_remove(&self) -> bool {
        self.free_inside_remove.load(SeqCst)
    }

    /// Whether two callbacks of this registration ever ran at the same time (or one
    /// ran nested inside another).
    pub fn concurrent_calls(&self) -> bool {
        self.concurrent_calls.load(SeqCst)
    }

    /// Callbacks that arrived after the free callback had run.
    pub fn calls_after_free(&self) -> usize {
        self.calls_after_free.load(SeqCst)
    }

    /// The thread the (first) free callback ran on.
    pub fn free_thread(&self) -> Option<ThreadId> {
        *lock(&self.free_thread)
    }

    /// When the (first) free callback started.
    pub fn free_at(&self) -> Option<Instant> {
        *lock(&self.free_at)
    }

    /// When the last callback returned.
    pub fn last_return(&self) -> Option<Instant> {
        *lock(&self.last_return)
    }

    /// Panics unless the registration saw no contract violation recorded here:
    /// at most one free, no free inside remove or during a callback, no callback
    /// after the free or concurrent with another.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.frees() <= 1,
            "{what}: free callback ran {} times",
            self.frees()
        );
        assert!(
            !self.free_inside_remove(),
            "{what}: free callback ran inside remove"
        );
        assert!(
            !self.free_overlapped_callback(),
            "{what}: free callback ran while a callback was in flight"
        );
        assert_eq!(
            self.calls_after_free(),
            0,
            "{what}: callbacks after the free"
        );
        assert!(!self.concurrent_calls(), "{what}: concurrent callbacks");
    }

    fn dispatch(&self, call: Call, run: impl FnOnce(&mut Body)) {
        if self.frees() > 0 {
            self.calls_after_free.fetch_add(1, SeqCst);
        }
        self.calls.fetch_add(1, SeqCst);
        {
            let mut history = lock(&self.history);
            if history.len() < HISTORY_CAP {
                history.push(call);
            }
        }
        let mut body = match self.body.try_lock() {
            Ok(body) => body,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.concurrent_calls.store(true, SeqCst);
                return;
            }
        };
        self.in_flight.store(true, SeqCst);
        if let Some(body) = body.as_mut() {
            run(body);
        }
        *lock(&self.last_return) = Some(Instant::now());
        self.returns.fetch_add(1, SeqCst);
        self.in_flight.store(false, SeqCst);
        drop(body);
    }

    fn free(&self) {
        if self.frees.fetch_add(1, SeqCst) == 0 {
            *lock(&self.free_at) = Some(Instant::now());
            *lock(&self.free_thread) = Some(thread::current().id());
        }
        if INSIDE_REMOVE.get() > 0 {
            self.free_inside_remove.store(true, SeqCst);
        }
        if self.in_flight() {
            self.free_overlapped_callback.store(true, SeqCst);
        }
        // Drop the closure, as a real free callback releases its opaque data; but not
        // under a callback that is still running (that is the bug being recorded).
        let body = match self.body.try_lock() {
            Ok(mut body) => body.take(),
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
            Err(TryLockError::WouldBlock) => {
                self.free_overlapped_callback.store(true, SeqCst);
                None
            }
        };
        drop(body);
        let hook = lock(&self.on_free).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("calls", &self.calls())
            .field("returns", &self.returns())
            .field("frees", &self.frees())
            .field("free_inside_remove", &self.free_inside_remove())
            .field("free_overlapped_callback", &self.free_overlapped_callback())
            .field("calls_after_free", &self.calls_after_free())
            .field("concurrent_calls", &self.concurrent_calls())
            .finish_non_exhaustive()
    }
}

/// Gives libvirt a strong reference to `rec` that is never taken back (see the
/// module docs): the pointer stays valid for the rest of the process.
fn leak_opaque(rec: &Arc<Recorder>) -> *mut c_void {
    Arc::into_raw(Arc::clone(rec)).cast_mut().cast()
}

/// Runs `f`; a panic (a failed assertion inside a test callback) must not unwind into
/// libvirt's C frames, so it aborts the process after the panic hook printed it.
fn no_unwind(f: impl FnOnce()) {
    if panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        eprintln!("a test callback panicked (see above); aborting rather than unwinding into C");
        std::process::abort();
    }
}

/// Marks the current thread as inside a `virEventRemove*` call.
struct InsideRemove;

impl InsideRemove {
    fn enter() -> InsideRemove {
        INSIDE_REMOVE.set(INSIDE_REMOVE.get() + 1);
        InsideRemove
    }
}

impl Drop for InsideRemove {
    fn drop(&mut self) {
        INSIDE_REMOVE.set(INSIDE_REMOVE.get() - 1);
    }
}

unsafe extern "C" fn handle_cb(watch: c_int, fd: c_int, events: c_int, opaque: *mut c_void) {
    no_unwind(|| {
        // SAFETY: `opaque` is the strong `Arc<Recorder>` reference that `leak_opaque`
        // gave libvirt and that is never released, so it points to a live `Recorder`
        // for the rest of the process; `Recorder` is `Sync`, so a shared reference is
        // sound on any thread.
        let rec = unsafe { &*opaque.cast_const().cast::<Recorder>() };
        let call = Call {
            id: watch,
            fd,
            events,
            at: Instant::now(),
            thread: thread::current().id(),
        };
        rec.dispatch(call, |body| match body {
            Body::Handle(f) => f(watch, fd, events),
            Body::Timer(_) => panic!("handle callback {watch} got a timer's opaque"),
        });
    });
}

unsafe extern "C" fn timer_cb(timer: c_int, opaque: *mut c_void) {
    no_unwind(|| {
        // SAFETY: as in `handle_cb`.
        let rec = unsafe { &*opaque.cast_const().cast::<Recorder>() };
        let call = Call {
            id: timer,
            fd: -1,
            events: 0,
            at: Instant::now(),
            thread: thread::current().id(),
        };
        rec.dispatch(call, |body| match body {
            Body::Timer(f) => f(timer),
            Body::Handle(_) => panic!("timer callback {timer} got a handle's opaque"),
        });
    });
}

unsafe extern "C" fn free_cb(opaque: *mut c_void) {
    no_unwind(|| {
        // SAFETY: as in `handle_cb`; the free callback does not release the leaked
        // reference either, so a second (buggy) free is recorded, not a double free.
        let rec = unsafe { &*opaque.cast_const().cast::<Recorder>() };
        rec.free();
    });
}

/// A handle watch registered through `virEventAddHandle`.
#[derive(Clone, Debug)]
pub struct RawWatch {
    /// What `virEventAddHandle` returned.
    pub id: i32,
    /// What happened to this registration.
    pub rec: Arc<Recorder>,
}

impl RawWatch {
    /// `virEventAddHandle(fd, events, ..)` calling `on_event(watch, fd, events)`.
    pub fn add(
        fd: RawFd,
        events: i32,
        on_event: impl FnMut(i32, RawFd, i32) + Send + 'static,
    ) -> RawWatch {
        RawWatch::add_with_free(fd, events, on_event, || {})
    }

    /// As [`RawWatch::add`], and `on_free` runs inside the free callback.
    pub fn add_with_free(
        fd: RawFd,
        events: i32,
        on_event: impl FnMut(i32, RawFd, i32) + Send + 'static,
        on_free: impl FnOnce() + Send + 'static,
    ) -> RawWatch {
        let rec = Recorder::new(Body::Handle(Box::new(on_event)), Box::new(on_free));
        let opaque = leak_opaque(&rec);
        // SAFETY: `handle_cb` and `free_cb` are `extern "C"` functions with libvirt's
        // signatures that expect exactly this opaque (a never-released
        // `Arc<Recorder>`), which stays valid for the rest of the process.
        let id =
            unsafe { sys::virEventAddHandle(fd, events, Some(handle_cb), opaque, Some(free_cb)) };
        RawWatch { id, rec }
    }

    /// A watch whose callback only records.
    pub fn recorded(fd: RawFd, events: i32) -> RawWatch {
        RawWatch::add(fd, events, |_, _, _| {})
    }

    /// `virEventUpdateHandle(id, events)`.
    pub fn update(&self, events: i32) {
        update_handle(self.id, events);
    }

    /// `virEventRemoveHandle(id)`.
    pub fn remove(&self) -> i32 {
        remove_handle(self.id)
    }
}

/// A timer registered through `virEventAddTimeout`.
#[derive(Clone, Debug)]
pub struct RawTimer {
    /// What `virEventAddTimeout` returned.
    pub id: i32,
    /// What happened to this registration.
    pub rec: Arc<Recorder>,
}

impl RawTimer {
    /// `virEventAddTimeout(frequency, ..)` calling `on_fire(timer)`.
    pub fn add(frequency: i32, on_fire: impl FnMut(i32) + Send + 'static) -> RawTimer {
        RawTimer::add_with_free(frequency, on_fire, || {})
    }

    /// As [`RawTimer::add`], and `on_free` runs inside the free callback.
    pub fn add_with_free(
        frequency: i32,
        on_fire: impl FnMut(i32) + Send + 'static,
        on_free: impl FnOnce() + Send + 'static,
    ) -> RawTimer {
        let rec = Recorder::new(Body::Timer(Box::new(on_fire)), Box::new(on_free));
        let opaque = leak_opaque(&rec);
        // SAFETY: as in `RawWatch::add_with_free`, with `timer_cb`.
        let id =
            unsafe { sys::virEventAddTimeout(frequency, Some(timer_cb), opaque, Some(free_cb)) };
        RawTimer { id, rec }
    }

    /// A timer whose callback only records.
    pub fn recorded(frequency: i32) -> RawTimer {
        RawTimer::add(frequency, |_| {})
    }

    /// `virEventUpdateTimeout(id, frequency)`.
    pub fn update(&self, frequency: i32) {
        update_timeout(self.id, frequency);
    }

    /// `virEventRemoveTimeout(id)`.
    pub fn remove(&self) -> i32 {
        remove_timeout(self.id)
    }
}

/// `virEventUpdateHandle(watch, events)`.
pub fn update_handle(watch: i32, events: i32) {
    // SAFETY: integer arguments only; libvirt ignores an unknown id.
    unsafe { sys::virEventUpdateHandle(watch, events) }
}

/// `virEventRemoveHandle(watch)`; while it runs, a free callback on this thread is
/// recorded as a violation.
pub fn remove_handle(watch: i32) -> i32 {
    let _inside = InsideRemove::enter();
    // SAFETY: integer argument only; libvirt returns -1 for an unknown id.
    unsafe { sys::virEventRemoveHandle(watch) }
}

/// `virEventUpdateTimeout(timer, frequency)`.
pub fn update_timeout(timer: i32, frequency: i32) {
    // SAFETY: integer arguments only; libvirt ignores an unknown id.
    unsafe { sys::virEventUpdateTimeout(timer, frequency) }
}

/// `virEventRemoveTimeout(timer)`; see [`remove_handle`].
pub fn remove_timeout(timer: i32) -> i32 {
    let _inside = InsideRemove::enter();
    // SAFETY: integer argument only; libvirt returns -1 for an unknown id.
    unsafe { sys::virEventRemoveTimeout(timer) }
}

/// `virEventRegisterDefaultImpl()`: libvirt's own loop, registered before ours.
pub fn register_default_impl() -> i32 {
    // SAFETY: no preconditions; it initializes libvirt and registers its own loop.
    unsafe { sys::virEventRegisterDefaultImpl() }
}

/// Runs `child` in a forked child process and returns its exit status.
pub fn in_forked_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `child` and then `_exit`s, without returning into
    // the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child at once, skipping the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WEXITSTATUS(status)
}

/// A pipe, both ends non-blocking and close-on-exec: `(read end, write end)`.
pub fn pipe() -> (File, File) {
    let mut fds: [c_int; 2] = [-1, -1];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both fds are open and nothing else owns them.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}
