//! The console service (`virt-consoled`) end to end, with real testbed guests on a private
//! libvirtd: sockets appear (0600, in a 0700 directory) for running domains and for
//! domains that start later, several clients share one console (output to all,
//! input merged), a client leaving does not disturb the others, a slow client is cut
//! off, TCP needs the token, a destroyed guest's socket goes, and SIGTERM cleans up.
//! Hostile local clients (closing at once, churning, holding connections idle, up to
//! exhausting the server's descriptors) neither lock users out nor pile up
//! descriptors; bad arguments are errors that name them and leave nothing behind,
//! and neither example takes over a path it did not create.
//!
//! Guests are created paused, so that a client is attached before they print their
//! banner; every guest a test starts is destroyed when it ends, passing or not.
//! Each test boots TCG guests (several seconds each): run them with cargo-nextest.

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::consoles::{example_binary, live_processes_mentioning, testbed, Proc};
use support::daemon::PrivateDaemon;
use virt::connect::Connect;
use virt_reactor::testbed::{GuestMode, Guests, Testbed, BANNER};

/// A socket appears once the server has attached the console.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// create → banner takes 2.5–6 s under TCG, more while other tests boot guests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// One echo round trip (the first one after attaching can take about 1 s).
const ECHO_TIMEOUT: Duration = Duration::from_secs(20);
/// The server's log shows what it did (a client attached or left).
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// The issue's bound for telling a host's viewers that its connection was lost.
const LOSS_TIMEOUT: Duration = Duration::from_secs(2);
/// The issue's bound for attaching a host's consoles again once its daemon is back.
const RETURN_TIMEOUT: Duration = Duration::from_secs(5);
/// Hostile clients per test: closing, churning.
const CLIENTS: usize = 200;
/// How long clients churn.
const CHURN: Duration = Duration::from_secs(30);
/// A user gets in while hostile connections are open.
const LOCKOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// Descriptors the server may open or close on its own (libvirt's, a worker's).
const FD_SLACK: usize = 4;

#[test]
fn serves_consoles_to_many_clients() {
    let paused = PausedGuest::new("cs-1");
    paused.add("cs-2");
    let mut server = paused.server(&[]);

    // Sockets for the running (paused) domains, private to us.
    let s1 = server.wait_socket(&paused.dir, "cs-1");
    let s2 = server.wait_socket(&paused.dir, "cs-2");
    assert_eq!(mode(&paused.dir), 0o700, "{}", server.logs());
    for socket in [&s1, &s2] {
        let meta = fs::symlink_metadata(socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            socket.display()
        );
    }

    // A client on each console before the guests run, so they see the banners.
    let mut a = Client::unix(&s1, "a");
    server.wait_attached("cs-1", 1, 1);
    let mut other = Client::unix(&s2, "cs-2 client");
    server.wait_attached("cs-2", 1, 1);
    for name in ["cs-1", "cs-2"] {
        resume(&paused.conn, name);
    }
    a.expect(&format!("{BANNER} name=cs-1"), BOOT_TIMEOUT, &server);
    other.expect(&format!("{BANNER} name=cs-2"), BOOT_TIMEOUT, &server);

    // Two clients on one console: both see the output of one's command.
    let mut b = Client::unix(&s1, "b");
    server.wait_attached("cs-1", 2, 1);
    a.send("echo hello-1\n");
    a.expect("\nhello-1\r", ECHO_TIMEOUT, &server);
    b.expect("\nhello-1\r", ECHO_TIMEOUT, &server);

    // One leaving does not disturb the other.
    drop(b);
    server.wait_log(LOG_TIMEOUT, 1, |l| {
        l.contains("cs-1: unix#") && l.contains("hung up (1 viewer left)")
    });
    a.send("echo hello-2\n");
    a.expect("\nhello-2\r", ECHO_TIMEOUT, &server);

    // Input from both clients reaches the one console; both see both replies. One
    // line at a time: lines typed at once would interleave in the guest's tty echo,
    // which is the guest's business, not the server's.
    let mut c = Client::unix(&s1, "c");
    server.wait_attached("cs-1", 2, 2);
    a.send("echo from-a-3\n");
    for client in [&mut a, &mut c] {
        client.expect("\nfrom-a-3\r", ECHO_TIMEOUT, &server);
    }
    c.send("echo from-c-3\n");
    for client in [&mut a, &mut c] {
        client.expect("\nfrom-c-3\r", ECHO_TIMEOUT, &server);
    }

    // TCP: a wrong token is closed; the right one attaches to the named console.
    let (addr, token) = server.tcp_endpoint();
    let mut intruder = Client::tcp(&addr, "intruder");
    intruder.send("not-the-token cs-1\n");
    intruder.expect_eof(LOG_TIMEOUT, &server);
    assert!(
        !intruder.text().contains("hello"),
        "{}",
        intruder.text_escaped()
    );
    let mut t = Client::tcp(&addr, "tcp");
    t.send(&format!("{token} cs-1\n"));
    server.wait_attached("cs-1", 3, 1);
    t.send("echo via-tcp-4\n");
    t.expect("\nvia-tcp-4\r", ECHO_TIMEOUT, &server);
    a.expect("\nvia-tcp-4\r", ECHO_TIMEOUT, &server);
    c.expect("\nvia-tcp-4\r", ECHO_TIMEOUT, &server);

    // A destroyed guest's socket goes, and its clients are closed.
    paused
        .conn
        .lookup_domain_by_name("cs-2")
        .and_then(|d| d.destroy())
        .expect("destroy cs-2");
    server.wait_gone(&s2);
    other.expect_eof(LOG_TIMEOUT, &server);

    // A guest started while the server runs gets a socket of its own.
    paused.add("cs-3");
    let (_, mut d) = paused.boot_watched(&mut server, "cs-3", "d");
    d.send("echo hello-5\n");
    d.expect("\nhello-5\r", ECHO_TIMEOUT, &server);

    // SIGTERM: consoles finished, clients closed, sockets and directory removed.
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
    for client in [&mut a, &mut c, &mut t, &mut d] {
        client.expect_eof(LOG_TIMEOUT, &server);
    }
    assert!(
        !paused.dir.exists(),
        "{} survived\n{}",
        paused.dir.display(),
        server.logs()
    );
    // The server only attached; the guests it did not boot still run.
    assert!(paused
        .conn
        .lookup_domain_by_name("cs-1")
        .is_ok_and(|d| d.is_active().unwrap_or(false)));
}

#[test]
fn slow_client_is_cut_off() {
    let paused = PausedGuest::new("cs-flood");
    let mut server = Server::start(
        &paused.args(&["--domain", "cs-flood", "--viewer-buffer", "65536"]),
        &paused.work,
    );
    let (socket, mut reader) = paused.boot_watched(&mut server, "cs-flood", "reader");

    // This one never reads while the guest floods: ~340 KB of output, more than
    // its socket buffer plus the 64 KiB the server buffers for it. (The socket
    // takes far less than its 208 KiB sndbuf here: the console output comes in
    // small writes, and each costs about 1 KiB of buffer.)
    let mut slow = Client::unix(&socket, "slow");
    server.wait_attached("cs-flood", 2, 1);
    let started = Instant::now();
    reader.send("seq 1 50000\n");
    reader.expect("\n50000\r", Duration::from_secs(120), &server);
    eprintln!("flood took {:?}", started.elapsed());
    server.wait_log(LOG_TIMEOUT, 1, |l| {
        l.contains("WARN") && l.contains("cs-flood: unix#") && l.contains("too slow")
    });

    // The slow client got what its socket held, then end of file.
    slow.expect_eof(LOG_TIMEOUT, &server);
    eprintln!(
        "the slow client got {} of {} bytes",
        slow.buf.len(),
        reader.buf.len()
    );
    assert!(
        !slow.text().contains("\n50000\r"),
        "the slow client got the whole flood ({} bytes)",
        slow.buf.len()
    );
    // The other client carries on.
    reader.send("echo after-flood\n");
    reader.expect("\nafter-flood\r", ECHO_TIMEOUT, &server);

    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
    assert!(!paused.dir.exists());
}

#[test]
fn refuses_tcp_beyond_loopback() {
    let output = Command::new(server_binary())
        .args(["--uri", "test:///default", "--tcp", "0.0.0.0:0"])
        .env("RUST_LOG", "info")
        .output()
        .expect("run virt-consoled");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("only loopback"), "{stderr}");
}

/// TCP clients that authenticate and close, and Unix clients that connect and close,
/// leave nothing behind on a quiet console (a paused guest prints nothing).
#[test]
fn closed_clients_are_reaped_at_once() {
    let paused = PausedGuest::new("cs-quiet");
    let mut server = paused.server(&[]);
    let socket = server.wait_socket(&paused.dir, "cs-quiet");
    let (addr, token) = server.tcp_endpoint();
    let baseline = server.fds();

    for _ in 0..CLIENTS {
        let mut tcp = TcpStream::connect(&addr).expect("connect over TCP");
        tcp.write_all(format!("{token} cs-quiet\n").as_bytes())
            .expect("send the TOKEN NAME line");
        drop(tcp);
        drop(UnixStream::connect(&socket).expect("connect to the console"));
    }
    // All of them got in (and out) ...
    server.wait_log(LOG_TIMEOUT, CLIENTS, |l| {
        l.contains("cs-quiet: tcp#") && l.contains(" attached (")
    });
    server.wait_log(LOG_TIMEOUT, CLIENTS, |l| {
        l.contains("cs-quiet: unix#") && l.contains(" attached (")
    });
    // ... and left no descriptor behind.
    let after = server.wait_fds(baseline + FD_SLACK, LOG_TIMEOUT);
    eprintln!("server fds: {baseline} before {CLIENTS}+{CLIENTS} closed clients, {after} after");

    // They are gone from the console too: the next client is its only one.
    let _alone = Client::unix(&socket, "alone");
    let attached = |l: &str| l.contains("cs-quiet: ") && l.contains(" attached (");
    server.wait_log(LOG_TIMEOUT, 2 * CLIENTS + 1, attached);
    let log = fs::read_to_string(&server.stderr).unwrap_or_default();
    let last = log.lines().rfind(|l| attached(l)).unwrap_or_default();
    assert!(last.ends_with("attached (1 viewer)"), "{last}");
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// 200 viewers churning for 30 s (threads connecting and closing: Unix viewers that
/// read their replay, TCP ones with a valid TOKEN NAME line or none) neither starve a
/// real guest's console nor pile up descriptors or memory; a Unix viewer that
/// half-closed keeps getting output throughout.
#[test]
fn serves_a_guest_while_clients_churn() {
    let paused = PausedGuest::new("cs-churn");
    let mut server = paused.server(&[]);
    let socket = server.wait_socket(&paused.dir, "cs-churn");
    let (addr, token) = server.tcp_endpoint();
    let mut probe = Client::unix(&socket, "probe");
    server.wait_attached("cs-churn", 1, 1);
    let mut half = Client::unix(&socket, "half-closed");
    server.wait_attached("cs-churn", 2, 1);
    resume(&paused.conn, "cs-churn");
    probe.expect(&format!("{BANNER} name=cs-churn"), BOOT_TIMEOUT, &server);
    half.expect(&format!("{BANNER} name=cs-churn"), BOOT_TIMEOUT, &server);
    half.shutdown_write();
    probe.send("echo warm-up\n");
    probe.expect("\nwarm-up\r", ECHO_TIMEOUT, &server);
    let baseline = server.fds();

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, connects) = (Arc::clone(&stop), Arc::clone(&connects));
            let (addr, line) = (addr.clone(), format!("{token} cs-churn\n"));
            let socket = socket.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let connected = match i % 3 {
                        0 => UnixStream::connect(&socket).map(|mut unix| {
                            // Its greeting and replay, then gone.
                            let _ = unix.set_read_timeout(Some(Duration::from_millis(100)));
                            let _ = unix.read(&mut [0; 4096]);
                        }),
                        n => TcpStream::connect(&addr).map(|mut tcp| {
                            if n == 1 {
                                let _ = tcp.write_all(line.as_bytes());
                            }
                        }),
                    };
                    match connected {
                        Ok(()) => {
                            connects.fetch_add(1, Ordering::Relaxed);
                        }
                        // Out of ephemeral ports or backlog: not the point here.
                        Err(_) => sleep(Duration::from_millis(10)),
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let (mut most, mut probes, mut echoes) = (0, 0, Vec::new());
    let mut settled_rss = None;
    while started.elapsed() < CHURN {
        if settled_rss.is_none() && started.elapsed() > CHURN / 3 {
            settled_rss = Some(server.rss_kib());
        }
        probes += 1;
        let sent = Instant::now();
        probe.send(&format!("echo churn-{probes}\n"));
        probe.expect(&format!("\nchurn-{probes}\r"), ECHO_TIMEOUT, &server);
        echoes.push(sent.elapsed());
        most = most.max(server.fds());
        sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        churner.join().expect("a churning client panicked");
    }
    let end_rss = server.rss_kib();
    half.expect(&format!("\nchurn-{probes}\r"), ECHO_TIMEOUT, &server);
    let after = server.wait_fds(baseline + FD_SLACK, LOG_TIMEOUT);
    let settled_rss = settled_rss.expect("a third of the churn passed");
    eprintln!("server RSS: {settled_rss} KiB a third into the churn, {end_rss} KiB at its end");
    // Flat: what the churn costs it has cost after a third of it (allocator slack).
    assert!(
        end_rss <= settled_rss + 8 * 1024,
        "RSS grew from {settled_rss} KiB to {end_rss} KiB while viewers churned\n{}",
        server.logs()
    );
    echoes.sort();
    eprintln!(
        "{} connections in {CHURN:?}; {probes} echo probes, median {:?}, slowest {:?}; \
         server fds: {baseline} before, at most {most} during, {after} after",
        connects.load(Ordering::Relaxed),
        echoes[echoes.len() / 2],
        echoes[echoes.len() - 1],
    );
    // Flat: never more than the churning clients can hold open at once.
    assert!(
        most <= baseline + CLIENTS + FD_SLACK,
        "{most} descriptors open during the churn (baseline {baseline})\n{}",
        server.logs()
    );
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// With 64 descriptors, 100 TCP connections that never send their line lock out
/// neither Unix nor TCP users, and nothing stays behind once they close.
#[test]
fn idle_connections_lock_nobody_out() {
    let paused = PausedGuest::new("cs-idle");
    let mut server = paused.server_limited(&[], 64);
    let socket = server.wait_socket(&paused.dir, "cs-idle");
    let (addr, token) = server.tcp_endpoint();
    let baseline = server.fds();

    let idle = idle_connections(&addr);
    // Let the server take what it will of them before the users come.
    server.wait_fds_at_least(baseline + 32);
    sleep(Duration::from_millis(500));
    let mut user = Client::unix(&socket, "unix user");
    server.wait_log(LOCKOUT_TIMEOUT, 1, |l| {
        l.contains("cs-idle: unix#") && l.contains(" attached (")
    });
    let mut tcp_user = Client::tcp(&addr, "tcp user");
    tcp_user.send(&format!("{token} cs-idle\n"));
    server.wait_log(LOCKOUT_TIMEOUT, 1, |l| {
        l.contains("cs-idle: tcp#") && l.contains(" attached (")
    });
    let during = server.fds();

    drop(idle);
    let after = server.wait_fds(baseline + 2 + FD_SLACK, LOG_TIMEOUT);
    eprintln!("server fds: {baseline} before, {during} with 100 idle connections, {after} after");
    // Both users are still served: the console's end reaches them.
    paused
        .conn
        .lookup_domain_by_name("cs-idle")
        .and_then(|d| d.destroy())
        .expect("destroy cs-idle");
    for client in [&mut user, &mut tcp_user] {
        client.expect(
            "[virt-consoled] cs-idle: console ended: guest gone",
            LOG_TIMEOUT,
            &server,
        );
    }
}

/// Without the --max-pending cap the idle connections exhaust the descriptors: the
/// server sheds what it cannot take, a Unix client still gets in, and once the idle
/// connections close TCP is served again (the edge-triggered listener recovered).
#[test]
fn survives_running_out_of_descriptors() {
    let paused = PausedGuest::new("cs-emfile");
    let mut server = paused.server_limited(&["--max-pending", "1000"], 64);
    let socket = server.wait_socket(&paused.dir, "cs-emfile");
    let (addr, token) = server.tcp_endpoint();
    let baseline = server.fds();

    let idle = idle_connections(&addr);
    server.wait_log(LOG_TIMEOUT, 1, |l| l.contains("out of file descriptors"));
    let _user = Client::unix(&socket, "unix user");
    server.wait_log(LOCKOUT_TIMEOUT, 1, |l| {
        l.contains("cs-emfile: unix#") && l.contains(" attached (")
    });
    let during = server.fds();

    drop(idle);
    let after = server.wait_fds(baseline + 1 + FD_SLACK, LOG_TIMEOUT);
    let mut tcp_user = Client::tcp(&addr, "tcp user");
    tcp_user.send(&format!("{token} cs-emfile\n"));
    server.wait_log(LOCKOUT_TIMEOUT, 1, |l| {
        l.contains("cs-emfile: tcp#") && l.contains(" attached (")
    });
    eprintln!("server fds: {baseline} before, {during} out of descriptors, {after} after");
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

#[test]
fn refuses_bad_numbers() {
    for (option, value) in [
        ("--exit-after", "1e300"),
        ("--exit-after", "nan"),
        ("--exit-after", "inf"),
        ("--exit-after", "-1"),
        ("--max-pending", "0"),
        ("--viewer-buffer", "0"),
    ] {
        let output = Command::new(server_binary())
            .args(["--uri", "test:///default", &format!("{option}={value}")])
            .output()
            .expect("run virt-consoled");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{option} {value}: {stderr}");
        assert!(stderr.contains(&format!("'{value}'")), "{stderr}");
        assert!(stderr.contains(option), "{stderr}");
    }
}

/// An existing --dir is used only when private already; nothing is ever chmodded,
/// and only a directory the server made is removed.
#[test]
fn takes_no_directory_over() {
    let work = WorkDir::new();
    let refused = |dir: &Path, why: &str| {
        let output = Command::new(server_binary())
            .args(["--uri", "test:///default", "--dir", path_str(dir)])
            .args(["--exit-after", "5"]) // should it run anyway
            .output()
            .expect("run virt-consoled");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let named = format!("virt-consoled: --dir {}: {why}", dir.display());
        assert!(stderr.contains(&named), "{named:?} not in {stderr}");
    };
    let shared = work.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    refused(&shared, "mode 1777");
    let open = work.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    refused(&open, "mode 0755");
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&open, &link).unwrap();
    refused(&work.path().join("link/"), "is a symbolic link");
    let file = work.path().join("file");
    fs::write(&file, "mine\n").unwrap();
    refused(&file, "exists and is not a directory");
    refused(Path::new("/proc/nope"), "No such file or directory");
    assert_eq!(
        fs::metadata(&shared).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(mode(&open), 0o755);

    // A private directory of ours is used and kept, with what else is in it.
    let private = work.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(private.join("keep"), "mine\n").unwrap();
    // A missing one is made private, and removed at exit.
    let fresh = work.path().join("fresh");
    for dir in [&private, &fresh] {
        let output = Command::new(server_binary())
            .args(["--uri", "test:///default", "--dir", path_str(dir)])
            .args(["--exit-after", "0.5"])
            .output()
            .expect("run virt-consoled");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("consoles in {}", dir.display())),
            "{stdout}"
        );
    }
    assert_eq!(mode(&private), 0o700);
    assert!(private.join("keep").is_file());
    assert!(!fresh.exists());
}

/// A bad --token-file is an error naming it, and the server leaves nothing behind
/// (its socket directory included).
#[test]
fn bad_token_file_leaves_nothing() {
    let work = WorkDir::new();
    let token_file = work.path().join("token");
    let dir = work.path().join("consoles");
    fs::write(&token_file, "two words\n").unwrap();
    let output = Command::new(server_binary())
        .args(["--uri", "test:///default", "--tcp", "127.0.0.1:0"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run virt-consoled");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let named = format!(
        "--token-file {}: the token must be one word",
        token_file.display()
    );
    assert!(stderr.contains(&named), "{named:?} not in {stderr}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// `embedded --socket PATH` replaces a stale socket only: a file or a socket that is
/// in use stays as it is.
#[test]
fn embedded_replaces_only_a_stale_socket() {
    let work = WorkDir::new();
    let embedded = example_binary("embedded");
    let run = |path: &Path| {
        Command::new(&embedded)
            .args(["--steps", "1", "--socket", path_str(path)])
            .output()
            .expect("run embedded")
    };
    let file = work.path().join("file");
    fs::write(&file, "precious\n").unwrap();
    let output = run(&file);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--socket {}: exists and is not a socket",
            file.display()
        )),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "precious\n");

    let live = work.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let output = run(&live);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("another process listens on it"), "{stderr}");
    assert!(
        UnixStream::connect(&live).is_ok(),
        "the live socket was replaced"
    );

    let stale = work.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let output = run(&stale);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stale.exists(), "the socket stayed after exit");
}

/// A viewer that attaches late gets the scrollback; three viewers share a console
/// with roles (read-write, read-only, one taking the write role alone), two writers'
/// lines never interleave, in-band commands answer, and the control socket reports
/// and kicks.
#[test]
fn replays_scrollback_and_shares_a_console_by_roles() {
    let paused = PausedGuest::new("cs-roles");
    let logs = paused.work.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let mut server = paused.server(&[
        "--log-dir",
        path_str(&logs),
        "--break-sequence",
        r"echo sent-a-break\r",
    ]);
    server.wait_socket(&paused.dir, "cs-roles");
    // The guest boots with nobody watching: its banner goes to the ring and the log.
    resume(&paused.conn, "cs-roles");
    let log = logs.join("cs-roles.log");
    wait_for(BOOT_TIMEOUT, &server, "the banner in the log", || {
        fs::read_to_string(&log).is_ok_and(|t| t.contains(BANNER))
    });
    let socket = paused.dir.join("cs-roles.sock");
    let mut a = Client::unix(&socket, "a");
    a.expect(&format!("{BANNER} name=cs-roles"), ECHO_TIMEOUT, &server);
    a.expect("commands: Ctrl-] help Enter", ECHO_TIMEOUT, &server);
    let mut b = Client::unix(&socket, "b");
    b.expect(&format!("{BANNER} name=cs-roles"), ECHO_TIMEOUT, &server);
    let mut c = Client::unix(&socket, "c");
    c.send("\x1dro\n");
    c.expect(": read-only\r\n", ECHO_TIMEOUT, &server);

    // Two writers: a's line is under way when b's whole line comes; b's waits.
    a.send("echo a-part");
    a.expect("echo a-part", ECHO_TIMEOUT, &server);
    b.send("echo from-b\n");
    sleep(Duration::from_millis(300));
    a.send("-done\n");
    c.expect("\nfrom-b\r", ECHO_TIMEOUT, &server);
    c.expect("a-part-done\r\n", ECHO_TIMEOUT, &server);
    // Interleaved bytes would have made one command of both: "echo a-partecho
    // from-b". (The guest's own tty may echo b's line early, as type-ahead.)
    assert!(
        !c.text().contains("a-partecho") && !c.text().contains("-done: not found"),
        "the writers' lines were mixed: {}",
        c.text_escaped()
    );

    // The read-only viewer's input goes nowhere.
    c.send("echo from-c\n");
    c.expect("read-only: your input is ignored", ECHO_TIMEOUT, &server);

    // b takes the write role alone: a is told and becomes read-only.
    b.send("\x1dtake\n");
    b.expect("read-write, alone\r\n", ECHO_TIMEOUT, &server);
    a.expect("you lost the write role to viewer", ECHO_TIMEOUT, &server);
    a.send("echo from-a-after\n");
    a.expect("read-only: your input is ignored", ECHO_TIMEOUT, &server);
    a.send("\x1drw\n");
    a.expect("holds the write role alone", ECHO_TIMEOUT, &server);
    b.send("echo b-alone\n");
    b.expect("\nb-alone\r", ECHO_TIMEOUT, &server);
    for (client, line) in [(&c, "\nfrom-c\r"), (&b, "\nfrom-a-after\r")] {
        assert!(!client.text().contains(line), "{line:?} reached the guest");
    }

    // The break sequence, and the other commands.
    b.send("\x1dbreak\n");
    b.expect("\nsent-a-break\r", ECHO_TIMEOUT, &server);
    b.send("\x1dwho\n");
    b.expect("(you)", ECHO_TIMEOUT, &server);
    b.send("\x1dfly\n");
    b.expect("unknown command \"fly\"", ECHO_TIMEOUT, &server);
    b.send(&format!("\x1d{}\n", "x".repeat(500)));
    b.expect("unknown command \"(too long)\"", ECHO_TIMEOUT, &server);

    // The control socket: status as JSON, and a kick.
    let status = server.status(&paused.dir);
    let console = &status["consoles"][0];
    assert_eq!(console["name"], "cs-roles", "{status}");
    assert_eq!(console["state"], "attached", "{status}");
    assert!(console["output_bytes"].as_u64() > Some(0), "{status}");
    assert!(console["scrollback"]["used"].as_u64() > Some(0), "{status}");
    assert!(console["log"]["bytes"].as_u64() > Some(0), "{status}");
    let viewers = console["viewers"].as_array().expect("viewers");
    assert_eq!(viewers.len(), 3, "{status}");
    let roles: Vec<(&str, bool)> = viewers
        .iter()
        .map(|v| {
            (
                v["role"].as_str().unwrap(),
                v["exclusive"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [("ro", false), ("rw", true), ("ro", false)],
        "{status}"
    );
    let c_id = viewers[2]["id"].as_u64().unwrap();
    let answer = server.control(
        &paused.dir,
        &format!("{{\"cmd\":\"kick\",\"console\":\"cs-roles\",\"viewer\":{c_id}}}"),
    );
    assert_eq!(answer["ok"], true, "{answer}");
    c.expect(
        "kicked by the service's administrator",
        ECHO_TIMEOUT,
        &server,
    );
    c.expect_eof(LOG_TIMEOUT, &server);
    let answer = server.control(
        &paused.dir,
        "{\"cmd\":\"kick\",\"console\":\"cs-roles\",\"viewer\":999}",
    );
    assert_eq!(answer["ok"], false, "{answer}");
    let answer = server.control(&paused.dir, "not json");
    assert!(
        answer["error"].as_str().unwrap().starts_with("bad request"),
        "{answer}"
    );

    // A writer kicks a viewer in-band.
    let a_id = viewers[0]["id"].as_u64().unwrap();
    b.send(&format!("\x1dkick {a_id}\n"));
    a.expect("kicked by viewer", ECHO_TIMEOUT, &server);
    a.expect_eof(LOG_TIMEOUT, &server);
    b.expect(&format!("kicked viewer {a_id}\r\n"), ECHO_TIMEOUT, &server);

    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
    // Everything the guest printed is in the log, the break's answer included.
    let text = fs::read_to_string(&log).unwrap();
    for line in [
        BANNER,
        "a-part-done\r\n",
        "\nfrom-b\r",
        "\nb-alone\r",
        "\nsent-a-break\r",
    ] {
        assert!(text.contains(line), "{line:?} not in the log");
    }
}

/// A guest floods its console while a viewer never reads: the log, rotated by size
/// and reopened on SIGHUP, still has every line exactly once, each file ends on a line
/// end, and the reading viewer gets the whole flood.
#[test]
fn logs_a_flood_without_losing_a_line() {
    const LINES: u32 = 30_000;
    let paused = PausedGuest::new("cs-log");
    let logs = paused.work.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let mut server = paused.server(&[
        "--log-dir",
        path_str(&logs),
        "--log-size",
        "32768",
        "--log-keep",
        "1000",
        "--timestamps",
        "--viewer-buffer",
        "65536",
    ]);
    let (socket, mut reader) = paused.boot_watched(&mut server, "cs-log", "reader");
    let mut stalled = Client::unix(&socket, "never reads");
    server.wait_attached("cs-log", 2, 1);

    reader.send(&format!("seq 1 {}\n", LINES / 2));
    reader.expect(
        &format!("\n{}\r", LINES / 2),
        Duration::from_secs(120),
        &server,
    );
    // An outside rotation: the file moves away, SIGHUP makes the service reopen it.
    fs::rename(logs.join("cs-log.log"), logs.join("moved-away")).unwrap();
    signal(server.child.as_ref().unwrap(), libc::SIGHUP);
    server.wait_log(LOG_TIMEOUT, 1, |l| l.contains("reopened 1 log(s)"));
    reader.send(&format!("seq {} {LINES}\n", LINES / 2 + 1));
    reader.expect(&format!("\n{LINES}\r"), Duration::from_secs(120), &server);
    server.wait_log(LOG_TIMEOUT, 1, |l| {
        l.contains("never reads") || l.contains("too slow")
    });
    stalled.expect_eof(LOG_TIMEOUT, &server);
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());

    let mut counts = vec![0u32; LINES as usize + 1];
    let mut files = 0;
    for entry in fs::read_dir(&logs).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap();
        files += 1;
        assert!(text.ends_with('\n'), "a log file ends mid-line");
        for line in text.lines() {
            let stamp_end = line.find("] ").map_or(0, |at| at + 2);
            assert!(line.starts_with("[20"), "no timestamp: {line:?}");
            if let Ok(n) = line[stamp_end..].trim_end_matches('\r').parse::<usize>() {
                if n <= LINES as usize {
                    counts[n] += 1;
                }
            }
        }
    }
    let missing: Vec<usize> = (1..=LINES as usize).filter(|&n| counts[n] == 0).collect();
    let doubled: Vec<usize> = (1..=LINES as usize).filter(|&n| counts[n] > 1).collect();
    eprintln!("{files} log files");
    assert!(files > 5, "the log was not rotated: {files} files");
    assert!(
        missing.is_empty(),
        "lines missing from the logs: {missing:?}"
    );
    assert!(doubled.is_empty(), "lines logged twice: {doubled:?}");
}

/// The web front end with a plain WebSocket client: the token guards the API and the
/// upgrade, a WebSocket viewer gets the replay and echoes, and garbage frames or a
/// peer closing mid-frame end only that connection.
#[test]
fn serves_websocket_viewers_and_survives_bad_ones() {
    let paused = PausedGuest::new("cs-web");
    let mut server = paused.server(&["--web", "127.0.0.1:0"]);
    let (_, mut watcher) = paused.boot_watched(&mut server, "cs-web", "watcher");
    let (addr, token) = server.web_endpoint();

    // The API wants the token.
    assert!(http_get(&addr, "/api/consoles", None).starts_with("HTTP/1.1 401"));
    let listing = http_get(&addr, "/api/consoles", Some(&token));
    assert!(listing.starts_with("HTTP/1.1 200"), "{listing}");
    assert!(listing.contains(r#""name":"cs-web""#), "{listing}");
    assert!(http_get(&addr, "/", None).contains("xterm"), "the page");

    // Upgrades: a wrong token and an unknown console are refused, not upgraded.
    let refused = |path: &str, token: &str| match websocket(&addr, path, token) {
        Err(status) => status,
        Ok(_) => panic!("{path}: not refused"),
    };
    assert_eq!(refused("/ws/cs-web", "not-the-token"), 401);
    assert_eq!(refused("/ws/nope", &token), 404);

    // A viewer: the replay (the banner), then an echo both ways.
    let mut ws = websocket(&addr, "/ws/cs-web", &token).expect("upgrade");
    let mut got = Vec::new();
    let mut read_until = |ws: &mut tungstenite::WebSocket<TcpStream>, needle: &str| {
        let deadline = Instant::now() + ECHO_TIMEOUT;
        while !String::from_utf8_lossy(&got).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in {:?}",
                String::from_utf8_lossy(&got)
            );
            match ws.read() {
                Ok(tungstenite::Message::Binary(bytes)) => got.extend_from_slice(&bytes),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("websocket read: {e}"),
            }
        }
    };
    read_until(&mut ws, BANNER);
    ws.send(tungstenite::Message::binary(&b"echo via-web\n"[..]))
        .unwrap();
    read_until(&mut ws, "\nvia-web\r");
    watcher.expect("\nvia-web\r", ECHO_TIMEOUT, &server);

    // Garbage after an upgrade, and a peer that closes mid-frame: only they go.
    let raw = |ws: tungstenite::WebSocket<TcpStream>| ws.get_ref().try_clone().unwrap();
    let mut garbage = raw(websocket(&addr, "/ws/cs-web", &token).expect("upgrade"));
    garbage.write_all(&[0xff; 64]).unwrap();
    let mut half = raw(websocket(&addr, "/ws/cs-web", &token).expect("upgrade"));
    // A masked binary frame that says 100 bytes and brings 3.
    half.write_all(&[0x82, 0x80 | 100, 1, 2, 3, 4, b'a', b'b', b'c'])
        .unwrap();
    drop(half);
    server.wait_log(LOG_TIMEOUT, 2, |l| {
        l.contains("cs-web: web#") && l.contains(" left)")
    });
    let mut rest = Vec::new();
    let _ = garbage.set_read_timeout(Some(LOG_TIMEOUT));
    let _ = garbage.read_to_end(&mut rest);
    // An oversized request head is refused.
    let mut big = TcpStream::connect(&addr).unwrap();
    let _ = big.write_all(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(9000)).as_bytes());
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // So is a TCP viewer's TOKEN NAME line without an end.
    let (tcp_addr, _) = server.tcp_endpoint();
    let mut long = Client::tcp(&tcp_addr, "long line");
    long.send(&"z".repeat(4096));
    long.expect_eof(LOG_TIMEOUT, &server);

    ws.send(tungstenite::Message::binary(&b"echo still-here\n"[..]))
        .unwrap();
    read_until(&mut ws, "\nstill-here\r");
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// A persistent guest that stops keeps its socket and its viewers, who are told;
/// when it starts again its console is attached again and they see it boot.
#[test]
fn a_stopped_guest_keeps_its_viewers_until_it_starts_again() {
    let paused = PausedGuest::new("cs-other");
    let name = "cs-persistent";
    paused.guests.track(&paused.conn, name);
    let domain = paused
        .conn
        .define_domain_xml(&paused.testbed.guest_xml(name, GuestMode::Plain))
        .expect("define a persistent guest");
    domain.create().expect("start it");
    let mut server = paused.server(&[]);
    let socket = server.wait_socket(&paused.dir, name);
    let mut viewer = Client::unix(&socket, "viewer");
    viewer.expect(&format!("{BANNER} name={name}"), BOOT_TIMEOUT, &server);

    domain.destroy().expect("stop it");
    viewer.expect(
        &format!("{name}: console ended: guest gone"),
        LOG_TIMEOUT,
        &server,
    );
    // Still served: the domain exists.
    sleep(Duration::from_secs(1));
    assert!(socket.exists(), "the socket went\n{}", server.logs());
    let mut late = Client::unix(&socket, "late");
    late.expect("console not attached: guest gone", LOG_TIMEOUT, &server);

    domain.create().expect("start it again");
    for client in [&mut viewer, &mut late] {
        client.expect(&format!("{name}: console attached"), BOOT_TIMEOUT, &server);
    }
    // The viewer that was there sees the banner a second time.
    viewer.expect_count(&format!("{BANNER} name={name}"), 2, BOOT_TIMEOUT, &server);
    late.send("echo after-restart\n");
    viewer.expect("\nafter-restart\r", ECHO_TIMEOUT, &server);
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// Two hosts (two daemons) served at once, their consoles named `LABEL/NAME`. One
/// daemon is killed: only its consoles end, each viewer is told within 2 s, the other
/// host's console echoes on. One of its guests dies while it is down. It restarts:
/// within 5 s its running guest's console is attached again for the viewers that
/// stayed, and the vanished guest's socket goes.
#[test]
fn a_restarted_daemon_gets_its_consoles_back_while_the_other_host_carries_on() {
    let mut a = PausedGuest::new("ra-1");
    a.add("ra-2");
    let b = PausedGuest::new("rb-1");
    let (uri_a, uri_b) = (format!("a={}", a.uri), format!("b={}", b.uri));
    let args = [
        "--uri",
        &uri_a,
        "--uri",
        &uri_b,
        "--dir",
        path_str(&a.dir),
        "--keepalive-interval",
        "1",
        "--keepalive-count",
        "2",
        "--reconnect-max",
        "1",
        "--exit-after",
        "600",
    ];
    let mut server = Server::start(&args, &a.work);
    let mut viewers = Vec::new();
    for (host, name) in [(&a, "ra-1"), (&a, "ra-2"), (&b, "rb-1")] {
        let label = if std::ptr::eq(host, &a) { "a" } else { "b" };
        let key = format!("{label}/{name}");
        let socket = server.wait_socket(&a.dir, &key);
        let mut viewer = Client::unix(&socket, &key);
        server.wait_attached(&key, 1, 1);
        resume(&host.conn, name);
        viewer.expect(&format!("{BANNER} name={name}"), BOOT_TIMEOUT, &server);
        viewers.push((socket, viewer));
    }
    let [(_, ra1), (ra2_socket, ra2), (_, rb1)] = &mut viewers[..] else {
        unreachable!()
    };

    a.daemon.kill();
    let killed = Instant::now();
    for viewer in [&mut *ra1, &mut *ra2] {
        viewer.expect("console ended: connection to a lost", LOSS_TIMEOUT, &server);
    }
    eprintln!(
        "host a's viewers told {:?} after the kill",
        killed.elapsed()
    );
    rb1.send("echo b-while-a-is-down\n");
    rb1.expect("\nb-while-a-is-down\r", ECHO_TIMEOUT, &server);
    let status = server.status(&a.dir);
    let host = |label: &str| {
        status["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["label"] == label))
            .cloned()
            .unwrap_or_else(|| panic!("no host {label}: {status}"))
    };
    assert_eq!(host("a")["state"], "reconnecting", "{status}");
    assert_eq!(host("b")["state"], "connected", "{status}");

    // ra-2's QEMU dies while its daemon is away: back, the daemon drops it.
    kill_guest(&a.daemon, "ra-2");
    a.daemon.restart().expect("restart host a's daemon");
    let back = Instant::now();
    ra1.expect("a/ra-1: console attached", RETURN_TIMEOUT, &server);
    eprintln!(
        "a/ra-1 attached again {:?} after the restart",
        back.elapsed()
    );
    server.wait_gone(ra2_socket);
    ra2.expect(
        "guest gone while the connection was down",
        LOG_TIMEOUT,
        &server,
    );
    ra1.send("echo a-is-back\n");
    ra1.expect("\na-is-back\r", ECHO_TIMEOUT, &server);
    let status = server.status(&a.dir);
    let a_host = status["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["label"] == "a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(a_host["state"], "connected", "{status}");
    assert_eq!(a_host["reconnects"], 1, "{status}");
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// SIGKILLs the QEMU process of guest `name` of `daemon`.
fn kill_guest(daemon: &PrivateDaemon, name: &str) {
    let needle = format!("guest={name},");
    let qemus: Vec<Proc> = live_processes_mentioning(&daemon.root().display().to_string())
        .into_iter()
        .filter(|p| p.cmdline().contains(&needle))
        .collect();
    assert_eq!(qemus.len(), 1, "QEMU of {name}: {qemus:?}");
    let pid = nix::unistd::Pid::from_raw(qemus[0].pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL).expect("kill QEMU");
}

/// The web page in headless Chromium: it lists the console, opens it in the
/// terminal with the replay, types a command, shows the guest's answer (which a Unix
/// viewer sees too), and takes the write role.
#[test]
fn the_web_page_opens_a_console_in_a_real_browser() {
    let paused = PausedGuest::new("cs-browser");
    let mut server = paused.server(&["--web", "127.0.0.1:0"]);
    let (_, mut watcher) = paused.boot_watched(&mut server, "cs-browser", "watcher");
    let (addr, token) = server.web_endpoint();

    let browser = browser::Browser::start();
    browser.goto(&format!("http://{addr}/#token={token}"));
    let entry = r#"#consoles li[data-name="cs-browser"]"#;
    browser.wait_for(entry);
    browser.click(entry);
    browser.wait_for(r#"#status[data-state="open"]"#);
    browser.wait_for_screen("#terminal", BANNER);
    browser.click("#terminal");
    browser.type_keys("echo from-the-browser\n");
    watcher.expect("\nfrom-the-browser\r", ECHO_TIMEOUT, &server);
    // Typed, echoed by the guest's tty, then its answer: twice on the screen.
    browser.wait_until("the guest's answer on the screen", |b| {
        let screen = b.screen_text("#terminal");
        (screen.matches("from-the-browser").count() >= 2).then_some(())
    });
    browser.click("#take");
    browser.wait_for_screen("#terminal", "read-write, alone");
    watcher.send("echo from-the-watcher\n");
    watcher.expect("read-only: your input is ignored", ECHO_TIMEOUT, &server);

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-service-web.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
    let status = server.terminate();
    assert!(status.success(), "exit status {status}\n{}", server.logs());
}

/// A plain HTTP/1.1 GET, whole answer as text.
fn http_get(addr: &str, path: &str, token: Option<&str>) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the web front");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}

/// A WebSocket to the web front, the token in the subprotocol list as the page does;
/// the HTTP status if the upgrade is refused.
fn websocket(
    addr: &str,
    path: &str,
    token: &str,
) -> Result<tungstenite::WebSocket<TcpStream>, u16> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("virt-consoled, token.{token}").parse().unwrap(),
    );
    let stream = TcpStream::connect(addr).expect("connect to the web front");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{path}: upgrade: {e}"),
    }
}

/// Waits until `ready` holds.
fn wait_for(timeout: Duration, server: &Server, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what}: timed out\n{}",
            server.logs()
        );
        sleep(Duration::from_millis(50));
    }
}

/// A private libvirtd with paused testbed guests (quiet consoles), and a work
/// directory whose `consoles` the server is to use.
struct PausedGuest {
    // Dropped in this order: the guests are destroyed before their daemon goes.
    guests: Guests,
    conn: Connect,
    daemon: PrivateDaemon,
    testbed: Testbed,
    uri: String,
    work: WorkDir,
    dir: PathBuf,
}

impl PausedGuest {
    fn new(name: &str) -> PausedGuest {
        virt::error::clear_error_callback();
        let testbed = testbed();
        let daemon = PrivateDaemon::start().expect("start a private libvirtd");
        let uri = daemon.uri("qemu");
        let conn = Connect::open(Some(&uri)).expect("connect to the private libvirtd");
        let work = WorkDir::new();
        let dir = work.path().join("consoles");
        let paused = PausedGuest {
            guests: Guests::new(),
            conn,
            daemon,
            testbed,
            uri,
            work,
            dir,
        };
        paused.add(name);
        paused
    }

    /// Creates one more guest, paused, tracked for destruction.
    fn add(&self, name: &str) {
        self.guests.track(&self.conn, name);
        self.conn
            .create_domain_xml(
                &self.testbed.guest_xml(name, GuestMode::Plain),
                virt::sys::VIR_DOMAIN_START_PAUSED,
            )
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", self.daemon.log_tail(30)));
    }

    /// Attaches a first client (`client`) to paused guest `name`'s console, then
    /// boots the guest and waits for the banner there: the socket and the client.
    fn boot_watched(&self, server: &mut Server, name: &str, client: &str) -> (PathBuf, Client) {
        let socket = server.wait_socket(&self.dir, name);
        let mut watcher = Client::unix(&socket, client);
        server.wait_attached(name, 1, 1);
        resume(&self.conn, name);
        watcher.expect(&format!("{BANNER} name={name}"), BOOT_TIMEOUT, server);
        (socket, watcher)
    }

    /// `--uri URI --dir DIR`, `extra`, and an exit should the test leave it running.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--uri", &self.uri, "--dir", path_str(&self.dir)];
        args.extend_from_slice(extra);
        args.extend(["--exit-after", "600"]);
        args
    }

    /// The server on this daemon, also on TCP (loopback), with `extra` arguments.
    fn server(&self, extra: &[&str]) -> Server {
        Server::start(&self.args(&with_tcp(extra)), &self.work)
    }

    /// [`Self::server`] with at most `nofile` file descriptors.
    fn server_limited(&self, extra: &[&str], nofile: u32) -> Server {
        Server::start_limited(&self.args(&with_tcp(extra)), &self.work, nofile)
    }
}

/// `extra` after a TCP listener on loopback.
fn with_tcp<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&["--tcp", "127.0.0.1:0"], extra].concat()
}

/// With its daemon frozen (SIGSTOP) while console input is pending, the server
/// keeps serving its own clients, and SIGTERM ends it within a second (before,
/// libvirt's send held the loop: SIGTERM waited until the daemon ran again).
#[test]
fn sigterm_ends_the_server_within_a_second_while_its_daemon_is_frozen() {
    let paused = PausedGuest::new("cs-frozen");
    let mut server = paused.server(&[]);
    let (_, mut client) = paused.boot_watched(&mut server, "cs-frozen", "client");
    client.send("echo before-the-freeze\n");
    client.expect("\nbefore-the-freeze\r", ECHO_TIMEOUT, &server);

    paused.daemon.freeze();
    // More input than the daemon's socket holds: a send now waits in libvirt.
    let line = format!("{}\n", "x".repeat(64 * 1024));
    for _ in 0..8 {
        client.send(&line);
    }
    sleep(Duration::from_millis(500));
    // The loop still serves: a TCP client with a wrong token is turned away.
    let (addr, _) = server.tcp_endpoint();
    let mut intruder = Client::tcp(&addr, "intruder");
    intruder.send("not-the-token cs-frozen\n");
    intruder.expect_eof(LOG_TIMEOUT, &server);

    let signalled = Instant::now();
    let status = server.terminate();
    let took = signalled.elapsed();
    eprintln!("virt-consoled exited {took:?} after SIGTERM: {status:?}");
    assert!(
        took < Duration::from_secs(1),
        "virt-consoled took {took:?} to exit after SIGTERM\n{}",
        server.logs()
    );
    assert!(
        server.logs().contains("did not answer"),
        "the unclean exit is explained\n{}",
        server.logs()
    );
    paused.daemon.thaw();
}

/// 100 TCP connections that never send anything.
fn idle_connections(addr: &str) -> Vec<TcpStream> {
    (0..100)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("idle #{i}: {e}")))
        .collect()
}

fn resume(conn: &Connect, name: &str) {
    conn.lookup_domain_by_name(name)
        .and_then(|d| d.resume())
        .unwrap_or_else(|e| panic!("resume {name}: {e}"));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_virt-consoled"))
}

/// A temporary directory for one test, removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "console-server-test-{}-{nanos:x}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create the work dir");
        WorkDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The running example; terminated (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    fn start(args: &[&str], work: &WorkDir) -> Server {
        Server::spawn(Command::new(server_binary()), args, work)
    }

    /// Runs it with at most `nofile` file descriptors (soft and hard limit).
    fn start_limited(args: &[&str], work: &WorkDir, nofile: u32) -> Server {
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(server_binary());
        Server::spawn(prlimit, args, work)
    }

    fn spawn(mut command: Command, args: &[&str], work: &WorkDir) -> Server {
        let stdout = work.path().join("server.stdout");
        let stderr = work.path().join("server.stderr");
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        Server {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// Its open file descriptors (prlimit execs it: same pid).
    fn fds(&self) -> usize {
        let pid = self.child.as_ref().expect("the server runs").id();
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| dir.count())
            .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}\n{}", self.logs()))
    }

    /// Its resident memory (VmRSS), in KiB.
    fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("the server runs").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS for {pid}\n{}", self.logs()))
    }

    /// Waits until it has no more than `at_most` descriptors open; returns the count.
    fn wait_fds(&mut self, at_most: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running();
            let fds = self.fds();
            if fds <= at_most {
                return fds;
            }
            assert!(
                Instant::now() < deadline,
                "{fds} descriptors open, expected at most {at_most}\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits until it has at least `fds` descriptors open.
    fn wait_fds_at_least(&mut self, fds: usize) {
        let deadline = Instant::now() + LOG_TIMEOUT;
        while self.fds() < fds {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "the server did not take the connections\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Both of the server's outputs, for assertion messages.
    fn logs(&self) -> String {
        format!(
            "--- server stdout ---\n{}--- server stderr ---\n{}",
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn check_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!("virt-consoled exited ({status})\n{}", self.logs());
            }
        }
    }

    /// Waits until `count` lines of the server's log satisfy `matches`.
    fn wait_log(&mut self, timeout: Duration, count: usize, matches: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = fs::read_to_string(&self.stderr).unwrap_or_default();
            if log.lines().filter(|l| matches(l)).count() >= count {
                return;
            }
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "the expected log line did not come\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server logged, for the `nth` time, a client attaching to
    /// `name` that made `clients` clients.
    fn wait_attached(&mut self, name: &str, clients: usize, nth: usize) {
        let prefix = format!("{name}: ");
        let suffix = if clients == 1 {
            "attached (1 viewer)".to_owned()
        } else {
            format!("attached ({clients} viewers)")
        };
        self.wait_log(LOG_TIMEOUT, nth, |l| {
            l.contains(&prefix) && l.ends_with(&suffix)
        });
    }

    fn wait_socket(&mut self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.sock"));
        self.wait_path(&path, "did not appear", |m| {
            m.is_ok_and(|m| m.file_type().is_socket())
        });
        path
    }

    fn wait_gone(&mut self, path: &Path) {
        self.wait_path(path, "was not removed", |m| m.is_err());
    }

    /// Waits until `path`'s metadata (not following a link) is `wanted`.
    fn wait_path(
        &mut self,
        path: &Path,
        failure: &str,
        wanted: impl Fn(io::Result<fs::Metadata>) -> bool,
    ) {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !wanted(fs::symlink_metadata(path)) {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "{} {failure}\n{}",
                path.display(),
                self.logs()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// The TCP address and token the server printed.
    fn tcp_endpoint(&self) -> (String, String) {
        self.endpoint("virt-consoled: tcp ", ", token ")
    }

    /// The web address and token the server printed.
    fn web_endpoint(&self) -> (String, String) {
        self.endpoint("virt-consoled: web http://", "/#token=")
    }

    /// From the line the server printed that starts with `prefix`: what comes
    /// before `separator` (the address) and after it (the token).
    fn endpoint(&self, prefix: &str, separator: &str) -> (String, String) {
        let stdout = fs::read_to_string(&self.stdout).unwrap_or_default();
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", self.logs()));
        let (addr, token) = line
            .split_once(separator)
            .unwrap_or_else(|| panic!("{line:?}: no {separator:?}"));
        (addr.to_owned(), token.to_owned())
    }

    /// `virt-consoled status --dir DIR`, parsed.
    fn status(&self, dir: &Path) -> serde_json::Value {
        let output = Command::new(server_binary())
            .args(["status", "--dir", path_str(dir)])
            .output()
            .expect("run virt-consoled status");
        assert!(output.status.success(), "{output:?}\n{}", self.logs());
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {output:?}"))
    }

    /// One request line on the control socket, and its answer.
    fn control(&self, dir: &Path, request: &str) -> serde_json::Value {
        let mut stream = UnixStream::connect(dir.join("control.sock")).expect("control socket");
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(stream), &mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}\n{}", self.logs()))
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server runs");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("virt-consoled did not exit after SIGTERM\n{}", self.logs());
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            signal(&child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

#[allow(unsafe_code)]
fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; the child is not reaped yet, so its pid
    // still names it.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Both kinds of client connection.
trait Duplex: Read + Write {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Duplex for UnixStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Duplex for TcpStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A plain client of one console: everything it received, in order.
struct Client {
    name: String,
    stream: Box<dyn Duplex>,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    fn unix(path: &Path, name: &str) -> Client {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("{name}: connect {}: {e}", path.display()));
        Client::new(Box::new(stream), name)
    }

    fn tcp(addr: &str, name: &str) -> Client {
        let stream =
            TcpStream::connect(addr).unwrap_or_else(|e| panic!("{name}: connect {addr}: {e}"));
        Client::new(Box::new(stream), name)
    }

    fn new(stream: Box<dyn Duplex>, name: &str) -> Client {
        stream
            .set_timeout(Duration::from_millis(50))
            .expect("set a read timeout");
        Client {
            name: name.to_owned(),
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    fn send(&mut self, text: &str) {
        self.stream
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{}: send {text:?}: {e}", self.name));
    }

    /// Stops sending (a half-close); it still reads.
    fn shutdown_write(&mut self) {
        self.stream
            .shutdown_write()
            .unwrap_or_else(|e| panic!("{}: shutdown: {e}", self.name));
    }

    /// Reads once (up to the read timeout); false at end of file.
    fn read_some(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                true
            }
            // The server closing on us with unread input shows as a reset.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.eof = true;
                false
            }
            Err(e) => panic!("{}: read: {e}", self.name),
        }
    }

    /// Reads until `needle` has arrived (anywhere in what this client received).
    fn expect(&mut self, needle: &str, timeout: Duration, server: &Server) {
        let deadline = Instant::now() + timeout;
        let needle = needle.as_bytes();
        let mut from = 0;
        loop {
            if self.buf[from..].windows(needle.len()).any(|w| w == needle) {
                return;
            }
            from = self.buf.len().saturating_sub(needle.len());
            assert!(
                !self.eof && Instant::now() < deadline,
                "{}: {:?} did not arrive ({}); it got:\n{}\n{}",
                self.name,
                String::from_utf8_lossy(needle),
                if self.eof { "end of file" } else { "timed out" },
                self.text_escaped(),
                server.logs()
            );
            self.read_some();
        }
    }

    /// Reads until `needle` has arrived `count` times.
    fn expect_count(&mut self, needle: &str, count: usize, timeout: Duration, server: &Server) {
        let deadline = Instant::now() + timeout;
        while self.text().matches(needle).count() < count {
            assert!(
                !self.eof && Instant::now() < deadline,
                "{}: {needle:?} did not arrive {count} times; it got:
{}
{}",
                self.name,
                self.text_escaped(),
                server.logs()
            );
            self.read_some();
        }
    }

    /// Reads until the server closes the connection.
    fn expect_eof(&mut self, timeout: Duration, server: &Server) {
        let deadline = Instant::now() + timeout;
        while self.read_some() {
            assert!(
                Instant::now() < deadline,
                "{}: the server did not close the connection\n{}",
                self.name,
                server.logs()
            );
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The last 2000 bytes received, escaped.
    fn text_escaped(&self) -> String {
        let tail = &self.buf[self.buf.len().saturating_sub(2000)..];
        format!("{:?}", String::from_utf8_lossy(tail))
    }
}
