//! A remote connection to a private libvirtd, driven by the loop: domain events
//! arrive, and keepalive holds an idle connection open only while the loop runs.
//!
//! Each test registers the loop itself, so run them one process each (cargo-nextest).

mod support;

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use support::daemon::{DaemonConfig, PrivateDaemon};
use support::loop_thread::{Delivered, LoopThread};
use virt::connect::Connect;
use virt_reactor::{CloseReason, KeepAlive, LifecycleKind, SubscriptionId};

/// How long one expected event may take; the first define also probes QEMU.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Daemon and client keepalive: a ping after 1 s of silence, dead after 2 unanswered,
/// so an unserved client is dropped after about 1 × (2 + 1) = 3 s.
const KEEPALIVE_INTERVAL: u32 = 1;
const KEEPALIVE_COUNT: u32 = 2;
/// How long the connection stays idle: several times the keepalive deadline.
const IDLE: Duration = Duration::from_secs(10);
/// How long the loop is paused in the negative control: twice the deadline.
const PAUSE: Duration = Duration::from_secs(6);
/// How long the close callback may take once the loop runs again.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn start_daemon(cfg: DaemonConfig) -> PrivateDaemon {
    PrivateDaemon::start_with(cfg).expect("start a private libvirtd")
}

fn keepalive_daemon() -> PrivateDaemon {
    start_daemon(DaemonConfig {
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_count: Some(KEEPALIVE_COUNT),
        // Longer than any test, so the daemon never leaves on its own.
        idle_timeout_secs: 300,
        ..DaemonConfig::default()
    })
}

fn connect(daemon: &PrivateDaemon) -> Connect {
    let uri = daemon.uri("qemu");
    virt_reactor::connect(&uri)
        .unwrap_or_else(|e| panic!("open {uri}: {e}\n{}", daemon.log_tail(30)))
}

/// Connects with client keepalive on too, and a close subscription reporting on a
/// channel.
fn connect_with_keepalive(
    daemon: &PrivateDaemon,
    event_loop: &LoopThread,
) -> (Connect, SubscriptionId, Receiver<CloseReason>) {
    let uri = daemon.uri("qemu");
    let keepalive = KeepAlive {
        interval: Duration::from_secs(KEEPALIVE_INTERVAL.into()),
        count: KEEPALIVE_COUNT,
    };
    let conn = virt_reactor::connect_with(&uri, Some(keepalive))
        .unwrap_or_else(|e| panic!("open {uri}: {e}\n{}", daemon.log_tail(30)));
    let (close_watch, closed) = event_loop.closes(&conn);
    (conn, close_watch, closed)
}

fn qemu_domain_xml(name: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>\
         <os><type arch='x86_64'>hvm</type></os></domain>"
    )
}

fn next_event(rx: &Receiver<Delivered>, daemon: &PrivateDaemon) -> Delivered {
    rx.recv_timeout(EVENT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "no lifecycle event within {EVENT_TIMEOUT:?}: {e}\n{}",
            daemon.log_tail(30)
        )
    })
}

#[test]
fn domain_events_arrive_over_a_remote_connection() {
    let daemon = start_daemon(DaemonConfig::default());
    let event_loop = LoopThread::start();
    let conn = connect(&daemon);
    let (subscription, rx) = event_loop.deliveries(&conn);

    let name = "remote-events";
    let dom = conn
        .define_domain_xml(&qemu_domain_xml(name))
        .unwrap_or_else(|e| panic!("define {name}: {e}\n{}", daemon.log_tail(30)));
    let (defined, thread) = next_event(&rx, &daemon);
    assert_eq!(
        (defined.domain.as_str(), defined.kind, defined.detail_name()),
        (name, LifecycleKind::Defined, Some("Added"))
    );
    assert_eq!(thread, event_loop.id(), "delivered by the loop thread");

    dom.undefine().expect("undefine the domain");
    let (undefined, thread) = next_event(&rx, &daemon);
    assert_eq!(
        (
            undefined.domain.as_str(),
            undefined.kind,
            undefined.detail_name()
        ),
        (name, LifecycleKind::Undefined, Some("Removed"))
    );
    assert_eq!(thread, event_loop.id(), "delivered by the loop thread");

    event_loop.unsubscribe(subscription);
    drop(dom);
    drop(conn);
    event_loop.finish();
}

#[test]
fn keepalive_holds_an_idle_connection_while_the_loop_runs() {
    let daemon = keepalive_daemon();
    let event_loop = LoopThread::start();
    let (conn, close_watch, closed) = connect_with_keepalive(&daemon, &event_loop);

    thread::sleep(IDLE);

    assert_eq!(
        closed.try_recv(),
        Err(TryRecvError::Empty),
        "the close callback fired during {IDLE:?} idle\n{}",
        daemon.log_tail(30)
    );
    assert!(
        conn.is_alive()
            .expect("ask whether the connection is alive"),
        "the connection died during {IDLE:?} idle"
    );
    // The daemon still serves us: it did not drop us behind the client's back.
    conn.num_of_domains()
        .unwrap_or_else(|e| panic!("an RPC after {IDLE:?} idle: {e}\n{}", daemon.log_tail(30)));

    event_loop.unsubscribe(close_watch);
    drop(conn);
    event_loop.finish();
}

#[test]
fn keepalive_drops_the_connection_while_the_loop_is_paused() {
    let daemon = keepalive_daemon();
    let event_loop = LoopThread::start();
    // The close subscription ends when it fires.
    let (conn, _, closed) = connect_with_keepalive(&daemon, &event_loop);
    // Some traffic through the loop first, so both sides' keepalive is armed.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        closed.try_recv(),
        Err(TryRecvError::Empty),
        "closed too early"
    );

    event_loop.pause();
    let paused_at = Instant::now();
    thread::sleep(PAUSE);
    assert_eq!(
        closed.try_recv(),
        Err(TryRecvError::Empty),
        "no close callback while the loop is paused: libvirt calls it from the loop"
    );
    event_loop.resume();
    let resumed_at = Instant::now();

    let reason = match closed.recv_timeout(CLOSE_TIMEOUT) {
        Ok(reason) => reason,
        Err(RecvTimeoutError::Timeout) => panic!(
            "no close callback within {CLOSE_TIMEOUT:?} of resuming after a {PAUSE:?} pause\n{}",
            daemon.log_tail(30)
        ),
        Err(RecvTimeoutError::Disconnected) => panic!("the close watch went away"),
    };
    eprintln!(
        "closed ({reason}) {:?} after resuming, {:?} after pausing",
        resumed_at.elapsed(),
        paused_at.elapsed()
    );
    assert!(
        matches!(reason, CloseReason::Keepalive | CloseReason::Eof),
        "closed for an unexpected reason: {reason:?}\n{}",
        daemon.log_tail(30)
    );
    assert!(
        !conn
            .is_alive()
            .expect("ask whether the connection is alive"),
        "the connection is still alive after its close callback"
    );
    let log = daemon.log_tail(200);
    assert!(
        log.contains("keepalive timeout"),
        "the daemon dropped us for keepalive:\n{log}"
    );

    drop(conn);
    event_loop.finish();
}
