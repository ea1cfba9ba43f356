//! `kill -9` of the daemon in the middle of many downloads on one reactor.
//!
//! libvirt 9.0 leaves a remote stream stuck when its connection dies (no event, no
//! error, `virStreamRecv` says "would block" forever; see event-contract.md §H8);
//! the reactor fails every stream of the connection from its close callback. This
//! checks that it does so promptly, that nothing keeps the loop busy afterwards, that
//! everything libvirt registered is freed, and that a restarted daemon serves a new
//! transfer on the same reactor.
//!
//! The test registers the process-wide event loop itself: run under cargo-nextest.

mod support;

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use support::pool::{
    connect, drive, file_is, parts_of, pattern, Bed, DirPool, Tracker, DRAIN_TIMEOUT, MIB,
};
use virt_reactor::volume::VolumeRange;
use virt_reactor::Error;

const DOWNLOADS: usize = 8;
/// Big enough that no download is near its end when the daemon dies (the volumes
/// are sparse: no disk space, and the daemon reads zeros).
const VOLUME: u64 = 256 * MIB;
/// Each download has moved at least this much before the kill.
const PROGRESS: u64 = 4 * MIB;
/// The behaviour bound: every stream failed within this time of the kill.
const FAIL_WITHIN: Duration = Duration::from_secs(2);
/// Loop iterations allowed in one second of `run_once(200 ms)` once everything
/// failed: about 5 when the loop sleeps; libvirt's READABLE storm would be thousands.
const IDLE_ITERATIONS: u32 = 15;

#[test]
fn killing_the_daemon_fails_every_stream_promptly_and_leaves_the_loop_idle() {
    let mut bed = Bed::start("loss");
    let vols: Vec<_> = (0..DOWNLOADS)
        .map(|i| bed.pool.create_volume(&format!("big{i}"), VOLUME))
        .collect();
    let files: Vec<_> = (0..DOWNLOADS)
        .map(|i| bed.out(&format!("big{i}")))
        .collect();
    for (vol, file) in vols.iter().zip(&files) {
        bed.download(vol, file).expect("start a download");
    }
    bed.drive(Duration::from_secs(60), "some progress", |_, tracker| {
        (0..DOWNLOADS).all(|i| tracker.position(i) >= PROGRESS)
    });
    let tracker = &bed.state;
    for i in 0..DOWNLOADS {
        assert!(
            !tracker.is_ended(i) && tracker.position(i) < VOLUME / 2,
            "download {i} is mid-flight at the kill (precondition)"
        );
    }

    let killed_at = Instant::now();
    bed.daemon.kill();
    bed.drive(
        Duration::from_secs(10),
        "every stream fails after the kill",
        |_, tracker| tracker.all_ended(),
    );
    let tracker = &bed.state;
    let mut slowest = Duration::ZERO;
    for (i, file) in files.iter().enumerate() {
        tracker.with(i, |t| {
            assert_eq!(t.ends, 1, "download {i}: on_end called once");
            match &t.end {
                Some(Err(Error::ConnectionClosed { .. })) => {}
                other => panic!("download {i}: expected ConnectionClosed, got {other:?}"),
            }
            slowest = slowest.max(t.ended_at.unwrap() - killed_at);
        });
        assert!(!file.exists(), "a failed download left {}", file.display());
        let parts = parts_of(file);
        assert!(parts.is_empty(), "a failed download left {parts:?}");
    }
    eprintln!("every stream failed {slowest:?} after the kill");
    assert!(
        slowest < FAIL_WITHIN,
        "streams failed {slowest:?} after the kill (bound {FAIL_WITHIN:?})"
    );
    assert!(bed.reactor.is_empty());

    // No busy loop: nothing is ready any more, so each iteration sleeps its timeout.
    let second = Instant::now() + Duration::from_secs(1);
    let mut iterations = 0;
    while Instant::now() < second {
        bed.run_once(Some(Duration::from_millis(200)))
            .expect("run_once");
        iterations += 1;
    }
    eprintln!("{iterations} iteration(s) in the second after the failure");
    assert!(
        iterations <= IDLE_ITERATIONS,
        "{iterations} loop iterations in 1 s with nothing to do: the loop spins"
    );

    // Everything libvirt registered goes once the connection objects do.
    drop(vols);
    let Bed {
        pool,
        conn,
        mut reactor,
        mut state,
        mut daemon,
        out,
    } = bed;
    let pool_dir = pool.dir.clone();
    drop(pool);
    drop(conn);
    reactor
        .shutdown(DRAIN_TIMEOUT, &mut state)
        .expect("the loop drains after the connection is gone");
    let stats = reactor.stats();
    assert!(stats.is_idle(), "left on the loop: {stats:?}");

    // A restarted daemon serves a new transfer on the same reactor.
    daemon.restart().expect("restart the daemon");
    let conn = connect(&daemon);
    let pool = DirPool::lookup(&conn, "loss", &pool_dir);
    let data = pattern(70, 3 * MIB as usize + 5);
    let vol = pool.volume_with("after", &data);
    let file = out.join("after");
    let mut tracker = Tracker::default();
    let (index, _) = tracker
        .download(&mut reactor, &vol, &file, VolumeRange::default())
        .expect("start a download after the restart");
    drive(
        &mut reactor,
        &mut tracker,
        Duration::from_secs(60),
        "after the restart",
        |r, _| r.is_empty(),
    );
    assert_eq!(tracker.ok(index).data_bytes, data.len() as u64);
    assert!(file_is(&file, &data), "content after the restart");

    drop((vol, pool, conn));
    reactor
        .shutdown(DRAIN_TIMEOUT, &mut tracker)
        .expect("final drain");
    assert!(reactor.stats().is_idle());
    drop(daemon);
}

/// This process's effective uid (the owner of its `/proc` entry).
fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

/// The real gid of process `pid`.
fn real_gid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Gid:"))
        .expect("a Gid line");
    line.split_whitespace()
        .nth(1)
        .and_then(|g| g.parse().ok())
        .expect("a gid")
}

/// Runs `virt-admin` against the daemon's admin socket.
fn admin(daemon: &support::daemon::PrivateDaemon, args: &[&str]) -> String {
    let socket = daemon.socket_path().with_file_name("libvirt-admin-sock");
    let uri = format!("libvirtd:///session?socket={}", socket.display());
    // The admin server of a session daemon only accepts its own uid: switch to it
    // (as the daemon fixture does) when the tests run as root.
    let mut command = if daemon.daemon_uid() == own_uid() {
        Command::new("virt-admin")
    } else {
        let (uid, gid) = (daemon.daemon_uid(), real_gid(daemon.pid()));
        let mut setpriv = Command::new("setpriv");
        setpriv
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "virt-admin"])
            .env("HOME", daemon.root());
        setpriv
    };
    let output = command
        .arg("-c")
        .arg(&uri)
        .args(args)
        .output()
        .expect("run virt-admin");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "virt-admin {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Extra connections, each with one download, beside the victim connection.
const BYSTANDERS: usize = 12;
/// Downloads on the victim connection.
const VICTIM_STREAMS: usize = 3;

#[test]
fn losing_one_connection_fails_only_its_streams() {
    let mut bed = Bed::start("one");
    const LEN: u64 = 16 * MIB;
    let victim_vols: Vec<_> = (0..VICTIM_STREAMS)
        .map(|i| bed.pool.create_volume(&format!("victim{i}"), VOLUME))
        .collect();
    for i in 0..BYSTANDERS {
        drop(bed.pool.create_volume(&format!("bystander{i}"), LEN));
    }
    let out = bed.out.clone();
    let victim_file = |i: usize| out.join(format!("victim{i}"));
    let bystander_file = |i: usize| out.join(format!("bystander{i}"));

    // The victim is the first connection (the bed's), and its streams start first:
    // its close watch is the reactor's oldest, moved by every later growth of its
    // connection table.
    for (i, vol) in victim_vols.iter().enumerate() {
        bed.download(vol, &victim_file(i))
            .expect("start a victim download");
    }
    bed.drive(
        Duration::from_secs(60),
        "the victim's downloads have started",
        |_, tracker| (0..VICTIM_STREAMS).all(|i| tracker.position(i) > 0),
    );
    let bystanders: Vec<_> = (0..BYSTANDERS).map(|_| connect(&bed.daemon)).collect();
    // A volume object belongs to the connection it was looked up on.
    let bystander_vols: Vec<_> = bystanders
        .iter()
        .enumerate()
        .map(|(i, conn)| {
            let pool = conn.lookup_storage_pool_by_name("one").expect("pool");
            pool.lookup_storage_vol_by_name(&format!("bystander{i}"))
                .expect("look up a volume on a bystander connection")
        })
        .collect();
    // Each download runs on the connection its volume was looked up on.
    for (i, vol) in bystander_vols.iter().enumerate() {
        bed.download(vol, &bystander_file(i))
            .expect("start a bystander download");
    }
    let tracker = &bed.state;
    for i in 0..tracker.len() {
        assert!(
            !tracker.is_ended(i) && tracker.position(i) < VOLUME / 2,
            "download {i} mid-flight (precondition)"
        );
    }

    // The daemon's clients are listed by id, in connection order; ours are the only
    // ones, so the victim has the lowest id.
    let list = admin(&bed.daemon, &["srv-clients-list", "libvirtd"]);
    let ids: Vec<u64> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(ids.len(), 1 + BYSTANDERS, "our connections:\n{list}");
    let victim = ids.iter().min().unwrap().to_string();
    let disconnected_at = Instant::now();
    admin(&bed.daemon, &["client-disconnect", "libvirtd", &victim]);

    bed.drive(
        Duration::from_secs(10),
        "the victim's streams fail",
        |_, tracker| (0..VICTIM_STREAMS).all(|i| tracker.is_ended(i)),
    );
    let tracker = &bed.state;
    for i in 0..VICTIM_STREAMS {
        tracker.with(i, |t| {
            assert!(
                matches!(t.end, Some(Err(Error::ConnectionClosed { .. }))),
                "victim stream {i}: {:?}",
                t.end
            );
            let after = t.ended_at.unwrap() - disconnected_at;
            assert!(
                after < FAIL_WITHIN,
                "victim stream {i} failed {after:?} after"
            );
        });
        let file = victim_file(i);
        assert!(!file.exists(), "a failed download left {}", file.display());
        let parts = parts_of(&bed.out(&format!("victim{i}")));
        assert!(parts.is_empty(), "a failed download left {parts:?}");
    }
    bed.drive(
        Duration::from_secs(60),
        "the other connections' downloads",
        |r, _| r.is_empty(),
    );
    let tracker = &bed.state;
    let zeros = vec![0; LEN as usize];
    for i in 0..BYSTANDERS {
        let stats = tracker.ok(VICTIM_STREAMS + i);
        assert_eq!(stats.data_bytes, LEN, "bystander download {i}");
        assert!(
            file_is(&bystander_file(i), &zeros),
            "bystander {i}: content"
        );
    }

    drop((victim_vols, bystander_vols, bystanders));
    bed.finish();
}

/// Uploads cut off by `kill -9` report the lost connection with libvirt's reason,
/// as downloads do, not the first error their dead socket gave ("client socket is
/// closed", "Cannot write data: Broken pipe").
#[test]
fn killing_the_daemon_fails_every_upload_as_a_lost_connection() {
    const UPLOADS: usize = 4;
    let mut bed = Bed::start("uploads");
    let source = bed.out("source");
    support::pool::sparse_file(&source, VOLUME, &[(0, &pattern(3, VOLUME as usize))]);
    let vols: Vec<_> = (0..UPLOADS)
        .map(|i| bed.pool.create_volume(&format!("up{i}"), VOLUME))
        .collect();
    for vol in &vols {
        bed.upload(vol, &source).expect("start an upload");
    }
    bed.drive(Duration::from_secs(60), "some progress", |_, tracker| {
        (0..UPLOADS).all(|i| tracker.position(i) >= PROGRESS)
    });
    let killed_at = Instant::now();
    bed.daemon.kill();
    bed.drive(
        Duration::from_secs(10),
        "every upload fails after the kill",
        |_, tracker| tracker.all_ended(),
    );
    for i in 0..UPLOADS {
        bed.state.with(i, |t| {
            assert_eq!(t.ends, 1, "upload {i}: on_end called once");
            match &t.end {
                Some(Err(Error::ConnectionClosed { .. })) => {}
                other => panic!("upload {i}: expected ConnectionClosed, got {other:?}"),
            }
            let after = t.ended_at.unwrap() - killed_at;
            assert!(
                after < FAIL_WITHIN,
                "upload {i} failed {after:?} after the kill"
            );
        });
    }
    drop(vols);
    drop(bed);
}
