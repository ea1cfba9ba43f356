//! Domain lifecycle subscriptions on a remote connection: what a failed
//! deregistration leaves behind.
//!
//! Each test registers the loop itself, so run them one process each (cargo-nextest).

mod support;

use std::time::{Duration, Instant};

use support::daemon::PrivateDaemon;
use virt_reactor::{Error, Reactor};

/// libvirt's limit per connection of lifecycle subscriptions through this crate.
const SLOTS: usize = 32;
/// Connections opened after the lost one.
const ROUNDS: usize = 3;

/// Subscriptions of a connection whose daemon died leave nothing behind. Their
/// deregistration fails, but libvirt forgets the callback on the client side before
/// it asks the daemon, so the reactor releases the trampoline slot anyway, and only
/// then lets go of the connection. Before, the claim stayed in a process-wide table
/// keyed by the connection's address, where a later connection at the same address
/// would find a slot it never claimed. Here every later connection has all 32
/// slots, and shutdown finds nothing of the lost connection left on the loop.
#[test]
fn a_failed_deregistration_leaves_no_claimed_slot_to_a_later_connection() {
    let mut reactor = Reactor::<()>::register().expect("register");
    let mut daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("test");

    let lost = virt_reactor::connect(&uri).expect("connect");
    let id = reactor
        .subscribe_lifecycle(&lost, |_, _| {})
        .expect("subscribe");
    daemon.kill();
    // Remote deregistration runs on a worker thread and fails on the dead socket.
    reactor.unsubscribe(id).expect("unsubscribe");
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        reactor
            .run_once(Some(Duration::from_millis(50)), &mut ())
            .expect("iteration");
    }
    drop(lost);

    daemon.restart().expect("restart the daemon");
    // The freed connection's memory goes to one of the next connections opened.
    for round in 0..ROUNDS {
        let fresh = virt_reactor::connect(&uri).expect("connect again");
        let mut ids = Vec::new();
        for n in 0..SLOTS {
            let id = reactor
                .subscribe_lifecycle(&fresh, |_, _| {})
                .unwrap_or_else(|e| panic!("connection {round}: subscription {n} of {SLOTS}: {e}"));
            ids.push(id);
        }
        let beyond = reactor.subscribe_lifecycle(&fresh, |_, _| {});
        assert!(
            matches!(beyond, Err(Error::SubscriptionLimit { limit: SLOTS })),
            "connection {round}: subscription {}: {beyond:?}",
            SLOTS + 1
        );
        for id in ids {
            reactor.unsubscribe(id).expect("unsubscribe");
        }
        // Deregistration runs on worker threads: let their news in.
        let settle = Instant::now() + Duration::from_millis(200);
        while Instant::now() < settle {
            reactor
                .run_once(Some(Duration::from_millis(20)), &mut ())
                .expect("iteration");
        }
        drop(fresh);
    }
    reactor
        .shutdown(Duration::from_secs(5), &mut ())
        .expect("shutdown");
}
