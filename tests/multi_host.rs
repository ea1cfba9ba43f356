//! One reactor across several hypervisor hosts: each host is a network namespace
//! with its own libvirtd on TCP (`tests/support/hosts.rs`), its own testbed guests
//! and its own pool. A daemon killed with SIGKILL ends only its own host's
//! consoles, promptly, and the other hosts' consoles keep echoing.
//!
//! Every namespace, daemon, guest and directory is removed when the test ends,
//! also after a failure (the hosts' drop), and a crashed run's leftovers are
//! swept by the next start. Needs root (network namespaces).

mod support;

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::consoles::{names, spawn_reactor, testbed, Transcript};
use support::hosts::{self, Host};
use virt::connect::Connect;
use virt_reactor::console::{ConsoleEnd, ConsoleMux, ConsoleOptions};
use virt_reactor::testbed::{GuestMode, Guests, Testbed};
use virt_reactor::{DrainReport, Reactor, ReactorHandle};

/// Guests per host.
const GUESTS: usize = 2;
/// From a daemon's SIGKILL to the end of each of its consoles (issue 13).
const LOSS_DEADLINE: Duration = Duration::from_secs(2);
/// Detaching the consoles and stopping the reactor at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A host's connection, its console mux and its guests.
struct Side {
    conn: Connect,
    mux: ConsoleMux<()>,
    guests: Guests,
    names: Vec<String>,
}

/// One reactor on a thread of its own with a [`ConsoleMux`] per host, all
/// connected over TCP; the muxes' events arrive merged in one [`Transcript`]
/// (guest names are unique across hosts). Dropping it destroys the guests,
/// detaches the consoles, stops the reactor and then removes the hosts.
struct MultiRig {
    testbed: Testbed,
    handle: ReactorHandle<()>,
    sides: Vec<Side>,
    loop_thread: Option<JoinHandle<virt_reactor::Result<DrainReport>>>,
    /// Last: outlives everything that talks to the daemons.
    hosts: Vec<Host>,
}

impl MultiRig {
    fn start(n: usize) -> (MultiRig, Transcript) {
        virt::error::clear_error_callback();
        let testbed = testbed();
        let hosts = hosts::start(n).expect("start the hosts");
        let mut reactor = Reactor::register().expect("register the reactor's event loop");
        let handle = reactor.handle();
        let (merged, rx) = crossbeam_channel::unbounded();
        let mut sides = Vec::new();
        for host in &hosts {
            let uri = host.uri();
            let conn = virt_reactor::connect(&uri)
                .unwrap_or_else(|e| panic!("connect {uri}: {e}\n{}", host.daemon.log_tail(30)));
            let (mux, events) = ConsoleMux::new(&mut reactor, &conn, ConsoleOptions::default())
                .expect("a console mux");
            let merged = merged.clone();
            // Ends when the mux and everything holding its sender are gone.
            thread::spawn(move || events.iter().try_for_each(|e| merged.send(e)));
            sides.push(Side {
                conn,
                mux,
                guests: Guests::new(),
                names: names(&host.label, GUESTS),
            });
        }
        let loop_thread = Some(spawn_reactor(reactor, ()));
        let rig = MultiRig {
            testbed,
            handle,
            sides,
            loop_thread,
            hosts,
        };
        (rig, Transcript::new(rx))
    }

    /// Boots every host's guests through its mux.
    fn boot_all(&self) {
        for side in &self.sides {
            for name in &side.names {
                side.guests.track(&side.conn, name);
                side.mux
                    .boot(name, &self.testbed.guest_xml(name, GuestMode::Plain))
                    .unwrap_or_else(|e| panic!("boot {name}: {e}"));
            }
        }
    }

    fn all_names(&self) -> Vec<String> {
        self.sides.iter().flat_map(|s| s.names.clone()).collect()
    }

    /// Queues input for console `name`, on whichever host it is.
    fn send(&self, name: &str, bytes: &[u8]) -> virt_reactor::Result<()> {
        let side = self
            .sides
            .iter()
            .find(|s| s.names.iter().any(|n| n == name))
            .expect("a guest of this rig");
        side.mux.send(name, bytes)
    }

    fn teardown(&mut self) -> Result<DrainReport, String> {
        let loop_thread = self.loop_thread.take().ok_or("already torn down")?;
        let mut problems = Vec::new();
        for side in self.sides.drain(..) {
            side.guests.destroy_all();
            let (done_tx, done) = crossbeam_channel::bounded(1);
            let mux = side.mux;
            let sent = self.handle.execute(move |reactor, state| {
                mux.detach_all(reactor, state);
                let _ = done_tx.send(());
            });
            if sent.is_err() || done.recv_timeout(DRAIN_TIMEOUT).is_err() {
                problems.push("the reactor did not detach the consoles".to_owned());
            }
        }
        self.handle.stop();
        match loop_thread.join() {
            Ok(Ok(report)) if problems.is_empty() => Ok(report),
            Ok(Ok(_)) => Err(problems.join("; ")),
            Ok(Err(e)) => Err(format!(
                "{}; the reactor ended with {e}",
                problems.join("; ")
            )),
            Err(_) => Err("the reactor thread panicked".into()),
        }
    }
}

impl Drop for MultiRig {
    fn drop(&mut self) {
        if self.loop_thread.is_some() {
            if let Err(e) = self.teardown() {
                eprintln!("multi-host rig teardown: {e}");
            }
        }
    }
}

/// Issue 13, part 3: consoles of guests on 3 hosts on one reactor over TCP all
/// echo; after `kill -9` of one host's daemon, each of that host's consoles ends
/// as a lost connection within 2 s of the kill, and only those: the other hosts'
/// consoles keep echoing.
#[test]
fn killing_one_hosts_daemon_ends_only_its_consoles() {
    let (mut rig, mut tr) = MultiRig::start(3);
    let all = rig.all_names();
    rig.boot_all();
    tr.wait_banners(&all, None);
    let send = |name: &str, bytes: &[u8]| rig.send(name, bytes);
    tr.echo_round(&all, 1, send);

    let victims = rig.sides[1].names.clone();
    let survivors: Vec<String> = all
        .iter()
        .filter(|n| !victims.contains(n))
        .cloned()
        .collect();
    let killed_at = Instant::now();
    rig.hosts[1].daemon.kill();
    tr.wait(
        "the killed host's consoles to end",
        LOSS_DEADLINE.saturating_sub(killed_at.elapsed()),
        |t| {
            if let Some(n) = survivors.iter().find(|n| t.trouble(n) > 0) {
                return Err(format!("{n}, on a host that still runs, ended"));
            }
            Ok(victims.iter().all(|n| !t.ends(n).is_empty()).then_some(()))
        },
    );
    eprintln!(
        "{victims:?} ended {:.0?} after the kill",
        killed_at.elapsed()
    );
    for name in &victims {
        let ends = tr.ends(name);
        assert!(
            matches!(ends[..], [ConsoleEnd::ConnectionLost(_)]),
            "{name} ended once, as a lost connection: {ends:?}"
        );
    }

    for round in 2..4 {
        let send = |name: &str, bytes: &[u8]| rig.send(name, bytes);
        tr.echo_round(&survivors, round, send);
    }
    for name in &survivors {
        assert_eq!(tr.trouble(name), 0, "{name} never ended\n{}", tr.describe());
    }
    rig.teardown()
        .unwrap_or_else(|e| panic!("tearing the rig down: {e}"));
}
