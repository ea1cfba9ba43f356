//! The loop never waits on the network: a frozen daemon (SIGSTOP) stalls nothing but
//! its own streams, which fail through keepalive instead of hanging.
//!
//! libvirt's remote client sends a stream packet in its own `poll` with no timeout
//! (`virNetClientSendStream`), so an upload made on the loop thread to a daemon that
//! stopped reading would hold the loop, and every other connection's streams, until
//! keepalive gave up. The reactor sends through a thread per connection instead.
//!
//! The test registers the process-wide event loop itself: run under cargo-nextest.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::daemon::PrivateDaemon;
use support::pool::{connect, file_is, pattern, sparse_file, Bed, DirPool, MIB};
use virt_reactor::{CloseReason, Error, KeepAlive, Timer};

/// The upload is far bigger than what the sockets can hold once the daemon stops
/// reading (a few hundred KiB), so it is mid-flight when the daemon freezes.
const UPLOAD: u64 = 512 * MIB;
/// The download from the other daemon, served while the first one is frozen.
const DOWNLOAD: usize = 16 * MIB as usize;
/// Keepalive of the frozen daemon's connection: lost after about 1 × (2 + 1) s.
const KEEPALIVE: KeepAlive = KeepAlive {
    interval: Duration::from_secs(1),
    count: 2,
};
/// The behaviour bound: the loop ran at least this often all along. A loop that
/// waited in libvirt's send would be absent until keepalive gave up, about 3 s.
const MAX_GAP: Duration = Duration::from_millis(500);

#[test]
fn a_frozen_daemon_stalls_only_its_own_upload_which_fails_by_keepalive() {
    let mut frozen = Bed::start("frozen");
    let uri = frozen.daemon.uri("qemu");
    let upload_conn =
        virt_reactor::connect_with(&uri, Some(KEEPALIVE)).expect("connect with keepalive");
    let other = PrivateDaemon::start().expect("start a second private libvirtd");
    let other_conn = connect(&other);
    let other_pool = DirPool::create(&other, &other_conn, "other");
    let data = pattern(7, DOWNLOAD);
    let source_vol = other_pool.volume_with("served", &data);

    // An upload that keeps the frozen daemon's socket full.
    let big = frozen.out("big");
    sparse_file(&big, UPLOAD, &[(0, &pattern(1, UPLOAD as usize))]);
    let path = frozen
        .pool
        .create_volume("target", UPLOAD)
        .path()
        .expect("the volume's path");
    let target = upload_conn
        .lookup_storage_vol_by_path(&path)
        .expect("the volume on the upload's connection");
    // Each transfer runs on the connection its volume was looked up on.
    let (upload, _) = frozen.upload(&target, &big).expect("start the upload");
    frozen.drive(Duration::from_secs(60), "the upload moves", |_, tracker| {
        tracker.position(upload) >= 8 * MIB
    });

    // A timer on the loop records the longest gap between its runs: (last, longest).
    let gaps = Arc::new(Mutex::new((Instant::now(), Duration::ZERO)));
    let ticker = {
        let gaps = Arc::clone(&gaps);
        move |_| {
            let mut gaps = gaps.lock().expect("gaps");
            let now = Instant::now();
            gaps.1 = gaps.1.max(now - gaps.0);
            gaps.0 = now;
        }
    };
    let timer = Timer::add(Some(Duration::from_millis(10)), ticker).expect("a timer");

    frozen.daemon.freeze();
    let frozen_at = Instant::now();
    *gaps.lock().expect("gaps") = (frozen_at, Duration::ZERO);
    let out = frozen.out("served");
    let (download, _) = frozen
        .download(&source_vol, &out)
        .expect("start the download from the other daemon");
    frozen.drive(
        Duration::from_secs(30),
        "the other daemon's download completes while the first is frozen",
        |_, tracker| tracker.is_ended(download),
    );
    let tracker = &frozen.state;
    assert!(
        !tracker.is_ended(upload),
        "the upload is still waiting on the frozen daemon when the download is done"
    );
    assert_eq!(tracker.ok(download).data_bytes, DOWNLOAD as u64);
    assert!(file_is(&out, &data), "the download arrived intact");

    frozen.drive(
        Duration::from_secs(20),
        "the upload to the frozen daemon fails",
        |_, tracker| tracker.is_ended(upload),
    );
    let failed_after = frozen_at.elapsed();
    frozen.state.with(upload, |t| {
        assert_eq!(t.ends, 1, "the upload ended once");
        match &t.end {
            Some(Err(Error::ConnectionClosed {
                reason: CloseReason::Keepalive,
            })) => {}
            other => panic!("the upload ends as a keepalive loss, not {other:?}"),
        }
    });
    let longest = gaps.lock().expect("gaps").1;
    assert!(
        longest < MAX_GAP,
        "the loop ran all along: longest gap {longest:?} (the upload failed after \
         {failed_after:?})"
    );
    eprintln!("longest loop gap {longest:?}; upload failed {failed_after:?} after the freeze");

    frozen.daemon.thaw();
    drop(timer);
    drop((target, upload_conn, source_vol, other_pool, other_conn));
    frozen.finish();
}

/// Echo rounds measured on the quiet console, idle and then during the flood.
const ROUNDS: usize = 300;
/// Input poured into the flooded console per write: no newline, so the guest's
/// line discipline keeps nothing of it and the guest takes it only as fast as its
/// emulated UART does.
const FLOOD_CHUNK: usize = 4096;
/// Input queued for the flooded console before the measured rounds start: far more
/// than the daemon's quota of queued packets on one connection (5 × 256 KiB) and
/// what our queues hold.
const FLOOD_BEFORE: u64 = 2 * MIB;
/// Idle p99 below this counts as this. On this 2-CPU host with two TCG guests the
/// p99 of 300 rounds wanders between about 4 and 12 ms from run to run, flood or
/// not; a send that waits for the daemon shows as seconds.
const P99_FLOOR: Duration = Duration::from_millis(10);

#[test]
fn a_console_flooded_with_input_does_not_slow_another_consoles_echo() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use support::consoles::{live_processes_mentioning, names, MuxRig};
    use virt_reactor::console::ConsoleOptions;

    let (rig, mut tr) = MuxRig::start(ConsoleOptions::default());
    let guests = names("flood", 2);
    let (flooded, quiet) = (guests[0].clone(), guests[1].clone());
    tr.boot_and_wait(&guests, |names| rig.boot(names));
    let send = |name: &str, bytes: &[u8]| rig.mux().send(name, bytes);
    // The first input after attaching waits for QEMU's pty reader: warm both up.
    tr.echo_round(&guests, 0, send);
    // The flooded guest spins from now on, held to one of the two CPUs, so that
    // both measurements share the load of one busy TCG guest (taking the flood
    // keeps its QEMU busy too) and leave the other CPU to the rest: what differs
    // between them is the flood alone.
    let qemu = live_processes_mentioning(&format!("guest={flooded},"))
        .into_iter()
        .find(|p| p.comm.starts_with("qemu"))
        .expect("the flooded guest's QEMU");
    let pinned = std::process::Command::new("taskset")
        .args([
            "--all-tasks",
            "--cpu-list",
            "--pid",
            "1",
            &qemu.pid.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run taskset");
    assert!(pinned.success(), "taskset the flooded guest's QEMU");
    send(&flooded, b"while :; do :; done &\n").expect("start the spinner");
    std::thread::sleep(Duration::from_secs(1));

    let mut round = 1;
    let mut measure = |tr: &mut support::consoles::Transcript| {
        let mut times: Vec<Duration> = (0..ROUNDS)
            .map(|_| {
                let started = Instant::now();
                tr.echo_round(std::slice::from_ref(&quiet), round, send);
                round += 1;
                started.elapsed()
            })
            .collect();
        times.sort();
        times
    };
    let idle = measure(&mut tr);

    let stop = Arc::new(AtomicBool::new(false));
    let poured = Arc::new(AtomicU64::new(0));
    // Writes the full queues refused: the flood pressed on them all along.
    let refused = Arc::new(AtomicU64::new(0));
    let flood = {
        let (mux, stop) = (rig.mux().clone(), Arc::clone(&stop));
        let (poured, refused) = (Arc::clone(&poured), Arc::clone(&refused));
        std::thread::spawn(move || {
            let chunk = [b'x'; FLOOD_CHUNK];
            while !stop.load(Ordering::Relaxed) {
                match mux.try_send(&flooded, &chunk) {
                    Ok(n) => {
                        poured.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(
                            matches!(&e, Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock),
                            "flooding {flooded}: {e}"
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        })
    };
    let flood_started = Instant::now();
    let deadline = flood_started + Duration::from_secs(60);
    while poured.load(Ordering::Relaxed) < FLOOD_BEFORE {
        assert!(
            Instant::now() < deadline,
            "the flood got only {} bytes in",
            poured.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "flood of {FLOOD_BEFORE} bytes queued after {:?}",
        flood_started.elapsed()
    );
    let refused_before = refused.load(Ordering::Relaxed);
    let during = measure(&mut tr);
    let poured_total = poured.load(Ordering::Relaxed);
    let refused_during = refused.load(Ordering::Relaxed) - refused_before;
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("the flood thread");

    let p99 = |times: &[Duration]| times[(times.len() * 99).div_ceil(100) - 1];
    let (idle_p99, during_p99) = (p99(&idle), p99(&during));
    eprintln!(
        "quiet console echo: idle median {:?} p99 {idle_p99:?}; during a flood of \
         {poured_total} bytes median {:?} p99 {during_p99:?}",
        idle[ROUNDS / 2],
        during[ROUNDS / 2]
    );
    assert!(
        refused_during > 0,
        "the flood kept the flooded console's queues full during the rounds"
    );
    assert!(
        during_p99 <= 2 * idle_p99.max(P99_FLOOR),
        "the flood slowed the quiet console: p99 {during_p99:?} against {idle_p99:?} idle"
    );
    let teardown = Instant::now();
    rig.finish();
    eprintln!("teardown took {:?}", teardown.elapsed());
}

/// How long a program may take to exit after SIGTERM while its daemon is frozen.
const EXIT_AFTER_SIGTERM: Duration = Duration::from_secs(1);

#[test]
fn console_mux_ends_within_a_second_of_sigterm_while_its_daemon_is_frozen() {
    use support::consoles::{testbed, MuxProcess, BOOT_TIMEOUT};
    use virt_reactor::testbed::GuestMode;

    virt::error::clear_error_callback();
    let testbed = testbed();
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("qemu");
    let name = "tb-frozen";
    // Paused until console_mux is attached, so that its banner is not lost.
    let conn = virt::connect::Connect::open(Some(&uri)).expect("connect");
    let domain = conn
        .create_domain_xml(
            &testbed.guest_xml(name, GuestMode::Plain),
            virt::sys::VIR_DOMAIN_START_PAUSED,
        )
        .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", daemon.log_tail(30)));
    let mut mux = MuxProcess::spawn(&["--uri", &uri, "--domain", name]);
    mux.wait_lines("the ready line", BOOT_TIMEOUT, |lines| {
        lines.iter().any(|l| l.contains("console(s) ready"))
    });
    domain.resume().expect("resume the guest");
    drop((domain, conn));
    mux.wait_lines("the banner", BOOT_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("tb-frozen| TESTBED-READY"))
    });
    mux.send_line("echo before-the-freeze");
    mux.wait_lines("the echo", BOOT_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "tb-frozen| before-the-freeze")
    });

    daemon.freeze();
    // Input for the frozen daemon: more than its socket holds, so a send waits in
    // libvirt's client (on the console's sender thread), but less than the queues
    // in between (stdin pipe, outbox, lane), so that writing it here never blocks.
    let long_line = "x".repeat(100 * 1024);
    for _ in 0..4 {
        mux.send_line(&long_line);
    }
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &mux.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -TERM console_mux");
    let status = mux.wait_exit(Duration::from_secs(60));
    let took = signalled.elapsed();
    eprintln!("console_mux exited {took:?} after SIGTERM: {status:?}");
    assert!(
        took < EXIT_AFTER_SIGTERM,
        "console_mux took {took:?} to exit after SIGTERM\n{}",
        mux.describe()
    );
    assert!(
        mux.stderr().contains("did not answer"),
        "the unclean exit is explained\n{}",
        mux.describe()
    );
    daemon.thaw();
}
