//! Scenario 7: one reactor across several hosts (issue 13). Console echo latency
//! with the consoles spread over 3 hosts, against the same number of consoles on
//! one host, in the same run, alternating.
//!
//! The hosts are `tests/support/hosts.rs`'s: a network namespace each, with a
//! private libvirtd listening on TCP at the namespace's veth address. Host 1
//! carries 3 × G guests, hosts 2 and 3 G each (G = `--guests`); every guest runs
//! in both cases, so both see the same load. "3 hosts" times G consoles of each
//! host, "1 host" the 3 × G of host 1, all through `consoles::latency` (ours, one
//! `ConsoleMux` per connection) over TCP.
//!
//! Then the survivors under churn: one child times G consoles of hosts 1 and 3
//! and holds host 2's through a `Supervisor` (`Held`), untimed; meanwhile this
//! process kills host 2's daemon and restarts it over and over ("churn"), or
//! leaves it running ("steady"), alternating.
//!
//! Then, in this process (its children are done), the time a supervised
//! connection takes to come back: host 2's daemon is killed (SIGKILL) and
//! restarted, `--reconnects` times; from the restarted daemon's first answer to
//! `ConnectionEvent::Reconnected`, and to every console of host 2 attached again
//! (a `ConsoleMux` on the new connection attaching each guest).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use virt::connect::Connect;
use virt_reactor::console::{ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::supervisor::{ConnectionEvent, Supervisor, SupervisorOptions};
use virt_reactor::testbed::{GuestMode, Guests, Testbed};
use virt_reactor::{Reactor, ReactorHandle};

use crate::daemon::PrivateDaemon;
use crate::hosts::{self, Host};
use crate::report::{figure, Figure, Results};
use crate::{run_child, Figures, Loop, Opts};

pub(crate) const SCENARIO: &str = "Scenario 7: consoles on 3 hosts against 1 host";
pub(crate) const CHURN: &str = "Scenario 7: hosts 1 and 3 while host 2's daemon restarts";
pub(crate) const RECONNECT: &str = "Scenario 7: reconnect after a daemon restart";
const HOSTS: usize = 3;
/// Untimed passes until every console answers, booting lost guests again between.
const WARM_ATTEMPTS: usize = 3;

const FIGURES: &[Figure] = &[
    figure("p50_ms", "median ms"),
    figure("p99_ms", "p99 ms"),
    figure("samples", "echoes timed"),
    figure("lost", "echoes lost (5 s)"),
];

#[derive(Clone, Copy)]
enum Layout {
    Spread,
    One,
}

pub(crate) fn scenario7(opts: &Opts, results: &mut Results) {
    let mut hosts = match hosts::start(HOSTS) {
        Ok(hosts) => hosts,
        Err(e) => {
            eprintln!("compare: {SCENARIO}: cannot start the hosts (root needed): {e}");
            results.note(format!(
                "**Skipped:** {SCENARIO}: cannot start the hosts: {e}"
            ));
            return;
        }
    };
    let per_host = opts.guests;
    let testbed = Testbed::open(&opts.testbed).expect("the testbed (bash testbed/build.sh)");
    // Every guest's name, host by host.
    let mut placed: Vec<Vec<String>> = Vec::new();
    let mut guards = Vec::new();
    let started = Instant::now();
    for (k, host) in hosts.iter().enumerate() {
        let count = if k == 0 { HOSTS * per_host } else { per_host };
        let (guests, names) = boot(host, &testbed, count);
        guards.push(guests);
        placed.push(names);
    }
    eprintln!(
        "compare: {SCENARIO}: {} guests booting on {HOSTS} hosts ({:.1} s)",
        placed.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    let uris: Vec<String> = hosts.iter().map(Host::uri).collect();
    let args = |layout: Layout, samples: usize| -> Vec<String> {
        let (uri, guests) = match layout {
            Layout::Spread => (
                uris.join(","),
                placed
                    .iter()
                    .enumerate()
                    .flat_map(|(k, names)| {
                        names[..per_host].iter().map(move |n| format!("{k}:{n}"))
                    })
                    .collect::<Vec<_>>(),
            ),
            Layout::One => (uris[0].clone(), placed[0].clone()),
        };
        vec![
            format!("uri={uri}"),
            format!("guests={}", guests.join(",")),
            format!("samples={samples}"),
            "upload=0".to_owned(),
        ]
    };
    // An untimed pass over every guest of every host: no timed run shares the CPUs
    // with a boot. A guest that died booting (TCG under load) is booted again.
    let every: Vec<String> = placed
        .iter()
        .enumerate()
        .flat_map(|(k, names)| names.iter().map(move |n| format!("{k}:{n}")))
        .collect();
    let warm = vec![
        format!("uri={}", uris.join(",")),
        format!("guests={}", every.join(",")),
        "samples=1".to_owned(),
        "upload=0".to_owned(),
    ];
    let mut answered = Err(String::new());
    for _ in 0..WARM_ATTEMPTS {
        answered = run_child(Loop::Ours, "console", &warm);
        if answered.is_ok() {
            break;
        }
        for (host, names) in hosts.iter().zip(&placed) {
            reboot_missing(host, &testbed, names);
        }
    }
    if let Err(e) = answered {
        results.note(format!(
            "**Failed:** {SCENARIO}: the guests never answered: {e}"
        ));
        return;
    }
    eprintln!(
        "compare: {SCENARIO}: every console answers ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let samples = if opts.quick { 50 } else { 300 };
    let label = format!("{} consoles", HOSTS * per_host);
    let runs = alternate(SCENARIO, opts.runs, results, |side| {
        let layout = [Layout::Spread, Layout::One][side];
        run_child(Loop::Ours, "console", &args(layout, samples))
    });
    results.add_sides(SCENARIO, &label, FIGURES, &runs);
    results.note(format!(
        "Scenario 7: {HOSTS} hosts (network namespaces, a private libvirtd on TCP each); \
         host 1 runs {} testbed guests, hosts 2 and 3 {per_host} each; \"3 hosts\" times \
         {per_host} consoles of each host, \"1 host\" {} of host 1; {samples} echo rounds \
         per run, ours, one ConsoleMux per connection.",
        HOSTS * per_host,
        HOSTS * per_host
    ));
    churn(opts, &uris, &placed, &mut hosts[1], results);
    if let Err(e) = reconnects(&mut hosts[1], &placed[1], opts.reconnects, results) {
        eprintln!("compare: {RECONNECT}: FAILED: {e}");
        results.note(format!("**Failed:** {RECONNECT}: {e}"));
    }
    drop(guards);
}

/// How long the daemon stays dead before its restart: at once, and long enough
/// for the backoff to have grown.
const DOWNTIMES: [Duration; 2] = [Duration::ZERO, Duration::from_secs(3)];

/// How long a reconnect, or every console's re-attach, may take.
const BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills and restarts `host`'s daemon `rounds` times under a supervised
/// connection, with the consoles of `names` attached; adds the figures.
fn reconnects(
    host: &mut Host,
    names: &[String],
    rounds: usize,
    results: &mut Results,
) -> Result<(), String> {
    let mut reactor = Reactor::<()>::register().map_err(|e| format!("register: {e}"))?;
    let handle = reactor.handle();
    let (supervisor, events) = Supervisor::start(&mut reactor, SupervisorOptions::new(&host.uri()))
        .map_err(|e| e.to_string())?;
    let loop_thread = thread::spawn(move || {
        reactor.run(&mut ())?;
        reactor.shutdown(Duration::from_secs(10), &mut ())
    });
    let mut muxes = Vec::new();
    let mut figures: Vec<[Vec<f64>; 3]> = vec![Default::default(); DOWNTIMES.len()];
    let outcome = (|| {
        let conn = match next(&events)? {
            ConnectionEvent::Connected { conn } => conn,
            other => return Err(format!("first connection: {other:?}")),
        };
        muxes.push(attach_all(&handle, conn, names)?);
        for (round, k) in (0..rounds).flat_map(|r| (0..DOWNTIMES.len()).map(move |k| (r, k))) {
            let (down, figures) = (DOWNTIMES[k], &mut figures[k]);
            let killed = Instant::now();
            host.daemon.kill();
            thread::sleep(down);
            host.daemon.restart().map_err(|e| e.to_string())?;
            let back = Instant::now();
            let conn = loop {
                match next(&events)? {
                    ConnectionEvent::Reconnected { conn, .. } => break conn,
                    ConnectionEvent::GaveUp { error } => return Err(error.to_string()),
                    _ => {}
                }
            };
            let reconnected = Instant::now();
            muxes.push(attach_all(&handle, conn, names)?);
            let attached = Instant::now();
            let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1e3;
            figures[0].push(ms(back, reconnected));
            figures[1].push(ms(back, attached));
            figures[2].push(ms(killed, back));
            eprintln!(
                "compare: {RECONNECT} round {round}, down {down:?}: back after {:.0} ms, \
                 reconnected {:.0} ms later, {} consoles attached {:.0} ms later",
                ms(killed, back),
                ms(back, reconnected),
                names.len(),
                ms(reconnected, attached)
            );
        }
        Ok(())
    })();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let _ = handle.execute(move |reactor, state| {
        supervisor.stop(reactor);
        for (mux, _) in &muxes {
            mux.detach_all(reactor, state);
        }
        let _ = done_tx.send(());
    });
    let _ = done.recv_timeout(BACK_TIMEOUT);
    handle.stop();
    let _ = loop_thread.join();
    outcome?;
    for (down, figures) in DOWNTIMES.iter().zip(figures) {
        let label = format!("{} consoles, down {} s", names.len(), down.as_secs());
        for (figure, values) in [
            figure("reconnect_ms", "daemon answers → reconnected, ms"),
            figure("reattach_ms", "daemon answers → every console attached, ms"),
            figure("restart_ms", "kill → restarted daemon answers, ms"),
        ]
        .into_iter()
        .zip(figures)
        {
            results.add(RECONNECT, &label, figure, values, Vec::new(), Vec::new());
        }
    }
    results.note(format!(
        "{RECONNECT}: host 2's daemon killed (SIGKILL) and restarted at once or after \
         3 s down, {rounds} times each, alternating; a Supervisor (SupervisorOptions::new: backoff 200 ms doubling to 3 s, \
         jitter 0.25) on its TCP URI; on each Reconnected a ConsoleMux on the new \
         connection attaches the {} consoles. Cells: median (min–max) of the rounds.",
        names.len()
    ));
    Ok(())
}

fn next(events: &Receiver<ConnectionEvent>) -> Result<ConnectionEvent, String> {
    events
        .recv_timeout(BACK_TIMEOUT)
        .map_err(|e| format!("no connection event: {e}"))
}

/// A mux on `conn` (made on the loop thread) that attaches every guest of
/// `names`; returns once all are attached.
fn attach_all(
    handle: &ReactorHandle<()>,
    conn: Connect,
    names: &[String],
) -> Result<(ConsoleMux<()>, Receiver<ConsoleEvent>), String> {
    let (mux, events) = new_mux(handle, conn, ConsoleOptions::default())?;
    for name in names {
        mux.attach(name).map_err(|e| e.to_string())?;
    }
    let mut waiting: Vec<&String> = names.iter().collect();
    let deadline = Instant::now() + BACK_TIMEOUT;
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ConsoleEvent::Attached { name }) => waiting.retain(|n| **n != name),
            Ok(ConsoleEvent::AttachFailed { name, error }) => {
                return Err(format!("attach {name}: {error}"))
            }
            Ok(_) => {}
            Err(_) => return Err(format!("not attached in time: {waiting:?}")),
        }
    }
    Ok((mux, events))
}

/// A `ConsoleMux` on `conn`, made on the loop thread.
fn new_mux(
    handle: &ReactorHandle<()>,
    conn: Connect,
    options: ConsoleOptions,
) -> Result<(ConsoleMux<()>, Receiver<ConsoleEvent>), String> {
    let (made_tx, made) = crossbeam_channel::bounded(1);
    handle
        .execute(move |reactor, _| {
            let _ = made_tx.send(ConsoleMux::new(reactor, &conn, options));
        })
        .map_err(|e| e.to_string())?;
    made.recv_timeout(BACK_TIMEOUT)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// `runs` runs of two sides (0 and 1), alternating, swapping which goes first run
/// by run; a failed run is noted and left out.
fn alternate(
    scenario: &str,
    runs: usize,
    results: &mut Results,
    mut side: impl FnMut(usize) -> Result<HashMap<String, f64>, String>,
) -> [Vec<HashMap<String, f64>>; 2] {
    let mut sides: [Vec<HashMap<String, f64>>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            match side(k) {
                Ok(figures) => sides[k].push(figures),
                Err(e) => results.failed_run(scenario, run, &e),
            }
        }
    }
    sides
}

/// Host 2's daemon under churn: up this long, then killed (SIGKILL), down this
/// long, restarted, and again. Up long enough for the default backoff (attempts
/// about 0.2, 0.6 and 1.4 s after the loss) to find it back each time.
const CHURN_UP: Duration = Duration::from_secs(2);
const CHURN_DOWN: Duration = Duration::from_secs(1);

/// What the child saw of host 2 during its timed rounds, and the parent's kills.
const HELD_FIGURES: &[Figure] = &[
    figure("host2_kills", "host 2 kills (whole child)"),
    figure("host2_lost", "host 2 lost (timed rounds)"),
    figure("host2_back", "host 2 reconnected (timed rounds)"),
    figure(
        "host2_attached",
        "host 2 consoles attached again (timed rounds)",
    ),
];

/// The echo of hosts 1 and 3's consoles (G each) in a process that also holds
/// host 2's through a supervised connection (`Held`): host 2's daemon running
/// throughout ("steady"), or killed and restarted over and over while the echoes
/// are timed ("churn").
fn churn(
    opts: &Opts,
    uris: &[String],
    placed: &[Vec<String>],
    host2: &mut Host,
    results: &mut Results,
) {
    let per_host = opts.guests;
    let samples = if opts.quick { 150 } else { 3000 };
    let timed: Vec<String> = [0, 2]
        .iter()
        .enumerate()
        .flat_map(|(k, &host)| {
            placed[host][..per_host]
                .iter()
                .map(move |n| format!("{k}:{n}"))
        })
        .collect();
    let args = vec![
        format!("uri={},{}", uris[0], uris[2]),
        format!("guests={}", timed.join(",")),
        format!("samples={samples}"),
        "upload=0".to_owned(),
        format!("held_uri={}", uris[1]),
        format!("held={}", placed[1].join(",")),
    ];
    // Side 0 churns, side 1 is steady: the table's ratio is churn/steady.
    let runs = alternate(CHURN, opts.runs, results, |side| {
        churning(&mut host2.daemon, side == 0, || {
            run_child(Loop::Ours, "console", &args)
        })
    });
    let label = format!("{} consoles of hosts 1, 3", timed.len());
    results.add_sides(CHURN, &label, FIGURES, &runs);
    results.add_sides(CHURN, &label, HELD_FIGURES, &runs);
    results.note(format!(
        "{CHURN}: one child times {} consoles of hosts 1 and 3 ({samples} echo rounds) \
         and holds host 2's {} through a Supervisor (SupervisorOptions::new), attaching \
         them again with a new ConsoleMux on each Reconnected, untimed. \"churn\": \
         meanwhile the bench kills host 2's daemon (SIGKILL) every {} s and restarts it \
         {} s later; \"steady\": it runs throughout. Alternating, swapping which goes first.",
        timed.len(),
        placed[1].len(),
        (CHURN_UP + CHURN_DOWN).as_secs(),
        CHURN_DOWN.as_secs()
    ));
}

/// Runs `f` on a thread of its own, meanwhile (if `churn`) killing `daemon` and
/// restarting it over and over; adds the kills to its figures. The daemon runs
/// again afterwards. It is restarted on this thread, which keeps it: a daemon dies
/// with the thread that started it (`--pdeathsig`, see daemon.rs).
fn churning(
    daemon: &mut PrivateDaemon,
    churn: bool,
    f: impl FnOnce() -> Result<HashMap<String, f64>, String> + Send,
) -> Result<HashMap<String, f64>, String> {
    let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
    thread::scope(|scope| {
        let child = scope.spawn(move || {
            let _done = done_tx;
            f()
        });
        let mut kills = 0u32;
        let mut failed = None;
        while churn && matches!(done.recv_timeout(CHURN_UP), Err(RecvTimeoutError::Timeout)) {
            daemon.kill();
            kills += 1;
            let _ = done.recv_timeout(CHURN_DOWN);
            if let Err(e) = daemon.restart() {
                failed = Some(format!("restart host 2: {e}"));
                break;
            }
        }
        let figures = child.join().expect("the child's thread");
        if let Some(e) = failed {
            return Err(e);
        }
        let mut figures = figures?;
        figures.insert("host2_kills".to_owned(), f64::from(kills));
        Ok(figures)
    })
}

/// What happened to host 2's connection in the child.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    Lost,
    Back,
    Attached,
}

/// In scenario 7's child: host 2's consoles, held through a supervised connection
/// and attached again with a new `ConsoleMux` on each new connection; never timed,
/// their output dropped, their end with a lost connection expected.
pub(crate) struct Held {
    supervisor: Supervisor<()>,
    muxes: Arc<Mutex<Vec<ConsoleMux<()>>>>,
    /// Each change, and when.
    changes: Arc<Mutex<Vec<(Instant, Change)>>>,
}

impl Held {
    /// Supervises `uri` on `reactor` and attaches `names` on each connection.
    pub(crate) fn start(
        reactor: &mut Reactor<()>,
        uri: &str,
        names: Vec<String>,
        options: ConsoleOptions,
    ) -> Held {
        let (supervisor, events) =
            Supervisor::start(reactor, SupervisorOptions::new(uri)).expect("supervise host 2");
        let handle = reactor.handle();
        let held = Held {
            supervisor,
            muxes: Arc::default(),
            changes: Arc::default(),
        };
        let (muxes, changes) = (Arc::clone(&held.muxes), Arc::clone(&held.changes));
        let note = move |change| {
            changes
                .lock()
                .expect("changes")
                .push((Instant::now(), change));
        };
        thread::spawn(move || {
            for event in events {
                let conn = match event {
                    ConnectionEvent::Connected { conn } => conn,
                    ConnectionEvent::Reconnected { conn, .. } => {
                        note(Change::Back);
                        conn
                    }
                    ConnectionEvent::Lost { .. } => {
                        note(Change::Lost);
                        continue;
                    }
                    ConnectionEvent::GaveUp { error } => {
                        eprintln!("host 2: the supervisor gave up: {error}");
                        std::process::exit(1);
                    }
                    _ => continue,
                };
                let (mux, consoles) = match new_mux(&handle, conn, options.clone()) {
                    Ok(made) => made,
                    Err(e) => {
                        eprintln!("host 2: no mux: {e}");
                        continue;
                    }
                };
                for name in &names {
                    if let Err(e) = mux.attach(name) {
                        eprintln!("host 2: attach {name}: {e}");
                    }
                }
                let note = note.clone();
                thread::spawn(move || {
                    for event in consoles {
                        if matches!(event, ConsoleEvent::Attached { .. }) {
                            note(Change::Attached);
                        }
                    }
                });
                muxes.lock().expect("muxes").push(mux);
            }
        });
        held
    }

    /// Stops supervising and detaches every console; on the loop thread.
    pub(crate) fn stop(&self, reactor: &mut Reactor<()>) {
        self.supervisor.stop(reactor);
        for mux in self.muxes.lock().expect("muxes").iter() {
            mux.detach_all(reactor, &mut ());
        }
    }

    /// Host 2's losses, returns and consoles attached within `window`.
    pub(crate) fn figures(&self, window: &Range<Instant>) -> Figures {
        let changes = self.changes.lock().expect("changes");
        let count = |change| {
            changes
                .iter()
                .filter(|(at, c)| *c == change && window.contains(at))
                .count() as f64
        };
        vec![
            ("host2_lost", count(Change::Lost)),
            ("host2_back", count(Change::Back)),
            ("host2_attached", count(Change::Attached)),
        ]
    }
}

/// Boots again each guest of `names` that `host` does not run.
fn reboot_missing(host: &Host, testbed: &Testbed, names: &[String]) {
    let conn = Connect::open(Some(&host.uri())).expect("connect to a host");
    for name in names {
        if conn.lookup_domain_by_name(name).is_err() {
            eprintln!("compare: {SCENARIO}: {name} is gone; booting it again");
            conn.create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
                .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", host.daemon.log_tail(20)));
        }
    }
}

/// Boots `count` testbed guests `LABEL-1` … on `host`; they may still be booting.
fn boot(host: &Host, testbed: &Testbed, count: usize) -> (Guests, Vec<String>) {
    let conn = Connect::open(Some(&host.uri())).expect("connect to a host");
    let guests = Guests::new();
    let names: Vec<String> = (1..=count).map(|i| format!("{}-{i}", host.label)).collect();
    for name in &names {
        guests.track(&conn, name);
        conn.create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
            .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", host.daemon.log_tail(20)));
    }
    (guests, names)
}
