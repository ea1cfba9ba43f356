//! Guest consoles end to end, with real guests: the testbed's tiny TCG guests
//! (`testbed/`), which print `TESTBED-READY name=NAME` on their serial console and
//! then run whatever line they are sent.
//!
//! * Through a private, unprivileged libvirtd (`tests/support/daemon.rs`):
//!   `ConsoleMux` with 8 guests on one reactor, guests ending one at a time,
//!   FORCE takeover and the busy error, reopen after a restart, and raw console
//!   streams whose handles live in containers that grow while the reactor's slab
//!   reallocates.
//! * Through libvirt's in-process driver, without any daemon: the `console_mux`
//!   example, run as `nobody` exactly as `scripts/main.sh` runs it, with piped
//!   input; and its exit when no guest comes up.
//!
//! Every guest is destroyed at the end, also when a test fails: `Guests` and the
//! rig's drop destroy them, the daemon's drop kills what is left, and the example
//! destroys its own (its drop guard closes its input and runs
//! `testbed/cleanup.sh` on its root). Each test registers the event loop itself,
//! so run them one process each (cargo-nextest).
//!
//! `measure_echo_latency` (ignored) is not a test: it runs
//! `examples/console_latency.rs` against a private daemon and prints its figures.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use support::consoles::{
    banner, contains, descendants, echo_command, live_processes_mentioning, names, tail_text,
    testbed, MuxProcess, MuxRig, Proc, Tap, TapLog, Tapped, BOOT_TIMEOUT, ECHO_TIMEOUT,
    END_TIMEOUT,
};
use support::daemon::PrivateDaemon;
use virt::domain::Domain;
use virt::storage_vol::StorageVol;
use virt::sys;
use virt_reactor::console::{self, ConsoleEnd, ConsoleOptions};
use virt_reactor::testbed::{GuestMode, Guests};
use virt_reactor::{handler_fn, Error, Flow, Interest, Reactor, Stream, StreamToken, StreamWriter};

/// How long the example may take to destroy its guests and exit after its input ends.
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a destroyed guest's QEMU may take to disappear from /proc.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);

fn is_guest_gone(end: &ConsoleEnd) -> bool {
    matches!(end, ConsoleEnd::GuestGone)
}

/// Waits until console `name` has ended `n` times; panics with the transcript if
/// that does not happen within [`END_TIMEOUT`].
fn wait_end(tr: &mut support::consoles::Transcript, name: &str, n: usize) {
    tr.wait(&format!("end #{n} of {name}"), END_TIMEOUT, |t| {
        Ok((t.ends(name).len() >= n).then_some(()))
    });
}

/// 1 and 2 of the issue: 8 guests on one reactor, each shows its banner and echoes
/// on its own console; then the guests are destroyed one at a time, each console
/// reports `GuestGone` exactly once, and the others keep echoing.
#[test]
fn eight_guests_echo_on_one_reactor_and_end_one_at_a_time() {
    let (rig, mut tr) = MuxRig::start(ConsoleOptions::default());
    let all = names("c8", 8);
    let started = Instant::now();
    tr.boot_and_wait(&all, |names| rig.boot(names));
    eprintln!("8 banners after {:.1?}", started.elapsed());
    for name in &all {
        assert_eq!(tr.attached_count(name), 1, "{name} attached once");
    }
    assert_eq!(rig.mux().attached(), all, "all 8 consoles are attached");

    let send = |name: &str, bytes: &[u8]| rig.mux().send(name, bytes);
    tr.echo_round(&all, 1, send);
    // No cross-talk: each reply (and echoed command) is on its own console only.
    for name in &all {
        for other in all.iter().filter(|o| *o != name) {
            let (_, reply) = echo_command(other, 1);
            assert!(
                !contains(tr.output(name), reply.trim().as_bytes()),
                "{other}'s reply showed up on {name}'s console\n{}",
                tr.describe()
            );
        }
    }

    let mut alive = all.clone();
    for (i, victim) in all.iter().enumerate() {
        rig.domain(victim)
            .destroy()
            .unwrap_or_else(|e| panic!("destroy {victim}: {e}"));
        wait_end(&mut tr, victim, 1);
        let ends = tr.ends(victim);
        assert!(
            is_guest_gone(ends[0]),
            "{victim} ended as {:?}, not GuestGone",
            ends[0]
        );
        alive.retain(|n| n != victim);
        assert_eq!(
            rig.mux().attached(),
            alive,
            "only the living consoles stay attached"
        );
        assert!(
            matches!(
                rig.mux().send(victim, b"echo too-late\n"),
                Err(Error::NotAttached { .. })
            ),
            "sending to the ended console {victim} is refused"
        );
        if !alive.is_empty() {
            tr.echo_round(&alive, i + 2, send);
        }
        for name in &alive {
            assert!(
                tr.ends(name).is_empty(),
                "{name} ended when {victim} was destroyed\n{}",
                tr.describe()
            );
        }
    }

    rig.finish();
    assert!(
        tr.drain_until_closed(Duration::from_secs(10)),
        "the mux's event channel stays open after teardown: something still holds the mux"
    );
    for name in &all {
        let ends = tr.ends(name);
        assert_eq!(
            ends.len(),
            1,
            "{name} must end exactly once, got {ends:?}\n{}",
            tr.describe()
        );
        assert!(is_guest_gone(ends[0]));
        assert_eq!(tr.attached_count(name), 1, "{name} attached exactly once");
        assert!(
            tr.failures(name).is_empty(),
            "{name} never failed to attach"
        );
    }
}

/// 3 of the issue: while the mux holds a console, another client's open without
/// FORCE is `ConsoleBusy`; with FORCE it takes the console over, the mux's console
/// ends as `TakenOver` (and the other guest's console does not notice), the mux
/// cannot attach without FORCE while the other client holds it, and can again once
/// that client lets go.
#[test]
fn force_takes_a_console_over_and_an_open_without_it_is_busy() {
    let (rig, mut tr) = MuxRig::start(ConsoleOptions::default());
    let all = names("tk", 2);
    let (victim, bystander) = (&all[0], &all[1]);
    tr.boot_and_wait(&all, |names| rig.boot(names));
    let send = |name: &str, bytes: &[u8]| rig.mux().send(name, bytes);
    tr.echo_round(&all, 1, send);

    let other = rig.connect_again();
    let domain = other
        .lookup_domain_by_name(victim)
        .expect("look up the guest on the second connection");
    match console::open_stream(&domain, &ConsoleOptions::default()) {
        Err(Error::ConsoleBusy { domain }) => assert_eq!(&domain, victim),
        Err(e) => panic!("an open without FORCE failed with {e:?}, not ConsoleBusy"),
        Ok(_) => panic!("an open without FORCE succeeded while the mux holds the console"),
    }
    tr.echo_round(&all, 2, send);
    assert!(
        tr.ends(victim).is_empty(),
        "a refused open must not disturb the holder"
    );

    let force = ConsoleOptions {
        force: true,
        ..ConsoleOptions::default()
    };
    let stream = console::open_stream(&domain, &force).expect("open with FORCE");
    wait_end(&mut tr, victim, 1);
    assert!(
        matches!(tr.ends(victim)[0], ConsoleEnd::TakenOver),
        "the old console ended as {:?}, not TakenOver\n{}",
        tr.ends(victim)[0],
        tr.describe()
    );
    assert_eq!(rig.mux().attached(), vec![bystander.clone()]);
    tr.echo_round(std::slice::from_ref(bystander), 3, send);

    // The new client really has the console: echo through its stream.
    let (tap_tx, taps) = crossbeam_channel::unbounded();
    let (inserted_tx, inserted) = crossbeam_channel::bounded(1);
    rig.handle
        .execute(move |reactor, _| {
            let _ = inserted_tx.send(reactor.insert(stream, Interest::READABLE, Tap::new(tap_tx)));
        })
        .expect("hand the stream to the reactor");
    let token = inserted
        .recv_timeout(ECHO_TIMEOUT)
        .expect("the reactor inserts the stream")
        .expect("insert the taken-over stream");
    let writer = writer_of(&rig, token);
    let (command, reply) = echo_command(victim, 4);
    writer.write_all(command.as_bytes()).expect("queue input");
    let seen = wait_tap(&taps, ECHO_TIMEOUT, |out| contains(out, reply.as_bytes()));
    assert!(
        seen.is_ok(),
        "no echo through the new stream: {}",
        seen.unwrap_err()
    );

    // The mux cannot take it back without FORCE.
    rig.mux().attach(victim).expect("start an attach");
    tr.wait("the refused attach", END_TIMEOUT, |t| {
        Ok((!t.failures(victim).is_empty()).then_some(()))
    });
    assert!(
        matches!(tr.failures(victim)[0], Error::ConsoleBusy { domain } if domain == victim),
        "attach while another client holds the console: {:?}",
        tr.failures(victim)[0]
    );
    assert!(matches!(
        rig.mux().send(victim, b"x\n"),
        Err(Error::NotAttached { .. })
    ));

    // Once the other client lets go, the mux attaches again.
    rig.handle
        .execute(move |reactor, state| {
            reactor
                .abort(token, state)
                .expect("abort the other client's stream");
        })
        .expect("reach the reactor");
    let closed = wait_tap(&taps, END_TIMEOUT, |_| false);
    assert!(
        closed.as_ref().is_err_and(|e| e.starts_with("closed")),
        "the other client's stream did not close: {closed:?}"
    );
    let deadline = Instant::now() + END_TIMEOUT;
    for attempt in 1.. {
        let (attached, failed) = (tr.attached_count(victim), tr.failures(victim).len());
        rig.mux().attach(victim).expect("start an attach");
        tr.wait("the attach after the release", END_TIMEOUT, |t| {
            Ok(
                (t.attached_count(victim) > attached || t.failures(victim).len() > failed)
                    .then_some(()),
            )
        });
        if tr.attached_count(victim) > attached {
            eprintln!("attached again at attempt {attempt}");
            break;
        }
        // libvirt may release the console a moment after the abort returned.
        let error = tr.failures(victim)[failed];
        assert!(
            matches!(error, Error::ConsoleBusy { .. }),
            "the attach after the release failed with {error:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the mux could not attach again within {END_TIMEOUT:?}\n{}",
            tr.describe()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    tr.echo_round(&all, 5, send);

    // Detaching finishes the live consoles: each ends as Detached, the guests run on.
    rig.detach_all();
    for name in &all {
        let ends_so_far = if name == victim { 2 } else { 1 };
        wait_end(&mut tr, name, ends_so_far);
    }
    assert!(rig.mux().attached().is_empty());
    assert!(
        rig.domain(bystander)
            .is_active()
            .expect("the guest's state"),
        "detaching leaves the guest running"
    );

    drop((domain, other));
    rig.finish();
    assert!(tr.drain_until_closed(Duration::from_secs(10)));
    let kinds = |name: &str| -> Vec<String> {
        tr.ends(name)
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(victim),
        ["TakenOver", "Detached"],
        "taken over once, then detached"
    );
    assert_eq!(
        kinds(bystander),
        ["Detached"],
        "the bystander only ended when detached"
    );
}

/// A writer for `token`, made on the loop thread.
fn writer_of(rig: &MuxRig, token: StreamToken) -> StreamWriter {
    let (tx, rx) = crossbeam_channel::bounded(1);
    rig.handle
        .execute(move |reactor, _| {
            let _ = tx.send(reactor.writer(token, 4096));
        })
        .expect("reach the reactor");
    rx.recv_timeout(ECHO_TIMEOUT)
        .expect("the reactor answers")
        .expect("a writer")
}

/// Collects a [`Tap`]'s output until `done` holds (`Ok`), or returns why not:
/// "closed: …" when the stream left the reactor, "timeout" otherwise.
fn wait_tap(
    taps: &Receiver<(StreamToken, Tapped)>,
    timeout: Duration,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match taps.recv_timeout(left) {
            Ok((_, Tapped::Output(bytes))) => {
                out.extend(bytes);
                if done(&out) {
                    return Ok(out);
                }
            }
            Ok((_, Tapped::Closed(end))) => return Err(format!("closed: {end}")),
            Ok((_, other)) => {
                if let Tapped::End | Tapped::Failed(_) = other {
                    continue; // Closed follows
                }
            }
            Err(_) => return Err(format!("timeout; got {}", tail_text(&out, 300))),
        }
    }
}

/// 7 of the issue: with `reopen`, the console of a persistent guest that was
/// destroyed and started again is attached again by itself and echoes; also when
/// the restart happens while the loop thread is busy, so that the old console's end
/// and the Started event reach the reactor in the same iteration.
#[test]
fn reopen_attaches_again_when_a_persistent_guest_restarts() {
    let (rig, mut tr) = MuxRig::start(ConsoleOptions {
        reopen: true,
        ..ConsoleOptions::default()
    });
    let name = "ro-1".to_owned();
    let one = std::slice::from_ref(&name);
    let xml = rig.testbed.guest_xml(&name, GuestMode::Plain);
    let domain = rig
        .conn()
        .define_domain_xml(&xml)
        .expect("define a persistent guest");
    let undefine = Undefine(domain.clone());
    rig.guests().track(rig.conn(), &name);
    let send = |name: &str, bytes: &[u8]| rig.mux().send(name, bytes);

    // First run: paused, attach, resume, so the banner is not missed.
    domain
        .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
        .expect("start paused");
    rig.mux().attach(&name).expect("attach");
    tr.wait("the first attach", END_TIMEOUT, |t| {
        Ok((t.attached_count(&name) == 1).then_some(()))
    });
    domain.resume().expect("resume");
    tr.wait_banners(one, None);
    tr.echo_round(one, 1, send);

    domain.destroy().expect("destroy");
    wait_end(&mut tr, &name, 1);
    assert!(is_guest_gone(tr.ends(&name)[0]), "{}", tr.describe());
    assert!(rig.mux().attached().is_empty());

    // Second run, started plainly: the mux attaches by itself.
    let mark = BTreeMap::from([(name.clone(), tr.mark(&name))]);
    domain.create().expect("start again");
    tr.wait("the console to be reopened", END_TIMEOUT, |t| {
        if !t.failures(&name).is_empty() {
            return Err("the reopen failed".into());
        }
        Ok((t.attached_count(&name) == 2).then_some(()))
    });
    assert_eq!(rig.mux().attached(), one);
    tr.wait_banners(one, Some(&mark));
    tr.echo_round(one, 2, send);

    // Third run, restarted while the loop thread is held: libvirt queues both the
    // stream's end and the lifecycle events, and the first iteration after the hold
    // delivers the Started event while the old console still counts as attached.
    let mark = BTreeMap::from([(name.clone(), tr.mark(&name))]);
    let (release, held) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(1);
    rig.handle
        .execute(move |_, _| {
            let _ = entered_tx.send(());
            let _ = held.recv(); // until `release` is dropped
        })
        .expect("reach the reactor");
    entered
        .recv_timeout(END_TIMEOUT)
        .expect("the loop thread is held");
    domain.destroy().expect("destroy while the loop is held");
    domain.create().expect("start while the loop is held");
    drop(release);
    wait_end(&mut tr, &name, 2);
    tr.wait("the console to be reopened again", END_TIMEOUT, |t| {
        if !t.failures(&name).is_empty() {
            return Err("the reopen failed".into());
        }
        Ok((t.attached_count(&name) == 3).then_some(()))
    });
    tr.wait_banners(one, Some(&mark));
    tr.echo_round(one, 3, send);

    domain.destroy().expect("destroy again");
    wait_end(&mut tr, &name, 3);
    // Domain handles hold the connection open; the reactor drains only once it is closed.
    drop((undefine, domain));
    rig.finish();
    assert!(tr.drain_until_closed(Duration::from_secs(10)));
    assert_eq!(tr.attached_count(&name), 3, "{}", tr.describe());
    assert!(tr.ends(&name).iter().all(|e| is_guest_gone(e)));
    assert_eq!(tr.ends(&name).len(), 3);
}

/// Destroys and undefines a persistent guest on drop.
struct Undefine(Domain);

impl Drop for Undefine {
    fn drop(&mut self) {
        let _ = self.0.destroy();
        let _ = self.0.undefine();
    }
}

/// One raw console in [`consoles_in_growing_containers_keep_echoing_while_the_slab_reallocates`].
struct RawConsole {
    name: String,
    domain: Domain,
    token: StreamToken,
    writer: StreamWriter,
    output: Vec<u8>,
    ended: bool,
}

/// What a token stands for, in a map that rehashes as the test goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Console(usize),
    Dummy,
}

/// Runs the reactor on this thread, routing what the taps report (into `taps`, the
/// reactor's state) by token through `roles`, until `done` holds; panics after
/// `timeout`, or if an event reaches a stream it does not belong to.
fn pump(
    reactor: &mut Reactor<TapLog>,
    taps: &mut TapLog,
    consoles: &mut [RawConsole],
    roles: &HashMap<StreamToken, Role>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[RawConsole]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        for (token, tapped) in taps.drain(..) {
            let index = match roles.get(&token) {
                Some(Role::Console(i)) => *i,
                other => panic!("{tapped:?} for {token:?}, which is {other:?}, not a console"),
            };
            let console = &mut consoles[index];
            assert_eq!(console.token, token, "the token map and the Vec disagree");
            match tapped {
                Tapped::Output(bytes) => console.output.extend(bytes),
                Tapped::End | Tapped::Closed(_) => console.ended = true,
                Tapped::Failed(e) => panic!("{}: receive failed: {e}", console.name),
            }
        }
        if done(consoles) {
            return;
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = consoles
                .iter()
                .map(|c| {
                    format!(
                        "{} (ended {}): {}",
                        c.name,
                        c.ended,
                        tail_text(&c.output, 200)
                    )
                })
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                tails.join("\n")
            );
        }
        reactor
            .run_once(Some(Duration::from_millis(20)), taps)
            .expect("a reactor iteration");
    }
}

/// An echo round on every console that has not ended; none of them may end.
fn raw_echo_round(
    reactor: &mut Reactor<TapLog>,
    taps: &mut TapLog,
    consoles: &mut [RawConsole],
    roles: &HashMap<StreamToken, Role>,
    round: usize,
) {
    let marks: Vec<usize> = consoles.iter().map(|c| c.output.len()).collect();
    let alive: Vec<bool> = consoles.iter().map(|c| !c.ended).collect();
    for console in consoles.iter().filter(|c| !c.ended) {
        let (command, _) = echo_command(&console.name, round);
        console
            .writer
            .write_all(command.as_bytes())
            .unwrap_or_else(|e| panic!("{}: queue input: {e}", console.name));
    }
    pump(
        reactor,
        taps,
        consoles,
        roles,
        &format!("raw echo round {round}"),
        ECHO_TIMEOUT,
        |cs| {
            cs.iter()
                .zip(&marks)
                .zip(&alive)
                .all(|((c, &mark), &alive)| {
                    assert!(!(alive && c.ended), "{} ended during round {round}", c.name);
                    let (_, reply) = echo_command(&c.name, round);
                    !alive || contains(&c.output[mark..], reply.as_bytes())
                })
        },
    );
}

/// Opens `n` volume download streams and inserts them with no interest: streams
/// that just occupy slab slots.
fn insert_dummies(
    reactor: &mut Reactor<TapLog>,
    conn: &virt::connect::Connect,
    vol: &StorageVol,
    n: usize,
) -> Vec<StreamToken> {
    (0..n)
        .map(|_| {
            let mut stream = Stream::new(conn).expect("a stream");
            stream
                .with_virt(|virt_stream| vol.download(virt_stream, 0, 0, 0))
                .expect("start a download");
            let idle = handler_fn(|_: &mut TapLog, _, _| Flow::Continue);
            reactor
                .insert(stream, Interest::NONE, idle)
                .expect("insert a dummy stream")
        })
        .collect()
}

/// 4 of the issue: 8 consoles opened with raw `Reactor::insert` and a handler of
/// our own; their tokens and writers live in a `Vec` that starts with capacity 1
/// and a token map that rehashes, and 240 more streams are inserted (and half of
/// the first 120 removed) so the reactor's slab reallocates and reuses slots. Every
/// console keeps echoing on its own output, and no event reaches a stream it does
/// not belong to.
#[test]
fn consoles_in_growing_containers_keep_echoing_while_the_slab_reallocates() {
    virt::error::clear_error_callback();
    let testbed = testbed();
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let mut reactor = Reactor::register().expect("register the event loop");
    let uri = daemon.uri("qemu");
    let conn = virt_reactor::connect(&uri).expect("connect");
    let guests = Guests::new();
    // The taps report into the reactor's state.
    let mut taps = TapLog::new();

    let mut consoles: Vec<RawConsole> = Vec::with_capacity(1);
    let mut roles: HashMap<StreamToken, Role> = HashMap::new();
    let mut first_buffer = None;
    let mut first_capacity = 0;
    for (i, name) in names("rx", 8).into_iter().enumerate() {
        guests.track(&conn, &name);
        let domain = conn
            .create_domain_xml(
                &testbed.guest_xml(&name, GuestMode::Plain),
                sys::VIR_DOMAIN_START_PAUSED,
            )
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        let stream = console::open_stream(&domain, &ConsoleOptions::default())
            .unwrap_or_else(|e| panic!("open {name}'s console: {e}"));
        let token = reactor
            .insert(stream, Interest::READABLE, Tap::in_state())
            .expect("insert a console");
        let writer = reactor.writer(token, 4096).expect("a writer");
        consoles.push(RawConsole {
            name,
            domain,
            token,
            writer,
            output: Vec::new(),
            ended: false,
        });
        roles.insert(token, Role::Console(i));
        if i == 0 {
            first_buffer = Some(consoles.as_ptr());
            first_capacity = roles.capacity();
        }
        consoles[i].domain.resume().expect("resume");
        reactor
            .run_once(Some(Duration::ZERO), &mut taps)
            .expect("a reactor iteration");
    }
    assert_ne!(
        Some(consoles.as_ptr()),
        first_buffer,
        "precondition: the Vec moved after the first console was registered"
    );
    pump(
        &mut reactor,
        &mut taps,
        &mut consoles,
        &roles,
        "8 banners",
        BOOT_TIMEOUT,
        |cs| {
            cs.iter()
                .all(|c| contains(&c.output, banner(&c.name).as_bytes()))
        },
    );
    raw_echo_round(&mut reactor, &mut taps, &mut consoles, &roles, 1);

    // 120 streams more: the slab (8 slots so far) reallocates several times.
    let pool_dir = daemon.create_dir("pool").expect("a pool directory");
    let pool = conn
        .define_storage_pool_xml(
            &format!(
                "<pool type='dir'><name>dummies</name><target><path>{}</path></target></pool>",
                pool_dir.display()
            ),
            0,
        )
        .expect("define a pool");
    pool.create(0).expect("start the pool");
    let vol = StorageVol::create_xml(
        &pool,
        "<volume><name>dummy</name><capacity unit='bytes'>4096</capacity>\
         <target><format type='raw'/></target></volume>",
        0,
    )
    .expect("a volume");
    let dummies = insert_dummies(&mut reactor, &conn, &vol, 120);
    for token in &dummies {
        roles.insert(*token, Role::Dummy);
    }
    assert!(
        roles.capacity() > first_capacity,
        "precondition: the token map rehashed"
    );
    assert_eq!(reactor.len(), 128);
    raw_echo_round(&mut reactor, &mut taps, &mut consoles, &roles, 2);

    // Remove every other dummy, then insert 120 more: vacated slots are reused
    // (with new generations) and the slab grows past 128 slots.
    let removed: Vec<StreamToken> = dummies.iter().step_by(2).copied().collect();
    for token in &removed {
        reactor.abort(*token, &mut taps).expect("abort a dummy");
        roles.remove(token);
        assert!(!reactor.contains(*token));
    }
    // A remote stream's abort waits for the daemon's answer, off the loop.
    let deadline = Instant::now() + END_TIMEOUT;
    while reactor.len() > 8 + 60 {
        assert!(Instant::now() < deadline, "the aborts were not answered");
        reactor
            .run_once(Some(Duration::from_millis(100)), &mut taps)
            .expect("run_once");
    }
    let more = insert_dummies(&mut reactor, &conn, &vol, 120);
    let removed: HashSet<StreamToken> = removed.into_iter().collect();
    for token in &more {
        assert!(
            !removed.contains(token),
            "a reused slot must get a new token, got the old {token:?}"
        );
        roles.insert(*token, Role::Dummy);
    }
    for token in &removed {
        assert!(
            !reactor.contains(*token),
            "a stale token names a reused slot"
        );
    }
    assert_eq!(reactor.len(), 8 + 60 + 120);
    raw_echo_round(&mut reactor, &mut taps, &mut consoles, &roles, 3);

    // One guest goes: its own console ends, the others keep echoing.
    consoles[3].domain.destroy().expect("destroy rx-4");
    pump(
        &mut reactor,
        &mut taps,
        &mut consoles,
        &roles,
        "rx-4's end",
        END_TIMEOUT,
        |cs| cs[3].ended,
    );
    assert!(
        consoles.iter().filter(|c| c.ended).count() == 1,
        "only rx-4 ended"
    );
    raw_echo_round(&mut reactor, &mut taps, &mut consoles, &roles, 4);

    // Each console only ever printed its own lines.
    for console in &consoles {
        for other in consoles.iter().filter(|o| o.name != console.name) {
            let (command, _) = echo_command(&other.name, 1);
            assert!(
                !contains(&console.output, command.trim().as_bytes()),
                "{}'s input showed up on {}",
                other.name,
                console.name
            );
        }
    }

    guests.destroy_all();
    drop(guests);
    drop(consoles);
    drop((vol, pool, conn));
    reactor
        .shutdown(Duration::from_secs(10), &mut taps)
        .expect("the reactor shuts down and drains");
}

/// 5 of the issue: the `console_mux` example with piped input: a broadcast reaches
/// all 3 guests, `:use` and `@NAME` route to one, and end of input quits: exit 0,
/// `destroyed 3 guest(s)`, and no QEMU of its embed root is left.
#[test]
fn console_mux_example_broadcasts_routes_and_cleans_up() {
    let mut mux = MuxProcess::spawn(&[]);
    let guests = names("tb", 3);
    mux.wait_lines("the ready line", BOOT_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("-- 3 console(s) ready: tb-1, tb-2, tb-3."))
    });
    for name in &guests {
        assert_eq!(
            mux.count(&format!("{name}| TESTBED-READY name={name}")),
            1,
            "{name}'s banner\n{}",
            mux.describe()
        );
    }
    let root = format!("{}/", mux.root.display());
    let qemus = live_qemus(&root);
    assert_eq!(
        qemus.len(),
        3,
        "3 QEMU processes name the embed root {root} while it runs: {qemus:?}"
    );

    mux.send_line("@all echo hello-all");
    mux.wait_lines("the broadcast's replies", ECHO_TIMEOUT, |lines| {
        guests
            .iter()
            .all(|n| lines.contains(&format!("{n}| hello-all")))
    });
    mux.send_line(":use tb-2");
    mux.wait_lines("the selection", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "-- sending to tb-2")
    });
    mux.send_line("echo hello-use");
    mux.wait_lines("tb-2's reply", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "tb-2| hello-use")
    });
    mux.send_line("@tb-3 echo hello-at");
    mux.wait_lines("tb-3's reply", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "tb-3| hello-at")
    });
    mux.send_line(":list");
    mux.wait_lines("the list", ECHO_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l == "-- guests: tb-1, tb-2, tb-3 (selected: tb-2)")
    });

    mux.close_stdin();
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}\n{}", mux.describe());
    assert_eq!(
        mux.count("-- destroyed 3 guest(s)"),
        1,
        "{}",
        mux.describe()
    );
    for name in &guests {
        assert_eq!(
            mux.count(&format!("{name}| hello-all")),
            1,
            "{name}: one broadcast reply"
        );
    }
    for (tag, target) in [("hello-use", "tb-2"), ("hello-at", "tb-3")] {
        for name in &guests {
            let got = mux
                .lines
                .iter()
                .filter(|l| l.starts_with(&format!("{name}| ")) && l.contains(tag))
                .count();
            let want = if name == target { 2 } else { 0 }; // the echoed command + the reply
            assert_eq!(got, want, "{tag} lines on {name}\n{}", mux.describe());
        }
    }
    assert_qemus_gone(&root);
    assert!(!mux.root.exists(), "the example removes its embed root");
}

/// 6 of the issue: the embedded driver boots a guest, echoes and destroys it with
/// no libvirtd: the QEMU driver runs inside the example's process, and no daemon
/// is among its descendants or anywhere with its private home.
#[test]
fn console_mux_runs_on_the_embedded_driver_without_a_daemon() {
    // Its log goes where the unprivileged example may write.
    let logs = tempfile::tempdir().expect("a log directory");
    fs::set_permissions(logs.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let log_dir = logs.path().to_str().expect("UTF-8 path");
    let mut mux = MuxProcess::spawn(&["--guests", "1", "--log-dir", log_dir]);
    mux.wait_lines("the ready line", BOOT_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("-- 1 console(s) ready: tb-1."))
    });
    let pid = mux.pid();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).expect("the example's executable");
    assert!(
        exe.ends_with("console_mux"),
        "pid {pid} is {} (setpriv and env must exec the example)",
        exe.display()
    );
    // The QEMU driver is loaded into the example itself...
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("the example's maps");
    assert!(
        maps.contains("libvirt_driver_qemu.so"),
        "the QEMU driver is not loaded in-process"
    );
    // ...its guest runs, naming the embed root...
    let root = format!("{}/", mux.root.display());
    let qemus = live_qemus(&root);
    assert_eq!(qemus.len(), 1, "one QEMU names {root}: {qemus:?}");
    // ...and no daemon is involved: none below the example, and nothing else that
    // carries its private home or its root (a spawned session daemon would).
    let daemons = |procs: &[Proc]| -> Vec<Proc> {
        procs
            .iter()
            .filter(|p| p.comm.starts_with("libvirtd") || p.comm.starts_with("virt"))
            .cloned()
            .collect()
    };
    let below = descendants(pid);
    assert!(
        daemons(&below).is_empty(),
        "daemons below the example: {below:?}"
    );
    let home = format!("HOME={}", mux.home.0.display());
    let mut related: Vec<Proc> = live_processes_mentioning(&home)
        .into_iter()
        .chain(live_processes_mentioning(&root))
        .filter(|p| p.pid != pid)
        .collect();
    related.sort_by_key(|p| p.pid);
    related.dedup_by_key(|p| p.pid);
    eprintln!("processes sharing the example's home or root: {related:?}");
    assert!(
        related.iter().all(|p| p.comm.starts_with("qemu-system")),
        "only QEMU may share the example's home or root: {related:?}"
    );

    mux.send_line("echo hello-embedded");
    mux.wait_lines("the echo", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "tb-1| hello-embedded")
    });
    let below = descendants(pid);
    assert!(
        daemons(&below).is_empty(),
        "daemons below the example: {below:?}"
    );

    mux.close_stdin();
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}\n{}", mux.describe());
    assert_eq!(
        mux.count("-- destroyed 1 guest(s)"),
        1,
        "{}",
        mux.describe()
    );
    assert_qemus_gone(&root);
    // The guest's output as it came, in the console service's log format.
    let log = fs::read_to_string(logs.path().join("tb-1.log")).expect("tb-1's log");
    for line in ["TESTBED-READY name=tb-1\r\n", "\nhello-embedded\r\n"] {
        assert!(log.contains(line), "{line:?} not in the log: {log:?}");
    }
}

/// The `console_mux` example quits with an error when no guest comes up, even
/// though its input is still open: before, with every boot failed it never started
/// reading input, so neither end of input nor Ctrl-] could end it. The guest's
/// kernel here is 4 KiB of zeros, so QEMU refuses to start it.
#[test]
fn console_mux_exits_with_an_error_when_no_guest_comes_up() {
    let broken = BrokenTestbed::new();
    let mut mux = MuxProcess::spawn_with_testbed(&["--guests", "1"], &broken.0);
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status {status}\n{}",
        mux.describe()
    );
    assert!(
        mux.lines
            .iter()
            .any(|l| l.starts_with("-- tb-1: cannot attach: ")),
        "the failed boot is reported\n{}",
        mux.describe()
    );
    assert!(
        mux.stderr().contains("console_mux: no console came up"),
        "{}",
        mux.describe()
    );
    assert_qemus_gone(&format!("{}/", mux.root.display()));
}

/// A testbed directory whose kernel cannot boot, readable by nobody.
struct BrokenTestbed(std::path::PathBuf);

impl BrokenTestbed {
    fn new() -> BrokenTestbed {
        let dir = std::path::PathBuf::from(format!("/tmp/consoles-broken-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).expect("create the broken testbed");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(dir.join("vmlinuz"), vec![0; 4096]).expect("write a bogus kernel");
        fs::copy(
            support::consoles::testbed_dir().join("initramfs.cpio.gz"),
            dir.join("initramfs.cpio.gz"),
        )
        .expect("copy the initramfs");
        for file in ["vmlinuz", "initramfs.cpio.gz"] {
            fs::set_permissions(dir.join(file), fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        BrokenTestbed(dir)
    }
}

impl Drop for BrokenTestbed {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Live QEMU processes whose command line or environment names `root`.
fn live_qemus(root: &str) -> Vec<Proc> {
    live_processes_mentioning(root)
        .into_iter()
        .filter(|p| p.comm.starts_with("qemu"))
        .collect()
}

fn assert_qemus_gone(root: &str) {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let left = live_processes_mentioning(root);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still name {root} {GONE_TIMEOUT:?} after the example exited: {:?}",
            left.iter()
                .map(|p| (p.pid, p.comm.clone(), p.cmdline()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
