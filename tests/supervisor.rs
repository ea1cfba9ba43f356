//! A supervised connection against a real daemon that is killed, restarted and
//! frozen: the loss is reported, attempts back off, the connection comes back with
//! its subscriptions, and the loop keeps running all the while.
//!
//! Each test registers the loop itself, so run them one process each (cargo-nextest).

mod support;

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use support::daemon::PrivateDaemon;
use virt_reactor::supervisor::{Backoff, ConnectionEvent, Supervisor, SupervisorOptions};
use virt_reactor::{CloseReason, KeepAlive, LifecycleEvent, LifecycleKind, Reactor};

/// The bound for reporting a lost connection.
const LOSS_DEADLINE: Duration = Duration::from_secs(2);
/// The bound for being connected again once the daemon is back.
const RETURN_DEADLINE: Duration = Duration::from_secs(5);
/// What the loop's handlers saw.
#[derive(Default)]
struct Seen {
    /// Lifecycle events, through the supervisor's subscription.
    events: Vec<LifecycleEvent>,
    /// Jobs posted through the reactor's handle that ran.
    jobs: u32,
}

struct Rig {
    reactor: Reactor<Seen>,
    seen: Seen,
    supervisor: Supervisor<Seen>,
    events: Receiver<ConnectionEvent>,
    /// Every connection event so far, in order.
    log: Vec<ConnectionEvent>,
    backoff: Backoff,
}

impl Rig {
    fn start(options: SupervisorOptions) -> Rig {
        let backoff = options.backoff;
        let mut reactor = Reactor::<Seen>::register().expect("register the loop");
        let (supervisor, events) = Supervisor::start(&mut reactor, options).expect("start");
        Rig {
            reactor,
            seen: Seen::default(),
            supervisor,
            events,
            log: Vec::new(),
            backoff,
        }
    }

    /// Runs the loop until an event matches `wanted`, failing after `timeout`.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&ConnectionEvent) -> bool,
    ) -> ConnectionEvent {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(event) = self.events.try_recv() {
                self.log.push(event.clone());
                if wanted(&event) {
                    return event;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {timeout:?}: {:?}",
                self.log
            );
            self.reactor
                .run_once(Some(left.min(Duration::from_millis(20))), &mut self.seen)
                .expect("loop iteration");
        }
    }

    /// Runs the loop until a lifecycle event for `domain` of `kind` arrived.
    fn wait_lifecycle(&mut self, domain: &str, kind: LifecycleKind) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .seen
            .events
            .iter()
            .any(|e| e.domain == domain && e.kind == kind)
        {
            assert!(
                Instant::now() < deadline,
                "no {kind:?} event for {domain}: {:?}",
                self.seen.events
            );
            self.reactor
                .run_once(Some(Duration::from_millis(20)), &mut self.seen)
                .expect("loop iteration");
        }
    }

    fn subscribe(&mut self) {
        self.supervisor
            .subscribe_lifecycle(&mut self.reactor, |seen: &mut Seen, event| {
                seen.events.push(event.clone());
            })
            .expect("subscribe");
    }

    /// Defines a test-driver domain named `name` on the current connection.
    fn define(&self, name: &str) {
        let conn = self.supervisor.connection().expect("connected");
        let xml = format!(
            "<domain type='test'><name>{name}</name><memory>65536</memory>\
             <os><type>hvm</type></os></domain>"
        );
        conn.define_domain_xml(&xml).expect("define a domain");
    }
}

fn connected(event: &ConnectionEvent) -> bool {
    matches!(event, ConnectionEvent::Connected { .. })
}

fn reconnected(event: &ConnectionEvent) -> bool {
    matches!(event, ConnectionEvent::Reconnected { .. })
}

fn lost(event: &ConnectionEvent) -> bool {
    matches!(event, ConnectionEvent::Lost { .. })
}

fn quick(uri: &str) -> SupervisorOptions {
    let mut options = SupervisorOptions::new(uri);
    options.backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_millis(800),
        jitter: 0.25,
    };
    options
}

#[test]
fn a_restarted_daemon_is_found_again_with_its_subscriptions() {
    let mut daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let mut rig = Rig::start(quick(&daemon.uri("test")));
    // Subscribed before the connection is announced: it is live by then.
    rig.subscribe();
    rig.wait("connection", Duration::from_secs(10), connected);
    rig.define("before");
    rig.wait_lifecycle("before", LifecycleKind::Defined);
    let first = rig.supervisor.connection().expect("connected");

    daemon.kill();
    let killed = Instant::now();
    let event = rig.wait("loss", LOSS_DEADLINE, lost);
    let lost_by = Instant::now();
    assert!(
        matches!(
            event,
            ConnectionEvent::Lost {
                reason: CloseReason::Eof | CloseReason::Error
            }
        ),
        "{event:?}"
    );
    assert!(rig.supervisor.connection().is_none());
    // Down long enough for several attempts, each waiting longer than the last.
    let down_until = killed + Duration::from_millis(2500);
    while Instant::now() < down_until {
        rig.reactor
            .run_once(Some(Duration::from_millis(20)), &mut rig.seen)
            .expect("loop iteration");
    }
    daemon.restart().expect("restart the daemon");
    let ConnectionEvent::Reconnected { attempts, down, .. } =
        rig.wait("reconnection", RETURN_DEADLINE, reconnected)
    else {
        unreachable!()
    };
    assert!(attempts >= 2, "{attempts} attempt(s): {:?}", rig.log);
    // Down from the loss (by `lost_by`) until at least the restart began (after
    // `down_until`); the supervisor may reconnect before `restart` returns.
    assert!(down >= down_until - lost_by, "down {down:?}");
    let delays: Vec<(u32, Duration)> = rig
        .log
        .iter()
        .filter_map(|e| match e {
            ConnectionEvent::Reconnecting { attempt, delay, .. } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect();
    let attempts: Vec<u32> = delays.iter().map(|(n, _)| *n).collect();
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>());
    for (n, delay) in &delays {
        let full = rig.backoff.delay(*n, 0.0);
        assert!(
            *delay <= full && *delay >= full.mul_f64(0.75),
            "attempt {n}: {delay:?} against {full:?}"
        );
    }

    // The same handler hears the new connection's events.
    let second = rig.supervisor.connection().expect("connected again");
    assert_eq!(first.is_alive().ok(), Some(false), "the lost connection");
    assert_eq!(second.is_alive().ok(), Some(true), "the new connection");
    rig.define("after");
    rig.wait_lifecycle("after", LifecycleKind::Defined);
    // The loop drains only once nothing holds a connection; events carry some.
    drop((first, second));
    rig.log.clear();
    rig.supervisor.stop(&mut rig.reactor);
    rig.reactor
        .shutdown(Duration::from_secs(5), &mut rig.seen)
        .expect("shutdown");
}

#[test]
fn a_frozen_daemon_is_caught_by_keepalive_while_the_loop_runs_on() {
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let mut options = quick(&daemon.uri("test"));
    options.keepalive = KeepAlive {
        interval: Duration::from_secs(1),
        count: 1,
    };
    options.connect_timeout = Duration::from_secs(1);
    let mut rig = Rig::start(options);
    rig.wait("connection", Duration::from_secs(10), connected);

    daemon.freeze();
    // About interval × (count + 1) = 2 s of silence, then the loss; libvirt
    // reports it as a keepalive timeout or as the socket error closing it causes.
    let frozen = Instant::now();
    let event = rig.wait("loss", Duration::from_secs(6), lost);
    assert!(
        matches!(
            event,
            ConnectionEvent::Lost {
                reason: CloseReason::Keepalive | CloseReason::Error
            }
        ),
        "{event:?}"
    );
    assert!(
        frozen.elapsed() >= Duration::from_secs(1),
        "lost before a keepalive interval passed: {event:?}"
    );
    // Attempts against the frozen daemon time out on their worker; meanwhile the
    // loop serves its jobs.
    let event = rig.wait("a timed-out attempt", Duration::from_secs(10), |e| {
        matches!(e, ConnectionEvent::Reconnecting { error: Some(_), .. })
    });
    assert!(format!("{event:?}").contains("timed out"), "{event:?}");
    let handle = rig.reactor.handle();
    let posted = Instant::now();
    handle
        .execute(|_, seen: &mut Seen| seen.jobs += 1)
        .expect("post a job");
    while rig.seen.jobs == 0 {
        assert!(
            posted.elapsed() < Duration::from_secs(1),
            "the loop did not run a job while reconnecting"
        );
        rig.reactor
            .run_once(Some(Duration::from_millis(20)), &mut rig.seen)
            .expect("loop iteration");
    }

    daemon.thaw();
    rig.wait("reconnection", RETURN_DEADLINE, reconnected);
    rig.supervisor.stop(&mut rig.reactor);
}

#[test]
fn a_wrong_uri_gives_up_at_once() {
    let mut rig = Rig::start(SupervisorOptions::new(
        "test+unix:///default?socket=/nonexistent/virt-reactor.sock",
    ));
    let event = rig.wait("the end", Duration::from_secs(10), |e| {
        !matches!(e, ConnectionEvent::Reconnecting { .. })
    });
    let ConnectionEvent::GaveUp { error } = event else {
        panic!("{event:?}")
    };
    assert!(error.to_string().contains("nonexistent"), "{error}");
    assert_eq!(rig.log.len(), 1, "{:?}", rig.log);
}

#[test]
fn attempts_stop_at_the_limit_and_after_stop() {
    let mut daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let mut options = quick(&daemon.uri("test"));
    options.max_attempts = Some(2);
    let mut rig = Rig::start(options);
    rig.wait("connection", Duration::from_secs(10), connected);
    daemon.kill();
    rig.wait("loss", LOSS_DEADLINE, lost);
    let event = rig.wait("giving up", Duration::from_secs(10), |e| {
        matches!(e, ConnectionEvent::GaveUp { .. })
    });
    let attempts = rig
        .log
        .iter()
        .filter(|e| matches!(e, ConnectionEvent::Reconnecting { .. }))
        .count();
    assert_eq!(attempts, 2, "{:?}", rig.log);
    assert!(event_error(&event).is_some());

    // A second supervisor on the same loop, stopped while it waits: nothing follows.
    daemon.restart().expect("restart the daemon");
    let (supervisor, events) =
        Supervisor::start(&mut rig.reactor, quick(&daemon.uri("test"))).expect("start");
    (rig.supervisor, rig.events) = (supervisor, events);
    rig.wait("connection", Duration::from_secs(10), connected);
    daemon.kill();
    rig.wait("loss", LOSS_DEADLINE, lost);
    rig.wait("an attempt", Duration::from_secs(2), |e| {
        matches!(e, ConnectionEvent::Reconnecting { .. })
    });
    rig.supervisor.stop(&mut rig.reactor);
    daemon.restart().expect("restart the daemon");
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet_until {
        rig.reactor
            .run_once(Some(Duration::from_millis(20)), &mut rig.seen)
            .expect("loop iteration");
    }
    let after: Vec<ConnectionEvent> = rig.events.try_iter().collect();
    assert!(after.is_empty(), "{after:?}");
    assert!(rig.supervisor.connection().is_none());
}

fn event_error(event: &ConnectionEvent) -> Option<String> {
    match event {
        ConnectionEvent::GaveUp { error } => Some(error.to_string()),
        _ => None,
    }
}
