//! The contract of libvirt's event-implementation API, checked against virt-reactor.
//!
//! Each test names the rule it proves (the rules are in docs/contract.md, from the
//! research note on libvirt's event contract, sections A–G and 3). The tests drive the
//! loop through libvirt's *public* C API (`virEventAddHandle`, `virEventUpdateHandle`,
//! `virEventRemoveHandle` and the timeout trio), with C callbacks and free callbacks on
//! socketpairs and pipes, exactly as libvirt itself would; the unsafe plumbing is in
//! `support/raw.rs`. Scenarios follow libvirt's `tests/eventtest.c` and libvirt-glib's
//! `tests/test-events.c`, plus the ones those anchors got wrong.
//!
//! libvirt's registration is per process and permanent, so every test registers the
//! loop itself and needs a process of its own: run with
//! `cargo nextest run --test event_contract`.
//!
//! Timing: assertions about time are correctness bounds (a wake-up that must happen
//! well before a 10 s poll timeout ends, a timer that must not fire early), never
//! performance figures, and are loose enough for a loaded 2-core machine.

#[path = "support/raw.rs"]
mod raw;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use raw::{
    in_forked_child, remove_handle, remove_timeout, update_handle, update_timeout, RawTimer,
    RawWatch, Recorder, ERROR, HANGUP, READABLE, WRITABLE,
};
use virt_reactor::{Error, Interest, LoopStats, Reactor, Readiness, Timer, Watch};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// A whole test may take this long before the watchdog aborts it (a deadlock).
const WATCHDOG: Duration = Duration::from_secs(120);

/// A generous bound for "promptly": far below the 10 s poll timeouts the thread tests
/// sleep in, far above any scheduling hiccup of a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(2);

/// Registers the loop (once per process: nextest runs each test in its own), silences
/// libvirt's default error printer and arms a watchdog against deadlocks.
fn setup() -> Reactor {
    virt::error::clear_error_callback();
    start_watchdog();
    Reactor::<()>::register().unwrap_or_else(|e| {
        panic!(
            "Reactor::register: {e}; each test needs a process of its own: \
             run with `cargo nextest run --test event_contract`"
        )
    })
}

fn start_watchdog() {
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| {
            thread::sleep(WATCHDOG);
            eprintln!("watchdog: test still running after {WATCHDOG:?} (deadlock?); aborting");
            std::process::abort();
        })
        .expect("spawn watchdog");
}

/// Runs loop iterations until `cond` holds (true) or `limit` passes (false).
fn run_until(ev: &mut Reactor, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let step = (deadline - now).min(Duration::from_millis(10));
        ev.run_once(Some(step), &mut ()).expect("run_once");
    }
}

/// Runs `n` iterations of at most `timeout` each.
fn run_iterations(ev: &mut Reactor, n: usize, timeout: Duration) {
    for _ in 0..n {
        ev.run_once(Some(timeout), &mut ()).expect("run_once");
    }
}

/// Runs iterations of at most 10 ms for `span` of wall time; returns how many.
fn run_for(ev: &mut Reactor, span: Duration) -> usize {
    let end = Instant::now() + span;
    let mut n = 0;
    while Instant::now() < end {
        ev.run_once(Some(Duration::from_millis(10)), &mut ())
            .expect("run_once");
        n += 1;
    }
    n
}

/// One `run_once(Some(timeout))` with nothing due must actually sleep: an fd that the
/// loop should not be polling (disabled, closed) would make it return at once, every
/// time. This is the "no busy spin" check; it asserts a lower bound only.
fn assert_iteration_blocks(ev: &mut Reactor, timeout: Duration, why: &str) {
    let start = Instant::now();
    ev.run_once(Some(timeout), &mut ()).expect("run_once");
    let took = start.elapsed();
    assert!(
        took >= timeout * 3 / 4,
        "{why}: run_once({timeout:?}) returned after {took:?}: the loop is spinning"
    );
}

/// Everything registered was removed: drain must finish with nothing left.
fn assert_drains(ev: &mut Reactor) {
    let report = ev.shutdown(Duration::from_secs(5), &mut ());
    assert!(report.is_ok(), "drain: {report:?}; left: {:?}", ev.stats());
    assert!(ev.stats().is_idle(), "{:?}", ev.stats());
}

/// A connected socketpair, both ends non-blocking: `(ours, peer)`.
fn socketpair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

fn fd_of(s: &impl AsRawFd) -> RawFd {
    s.as_raw_fd()
}

/// Writes until the kernel refuses more: the fd is then not writable.
fn fill(mut w: impl Write) -> usize {
    let mut total = 0;
    for chunk in [65_536usize, 4096, 1] {
        let buf = vec![0x5a; chunk];
        loop {
            match w.write(&buf) {
                Ok(n) => total += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
    }
    total
}

/// Reads one byte; `None` on would-block, `Some(0)` on end of file.
fn read_one(mut r: impl Read) -> Option<usize> {
    match r.read(&mut [0u8; 1]) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("read: {e}"),
    }
}

/// Reads everything available; returns the byte count.
fn read_all(mut r: impl Read) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// An id filled in after the closure that needs it was created.
fn id_cell() -> Arc<AtomicI32> {
    Arc::new(AtomicI32::new(0))
}

/// Every callback of `rec` ran on `thread` and was given `id`.
fn assert_calls_were(rec: &Recorder, id: i32, thread: ThreadId, what: &str) {
    for call in rec.history() {
        assert_eq!(
            call.id, id,
            "{what}: callback given another registration's id"
        );
        assert_eq!(
            call.thread, thread,
            "{what}: callback ran off the loop thread"
        );
    }
}

/// A raw watch or timer, for the checks that hold for both: `update` takes events for
/// a watch and a frequency for a timer.
trait Registration: Clone + Send + 'static {
    fn rec(&self) -> &Arc<Recorder>;
    fn update(&self, value: i32);
    fn remove(&self) -> i32;
}

impl Registration for RawWatch {
    fn rec(&self) -> &Arc<Recorder> {
        &self.rec
    }
    fn update(&self, events: i32) {
        RawWatch::update(self, events);
    }
    fn remove(&self) -> i32 {
        RawWatch::remove(self)
    }
}

impl Registration for RawTimer {
    fn rec(&self) -> &Arc<Recorder> {
        &self.rec
    }
    fn update(&self, frequency: i32) {
        RawTimer::update(self, frequency);
    }
    fn remove(&self) -> i32 {
        RawTimer::remove(self)
    }
}

/// A READABLE watch on `source` that reads it with `read` on every call and counts
/// the bytes read. The watch owns `source`: it closes when the watch's free runs.
fn counting_watch<T>(source: T, read: fn(&T) -> usize) -> (RawWatch, Arc<AtomicUsize>)
where
    T: AsRawFd + Send + 'static,
{
    let bytes = counter();
    let fd = source.as_raw_fd();
    let w = {
        let bytes = bytes.clone();
        RawWatch::add(fd, READABLE, move |_, _, _| {
            bytes.fetch_add(read(&source), SeqCst);
        })
    };
    (w, bytes)
}

/// Reads everything `sock` holds (for [`counting_watch`]).
fn read_everything(sock: &UnixStream) -> usize {
    read_all(sock)
}

/// Reads one byte of `sock`, if there is one (for [`counting_watch`]).
fn read_a_byte(sock: &UnixStream) -> usize {
    usize::from(read_one(sock) == Some(1))
}

/// Suppresses the panic message of the deliberate panics of the panic tests (keeping
/// every other panic message, so real failures still print).
fn quiet_deliberate_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !message.contains("deliberate") {
            default(info);
        }
    }));
}

// ---------------------------------------------------------------------------------
// A. Registration
// ---------------------------------------------------------------------------------

/// A3: the registration is permanent; a second one is refused, not silently lost.
#[test]
fn second_register_is_already_registered() {
    let _ev = setup();
    let second = Reactor::<()>::register();
    assert!(
        matches!(second, Err(Error::AlreadyRegistered)),
        "second register: {second:?}"
    );
}

/// A1: a connection opened before registration would never get its events, so
/// `connect` refuses it; after registration it works.
#[test]
fn connect_before_register_is_not_registered() {
    virt::error::clear_error_callback();
    start_watchdog();
    let early = virt_reactor::connect("test:///default");
    assert!(
        matches!(early, Err(Error::NotRegistered)),
        "connect before register: {:?}",
        early.as_ref().map(|_| "a connection")
    );

    let mut ev = Reactor::<()>::register().expect("register");
    let conn = virt_reactor::connect("test:///default").expect("connect after register");
    // virConnectClose. A4: whatever the connection registered is gone once closed.
    drop(conn);
    assert_drains(&mut ev);
}

/// A3: libvirt keeps the first implementation; registering after libvirt's default
/// one would leave ours uncalled, so it is an error.
#[test]
fn register_after_default_impl_is_foreign_impl_registered() {
    virt::error::clear_error_callback();
    start_watchdog();
    assert_eq!(
        raw::register_default_impl(),
        0,
        "virEventRegisterDefaultImpl"
    );
    let ours = Reactor::<()>::register();
    assert!(
        matches!(ours, Err(Error::ForeignImplRegistered)),
        "register after the default impl: {ours:?}"
    );
}

// ---------------------------------------------------------------------------------
// B. Identifiers
// ---------------------------------------------------------------------------------

/// B1, B2: ids are strictly positive, unique among live registrations, and a removed
/// id is not handed to a later registration.
#[test]
fn ids_are_positive_unique_and_not_reused_after_remove() {
    let mut ev = setup();
    let (ours, _peer) = socketpair();
    let fifty = || -> Vec<(RawWatch, RawTimer)> {
        (0..50)
            .map(|_| {
                (
                    RawWatch::recorded(fd_of(&ours), READABLE),
                    RawTimer::recorded(-1),
                )
            })
            .collect()
    };
    let first = fifty();
    for (w, t) in &first {
        assert!(w.id > 0, "watch id {}", w.id);
        assert!(t.id > 0, "timer id {}", t.id);
    }
    let mut watch_ids: Vec<i32> = first.iter().map(|(w, _)| w.id).collect();
    let mut timer_ids: Vec<i32> = first.iter().map(|(_, t)| t.id).collect();
    watch_ids.sort_unstable();
    watch_ids.dedup();
    timer_ids.sort_unstable();
    timer_ids.dedup();
    assert_eq!(watch_ids.len(), 50, "duplicate watch ids");
    assert_eq!(timer_ids.len(), 50, "duplicate timer ids");

    for (w, t) in &first {
        assert_eq!(w.remove(), 0);
        assert_eq!(t.remove(), 0);
    }
    for (w, t) in &fifty() {
        assert!(w.id > 0 && t.id > 0);
        assert!(
            watch_ids.binary_search(&w.id).is_err(),
            "watch id {} reused",
            w.id
        );
        assert!(
            timer_ids.binary_search(&t.id).is_err(),
            "timer id {} reused",
            t.id
        );
        assert_eq!(w.remove(), 0);
        assert_eq!(t.remove(), 0);
    }
    assert_drains(&mut ev);
}

/// Disables `reg` (`off`), removes it, then tries to resurrect the removed id with
/// `on` (a resurrected registration would fire at once) and removes it again: 0, then
/// -1; the free runs once, on a later iteration, and nothing fires. `count` reads how
/// many such registrations the loop holds.
fn check_stale_id<R: Registration>(
    ev: &mut Reactor,
    reg: R,
    off: i32,
    on: i32,
    count: fn(&LoopStats) -> usize,
) {
    reg.update(off);
    assert_eq!(reg.remove(), 0, "removing a disabled registration");
    reg.update(on);
    assert_eq!(reg.remove(), -1, "second remove");
    assert_eq!(reg.rec().frees(), 0, "free ran inside remove");

    run_iterations(ev, 5, Duration::from_millis(20));
    assert_eq!(reg.rec().calls(), 0, "a removed registration was called");
    assert_eq!(reg.rec().frees(), 1);
    assert_eq!(count(&ev.stats()), 0);
    reg.rec().assert_clean("registration");
    assert_drains(ev);
}

/// B2, B3, C4 (libvirt-glib's remove-disabled-watch): a disabled watch can be removed;
/// updating the removed id does not resurrect it; removing it again returns -1; its
/// free runs once, later.
#[test]
fn stale_watch_id_update_is_ignored_and_second_remove_is_minus_one() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"pending").unwrap(); // a resurrected READABLE watch would fire
    let w = RawWatch::recorded(fd_of(&ours), READABLE | WRITABLE);
    check_stale_id(&mut ev, w, 0, READABLE, |stats| stats.handles);
}

/// B2, B3 (libvirt-glib's remove-disabled-timeout): the same for a timer.
#[test]
fn stale_timer_id_update_is_ignored_and_second_remove_is_minus_one() {
    let mut ev = setup();
    let t = RawTimer::recorded(10_000);
    // A resurrected 0 ms timer would fire on the next iteration.
    check_stale_id(&mut ev, t, -1, 0, |stats| stats.timers);
}

/// B2: a new watch on the same fd gets only its own callbacks, with its own id; the
/// removed watch's callback never runs, though its fd is ready.
#[test]
fn new_watch_never_receives_callbacks_meant_for_a_removed_id() {
    let mut ev = setup();
    let me = thread::current().id();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let old = RawWatch::recorded(fd_of(&ours), READABLE);
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    assert_eq!(old.rec.calls(), 1, "the first watch should have fired once");
    assert_eq!(old.remove(), 0);

    let new = RawWatch::recorded(fd_of(&ours), READABLE);
    assert_ne!(new.id, old.id);
    assert!(run_until(&mut ev, PROMPTLY, || new.rec.calls() >= 3));
    assert_eq!(old.rec.calls(), 1, "removed watch called again");
    assert_calls_were(&new.rec, new.id, me, "new watch");
    assert_eq!(new.remove(), 0);
    assert_drains(&mut ev);
    old.rec.assert_clean("old");
    new.rec.assert_clean("new");
    assert_eq!(old.rec.frees(), 1);
    assert_eq!(new.rec.frees(), 1);
}

/// B1 and libvirt's callers (virNetSocketAddIOCallback frees its opaque itself when
/// virEventAddHandle fails): a watch on an fd that cannot be polled returns -1,
/// leaves nothing registered, and never calls the free callback.
#[test]
fn failed_add_handle_returns_minus_one_and_never_calls_free() {
    let mut ev = setup();
    let (r, w) = raw::pipe();
    let closed_fd = r.as_raw_fd();
    drop(r);
    drop(w);
    let bad = RawWatch::recorded(closed_fd, READABLE);
    assert_eq!(bad.id, -1, "adding a closed fd");
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(
        bad.rec.frees(),
        0,
        "free callback of a failed registration ran"
    );
    assert_eq!(bad.rec.calls(), 0);
    assert!(ev.stats().is_idle(), "{:?}", ev.stats());
}

// ---------------------------------------------------------------------------------
// C. Handles
// ---------------------------------------------------------------------------------

/// C5 and section 3: level-triggered. A callback that reads one byte per call from a
/// socket holding 4,096 bytes is called exactly 4,096 times, always with data there,
/// and then not again without a further write.
#[test]
fn level_triggered_one_byte_per_callback_drains_4096_bytes() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(&[0xab; 4096]).unwrap();
    let (w, bytes) = counting_watch(ours, read_a_byte);
    assert!(
        run_until(&mut ev, Duration::from_secs(60), || bytes.load(SeqCst)
            == 4096),
        "read {} of 4096 bytes",
        bytes.load(SeqCst)
    );
    assert_eq!(w.rec.calls(), 4096);
    run_iterations(&mut ev, 5, Duration::from_millis(20));
    assert_eq!(w.rec.calls(), 4096, "called again with nothing to read");
    assert_eq!(bytes.load(SeqCst), 4096, "called while not readable");
    assert!(
        w.rec.events().iter().all(|&e| e == READABLE),
        "events other than READABLE"
    );
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// C7: one call per watch per iteration, with all pending bits ORed together.
#[test]
fn one_call_per_iteration_with_pending_bits_ored() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let w = RawWatch::recorded(fd_of(&ours), READABLE | WRITABLE);
    for i in 1..=3 {
        ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
        assert_eq!(w.rec.calls(), i, "calls after {i} iterations");
    }
    assert!(
        w.rec.events().iter().all(|&e| e == READABLE | WRITABLE),
        "events {:?}",
        w.rec.events()
    );
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// Watches `fd` for `interest` with a callback that disables the watch on ERROR or
/// HANGUP (both are level-triggered too: it would repeat). Checks that nothing fires
/// before `close` (the peer going away) and that the first call after it carries
/// `want` and none of the bits in `never`, and then nothing else fires.
fn check_unrequested_bits_when_peer_closes(
    ev: &mut Reactor,
    fd: RawFd,
    interest: i32,
    close: impl FnOnce(),
    want: i32,
    never: i32,
) {
    let w = RawWatch::add(fd, interest, |id, _, events| {
        if events & (ERROR | HANGUP) != 0 {
            update_handle(id, 0);
        }
    });
    ev.run_once(Some(Duration::from_millis(100)), &mut ())
        .unwrap();
    assert_eq!(w.rec.calls(), 0, "fired before the peer went away");

    close();
    assert!(
        run_until(ev, PROMPTLY, || w.rec.calls() >= 1),
        "no event once the peer went away (want {want:#x})"
    );
    let events = w.rec.events();
    assert!(events[0] & want != 0, "events {events:?}: want {want:#x}");
    assert!(
        events.iter().all(|&e| e & never == 0),
        "events {events:?}: {never:#x} was not asked for"
    );
    run_iterations(ev, 3, Duration::from_millis(10));
    assert_eq!(w.rec.events(), events, "fired after disabling itself");
    assert_eq!(w.remove(), 0);
    assert_drains(ev);
}

/// C2, C3: a full hangup of the peer reaches a watch that asked only for WRITABLE, as
/// HANGUP, without bits it did not ask for.
#[test]
fn hangup_is_delivered_to_a_writable_only_watch_when_peer_closes() {
    let mut ev = setup();
    let (ours, peer) = socketpair();
    fill(&ours); // not writable while the peer is open
    let close = move || drop(peer);
    check_unrequested_bits_when_peer_closes(
        &mut ev,
        fd_of(&ours),
        WRITABLE,
        close,
        HANGUP,
        READABLE,
    );
}

/// C2, C3: a full hangup reaches a READABLE watch as HANGUP, without WRITABLE.
#[test]
fn hangup_is_delivered_to_a_readable_watch_when_peer_closes() {
    let mut ev = setup();
    let (ours, peer) = socketpair();
    let close = move || drop(peer);
    check_unrequested_bits_when_peer_closes(
        &mut ev,
        fd_of(&ours),
        READABLE,
        close,
        HANGUP,
        WRITABLE,
    );
}

/// C2: ERROR is delivered without being asked for: a pipe's write end whose reader
/// went away, watched for WRITABLE only.
#[test]
fn error_is_delivered_unrequested_when_the_pipe_reader_closes() {
    let mut ev = setup();
    let (r, w_end) = raw::pipe();
    fill(&w_end); // full: not writable
    let close = move || drop(r);
    check_unrequested_bits_when_peer_closes(
        &mut ev,
        fd_of(&w_end),
        WRITABLE,
        close,
        ERROR,
        READABLE,
    );
}

/// C3: a half-close (the peer's shutdown(SHUT_WR)) is READABLE (end of file), not
/// HANGUP, and stays READABLE on every iteration; only the full close is HANGUP.
#[test]
fn half_close_is_readable_not_hangup() {
    let mut ev = setup();
    let (ours, peer) = socketpair();
    let sock = Arc::new(ours);
    let eofs = counter();
    let w = {
        let (sock, eofs) = (sock.clone(), eofs.clone());
        RawWatch::add(fd_of(&*sock), READABLE, move |id, _, events| {
            if read_one(&*sock) == Some(0) {
                eofs.fetch_add(1, SeqCst);
            }
            if events & HANGUP != 0 {
                update_handle(id, 0);
            }
        })
    };
    peer.shutdown(Shutdown::Write).unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || w.rec.calls() >= 5));
    let events = w.rec.events();
    assert!(
        events.iter().all(|&e| e == READABLE),
        "events after a half-close {events:?}: want READABLE only"
    );
    assert_eq!(
        eofs.load(SeqCst),
        w.rec.calls(),
        "each call saw end of file"
    );

    drop(peer);
    assert!(
        run_until(&mut ev, PROMPTLY, || w
            .rec
            .events()
            .iter()
            .any(|e| e & HANGUP != 0)),
        "no HANGUP after the full close"
    );
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// C4: events == 0 takes the fd out of polling: no callback, not even for a hangup
/// or an always-writable socket, and the loop sleeps instead of spinning.
#[test]
fn update_to_zero_disables_fully_even_on_hangup_and_loop_does_not_spin() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    let (ours2, _peer2) = socketpair();
    let r = RawWatch::recorded(fd_of(&ours), READABLE);
    let wr = RawWatch::recorded(fd_of(&ours2), WRITABLE); // ready on every iteration
    r.update(0);
    wr.update(0);
    peer.write_all(b"data then hangup").unwrap();
    drop(peer);

    for _ in 0..3 {
        assert_iteration_blocks(&mut ev, Duration::from_millis(200), "disabled watches");
    }
    assert_eq!(r.rec.calls(), 0, "a disabled READABLE watch fired");
    assert_eq!(wr.rec.calls(), 0, "a disabled WRITABLE watch fired");
    let stats = ev.stats();
    assert_eq!((stats.handles, stats.enabled_handles), (2, 0), "{stats:?}");

    // Re-enabled, the watch gets what happened meanwhile, ERROR/HANGUP included.
    r.update(READABLE);
    assert!(run_until(&mut ev, PROMPTLY, || r.rec.calls() >= 1));
    let first = r.rec.events()[0];
    assert!(
        first & READABLE != 0 && first & HANGUP != 0,
        "events {first:#x}"
    );
    assert_eq!(wr.rec.calls(), 0);
    assert_eq!(r.remove(), 0);
    assert_eq!(wr.remove(), 0);
    assert_drains(&mut ev);
}

/// C4: re-enabling a disabled watch delivers the data that arrived meanwhile, on the
/// very next iteration.
#[test]
fn reenabling_after_zero_delivers_pending_data() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    let (w, bytes) = counting_watch(ours, read_everything);
    w.update(0);
    peer.write_all(b"abc").unwrap();
    run_iterations(&mut ev, 2, Duration::from_millis(50));
    assert_eq!(w.rec.calls(), 0, "fired while disabled");

    w.update(READABLE);
    ev.run_once(Some(Duration::from_secs(2)), &mut ()).unwrap();
    assert_eq!(w.rec.calls(), 1, "not delivered on the next iteration");
    assert_eq!(bytes.load(SeqCst), 3);
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// C6: two watches on one fd with different events; each gets only its own bits, and
/// removing one leaves the other working.
#[test]
fn same_fd_readable_and_writable_watches_get_only_their_bits() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let r = RawWatch::recorded(fd_of(&ours), READABLE);
    let w = RawWatch::recorded(fd_of(&ours), WRITABLE);
    for i in 1..=2 {
        ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
        assert_eq!((r.rec.calls(), w.rec.calls()), (i, i), "iteration {i}");
    }
    assert!(
        r.rec.events().iter().all(|&e| e == READABLE),
        "{:?}",
        r.rec.events()
    );
    assert!(
        w.rec.events().iter().all(|&e| e == WRITABLE),
        "{:?}",
        w.rec.events()
    );

    assert_eq!(w.remove(), 0);
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    assert_eq!(
        (r.rec.calls(), w.rec.calls()),
        (3, 2),
        "after removing the writer"
    );
    assert_eq!(r.remove(), 0);
    assert_drains(&mut ev);
}

/// C6 (libvirt's eventtest "Write duplicate"): the same pipe watched twice, once with
/// events 0: only the enabled watch fires, with its own id and fd.
#[test]
fn same_pipe_twice_one_with_events_zero_only_enabled_fires() {
    let mut ev = setup();
    let me = thread::current().id();
    let (r, mut w_end) = raw::pipe();
    let pipe = Arc::new(r);
    let disabled = RawWatch::recorded(fd_of(&*pipe), 0);
    let enabled = {
        let pipe = pipe.clone();
        RawWatch::add(fd_of(&*pipe), READABLE, move |_, fd, events| {
            assert_eq!(fd, pipe.as_raw_fd());
            assert_eq!(events, READABLE);
            assert_eq!(read_one(&*pipe), Some(1));
        })
    };
    w_end.write_all(b"1").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || enabled.rec.calls() >= 1));
    run_iterations(&mut ev, 3, Duration::from_millis(20));
    assert_eq!(enabled.rec.calls(), 1);
    assert_eq!(disabled.rec.calls(), 0, "the disabled duplicate fired");
    assert_calls_were(&enabled.rec, enabled.id, me, "enabled watch");
    assert_eq!(disabled.remove(), 0);
    assert_eq!(enabled.remove(), 0);
    assert_drains(&mut ev);
}

/// C8: an fd closed by its owner while still watched neither breaks nor spins the
/// loop; other watches keep working; removing the stale watch afterwards returns 0;
/// the fd number, reused, can be watched again.
#[test]
fn fd_closed_before_its_watch_is_removed_neither_breaks_nor_spins() {
    let mut ev = setup();
    let (a, mut a_peer) = socketpair();
    let (b, mut b_peer) = socketpair();
    let a_fd = fd_of(&a);
    let stale = RawWatch::recorded(a_fd, READABLE); // never reads: stays ready
    let (other, b_bytes) = counting_watch(b, read_everything);
    a_peer.write_all(b"x").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || stale.rec.calls() >= 2));

    drop(a); // closed under the watch, with data pending and the fd re-armed
    let calls_at_close = stale.rec.calls();
    b_peer.write_all(b"yz").unwrap();
    assert!(
        run_until(&mut ev, PROMPTLY, || b_bytes.load(SeqCst) == 2),
        "other watch"
    );
    for _ in 0..2 {
        assert_iteration_blocks(&mut ev, Duration::from_millis(200), "closed fd");
    }
    let extra = stale.rec.calls() - calls_at_close;
    // poll(2) would report POLLNVAL (ERROR) at most; nothing may repeat forever.
    assert!(extra <= 1, "{extra} callbacks for a closed fd");
    if extra == 1 {
        let last = *stale.rec.events().last().unwrap();
        assert!(
            last & ERROR != 0,
            "callback for a closed fd with events {last:#x}"
        );
    }
    assert_eq!(stale.remove(), 0, "removing the watch of a closed fd");
    assert!(run_until(&mut ev, PROMPTLY, || stale.rec.frees() == 1));

    // The number is free again; a new socket probably gets it. It must work.
    let (c, mut c_peer) = socketpair();
    let fresh = RawWatch::recorded(fd_of(&c), READABLE);
    c_peer.write_all(b"!").unwrap();
    assert!(
        run_until(&mut ev, PROMPTLY, || fresh.rec.calls() >= 1),
        "new watch"
    );
    assert_eq!(
        stale.rec.calls() - calls_at_close,
        extra,
        "removed watch called"
    );
    b_peer.write_all(b"w").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || b_bytes.load(SeqCst) == 3));
    assert_eq!(fresh.remove(), 0); // it never reads: it would keep the loop busy

    // A callback that closes its own fd (without removing its watch) during dispatch.
    let (d, mut d_peer) = socketpair();
    let d_fd = fd_of(&d);
    let mut d = Some(d);
    let closer = RawWatch::add(d_fd, READABLE, move |_, _, _| drop(d.take()));
    d_peer.write_all(b"x").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || closer.rec.calls() >= 1));
    assert_iteration_blocks(
        &mut ev,
        Duration::from_millis(200),
        "fd closed in its callback",
    );
    assert!(
        closer.rec.calls() <= 2,
        "{} callbacks for a closed fd",
        closer.rec.calls()
    );
    b_peer.write_all(b"v").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || b_bytes.load(SeqCst) == 4));
    assert_eq!(closer.remove(), 0);
    assert_eq!(other.remove(), 0);
    assert_drains(&mut ev);
    for rec in [&stale.rec, &other.rec, &fresh.rec, &closer.rec] {
        rec.assert_clean("watch");
        assert_eq!(rec.frees(), 1);
    }
    drop(c);
}

// ---------------------------------------------------------------------------------
// D. Timers
// ---------------------------------------------------------------------------------

/// D1: frequency -1 is off: the timer never fires, and does not wake the loop.
#[test]
fn timer_minus_one_never_fires() {
    let mut ev = setup();
    let t = RawTimer::recorded(-1);
    assert_iteration_blocks(&mut ev, Duration::from_millis(200), "a disabled timer");
    run_for(&mut ev, Duration::from_millis(300));
    assert_eq!(t.rec.calls(), 0, "a -1 timer fired");
    let stats = ev.stats();
    assert_eq!((stats.timers, stats.armed_timers), (1, 0), "{stats:?}");
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
}

/// D1: frequency 0 fires on every iteration, exactly once per iteration, without
/// making the loop wait for the poll timeout.
#[test]
fn timer_zero_fires_exactly_once_per_iteration() {
    let mut ev = setup();
    let t = RawTimer::recorded(0);
    let start = Instant::now();
    for i in 1..=100 {
        ev.run_once(Some(Duration::from_secs(2)), &mut ()).unwrap();
        assert_eq!(t.rec.calls(), i, "fires after {i} iterations");
    }
    // A due 0 ms timer makes the poll return at once: 100 iterations that waited
    // for their 2 s timeout would take 200 s; allow 1% of that for a loaded machine.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
}

/// Runs the loop for 1 s with a 50 ms timer and checks its firings: at least a quarter
/// of the ideal count (a loaded machine), never more than the window allows, none
/// earlier than 50 ms after the add or the previous firing.
fn check_50ms_timer_for_a_second(ev: &mut Reactor, what: &str) {
    let added = Instant::now();
    let t = RawTimer::recorded(50);
    while added.elapsed() < Duration::from_secs(1) {
        ev.run_once(None, &mut ()).unwrap(); // sleeps until the next timer is due
    }
    let window = added.elapsed();
    let fires: Vec<Instant> = t.rec.history().iter().map(|c| c.at).collect();
    let most = (window.as_millis() / 50) as usize;
    assert!(
        (5..=most).contains(&fires.len()),
        "{what}: {} firings of a 50 ms timer in {window:?}",
        fires.len()
    );
    assert!(
        fires[0] - added >= Duration::from_millis(50),
        "{what}: fired early"
    );
    for pair in fires.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(50),
            "{what}: fired {gap:?} after the previous firing"
        );
    }
    assert_eq!(t.remove(), 0);
}

/// D1: frequency N fires every N ms, measured from the previous firing, never early:
/// when the loop sleeps until the deadline, and when a 0 ms timer keeps it iterating
/// (so an early deadline check would show).
#[test]
fn timer_n_ms_fires_periodically_and_never_early() {
    let mut ev = setup();
    check_50ms_timer_for_a_second(&mut ev, "idle loop");
    let busy = RawTimer::recorded(0);
    check_50ms_timer_for_a_second(&mut ev, "busy loop");
    assert!(busy.rec.calls() > 20, "the loop was not busy");
    assert_eq!(busy.remove(), 0);
    assert_drains(&mut ev);
}

/// D2: an update re-arms the timer from now: a 500 ms timer updated after 100 ms fires
/// 500 ms after the update, not at its original deadline; and an update to a shorter
/// period brings the deadline forward.
#[test]
fn timer_update_rearms_from_now() {
    let mut ev = setup();
    let t = RawTimer::recorded(500);
    let added = Instant::now();
    let fired_early = run_until(&mut ev, Duration::from_millis(100), || t.rec.calls() > 0);
    assert!(!fired_early, "a 500 ms timer fired within 100 ms");
    let updated = Instant::now();
    t.update(500);
    assert!(run_until(&mut ev, Duration::from_secs(5), || t.rec.calls() >= 1));
    let fired = t.rec.history()[0].at;
    assert!(
        fired - updated >= Duration::from_millis(500),
        "fired {:?} after the update ({:?} after the add): not re-armed from now",
        fired - updated,
        fired - added
    );

    let long = RawTimer::recorded(60_000);
    let shortened = Instant::now();
    long.update(50);
    assert!(
        run_until(&mut ev, PROMPTLY, || long.rec.calls() >= 1),
        "not brought forward"
    );
    assert!(long.rec.history()[0].at - shortened >= Duration::from_millis(50));
    assert_eq!(t.remove(), 0);
    assert_eq!(long.remove(), 0);
    assert_drains(&mut ev);
}

/// D1 (libvirt-glib a40a173; remote streams toggle their timer this way): a timer
/// switched -1 -> 0 fires once per iteration, and -1 again stops it.
#[test]
fn timer_toggles_between_minus_one_and_zero() {
    let mut ev = setup();
    let t = RawTimer::recorded(-1);
    run_iterations(&mut ev, 2, Duration::from_millis(50));
    assert_eq!(t.rec.calls(), 0);
    t.update(0);
    run_iterations(&mut ev, 5, Duration::from_secs(1));
    assert_eq!(t.rec.calls(), 5, "0 ms after -1");
    t.update(-1);
    assert_iteration_blocks(&mut ev, Duration::from_millis(100), "timer back at -1");
    assert_eq!(t.rec.calls(), 5, "fired after going back to -1");
    t.update(0);
    run_iterations(&mut ev, 2, Duration::from_secs(1));
    assert_eq!(t.rec.calls(), 7, "0 ms again");
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
}

/// D2, I2 (keepalive re-arms itself): a timer may update itself from its own callback,
/// to a new period (measured from then) and to -1.
#[test]
fn timer_updates_itself_from_its_callback() {
    let mut ev = setup();
    // Starts at 0 ms, then re-arms itself for 100 ms on every firing.
    let t = RawTimer::add(0, |id| update_timeout(id, 100));
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    assert_eq!(t.rec.calls(), 1);
    let t2 = RawTimer::add(0, |id| update_timeout(id, -1));
    assert!(run_until(&mut ev, PROMPTLY, || t.rec.calls() >= 2));
    let fires = t.rec.history();
    assert!(
        fires[1].at - fires[0].at >= Duration::from_millis(100),
        "self-update to 100 ms fired after {:?}",
        fires[1].at - fires[0].at
    );
    run_iterations(&mut ev, 5, Duration::from_millis(10));
    assert_eq!(
        t2.rec.calls(),
        1,
        "a timer that set itself to -1 fired again"
    );
    t2.update(0);
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(
        t2.rec.calls(),
        2,
        "re-enabled from outside: fires once, then -1 again"
    );
    assert_eq!(t.remove(), 0);
    assert_eq!(t2.remove(), 0);
    assert_drains(&mut ev);
}

/// D, F2 (eventtest "Deleted during dispatch", timers): a timer removes itself from its
/// own callback: 0, fired once, a second remove is -1, its free runs once, later.
#[test]
fn timer_removes_itself_from_its_callback() {
    let mut ev = setup();
    let results = Arc::new(Mutex::new(Vec::new()));
    let cell: Arc<Mutex<Option<Arc<Recorder>>>> = Arc::new(Mutex::new(None));
    let t = {
        let (results, cell) = (results.clone(), cell.clone());
        RawTimer::add(0, move |id| {
            let first = remove_timeout(id);
            let second = remove_timeout(id);
            let frees = cell.lock().unwrap().as_ref().map(|r| r.frees());
            results.lock().unwrap().push((first, second, frees));
        })
    };
    *cell.lock().unwrap() = Some(t.rec.clone());
    run_iterations(&mut ev, 5, Duration::from_millis(10));
    assert_eq!(t.rec.calls(), 1);
    assert_eq!(*results.lock().unwrap(), vec![(0, -1, Some(0))]);
    assert_eq!(t.rec.frees(), 1);
    t.rec.assert_clean("timer");
    assert_eq!(t.remove(), -1);
    assert_drains(&mut ev);
}

// ---------------------------------------------------------------------------------
// E. Free callbacks
// ---------------------------------------------------------------------------------

/// E1: every registration's free callback runs exactly once: removed before any
/// iteration or after some, enabled or disabled, watch or timer.
#[test]
fn free_runs_exactly_once_per_registration() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let fd = fd_of(&ours);
    let watches = [
        RawWatch::recorded(fd, READABLE),
        RawWatch::recorded(fd, WRITABLE),
        RawWatch::recorded(fd, 0),
        RawWatch::recorded(fd, READABLE | WRITABLE),
    ];
    let timers = [
        RawTimer::recorded(0),
        RawTimer::recorded(-1),
        RawTimer::recorded(5),
        RawTimer::recorded(60_000),
    ];
    assert_eq!(watches[0].remove(), 0);
    assert_eq!(timers[0].remove(), 0);
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    for w in &watches[1..] {
        assert_eq!(w.remove(), 0);
    }
    for t in &timers[1..] {
        assert_eq!(t.remove(), 0);
    }
    run_iterations(&mut ev, 5, Duration::from_millis(10));
    for (i, rec) in watches
        .iter()
        .map(|w| &w.rec)
        .chain(timers.iter().map(|t| &t.rec))
        .enumerate()
    {
        assert_eq!(rec.frees(), 1, "registration {i}: frees");
        rec.assert_clean(&format!("registration {i}"));
    }
    assert_drains(&mut ev);
}

/// Adds a READABLE watch on `fd` and a disabled timer, removes both and checks that
/// neither free callback ran inside its remove.
fn add_and_remove_a_watch_and_a_timer(fd: RawFd) -> (RawWatch, RawTimer) {
    let w = RawWatch::recorded(fd, READABLE);
    let t = RawTimer::recorded(-1);
    assert_eq!(w.remove(), 0);
    assert_eq!(t.remove(), 0);
    assert_eq!(
        (w.rec.frees(), t.rec.frees()),
        (0, 0),
        "free ran inside remove"
    );
    (w, t)
}

/// E1, E2: the free callback never runs inside the remove call (libvirt-glib f65794e:
/// that deadlocks libvirt), neither when removing between iterations nor from inside
/// a callback; it runs on the next iteration (after the current batch).
#[test]
fn free_never_runs_inside_remove_only_on_the_next_iteration() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();

    // Between iterations, on the loop thread.
    let (w, t) = add_and_remove_a_watch_and_a_timer(fd_of(&ours));
    assert_eq!(ev.stats().pending_frees, 2);
    ev.run_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert_eq!(
        (w.rec.frees(), t.rec.frees()),
        (1, 1),
        "free not run by the next iteration"
    );

    // From inside a callback: frees observed right after each remove, in the callback.
    let victim_w = RawWatch::recorded(fd_of(&ours), WRITABLE);
    let victim_t = RawTimer::recorded(60_000);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let remover = {
        let (vw, vt, seen) = (victim_w.clone(), victim_t.clone(), seen.clone());
        RawWatch::add(fd_of(&ours), READABLE, move |id, _, _| {
            let rcs = (vw.remove(), vt.remove(), remove_handle(id));
            seen.lock()
                .unwrap()
                .push((rcs, vw.rec.frees(), vt.rec.frees()));
        })
    };
    peer.write_all(b"x").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || remover.rec.calls() >= 1));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![((0, 0, 0), 0, 0)],
        "(rcs, frees) in the callback"
    );
    for rec in [&w.rec, &t.rec, &victim_w.rec, &victim_t.rec, &remover.rec] {
        assert_eq!(rec.frees(), 1);
        assert!(!rec.free_inside_remove(), "free callback ran inside remove");
        rec.assert_clean("registration");
    }
    assert_drains(&mut ev);
}

/// E3, G4: free callbacks run on the loop thread, also for registrations that another
/// thread added and removed; nothing runs on the remover's thread.
#[test]
fn free_runs_on_the_loop_thread_when_removed_from_another_thread() {
    let mut ev = setup();
    let loop_thread = thread::current().id();
    let (ours, _peer) = socketpair();
    let fd = fd_of(&ours);
    let (w, t, remover) = thread::spawn(move || {
        let (w, t) = add_and_remove_a_watch_and_a_timer(fd);
        (w, t, thread::current().id())
    })
    .join()
    .unwrap();
    assert_eq!(
        (w.rec.frees(), t.rec.frees()),
        (0, 0),
        "free ran off the loop"
    );
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    for rec in [&w.rec, &t.rec] {
        assert_eq!(rec.frees(), 1);
        assert_eq!(
            rec.free_thread(),
            Some(loop_thread),
            "free ran off the loop thread"
        );
        assert_ne!(rec.free_thread(), Some(remover));
    }
    assert_drains(&mut ev);
}

/// E3: free callbacks run promptly even while a 0 ms timer keeps the loop busy (a
/// loop that ran frees only when idle would never run them): within the iteration
/// of the removal or the next one.
#[test]
fn free_runs_promptly_while_a_zero_timer_keeps_the_loop_busy() {
    let mut ev = setup();
    let busy = RawTimer::recorded(0);
    let (ours, _peer) = socketpair();
    let fd = fd_of(&ours);
    let fires_at_free = Arc::new(AtomicUsize::new(usize::MAX));
    let (tx, rx) = mpsc::channel();
    let remover = {
        let (busy_rec, fires_at_free) = (busy.rec.clone(), fires_at_free.clone());
        thread::spawn(move || {
            let fires_at_free2 = fires_at_free.clone();
            let busy_rec2 = busy_rec.clone();
            let w = RawWatch::add_with_free(
                fd,
                READABLE,
                |_, _, _| {},
                move || fires_at_free2.store(busy_rec2.calls(), SeqCst),
            );
            while busy_rec.calls() < 20 {
                thread::yield_now(); // the loop is spinning
            }
            let rc = w.remove();
            tx.send((rc, busy_rec.calls())).unwrap();
            w
        })
    };
    assert!(run_until(
        &mut ev,
        Duration::from_secs(10),
        || fires_at_free.load(SeqCst) != usize::MAX
    ));
    let (rc, fires_at_remove) = rx.recv().unwrap();
    let w = remover.join().unwrap();
    assert_eq!(rc, 0);
    let at_free = fires_at_free.load(SeqCst);
    assert!(
        at_free <= fires_at_remove + 2,
        "free ran {} busy iterations after the remove",
        at_free - fires_at_remove
    );
    assert_eq!(w.rec.frees(), 1);
    assert_eq!(busy.remove(), 0);
    assert_drains(&mut ev);
}

/// E1, F1 (libvirt-glib 3e73e0c): a watch removed by another thread while its callback
/// runs keeps its opaque data until the callback returns: the free never overlaps the
/// in-flight callback and runs after it, on the loop thread.
#[test]
fn free_waits_for_an_in_flight_callback_removed_by_another_thread() {
    let mut ev = setup();
    let loop_thread = thread::current().id();
    let (ours, mut peer) = socketpair();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (removed_tx, removed_rx) = mpsc::channel::<(i32, usize, Instant)>();
    let removed_rx = Arc::new(Mutex::new(removed_rx));
    let cell = Arc::new(Mutex::new(None::<(i32, usize, Instant)>));
    let sock = Arc::new(ours);
    let w = {
        let (sock, cell, removed_rx) = (sock.clone(), cell.clone(), removed_rx.clone());
        let mut data = [0u8; 64]; // the opaque data a free would release
        RawWatch::add(fd_of(&*sock), READABLE, move |_, _, _| {
            entered_tx.send(()).unwrap();
            let removed = removed_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            *cell.lock().unwrap() = removed.ok();
            thread::sleep(Duration::from_millis(100)); // still in flight, removed
            data.fill(1);
            assert_eq!(read_all(&*sock), 1);
        })
    };
    let remover = {
        let (id, rec) = (w.id, w.rec.clone());
        thread::spawn(move || {
            entered_rx.recv().unwrap();
            let rc = remove_handle(id);
            removed_tx.send((rc, rec.frees(), Instant::now())).unwrap();
        })
    };
    peer.write_all(b"x").unwrap();
    assert!(run_until(&mut ev, Duration::from_secs(20), || w
        .rec
        .frees()
        == 1));
    remover.join().unwrap();
    let (rc, frees_after_remove, removed_at) = cell
        .lock()
        .unwrap()
        .expect("the remover did not report while the callback ran");
    assert_eq!(rc, 0);
    assert_eq!(
        frees_after_remove, 0,
        "free ran inside remove on the remover's thread"
    );
    assert_eq!(w.rec.calls(), 1);
    assert!(
        !w.rec.free_overlapped_callback(),
        "free ran during the callback"
    );
    let returned = w.rec.last_return().unwrap();
    assert!(
        removed_at < returned,
        "the remove did not happen while in flight"
    );
    assert!(
        w.rec.free_at().unwrap() >= returned,
        "free before the callback returned"
    );
    assert_eq!(w.rec.free_thread(), Some(loop_thread));
    w.rec.assert_clean("watch");
    assert_drains(&mut ev);
}

/// E1, F1 (eventtest "Deleted during dispatch", self): a callback that removes its own
/// watch keeps valid opaque data until it returns.
#[test]
fn free_waits_for_a_callback_that_removes_its_own_watch() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    let seen = Arc::new(Mutex::new(None));
    let cell: Arc<Mutex<Option<Arc<Recorder>>>> = Arc::new(Mutex::new(None));
    let w = {
        let (seen, cell) = (seen.clone(), cell.clone());
        let mut data = [0u8; 64];
        RawWatch::add(fd_of(&ours), READABLE, move |id, _, _| {
            let rc = remove_handle(id);
            thread::sleep(Duration::from_millis(50));
            data.fill(2); // still ours after removing ourselves
            let frees = cell.lock().unwrap().as_ref().map(|r| r.frees());
            *seen.lock().unwrap() = Some((rc, frees));
        })
    };
    *cell.lock().unwrap() = Some(w.rec.clone());
    peer.write_all(b"x").unwrap();
    assert!(run_until(&mut ev, PROMPTLY, || w.rec.frees() == 1));
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(
        *seen.lock().unwrap(),
        Some((0, Some(0))),
        "(rc, frees) inside the callback"
    );
    assert_eq!(w.rec.calls(), 1, "called again after removing itself");
    assert!(w.rec.free_at().unwrap() >= w.rec.last_return().unwrap());
    w.rec.assert_clean("watch");
    assert_drains(&mut ev);
}

/// E1, F1: the same for a timer removed by another thread while it fires.
#[test]
fn free_waits_for_an_in_flight_timer_removed_by_another_thread() {
    let mut ev = setup();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (removed_tx, removed_rx) = mpsc::channel::<i32>();
    let removed_rx = Arc::new(Mutex::new(removed_rx));
    let t = {
        let removed_rx = removed_rx.clone();
        let mut data = [0u8; 64];
        RawTimer::add(0, move |_| {
            entered_tx.send(()).unwrap();
            let rc = removed_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            assert_eq!(rc, Ok(0), "remove from the other thread");
            thread::sleep(Duration::from_millis(100));
            data.fill(3);
        })
    };
    let remover = {
        let id = t.id;
        thread::spawn(move || {
            entered_rx.recv().unwrap();
            removed_tx.send(remove_timeout(id)).unwrap();
        })
    };
    assert!(run_until(&mut ev, Duration::from_secs(20), || t
        .rec
        .frees()
        == 1));
    remover.join().unwrap();
    assert_eq!(t.rec.calls(), 1);
    assert!(
        !t.rec.free_overlapped_callback(),
        "free ran during the callback"
    );
    assert!(t.rec.free_at().unwrap() >= t.rec.last_return().unwrap());
    t.rec.assert_clean("timer");
    assert_drains(&mut ev);
}

/// E2 (libvirt-glib dd17c3c): free callbacks run with no lock of the implementation
/// held: a free callback may add, update and remove registrations.
#[test]
fn free_callback_may_call_back_into_the_event_api() {
    let mut ev = setup();
    let (ours, _peer) = socketpair();
    let other = RawWatch::recorded(fd_of(&ours), READABLE);
    let added: Arc<Mutex<Option<RawTimer>>> = Arc::new(Mutex::new(None));
    let w = {
        let (other, added) = (other.clone(), added.clone());
        RawWatch::add_with_free(
            fd_of(&ours),
            WRITABLE,
            |_, _, _| {},
            move || {
                let t = RawTimer::recorded(-1);
                t.update(0);
                assert_eq!(other.remove(), 0);
                *added.lock().unwrap() = Some(t);
            },
        )
    };
    assert_eq!(w.remove(), 0);
    assert!(
        run_until(&mut ev, PROMPTLY, || other.rec.frees() == 1),
        "chained free"
    );
    let t = added.lock().unwrap().clone().expect("free callback ran");
    assert!(t.id > 0);
    assert!(
        run_until(&mut ev, PROMPTLY, || t.rec.calls() >= 1),
        "timer added by a free"
    );
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
    for rec in [&w.rec, &other.rec, &t.rec] {
        assert_eq!(rec.frees(), 1);
        rec.assert_clean("registration");
    }
}

// ---------------------------------------------------------------------------------
// F. Re-entrancy
// ---------------------------------------------------------------------------------

/// F1, F3: callbacks add, update and remove other watches and timers, and themselves;
/// every change takes effect (additions in a later iteration at the latest).
#[test]
fn callbacks_add_update_and_remove_other_registrations_and_themselves() {
    let mut ev = setup();
    let me = thread::current().id();
    let (s1, mut s1_peer) = socketpair(); // for a watch added by a callback
    let (s2, mut s2_peer) = socketpair(); // watch enabled by a callback
    let (s3, mut s3_peer) = socketpair(); // watch removed by a callback
    let (s4, mut s4_peer) = socketpair(); // the handle callback's own fd
    for peer in [&mut s1_peer, &mut s2_peer, &mut s4_peer] {
        peer.write_all(b"x").unwrap();
    }
    let w_on = RawWatch::recorded(fd_of(&s2), 0);
    let t_on = RawTimer::recorded(-1);
    let w_rm = RawWatch::recorded(fd_of(&s3), READABLE);
    let added_watch: Arc<Mutex<Option<RawWatch>>> = Arc::new(Mutex::new(None));
    let rcs = Arc::new(Mutex::new(Vec::new()));

    // A timer callback: add a watch, enable a watch and a timer, remove a watch and
    // itself.
    let t_ctl = {
        let (w_on, t_on, w_rm) = (w_on.clone(), t_on.clone(), w_rm.clone());
        let (added_watch, rcs) = (added_watch.clone(), rcs.clone());
        let s1_fd = fd_of(&s1);
        RawTimer::add(0, move |id| {
            *added_watch.lock().unwrap() = Some(RawWatch::recorded(s1_fd, READABLE));
            w_on.update(READABLE);
            t_on.update(0);
            rcs.lock()
                .unwrap()
                .push(("timer removes a watch", w_rm.remove()));
            rcs.lock()
                .unwrap()
                .push(("timer removes itself", remove_timeout(id)));
        })
    };
    assert!(run_until(&mut ev, PROMPTLY, || {
        let added = added_watch.lock().unwrap();
        added.as_ref().is_some_and(|w| w.rec.calls() >= 1)
            && w_on.rec.calls() >= 1
            && t_on.rec.calls() >= 1
    }));
    s3_peer.write_all(b"x").unwrap(); // a still-registered w_rm would fire now
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(t_ctl.rec.calls(), 1, "removed itself, fired again");
    assert_eq!(w_rm.rec.calls(), 0, "removed watch fired");
    assert_eq!((t_ctl.rec.frees(), w_rm.rec.frees()), (1, 1));

    // A handle callback: add a timer, remove another timer, disable itself.
    let added_timer: Arc<Mutex<Option<RawTimer>>> = Arc::new(Mutex::new(None));
    let h = {
        let (t_on, added_timer, rcs) = (t_on.clone(), added_timer.clone(), rcs.clone());
        RawWatch::add(fd_of(&s4), READABLE, move |id, _, _| {
            *added_timer.lock().unwrap() = Some(RawTimer::recorded(0));
            rcs.lock()
                .unwrap()
                .push(("handle removes a timer", t_on.remove()));
            update_handle(id, 0);
        })
    };
    assert!(run_until(&mut ev, PROMPTLY, || {
        let added = added_timer.lock().unwrap();
        added.as_ref().is_some_and(|t| t.rec.calls() >= 2)
    }));
    let t_on_calls = t_on.rec.calls();
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(
        h.rec.calls(),
        1,
        "disabled itself (data still pending), fired again"
    );
    assert_eq!(t_on.rec.calls(), t_on_calls, "removed timer fired");
    assert_eq!(t_on.rec.frees(), 1);
    assert!(
        rcs.lock().unwrap().iter().all(|&(_, rc)| rc == 0),
        "{:?}",
        rcs.lock().unwrap()
    );
    assert_eq!(rcs.lock().unwrap().len(), 3);

    let added_watch = added_watch.lock().unwrap().take().unwrap();
    let added_timer = added_timer.lock().unwrap().take().unwrap();
    for rc in [
        added_watch.remove(),
        added_timer.remove(),
        w_on.remove(),
        h.remove(),
    ] {
        assert_eq!(rc, 0);
    }
    assert_drains(&mut ev);
    for (rec, id) in [
        (&w_on.rec, w_on.id),
        (&t_on.rec, t_on.id),
        (&w_rm.rec, w_rm.id),
        (&t_ctl.rec, t_ctl.id),
        (&h.rec, h.id),
        (&added_watch.rec, added_watch.id),
        (&added_timer.rec, added_timer.id),
    ] {
        assert_eq!(rec.frees(), 1, "registration {id}");
        rec.assert_clean(&format!("registration {id}"));
        assert_calls_were(rec, id, me, &format!("registration {id}"));
    }
}

/// The two watches of [`one_iteration_with_mutual_victims`], the return codes of their
/// actions, and the peers (kept open: a hangup must not make a watch fire later).
type MutualVictims = (RawWatch, RawWatch, Arc<Mutex<Vec<i32>>>, [UnixStream; 2]);

/// Registers two ready watches whose callbacks each apply `action` (remove, disable)
/// to the other, and runs one iteration.
fn one_iteration_with_mutual_victims(ev: &mut Reactor, action: fn(i32) -> i32) -> MutualVictims {
    let (a, mut a_peer) = socketpair();
    let (b, mut b_peer) = socketpair();
    let victims = [id_cell(), id_cell()];
    let rcs = Arc::new(Mutex::new(Vec::new()));
    let make = |sock: UnixStream, victim: Arc<AtomicI32>| {
        let rcs = rcs.clone();
        let fd = fd_of(&sock);
        RawWatch::add(fd, READABLE, move |_, _, _| {
            let _keep_open = &sock;
            let v = victim.swap(0, SeqCst);
            if v > 0 {
                rcs.lock().unwrap().push(action(v));
            }
        })
    };
    let wa = make(a, victims[0].clone());
    let wb = make(b, victims[1].clone());
    victims[0].store(wb.id, SeqCst);
    victims[1].store(wa.id, SeqCst);
    a_peer.write_all(b"x").unwrap();
    b_peer.write_all(b"x").unwrap();
    // Both fds are ready before the poll: one batch holds both.
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    (wa, wb, rcs, [a_peer, b_peer])
}

/// F2 (eventtest "Deleted during dispatch"): a watch removed by an earlier callback
/// of the same batch is not dispatched, though its fd was ready, and never again; its
/// free runs once.
#[test]
fn watch_removed_by_an_earlier_callback_of_the_batch_is_not_dispatched() {
    let mut ev = setup();
    let (wa, wb, rcs, _peers) = one_iteration_with_mutual_victims(&mut ev, remove_handle);
    let (ca, cb) = (wa.rec.calls(), wb.rec.calls());
    assert_eq!(ca + cb, 1, "both called in the batch (a: {ca}, b: {cb})");
    assert_eq!(*rcs.lock().unwrap(), vec![0]);
    let (survivor, removed) = if ca == 1 { (wa, wb) } else { (wb, wa) };
    assert_eq!(removed.rec.frees(), 1, "the removed watch's free");
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(
        removed.rec.calls(),
        0,
        "removed watch (data pending) fired later"
    );
    assert!(
        survivor.rec.calls() >= 2,
        "the survivor is still level-triggered"
    );
    assert_eq!(survivor.remove(), 0);
    assert_eq!(removed.remove(), -1);
    assert_drains(&mut ev);
}

/// F2, C4: a watch disabled by an earlier callback of the same batch is not
/// dispatched; re-enabled, it fires.
#[test]
fn watch_disabled_by_an_earlier_callback_of_the_batch_is_not_dispatched() {
    let mut ev = setup();
    let disable = |id| {
        update_handle(id, 0);
        0
    };
    let (wa, wb, _, _peers) = one_iteration_with_mutual_victims(&mut ev, disable);
    let (ca, cb) = (wa.rec.calls(), wb.rec.calls());
    assert_eq!(ca + cb, 1, "both called in the batch (a: {ca}, b: {cb})");
    let disabled = if ca == 1 { &wb } else { &wa };
    run_iterations(&mut ev, 2, Duration::from_millis(10));
    assert_eq!(disabled.rec.calls(), 0, "disabled watch fired");
    disabled.update(READABLE);
    assert!(
        run_until(&mut ev, PROMPTLY, || disabled.rec.calls() >= 1),
        "re-enabled"
    );
    assert_eq!(wa.remove(), 0);
    assert_eq!(wb.remove(), 0);
    assert_drains(&mut ev);
}

/// F2 for timers (eventtest "Deleted during dispatch", timers): two due timers each
/// remove the other; only the first fires.
#[test]
fn timer_removed_by_an_earlier_timer_of_the_batch_does_not_fire() {
    let mut ev = setup();
    let victims = [id_cell(), id_cell()];
    let make = |victim: Arc<AtomicI32>| {
        RawTimer::add(0, move |_| {
            let v = victim.swap(0, SeqCst);
            if v > 0 {
                assert_eq!(remove_timeout(v), 0);
            }
        })
    };
    let ta = make(victims[0].clone());
    let tb = make(victims[1].clone());
    victims[0].store(tb.id, SeqCst);
    victims[1].store(ta.id, SeqCst);
    ev.run_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
    let (ca, cb) = (ta.rec.calls(), tb.rec.calls());
    assert_eq!(ca + cb, 1, "both fired (a: {ca}, b: {cb})");
    let (survivor, removed) = if ca == 1 { (ta, tb) } else { (tb, ta) };
    run_iterations(&mut ev, 3, Duration::from_millis(10));
    assert_eq!(removed.rec.calls(), 0);
    assert_eq!(removed.rec.frees(), 1);
    assert_eq!(survivor.rec.calls(), 4);
    assert_eq!(survivor.remove(), 0);
    assert_drains(&mut ev);
}

// ---------------------------------------------------------------------------------
// G. Threads
// ---------------------------------------------------------------------------------

/// Runs `change` on another thread once the loop (this thread) has had time to fall
/// asleep in `run_once(Some(10 s))`, then runs iterations of up to 10 s until `done`
/// holds. Returns the time from the change to `done`.
///
/// The 100 ms head start only makes it likely that the change lands while the loop
/// sleeps in the poll (the case under test); landing earlier is just as correct.
fn change_while_sleeping(
    ev: &mut Reactor,
    change: impl FnOnce() + Send + 'static,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let changed_at = Arc::new(Mutex::new(None::<Instant>));
    let changer = {
        let changed_at = changed_at.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            change();
            *changed_at.lock().unwrap() = Some(Instant::now());
        })
    };
    let start = Instant::now();
    for _ in 0..3 {
        ev.run_once(Some(Duration::from_secs(10)), &mut ()).unwrap();
        if done() {
            break;
        }
    }
    let finished = Instant::now();
    changer.join().unwrap();
    assert!(done(), "the change from another thread did not take effect");
    assert!(
        finished - start < Duration::from_secs(5),
        "the loop slept through the change ({:?})",
        finished - start
    );
    let changed_at = changed_at.lock().unwrap().expect("changed");
    finished.saturating_duration_since(changed_at)
}

/// G1, G2 (eventtest "Interrupted during poll"): removing a watch from another thread
/// wakes a loop sleeping in a 10 s poll, and its free runs in that iteration, on the
/// loop thread.
#[test]
fn remove_from_another_thread_wakes_a_sleeping_loop() {
    let mut ev = setup();
    let (ours, _peer) = socketpair();
    let w = RawWatch::recorded(fd_of(&ours), READABLE);
    let rec = w.rec.clone();
    let rc = Arc::new(AtomicI32::new(1));
    let lag = {
        let rc = rc.clone();
        change_while_sleeping(
            &mut ev,
            move || rc.store(w.remove(), SeqCst),
            || rec.frees() == 1,
        )
    };
    assert_eq!(rc.load(SeqCst), 0);
    assert!(lag < PROMPTLY, "free ran {lag:?} after the remove");
    assert_eq!(rec.free_thread(), Some(thread::current().id()));
    assert_eq!(rec.calls(), 0);
    assert_drains(&mut ev);
}

/// Runs `add` on another thread while the loop sleeps (see
/// [`change_while_sleeping`]); returns what it added once that fired, and the time
/// from the add to the firing.
fn added_from_another_thread<R: Registration>(
    ev: &mut Reactor,
    add: impl FnOnce() -> R + Send + 'static,
) -> (R, Duration) {
    let slot: Arc<Mutex<Option<R>>> = Arc::new(Mutex::new(None));
    let lag = {
        let slot2 = slot.clone();
        change_while_sleeping(
            ev,
            move || *slot2.lock().unwrap() = Some(add()),
            || {
                slot.lock()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|r| r.rec().calls() >= 1)
            },
        )
    };
    let added = slot.lock().unwrap().take().unwrap();
    (added, lag)
}

/// Re-enables `reg` (`update(on)`) from another thread while the loop sleeps; returns
/// the time from the update to its next call.
fn enabled_from_another_thread<R: Registration>(ev: &mut Reactor, reg: &R, on: i32) -> Duration {
    let calls = reg.rec().calls();
    let (enable, rec) = (reg.clone(), reg.rec().clone());
    change_while_sleeping(ev, move || enable.update(on), || rec.calls() > calls)
}

/// G1, G2: a watch added from another thread on a ready fd fires while the loop
/// sleeps, and a disabled watch re-enabled from another thread (libvirt's RPC
/// pattern: updateHandle(w, 0) then (w, READABLE) from the caller's thread) too.
#[test]
fn watch_added_or_enabled_from_another_thread_fires_while_the_loop_sleeps() {
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let fd = fd_of(&ours);
    let (w, lag) = added_from_another_thread(&mut ev, move || RawWatch::recorded(fd, READABLE));
    assert!(lag < PROMPTLY, "added watch fired {lag:?} after the add");
    w.update(0);
    ev.run_once(Some(Duration::ZERO), &mut ()).unwrap();

    let lag = enabled_from_another_thread(&mut ev, &w, READABLE);
    assert!(
        lag < PROMPTLY,
        "re-enabled watch fired {lag:?} after the update"
    );
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// G1, G2: a timer added from another thread, or enabled from another thread (-1 ->
/// 0, as remote streams do), fires promptly although the loop sleeps in a 10 s poll.
#[test]
fn timer_added_or_enabled_from_another_thread_fires_promptly() {
    let mut ev = setup();
    let (t, lag) = added_from_another_thread(&mut ev, || RawTimer::recorded(20));
    assert!(lag < PROMPTLY, "timer fired {lag:?} after the add");
    t.update(-1);

    let lag = enabled_from_another_thread(&mut ev, &t, 0);
    assert!(lag < PROMPTLY, "timer fired {lag:?} after being enabled");
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
}

/// G1, G4, E1, B2: 10,000 add/update/remove cycles of watches and timers from a second
/// thread while the loop runs (on ready fds, so dispatch races with every change): no
/// crash, every free exactly once and on the loop thread, every callback on the loop
/// thread with its own id, and the loop ends idle.
#[test]
fn ten_thousand_add_update_remove_cycles_from_another_thread() {
    const CYCLES: usize = 10_000;
    let mut ev = setup();
    let loop_thread = thread::current().id();
    let (a, mut a_peer) = socketpair();
    let (b, mut b_peer) = socketpair();
    a_peer.write_all(b"ready").unwrap();
    b_peer.write_all(b"ready").unwrap();
    let fds = [fd_of(&a), fd_of(&b)];
    let done = Arc::new(AtomicBool::new(false));
    let worker = {
        let done = done.clone();
        thread::spawn(move || {
            let mut all = Vec::with_capacity(2 * CYCLES);
            let mut live = std::collections::VecDeque::new();
            for i in 0..CYCLES {
                let w = RawWatch::recorded(fds[i % 2], READABLE | WRITABLE);
                assert!(w.id > 0, "cycle {i}: add handle");
                w.update(READABLE);
                w.update(0);
                w.update(WRITABLE | READABLE);
                let t = RawTimer::recorded(0);
                assert!(t.id > 0, "cycle {i}: add timer");
                t.update(-1);
                t.update(0);
                if i % 3 == 0 {
                    t.update(1);
                }
                assert_eq!(t.remove(), 0, "cycle {i}: remove timer");
                live.push_back(w.clone());
                if live.len() > 4 {
                    assert_eq!(live.pop_front().unwrap().remove(), 0, "cycle {i}");
                }
                all.push((w.id, w.rec));
                all.push((t.id, t.rec));
            }
            for w in live {
                assert_eq!(w.remove(), 0);
            }
            done.store(true, SeqCst);
            all
        })
    };
    while !done.load(SeqCst) {
        ev.run_once(Some(Duration::from_millis(10)), &mut ())
            .unwrap();
    }
    let all = worker.join().unwrap();
    let report = ev.shutdown(Duration::from_secs(10), &mut ());
    assert!(report.is_ok(), "drain: {report:?}, {:?}", ev.stats());
    assert!(ev.stats().is_idle(), "{:?}", ev.stats());
    assert_eq!(all.len(), 2 * CYCLES);
    let mut calls = 0;
    for (id, rec) in &all {
        assert_eq!(rec.frees(), 1, "registration {id}: frees");
        assert_eq!(
            rec.free_thread(),
            Some(loop_thread),
            "registration {id}: free thread"
        );
        rec.assert_clean(&format!("registration {id}"));
        assert_calls_were(rec, *id, loop_thread, &format!("registration {id}"));
        calls += rec.calls();
    }
    eprintln!("{CYCLES} cycles: {calls} callbacks dispatched during the churn");
    drop((a, b));
}

/// G, D1: a 0 ms timer does not starve a pipe written every 10 ms: all 50 writes are
/// read while the timer keeps firing.
#[test]
fn zero_ms_timer_does_not_starve_a_pipe_written_every_10ms() {
    let mut ev = setup();
    let busy = RawTimer::recorded(0);
    let (r, mut w_end) = raw::pipe();
    let r = Arc::new(r);
    let bytes = counter();
    let fires_at_reads = Arc::new(Mutex::new(Vec::new()));
    let watch = {
        let (r, bytes, fires_at_reads, busy_rec) = (
            r.clone(),
            bytes.clone(),
            fires_at_reads.clone(),
            busy.rec.clone(),
        );
        RawWatch::add(fd_of(&*r), READABLE, move |_, _, _| {
            bytes.fetch_add(read_all(&*r), SeqCst);
            fires_at_reads.lock().unwrap().push(busy_rec.calls());
        })
    };
    let writer = thread::spawn(move || {
        for _ in 0..50 {
            w_end.write_all(b"w").unwrap();
            thread::sleep(Duration::from_millis(10));
        }
        w_end
    });
    assert!(
        run_until(&mut ev, Duration::from_secs(30), || bytes.load(SeqCst)
            == 50),
        "read {} of 50 bytes while a 0 ms timer fired {} times",
        bytes.load(SeqCst),
        busy.rec.calls()
    );
    let _w_end = writer.join().unwrap();
    let fires = fires_at_reads.lock().unwrap().clone();
    let during = fires.last().unwrap() - fires.first().unwrap();
    assert!(
        during >= 50,
        "the 0 ms timer fired only {during} times during the reads"
    );
    assert_eq!(watch.remove(), 0);
    assert_eq!(busy.remove(), 0);
    assert_drains(&mut ev);
    drop(r);
}

// ---------------------------------------------------------------------------------
// Driving the loop: run/stop, embedding in a mio::Poll, next_timeout
// ---------------------------------------------------------------------------------

/// `run()` returns after `handle().stop()` from another thread, even while it sleeps
/// with nothing scheduled (an infinite poll).
#[test]
fn run_returns_after_stop_from_another_thread() {
    let mut ev = setup();
    let (running_tx, running_rx) = mpsc::channel::<()>();
    // Tells the other thread the loop runs, then switches itself off: from then on
    // the loop has nothing scheduled and sleeps without a timeout.
    let t = RawTimer::add(0, move |id| {
        running_tx.send(()).unwrap();
        update_timeout(id, -1);
    });
    let handle = ev.handle();
    let stopper = thread::spawn(move || {
        running_rx.recv().unwrap();
        thread::sleep(Duration::from_millis(100)); // let it fall asleep
        let stop_called = Instant::now(); // before stop: run may return at once
        handle.stop();
        stop_called
    });
    ev.run(&mut ()).expect("run");
    let returned = Instant::now();
    let stopped = stopper.join().unwrap();
    assert!(returned >= stopped, "run returned before stop");
    assert!(
        returned - stopped < PROMPTLY,
        "run returned {:?} after stop",
        returned - stopped
    );
    assert_eq!(t.rec.calls(), 1);
    assert_eq!(t.remove(), 0);
    assert_drains(&mut ev);
}

/// `run()` returns after `stop()` from inside a callback (a timer's, then a watch's),
/// at the end of that iteration; the stop does not stick to the next `run()`.
#[test]
fn run_returns_after_stop_from_inside_a_callback() {
    let mut ev = setup();
    let handle = ev.handle();
    let t = RawTimer::add(0, move |_| {});
    let stop_at_third = {
        let (handle, rec) = (handle.clone(), t.rec.clone());
        RawTimer::add(0, move |_| {
            if rec.calls() == 3 {
                handle.stop();
            }
        })
    };
    ev.run(&mut ()).expect("run");
    assert_eq!(stop_at_third.rec.calls(), 3, "run went on after stop");
    assert_eq!(stop_at_third.remove(), 0);
    assert_eq!(t.remove(), 0);

    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    let w = RawWatch::add(fd_of(&ours), READABLE, move |_, _, _| handle.stop());
    ev.run(&mut ()).expect("second run");
    assert_eq!(
        w.rec.calls(),
        1,
        "second run: stopped by the watch's first call"
    );
    assert_eq!(w.remove(), 0);
    assert_drains(&mut ev);
}

/// A `stop()` requested in the same iteration as a caught callback panic is consumed
/// with the `Err` that `run()` returns, so it cannot end the next `run()` early.
#[test]
fn stop_in_a_panicking_iteration_does_not_stop_the_next_run() {
    quiet_deliberate_panics();
    let mut ev = setup();
    let handle = ev.handle();
    let panicking = Timer::add(Some(Duration::ZERO), move |_| {
        handle.stop();
        panic!("deliberate panic in the stopping iteration");
    })
    .expect("Timer::add");
    assert!(
        matches!(ev.run(&mut ()), Err(Error::CallbackPanicked { .. })),
        "first run"
    );
    drop(panicking);

    let ticking = RawTimer::recorded(10);
    let handle = ev.handle();
    let stop_at = Instant::now() + Duration::from_millis(300);
    let stopper = thread::spawn(move || {
        thread::sleep(stop_at.saturating_duration_since(Instant::now()));
        handle.stop();
    });
    ev.run(&mut ()).expect("second run");
    let returned = Instant::now();
    stopper.join().unwrap();
    assert!(
        returned >= stop_at,
        "the second run() returned {:?} before its stop, after {} iterations",
        stop_at - returned,
        ticking.rec.calls()
    );
    assert_eq!(ticking.remove(), 0);
    assert_drains(&mut ev);
}

/// An embedder's own `mio::Poll` with the loop registered on it under `token`.
fn embed(ev: &mut Reactor, token: mio::Token) -> (mio::Poll, mio::Events) {
    let poll = mio::Poll::new().unwrap();
    poll.registry()
        .register(ev, token, mio::Interest::READABLE)
        .unwrap();
    (poll, mio::Events::with_capacity(16))
}

/// Embedding: the loop registered in the caller's own `mio::Poll` makes that poll
/// report its token when a watched socket becomes readable, and `dispatch()` runs the
/// callback. Level triggering survives the nesting: a callback reading one byte per
/// call is dispatched once per embedder iteration, with `next_timeout()` keeping the
/// outer poll from sleeping, until the data is gone; then the embedder may sleep.
#[test]
fn embedded_in_own_mio_poll_token_fires_and_dispatch_runs_callbacks() {
    const LOOP: mio::Token = mio::Token(7);
    let mut ev = setup();
    let (mut poll, mut events) = embed(&mut ev, LOOP);
    let (ours, mut peer) = socketpair();
    let (w, bytes) = counting_watch(ours, read_a_byte);

    // Nothing ready: the outer poll times out without the token.
    poll.poll(&mut events, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        events.iter().all(|e| e.token() != LOOP),
        "token with nothing ready"
    );

    peer.write_all(&[1; 10]).unwrap();
    poll.poll(&mut events, Some(Duration::from_secs(5)))
        .unwrap();
    assert!(
        events.iter().any(|e| e.token() == LOOP),
        "no token for new data"
    );
    for delivered in 1..=10 {
        let before = w.rec.calls();
        ev.dispatch(&mut ()).unwrap();
        assert_eq!(w.rec.calls(), before + 1, "dispatch {delivered}");
        assert_eq!(bytes.load(SeqCst), delivered);
        assert_eq!(
            ev.next_timeout(),
            Some(Duration::ZERO),
            "the embedder would sleep with {} bytes unread",
            10 - delivered
        );
        poll.poll(&mut events, ev.next_timeout()).unwrap();
    }
    // Drained: the next dispatch calls nothing, and then the embedder may sleep.
    ev.dispatch(&mut ()).unwrap();
    assert_eq!(w.rec.calls(), 10, "called with nothing to read");
    assert_eq!(ev.next_timeout(), None, "nothing is left to do");
    poll.poll(&mut events, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        events.iter().all(|e| e.token() != LOOP),
        "token with everything read"
    );
    assert_eq!(w.remove(), 0);
    ev.dispatch(&mut ()).unwrap(); // runs the free callback
    assert_eq!(w.rec.frees(), 1);
    poll.registry().deregister(&mut ev).unwrap();
    assert_drains(&mut ev);
}

/// Embedding, G2: with nothing scheduled, `next_timeout()` is `None` and the embedder
/// sleeps without a timeout; a timer added from another thread then wakes the outer
/// poll through the loop's token.
#[test]
fn embedded_outer_poll_is_woken_by_a_timer_added_from_another_thread() {
    const LOOP: mio::Token = mio::Token(3);
    let mut ev = setup();
    let (mut poll, mut events) = embed(&mut ev, LOOP);
    assert_eq!(ev.next_timeout(), None, "nothing is scheduled");
    let adder = thread::spawn(|| {
        thread::sleep(Duration::from_millis(100));
        (RawTimer::recorded(0), Instant::now())
    });
    let start = Instant::now();
    poll.poll(&mut events, Some(Duration::from_secs(10)))
        .unwrap();
    let woke = Instant::now();
    let (t, added) = adder.join().unwrap();
    assert!(
        events.iter().any(|e| e.token() == LOOP),
        "outer poll not woken"
    );
    assert!(
        woke - start < Duration::from_secs(5),
        "slept {:?}",
        woke - start
    );
    assert!(woke.saturating_duration_since(added) < PROMPTLY);
    ev.dispatch(&mut ()).unwrap();
    assert_eq!(t.rec.calls(), 1, "dispatch fires the new 0 ms timer");
    assert_eq!(t.remove(), 0);
    poll.registry().deregister(&mut ev).unwrap();
    assert_drains(&mut ev);
}

/// `next_timeout()` tells an embedder how long it may sleep: `None` with nothing
/// scheduled, at most the period of an armed timer, `Some(ZERO)` with a 0 ms timer or
/// a free callback waiting; and an embedder that dispatches after that timeout fires
/// the timer.
#[test]
fn next_timeout_reflects_armed_timers_and_zero_timers() {
    let mut ev = setup();
    assert_eq!(ev.next_timeout(), None);
    let off = RawTimer::recorded(-1);
    assert_eq!(ev.next_timeout(), None, "a -1 timer schedules nothing");

    let long = RawTimer::recorded(10_000);
    let next = ev.next_timeout().expect("a 10 s timer is armed");
    assert!(
        next <= Duration::from_secs(10) && next > Duration::ZERO,
        "{next:?}"
    );
    let slow = RawTimer::recorded(500);
    let next = ev.next_timeout().expect("a 500 ms timer is armed");
    assert!(next <= Duration::from_millis(500), "{next:?}");

    let zero = RawTimer::recorded(0);
    assert_eq!(ev.next_timeout(), Some(Duration::ZERO));
    assert_eq!(zero.remove(), 0);
    assert_eq!(
        ev.next_timeout(),
        Some(Duration::ZERO),
        "a free callback is pending"
    );
    ev.dispatch(&mut ()).unwrap();
    assert_eq!(zero.rec.frees(), 1);
    let next = ev.next_timeout().expect("the 500 ms timer");
    assert!(next <= Duration::from_millis(500), "{next:?}");

    // An embedder sleeping exactly next_timeout() then dispatching fires the timer.
    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(4);
    let start = Instant::now();
    while slow.rec.calls() == 0 && start.elapsed() < Duration::from_secs(5) {
        poll.poll(&mut events, ev.next_timeout()).unwrap();
        ev.dispatch(&mut ()).unwrap();
    }
    assert_eq!(slow.rec.calls(), 1);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(long.rec.calls(), 0);
    assert_eq!(slow.remove(), 0);
    assert_eq!(long.remove(), 0);
    assert_eq!(off.remove(), 0);
    assert_drains(&mut ev);
}

// ---------------------------------------------------------------------------------
// A4. Drain
// ---------------------------------------------------------------------------------

/// A4: `drain` runs the loop until libvirt removed everything and every free ran;
/// its report counts the removals made during the drain (from callbacks and from
/// another thread) and every free it ran, including those of earlier removals.
#[test]
fn drain_reports_removals_and_runs_all_frees() {
    let mut ev = setup();
    let (a, mut a_peer) = socketpair();
    let (b, _b_peer) = socketpair();
    a_peer.write_all(b"x").unwrap();

    let before = RawWatch::recorded(fd_of(&b), READABLE);
    assert_eq!(before.remove(), 0); // before the drain: only its free is counted
    let self_removing_watch = RawWatch::add(fd_of(&a), READABLE, |id, _, _| {
        assert_eq!(remove_handle(id), 0);
    });
    let (fired_tx, fired_rx) = mpsc::channel::<()>();
    let self_removing_timer = RawTimer::add(0, move |id| {
        assert_eq!(remove_timeout(id), 0);
        fired_tx.send(()).unwrap();
    });
    let other_thread_watch = RawWatch::recorded(fd_of(&b), READABLE);
    let other_thread_timer = RawTimer::recorded(-1);
    let remover = {
        let (w, t) = (other_thread_watch.clone(), other_thread_timer.clone());
        thread::spawn(move || {
            fired_rx.recv().unwrap(); // the drain is running
            (w.remove(), t.remove())
        })
    };
    let report = ev.shutdown(Duration::from_secs(5), &mut ()).expect("drain");
    assert_eq!(remover.join().unwrap(), (0, 0));
    assert_eq!(report.handles_removed, 2, "{report:?}");
    assert_eq!(report.timers_removed, 2, "{report:?}");
    assert_eq!(report.frees_run, 5, "{report:?}");
    assert!(report.iterations >= 1, "{report:?}");
    assert!(ev.stats().is_idle());
    for rec in [
        &before.rec,
        &self_removing_watch.rec,
        &self_removing_timer.rec,
        &other_thread_watch.rec,
        &other_thread_timer.rec,
    ] {
        assert_eq!(rec.frees(), 1);
        rec.assert_clean("registration");
    }
}

/// A4: with a registration left, `drain` gives up after its timeout with what is left.
#[test]
fn drain_with_a_registration_left_times_out_with_counts() {
    let mut ev = setup();
    let (ours, _peer) = socketpair();
    let w = RawWatch::recorded(fd_of(&ours), READABLE);
    let t = RawTimer::recorded(-1);
    let start = Instant::now();
    let result = ev.shutdown(Duration::from_millis(300), &mut ());
    let took = start.elapsed();
    match result {
        Err(Error::DrainTimedOut {
            handles,
            timers,
            pending_frees,
        }) => assert_eq!((handles, timers, pending_frees), (1, 1, 0)),
        other => panic!("drain with a watch and a timer left: {other:?}"),
    }
    assert!(took >= Duration::from_millis(250), "gave up after {took:?}");
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert_eq!(w.remove(), 0);
    assert_eq!(t.remove(), 0);
    let report = ev.shutdown(Duration::from_secs(5), &mut ()).expect("drain");
    assert_eq!(
        (
            report.handles_removed,
            report.timers_removed,
            report.frees_run
        ),
        (0, 0, 2),
        "{report:?}"
    );
}

// ---------------------------------------------------------------------------------
// F4. Panics in Rust closures (virt_reactor::Watch / Timer)
// ---------------------------------------------------------------------------------

/// F4 and the panic policy (`Reactor`'s `# Panics`): in one iteration a `Watch` or
/// `Timer` closure that panics on every call (its calls counted by `calls`) and
/// `other`, a raw registration of the same batch, are due. `run_once` reports
/// `CallbackPanicked` with `message`, the rest of the batch was still dispatched, and
/// the loop stays usable: `other` fires on, and the closure that panicked is never
/// called again.
///
/// Catches the old behaviour: the panicked closure stayed armed and was called again
/// on every later iteration (the old tests asserted that it was), so here it would
/// panic again: the next `run_once` would fail and `calls` would grow.
fn check_panicking_closure_is_disabled(
    ev: &mut Reactor,
    calls: &AtomicUsize,
    other: &Recorder,
    message: &str,
) {
    match ev.run_once(Some(Duration::from_secs(1)), &mut ()) {
        Err(Error::CallbackPanicked {
            origin,
            message: got,
        }) => {
            assert!(got.contains(message), "message {got:?}");
            assert!(!origin.is_empty());
        }
        result => panic!("run_once after a panicking closure: {result:?}"),
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(other.calls(), 1, "the rest of the batch was not dispatched");
    for i in 2..=4 {
        ev.run_once(Some(Duration::from_secs(1)), &mut ())
            .expect("the loop stays usable");
        assert_eq!(
            calls.load(SeqCst),
            1,
            "the closure that panicked was called again"
        );
        assert_eq!(other.calls(), i, "other registrations fire on");
    }
}

/// F4: a panicking `Watch` closure does not unwind into C: it is reported, the rest
/// of the batch is dispatched, the loop stays usable, and the closure is disabled
/// (its fd stays ready: a level-triggered watch would call it on every iteration).
#[test]
fn panicking_watch_closure_is_reported_and_never_called_again() {
    quiet_deliberate_panics();
    let mut ev = setup();
    let (ours, mut peer) = socketpair();
    let (other_sock, mut other_peer) = socketpair();
    let calls = counter();
    let watch = {
        let calls = calls.clone();
        Watch::add(
            fd_of(&ours),
            Interest::READABLE,
            move |_, _, readiness: Readiness| {
                assert!(readiness.is_readable());
                calls.fetch_add(1, SeqCst);
                panic!("deliberate watch panic");
            },
        )
        .expect("Watch::add")
    };
    let other = RawWatch::recorded(fd_of(&other_sock), READABLE);
    peer.write_all(b"x").unwrap();
    other_peer.write_all(b"y").unwrap();
    check_panicking_closure_is_disabled(&mut ev, &calls, &other.rec, "deliberate watch panic");
    drop(watch);
    assert_eq!(other.remove(), 0);
    assert_drains(&mut ev);
}

/// F4: the same for a panicking `Timer` closure (a 0 ms timer: due on every
/// iteration).
#[test]
fn panicking_timer_closure_is_reported_and_never_called_again() {
    quiet_deliberate_panics();
    let mut ev = setup();
    let calls = counter();
    let timer = {
        let calls = calls.clone();
        Timer::add(Some(Duration::ZERO), move |_| {
            calls.fetch_add(1, SeqCst);
            panic!("deliberate timer panic");
        })
        .expect("Timer::add")
    };
    let other = RawTimer::recorded(0);
    check_panicking_closure_is_disabled(&mut ev, &calls, &other.rec, "deliberate timer panic");
    drop(timer);
    assert_eq!(other.remove(), 0);
    assert_drains(&mut ev);
}

/// Embedding, D1: a periodic timer fires through the documented pattern (poll with
/// `next_timeout()`, then `dispatch()` after every poll) although it makes no fd
/// readable, and the outer loop sleeps between firings instead of spinning.
#[test]
fn embedded_timer_fires_when_dispatch_follows_every_poll() {
    const LOOP: mio::Token = mio::Token(5);
    let mut ev = setup();
    let (mut poll, mut events) = embed(&mut ev, LOOP);
    let timer = RawTimer::recorded(20);
    let mut polls = 0;
    let start = Instant::now();
    while timer.rec.calls() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {} of 5 firings in 10 s",
            timer.rec.calls()
        );
        poll.poll(&mut events, ev.next_timeout()).unwrap();
        ev.dispatch(&mut ()).unwrap();
        polls += 1;
    }
    // About one poll per firing; a spinning loop would poll thousands of times.
    assert!(polls <= 20, "{polls} polls for 5 firings of a 20 ms timer");
    assert_eq!(timer.remove(), 0);
    ev.dispatch(&mut ()).unwrap();
    poll.registry().deregister(&mut ev).unwrap();
    assert_drains(&mut ev);
}

/// J1: a child forked after registration shares the parent's epoll instance, so the
/// loop refuses to run there; the parent's loop is unaffected.
#[test]
fn loop_refuses_to_run_in_a_forked_child() {
    let mut ev = setup();
    let status = in_forked_child(|| match ev.run_once(Some(Duration::ZERO), &mut ()) {
        Err(Error::WrongProcess) => 0,
        _ => 1,
    });
    assert_eq!(status, 0, "the child's run_once was not refused");
    ev.run_once(Some(Duration::ZERO), &mut ())
        .expect("the parent's loop still runs");
    assert_drains(&mut ev);
}

/// A sub-millisecond period rounds up to libvirt's 1 ms, not down to its 0 ("every
/// iteration"): a 500 µs timer fires at most once per millisecond that passes,
/// however fast the loop turns.
#[test]
fn a_sub_millisecond_timer_rounds_up_instead_of_firing_every_iteration() {
    let mut ev = setup();
    let fired = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fired);
    let timer = Timer::add(Some(Duration::from_micros(500)), move |_| {
        counter.fetch_add(1, SeqCst);
    })
    .expect("add a timer");
    let started = Instant::now();
    let iterations = 2000;
    for _ in 0..iterations {
        ev.run_once(Some(Duration::ZERO), &mut ())
            .expect("run_once");
    }
    let elapsed_ms = started.elapsed().as_millis() as usize;
    let fired = fired.load(SeqCst);
    assert!(
        fired <= elapsed_ms + 1,
        "fired {fired} times in {elapsed_ms} ms ({iterations} iterations)"
    );
    drop(timer);
}
