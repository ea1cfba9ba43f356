//! Registering the event loop with libvirt: what a failed or a racing registration
//! leaves behind (issue 10, defects 3 and 5).
//!
//! libvirt's registration is per process and permanent, so each test needs a process
//! of its own: run with `cargo nextest run --test registration` (nextest runs every
//! test in its own process).

use std::sync::{Arc, Barrier};
use std::thread;

use virt_reactor::{Error, Reactor, Result};

/// A way to register, named for the assertion message.
type Registration = (&'static str, fn() -> Result<Reactor>);

/// Names a registration result for an assertion message.
fn outcome(result: &Result<Reactor>) -> String {
    match result {
        Ok(_) => "registered".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

/// Defect 3: a failed registration leaves nothing installed. libvirt's own default
/// loop, registered directly (foreign to us), makes `register` fail with the real
/// cause, every time, and `connect` still refuses to open a connection.
///
/// Catches the old behaviour: the failed `register` left our singleton installed, so
/// the retry reported `AlreadyRegistered` instead of `ForeignImplRegistered`, and
/// `connect` no longer refused (it opened a connection whose events nothing of ours
/// would ever see).
#[test]
fn failed_registration_leaves_nothing_installed() {
    virt::error::clear_error_callback();
    virt::event::event_register_default_impl().expect("virEventRegisterDefaultImpl");

    // The first attempt may open what libvirt keeps for the process (its
    // initialisation); later ones must not add a single fd.
    let first = Reactor::<()>::register();
    let fds = open_fds();
    assert!(
        matches!(first, Err(Error::ForeignImplRegistered)),
        "register after libvirt's default loop: {}",
        outcome(&first)
    );
    let retry = Reactor::<()>::register();
    assert!(
        matches!(retry, Err(Error::ForeignImplRegistered)),
        "retry: {} (a failed registration left something installed)",
        outcome(&retry)
    );
    for _ in 0..10 {
        assert!(matches!(
            Reactor::<()>::register(),
            Err(Error::ForeignImplRegistered)
        ));
    }
    assert_eq!(
        open_fds(),
        fds,
        "failed registrations left file descriptors open (an epoll instance, a waker)"
    );
    let conn = virt_reactor::connect("test:///default");
    assert!(
        matches!(conn, Err(Error::NotRegistered)),
        "connect after failed registrations: {:?}",
        conn.as_ref().map(|_| "a connection")
    );
}

/// How many file descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Defect 5: threads register at the same moment, two our loop and two libvirt's
/// default loop: exactly one succeeds, every other gets `AlreadyRegistered`.
///
/// Catches the old behaviour: two locks (one in the event loop, one in the reactor's
/// driver) guarded the one fact "this process registered a loop", so racing threads
/// could each pass their check before any of them recorded its registration; then two
/// "succeeded" (libvirt keeps the first implementation and ignores later ones with a
/// warning), or ours failed with `ForeignImplRegistered` instead of
/// `AlreadyRegistered`. Registration is permanent, so there is one round per process;
/// the barrier makes the calls start together. (Against a copy of the registration
/// with the check and the record under separate lock holds, this one round failed in
/// 40 runs of 40; with one racer of each kind, in about every other run.)
#[test]
fn concurrent_registrations_exactly_one_succeeds() {
    virt::error::clear_error_callback();
    let registrations: [Registration; 4] = [
        ("ours", Reactor::<()>::register),
        ("default", Reactor::<()>::register_default_loop),
        ("ours", Reactor::<()>::register),
        ("default", Reactor::<()>::register_default_loop),
    ];
    let barrier = Arc::new(Barrier::new(registrations.len()));
    let racers: Vec<_> = registrations
        .into_iter()
        .map(|(name, register)| {
            let barrier = Arc::clone(&barrier);
            let racer = thread::spawn(move || {
                barrier.wait();
                // The reactor is dropped on this thread; the registration stays.
                register().map(drop)
            });
            (name, racer)
        })
        .collect();
    let results: Vec<(&str, Result<()>)> = racers
        .into_iter()
        .map(|(name, racer)| (name, racer.join().unwrap()))
        .collect();
    let succeeded = results.iter().filter(|(_, r)| r.is_ok()).count();
    let already = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(Error::AlreadyRegistered)))
        .count();
    assert_eq!((succeeded, already), (1, results.len() - 1), "{results:?}");
}
