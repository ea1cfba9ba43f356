//! The reactor's API promises that the issue-10 review found broken (issue 10): the
//! panic policy (`Reactor`'s `# Panics`: every callback runs under `catch_unwind`,
//! `run_once` reports the panic after finishing the iteration, and what panicked is
//! never called again) and a `StreamWriter` that must not deadlock on the loop thread
//! (defect 7). The `Watch`/`Timer` part of the panic policy is in
//! `tests/event_contract.rs` (`panicking_*_closure_is_reported_and_never_called_again`).
//!
//! Everything runs on `test:///default`, libvirt's in-process test driver: its
//! domain `test` runs from the start and emits lifecycle events, and its screenshot
//! is a local stream with data to read. libvirt's registration is per process, so
//! each test needs a process of its own: run with `cargo nextest run --test api`.

use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt_reactor::{
    handler_fn, Error, Flow, Interest, LifecycleEvent, Reactor, Stream, StreamEnd, StreamHandler,
    StreamToken, StreamWriter,
};

/// How long a test waits for what it drives the reactor towards.
const PATIENCE: Duration = Duration::from_secs(30);

/// Registers the reactor for state `S` and opens `test:///default`.
fn setup<S>() -> (Reactor<S>, Connect) {
    virt::error::clear_error_callback();
    let reactor = Reactor::<S>::register().expect("register (one test per process: nextest)");
    let conn = virt_reactor::connect("test:///default").expect("connect test:///default");
    (reactor, conn)
}

/// Runs iterations until `done(state)`, for at most [`PATIENCE`]; returns the errors
/// the iterations returned on the way.
fn run_until<S>(reactor: &mut Reactor<S>, state: &mut S, done: impl Fn(&S) -> bool) -> Vec<Error> {
    let deadline = Instant::now() + PATIENCE;
    let mut errors = Vec::new();
    while !done(state) {
        assert!(Instant::now() < deadline, "not done after {PATIENCE:?}");
        if let Err(e) = reactor.run_once(Some(Duration::from_millis(100)), state) {
            errors.push(e);
        }
    }
    errors
}

/// Asserts that `errors` is exactly one `CallbackPanicked` whose message has `what`.
fn assert_one_panic(errors: &[Error], what: &str) {
    match errors {
        [Error::CallbackPanicked { message, .. }] if message.contains(what) => {}
        _ => panic!("want one CallbackPanicked with {what:?}, got {errors:?}"),
    }
}

/// The test driver's screenshot of domain `test`: a local stream with data to read
/// (libvirt reads a PNG file into it) that never becomes writable.
fn screenshot(conn: &Connect) -> Stream {
    let dom = conn
        .lookup_domain_by_name("test")
        .expect("the test driver's domain");
    let mut stream = Stream::new(conn).expect("virStreamNew");
    stream
        .with_virt(|s| dom.screenshot(s, 0, 0))
        .expect("virDomainScreenshot");
    stream
}

/// Aborts remaining streams, unsubscribes and drains: nothing may be left behind.
fn shut_down<S>(mut reactor: Reactor<S>, conn: Connect, state: &mut S) {
    drop(conn);
    reactor
        .shutdown(Duration::from_secs(10), state)
        .expect("shutdown");
}

// ---------------------------------------------------------------------------------
// Defect 7: StreamWriter::write_all on the loop thread
// ---------------------------------------------------------------------------------

/// What the handler of `write_all_from_a_handler_with_a_full_queue_is_on_loop_thread`
/// gets: the writer of its own stream, and where to put what `write_all` returned.
#[derive(Default)]
struct WriteProbe {
    writer: Option<StreamWriter>,
    result: Option<virt_reactor::Result<()>>,
}

/// Defect 7: `write_all` from a stream handler (the loop thread) with the queue full
/// returns `OnLoopThread`: only the loop thread empties the queue, so waiting there
/// for room would wait forever. A one-byte queue on a stream that never becomes
/// writable (a screenshot, read-only) is full after the first byte.
///
/// Catches the old behaviour: `write_all` waited for room on the loop thread (only
/// documented as a deadlock), and this test hung until the watchdog below aborted it.
#[test]
fn write_all_from_a_handler_with_a_full_queue_is_on_loop_thread() {
    std::thread::spawn(|| {
        std::thread::sleep(PATIENCE * 2);
        eprintln!("write_all from a handler still waiting: deadlocked; aborting");
        std::process::abort();
    });
    let (mut reactor, conn) = setup::<WriteProbe>();
    let handler = handler_fn(
        |probe: &mut WriteProbe, _: &mut _, _| match probe.writer.take() {
            Some(writer) => {
                probe.result = Some(writer.write_all(b"more than one byte"));
                Flow::Abort
            }
            None => Flow::Continue,
        },
    );
    let token = reactor
        .insert(screenshot(&conn), Interest::READABLE, handler)
        .expect("insert");
    let mut probe = WriteProbe {
        writer: Some(reactor.writer(token, 1).expect("writer")),
        result: None,
    };
    let errors = run_until(&mut reactor, &mut probe, |p| p.result.is_some());
    assert!(errors.is_empty(), "{errors:?}");
    let result = probe.result.take();
    assert!(
        matches!(result, Some(Err(Error::OnLoopThread))),
        "write_all on the loop thread with a full queue: {result:?}"
    );
    shut_down(reactor, conn, &mut probe);
}

// ---------------------------------------------------------------------------------
// Panic policy
// ---------------------------------------------------------------------------------

/// Panic policy (a): a job from `ReactorHandle::execute` that panics is caught and
/// reported by `run_once`; the job queued after it in the same batch still runs, and
/// the reactor stays usable.
///
/// Catches the old behaviour: jobs ran outside `catch_unwind`, so the panic unwound
/// out of `run_once` (this test would die of it) and the rest of the batch was lost.
#[test]
fn panicking_execute_job_is_reported_and_the_next_job_still_runs() {
    let (mut reactor, conn) = setup::<Vec<&'static str>>();
    let handle = reactor.handle();
    handle
        .execute(|_, _| panic!("deliberate job panic"))
        .expect("execute");
    handle
        .execute(|_, ran: &mut Vec<&'static str>| ran.push("second job"))
        .expect("execute");
    let mut ran = Vec::new();
    let result = reactor.run_once(Some(Duration::ZERO), &mut ran);
    assert_one_panic(result.err().as_slice(), "deliberate job panic");
    assert_eq!(ran, ["second job"], "the job after the panicking one");

    handle
        .execute(|_, ran: &mut Vec<&'static str>| ran.push("later job"))
        .expect("execute");
    reactor
        .run_once(Some(Duration::ZERO), &mut ran)
        .expect("the reactor stays usable");
    assert_eq!(ran, ["second job", "later job"]);
    shut_down(reactor, conn, &mut ran);
}

/// The state of `a_panic_in_closed_does_not_drop_the_rest_of_the_inbox_batch`.
#[derive(Default)]
struct Ends {
    /// The iteration under way.
    iteration: u64,
    /// `ready` calls: (iteration, stream).
    ready: Vec<(u64, StreamToken)>,
    /// Set: every `ready` ends its stream.
    end: bool,
    /// `closed` calls: the iteration of each.
    closed: Vec<u64>,
}

impl Ends {
    /// Whether both streams were ready in the iteration just run.
    fn both_ready(&self) -> bool {
        let now = self.ready.iter().filter(|(i, _)| *i == self.iteration);
        now.count() == 2
    }
}

/// Never consumes its stream's data (so the stream stays ready on every iteration)
/// until told to end; the first `closed` of the two panics.
struct EndsTogether;

impl StreamHandler<Ends> for EndsTogether {
    fn ready(
        &mut self,
        ends: &mut Ends,
        cx: &mut virt_reactor::StreamCtx<'_>,
        _: virt_reactor::Readiness,
    ) -> Flow {
        ends.ready.push((ends.iteration, cx.token()));
        if ends.end {
            Flow::Abort
        } else {
            Flow::Continue
        }
    }

    fn closed(&mut self, ends: &mut Ends, _: StreamEnd) {
        ends.closed.push(ends.iteration);
        if ends.closed.len() == 1 {
            panic!("deliberate panic in closed");
        }
    }
}

/// Panic policy (b): two streams end in the same iteration (the same inbox batch);
/// the first handler's `closed` panics; the second's `closed` is still called in that
/// iteration, and `run_once` reports the panic.
///
/// Catches the old behaviour: `closed` ran outside `catch_unwind`, so its panic
/// unwound out of `run_once` and dropped the rest of the inbox batch: the second
/// stream's `closed` was never called.
#[test]
fn a_panic_in_closed_does_not_drop_the_rest_of_the_inbox_batch() {
    let (mut reactor, conn) = setup::<Ends>();
    for _ in 0..2 {
        reactor
            .insert(screenshot(&conn), Interest::READABLE, EndsTogether)
            .expect("insert");
    }
    let mut ends = Ends::default();
    // Level-triggered and never read: once both streams were ready in one iteration,
    // both are ready in every later one.
    let deadline = Instant::now() + PATIENCE;
    while !ends.both_ready() {
        assert!(
            Instant::now() < deadline,
            "both streams never ready at once"
        );
        ends.iteration += 1;
        reactor
            .run_once(Some(Duration::from_millis(100)), &mut ends)
            .expect("run_once");
    }
    ends.end = true;
    ends.iteration += 1;
    let result = reactor.run_once(Some(Duration::from_secs(1)), &mut ends);
    assert_one_panic(result.err().as_slice(), "deliberate panic in closed");
    assert_eq!(
        ends.closed,
        [ends.iteration, ends.iteration],
        "both streams end in this iteration, both handlers hear of it"
    );
    assert!(reactor.is_empty(), "{reactor:?}");
    shut_down(reactor, conn, &mut ends);
}

/// What the lifecycle handlers of `a_panicking_lifecycle_handler_is_disabled` saw.
#[derive(Default)]
struct Seen {
    /// Calls of the handler that panics.
    panicking: usize,
    /// Events the other handler got.
    events: Vec<LifecycleEvent>,
}

/// Panic policy (d): a lifecycle handler that panics is reported once and disabled;
/// a second subscription on the same connection gets every later event, the disabled
/// one none.
///
/// Catches the old behaviour: the lifecycle closure's panic was caught inside
/// libvirt's callback and the closure stayed registered, so it was called (and
/// panicked) again for every later event.
#[test]
fn a_panicking_lifecycle_handler_is_disabled() {
    let (mut reactor, conn) = setup::<Seen>();
    reactor
        .subscribe_lifecycle(&conn, |seen: &mut Seen, _: &LifecycleEvent| {
            seen.panicking += 1;
            panic!("deliberate lifecycle panic");
        })
        .expect("subscribe the panicking handler");
    reactor
        .subscribe_lifecycle(&conn, |seen: &mut Seen, event: &LifecycleEvent| {
            seen.events.push(event.clone());
        })
        .expect("subscribe the watching handler");
    let dom = conn
        .lookup_domain_by_name("test")
        .expect("the test driver's domain");
    let mut seen = Seen::default();

    dom.suspend().expect("suspend");
    let errors = run_until(&mut reactor, &mut seen, |s| !s.events.is_empty());
    assert_one_panic(&errors, "deliberate lifecycle panic");
    assert_eq!(seen.panicking, 1);

    dom.resume().expect("resume");
    dom.suspend().expect("suspend again");
    let errors = run_until(&mut reactor, &mut seen, |s| s.events.len() >= 3);
    assert!(
        errors.is_empty(),
        "a disabled handler panicked again: {errors:?}"
    );
    assert_eq!(seen.panicking, 1, "the disabled handler was called again");
    drop(dom);
    shut_down(reactor, conn, &mut seen);
}
