//! One reactor across several hypervisor hosts: each host is a network namespace
//! with its own libvirtd on TCP (`tests/support/hosts.rs`), its own testbed guests
//! and its own pool. A daemon killed with SIGKILL ends only its own host's
//! consoles, promptly, and the other hosts' consoles keep echoing; `virt-consoled`
//! given the 3 hosts attaches that host's consoles again once its daemon is back,
//! and `vol` resumes that host's download, the others untouched. The test bed's
//! own promises (separate daemons on their own addresses, restart, clean-up) are
//! checked too.
//!
//! Every namespace, daemon, guest and directory is removed when the test ends,
//! also after a failure (the hosts' drop), and a crashed run's leftovers are
//! swept by the next start. Needs root (network namespaces).

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant};

use support::consoles::{names, spawn_reactor, testbed, Transcript};
use support::daemon::send_signal;
use support::hosts::{self, Host};
use support::pool::{file_is, pattern, DirPool, MIB};
use support::vol::{
    bare_command, cut, json_lines, len_of, part_of, path, sha256sum, states, Background,
};
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
/// From a restarted daemon's first answer to its consoles attached again (issue 13).
const BACK_DEADLINE: Duration = Duration::from_secs(5);
/// Booting, attaching and one echo, under TCG on a loaded machine.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

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

    /// Boots guests `names`, each through its host's mux.
    fn boot(&self, names: &[String]) {
        for side in &self.sides {
            for name in side.names.iter().filter(|n| names.contains(n)) {
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
    tr.boot_and_wait(&all, |names| rig.boot(names));
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

/// `virt-consoled` on `--uri LABEL=URI` for each host, its sockets in a private
/// directory; SIGTERM, then SIGKILL, when dropped.
struct Service {
    child: Child,
    dir: PathBuf,
    /// Holds `dir` and the service's output.
    work: PathBuf,
}

impl Service {
    fn start(hosts: &[Host]) -> Service {
        let work = std::env::temp_dir().join(format!("multi-host-consoled-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).expect("create the work directory");
        let dir = work.join("consoles");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_virt-consoled"));
        for host in hosts {
            cmd.args(["--uri", &host.labelled_uri()]);
        }
        let child = cmd
            .arg("--dir")
            .arg(&dir)
            .args(["--exit-after", "600"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(fs::File::create(work.join("stdout")).expect("stdout file"))
            .stderr(fs::File::create(work.join("stderr")).expect("stderr file"))
            .spawn()
            .expect("spawn virt-consoled");
        Service { child, dir, work }
    }

    fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.work.join(f)).unwrap_or_default();
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// `virt-consoled status`: each console's name and state.
    fn console_states(&mut self) -> Vec<(String, String)> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("virt-consoled exited ({status})\n{}", self.logs());
        }
        let out = Command::new(env!("CARGO_BIN_EXE_virt-consoled"))
            .arg("status")
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("run virt-consoled status");
        if !out.status.success() {
            return Vec::new(); // not listening yet
        }
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("status is JSON");
        status["consoles"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let field = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                (field("name"), field("state"))
            })
            .collect()
    }

    /// Polls the status until `done` holds, panicking at `deadline` or as soon as
    /// `check` returns an error.
    fn wait(
        &mut self,
        what: &str,
        deadline: Instant,
        check: impl Fn(&[(String, String)]) -> Result<bool, String>,
    ) {
        loop {
            let states = self.console_states();
            match check(&states) {
                Ok(true) => return,
                Ok(false) => {}
                Err(why) => panic!(
                    "while waiting for {what}: {why}\n{states:?}\n{}",
                    self.logs()
                ),
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not by the deadline; consoles: {states:?}\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(25));
        }
    }

    /// Sends an echo line to console `name` through its socket and waits for the
    /// guest's answer.
    fn echo(&self, name: &str, tag: &str) {
        let path = self.dir.join(format!("{name}.sock"));
        let mut viewer = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("connect {}: {e}\n{}", path.display(), self.logs()));
        viewer
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let reply = format!("\n{tag}\r");
        let mut seen = Vec::new();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        // Sent again each second: QEMU drops input until it notices a reader.
        let mut next_send = Instant::now();
        while !support::consoles::contains(&seen, reply.as_bytes()) {
            assert!(
                Instant::now() < deadline,
                "{name} never echoed {tag}: {}\n{}",
                support::consoles::tail_text(&seen, 300),
                self.logs()
            );
            if Instant::now() >= next_send {
                viewer
                    .write_all(format!("echo {tag}\n").as_bytes())
                    .expect("write to the console");
                next_send = Instant::now() + Duration::from_secs(1);
            }
            let mut buf = [0; 4096];
            match viewer.read(&mut buf) {
                Ok(0) => panic!("{name}'s socket closed\n{}", self.logs()),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn state_of<'a>(states: &'a [(String, String)], name: &str) -> Option<&'a str> {
    states
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.as_str())
}

/// Issue 13, part 3, end to end: `virt-consoled` serves the consoles of guests on 3
/// hosts; `kill -9` of one host's daemon ends only that host's consoles (within
/// 2 s), and within 5 s of the restarted daemon's return they are attached again
/// and echo, as do the others throughout.
#[test]
fn consoled_attaches_a_restarted_hosts_consoles_again() {
    virt::error::clear_error_callback();
    let testbed = testbed();
    let mut hosts = hosts::start(3).expect("start the hosts");
    // One guest per host, booted before the service starts (it attaches running ones).
    let mut booted = Vec::new();
    for host in &hosts {
        let conn = Connect::open(Some(&host.uri()))
            .unwrap_or_else(|e| panic!("connect {}: {e}", host.uri()));
        let guests = Guests::new();
        let name = format!("{}-1", host.label);
        guests.track(&conn, &name);
        conn.create_domain_xml(&testbed.guest_xml(&name, GuestMode::Plain), 0)
            .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", host.daemon.log_tail(20)));
        booted.push((guests, conn));
    }
    let consoles: Vec<String> = hosts
        .iter()
        .map(|h| format!("{0}/{0}-1", h.label))
        .collect();
    let mut service = Service::start(&hosts);
    service.wait(
        "every console attached",
        Instant::now() + SETTLE_TIMEOUT,
        |s| Ok(consoles.iter().all(|c| state_of(s, c) == Some("attached"))),
    );
    for console in &consoles {
        service.echo(console, "before");
    }

    let (victim, others) = (&consoles[1], [&consoles[0], &consoles[2]]);
    let killed = Instant::now();
    hosts[1].daemon.kill();
    let others_attached =
        |s: &[(String, String)]| match others.iter().find(|c| state_of(s, c) != Some("attached")) {
            Some(c) => Err(format!("{c}, on a host that runs, is not attached")),
            None => Ok(()),
        };
    service.wait(
        "the killed host's console to end",
        killed + LOSS_DEADLINE,
        |s| {
            others_attached(s)?;
            Ok(state_of(s, victim).is_some_and(|state| state != "attached"))
        },
    );
    eprintln!("{victim} ended {:.0?} after the kill", killed.elapsed());
    for console in others {
        service.echo(console, "while-one-is-down");
    }

    hosts[1]
        .daemon
        .restart()
        .expect("restart the killed daemon");
    let back = Instant::now();
    service.wait("the console attached again", back + BACK_DEADLINE, |s| {
        others_attached(s)?;
        Ok(state_of(s, victim) == Some("attached"))
    });
    eprintln!(
        "{victim} attached again {:.0?} after its daemon's return",
        back.elapsed()
    );
    for console in &consoles {
        service.echo(console, "after");
    }
    drop(service);
    drop(booted);
}

/// Issue 13, part 3, with `vol`: one process downloads a volume from each of 3
/// hosts; `kill -9` of one host's daemon mid-transfer makes only that host's
/// transfer wait (reported within 2 s); within 5 s of the daemon's return it
/// resumes, and every download arrives whole with the checksum of its volume.
#[test]
fn vol_resumes_a_restarted_hosts_download_and_leaves_the_others_alone() {
    virt::error::clear_error_callback();
    let mut hosts = hosts::start(3).expect("start the hosts");
    let len = 64 * MIB as usize;
    // Removed on drop, also when the test fails.
    let work = tempfile::Builder::new()
        .prefix("multi-host-vol-")
        .tempdir()
        .expect("a work directory");
    let mut args: Vec<String> = hosts
        .iter()
        .flat_map(|h| ["--uri".to_owned(), h.labelled_uri()])
        .collect();
    args.extend(
        [
            "--pool",
            hosts::POOL,
            "--retry-for",
            "60s",
            "--progress",
            "json",
        ]
        .map(str::to_owned),
    );
    args.extend(["--checksum", "sha256"].map(str::to_owned));
    let mut expected = Vec::new();
    for (k, host) in hosts.iter().enumerate() {
        let conn = Connect::open(Some(&host.uri()))
            .unwrap_or_else(|e| panic!("connect {}: {e}", host.uri()));
        let pool = DirPool::lookup(&conn, hosts::POOL, &host.pool_dir());
        let data = pattern(8800 + k as u64, len);
        pool.volume_with("big", &data);
        let file = work.path().join(&host.label);
        args.extend([format!("{}/big", host.label), path(&file).to_owned()]);
        expected.push((
            format!("{}/big", host.label),
            file,
            data,
            pool.path_of("big"),
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = Background::spawn(bare_command("download", &args));

    let (victim, victim_file) = (&expected[1].0, part_of(&expected[1].1));
    cut(&mut hosts[1].daemon, &process, || {
        len_of(&victim_file) >= MIB
    });
    let killed = Instant::now();
    let waiting = format!(r#""transfer":"{victim}""#);
    process.wait_line_by("the waiting transfer", killed + LOSS_DEADLINE, |line| {
        line.contains(r#""state":"waiting""#) && line.contains(&waiting)
    });
    hosts[1]
        .daemon
        .restart()
        .expect("restart the killed daemon");
    let back = Instant::now();
    process.wait_line_by("the resumed transfer", back + BACK_DEADLINE, |line| {
        line.contains(r#""state":"resumed""#) && line.contains(&waiting)
    });
    eprintln!(
        "{victim} resumed {:.0?} after its daemon's return",
        back.elapsed()
    );

    let (run, _) = process.finish();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines = json_lines(&run.stderr);
    for (name, file, data, volume) in &expected {
        let went = states(&lines, name);
        if name == victim {
            assert_eq!(
                went,
                ["running", "waiting", "resumed", "running", "ended"],
                "{name}"
            );
        } else {
            assert!(
                !went.iter().any(|s| s == "waiting"),
                "{name} waited: {went:?}"
            );
        }
        let ended = lines
            .iter()
            .find(|l| l["transfer"] == name.as_str() && l["state"] == "ended")
            .unwrap_or_else(|| panic!("no end of {name}\n{}", run.stderr));
        assert_eq!(ended["outcome"], "ok", "{name}: {ended}");
        assert_eq!(
            ended["checksum"],
            sha256sum(volume).as_str(),
            "{name}'s checksum"
        );
        assert!(file_is(file, data), "{name} arrived byte-exact");
    }
}

/// The test bed itself: each host's daemon runs in its own namespace and answers
/// on its own address (not on another host's), the /30s differ, a restart keeps
/// the address and the pool, and dropping the hosts leaves no namespace, link,
/// process or directory behind.
#[test]
fn hosts_are_separate_restartable_and_leave_nothing_behind() {
    let mut hosts = hosts::start(2).expect("start the hosts");
    let netns_of = |pid: u32| {
        let out = Command::new("ip")
            .args(["netns", "identify", &pid.to_string()])
            .output()
            .expect("ip netns identify");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for host in &hosts {
        assert_eq!(
            netns_of(host.daemon.pid()),
            host.netns(),
            "{}'s daemon",
            host.label
        );
    }
    assert_ne!(hosts[0].addr, hosts[1].addr);
    for host in &hosts {
        // Its daemon listens on TCP at its own address only.
        let out = Command::new("ip")
            .args(["netns", "exec", host.netns(), "ss", "-Htln"])
            .output()
            .expect("ss in the namespace");
        let listening: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect();
        assert_eq!(
            listening,
            [format!("{}:{}", host.addr, hosts::PORT)],
            "{}",
            host.label
        );
        // Its address reaches its own daemon: the one with its pool.
        let conn = Connect::open(Some(&host.uri())).expect("connect");
        let xml = conn
            .lookup_storage_pool_by_name(hosts::POOL)
            .and_then(|p| p.xml_desc(0))
            .expect("the pool's XML");
        assert!(
            xml.contains(&*host.pool_dir().to_string_lossy()),
            "{} reaches {}'s daemon",
            host.uri(),
            host.label
        );
    }
    let (uri, before) = (hosts[0].uri(), hosts[0].daemon.pid());
    hosts[0].daemon.kill();
    hosts[0].daemon.restart().expect("restart");
    assert_ne!(hosts[0].daemon.pid(), before);
    let conn = Connect::open(Some(&uri)).expect("connect after the restart");
    assert_eq!(conn.list_storage_pools().expect("pools"), [hosts::POOL]);
    drop(conn);

    let left: Vec<(String, u32, PathBuf)> = hosts
        .iter()
        .map(|h| {
            (
                h.netns().to_owned(),
                h.daemon.pid(),
                h.daemon.root().to_path_buf(),
            )
        })
        .collect();
    drop(hosts);
    let namespaces = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_else(|_| Vec::new());
    let links: Vec<String> = fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for (netns, pid, root) in left {
        assert!(!namespaces.contains(&netns), "{netns} is gone");
        let link = netns.replacen("vrh-", "vrh", 1);
        assert!(!links.contains(&link), "{link} is gone");
        assert!(!support::daemon::proc_is_live(pid), "daemon {pid} is gone");
        assert!(!root.exists(), "{} is gone", root.display());
    }
}
