//! Helpers for the console tests (`tests/consoles.rs`): the testbed build, a
//! private daemon with a reactor thread and a [`ConsoleMux`], a transcript of
//! console events with deadline-bounded waits, a stream handler that forwards what
//! a raw console stream carries, `/proc` inspection, and the `console_mux` example
//! run as `nobody` exactly as `scripts/main.sh` runs it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use virt::connect::Connect;
use virt::domain::Domain;
use virt_reactor::console::{ConsoleEnd, ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::testbed::{GuestMode, Guests, Testbed, BANNER};
use virt_reactor::{
    DrainReport, Flow, Reactor, ReactorHandle, Readiness, StreamCtx, StreamEnd, StreamHandler,
    StreamToken,
};

use super::daemon::PrivateDaemon;
use super::lock;

/// Create → banner, for all guests of a test together. The research note measured
/// 2.3–2.5 s per guest on an idle host and ~2.5 CPU-s per TCG boot; 8 guests on 2
/// shared cores take far less than this even under load.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// One echo round trip (plain mode takes ~1 ms; input in the first second after
/// opening a pty console waits for QEMU's once-a-second reader poll).
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(30);
/// A console's end after its guest was destroyed or its console taken over.
pub const END_TIMEOUT: Duration = Duration::from_secs(30);
/// Stopping the reactor thread, and draining libvirt's registrations.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The repository.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the testbed (kernel + initramfs) once per process and returns its
/// directory. `testbed/build.sh` is idempotent (about 50 ms when nothing changed);
/// `flock` keeps test processes running in parallel from building it at once.
pub fn testbed_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = std::env::var_os("TESTBED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".testbed"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let output = Command::new("flock")
            .arg(dir.join(".build.lock"))
            .arg("bash")
            .arg(repo().join("testbed/build.sh"))
            .env("TESTBED_DIR", &dir)
            .output()
            .expect("run flock bash testbed/build.sh");
        assert!(
            output.status.success(),
            "testbed/build.sh failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        fs::canonicalize(&dir).expect("canonical testbed dir")
    })
}

/// The built testbed.
pub fn testbed() -> Testbed {
    Testbed::open(testbed_dir()).expect("open the testbed")
}

/// `PREFIX-1` … `PREFIX-n`.
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The banner line guest `name` prints once its console serves input.
pub fn banner(name: &str) -> String {
    format!("{BANNER} name={name}\r")
}

/// The command of echo round `round` for console `name`, and the reply to match:
/// the output line starts right after a newline, the echoed command line does not.
pub fn echo_command(name: &str, round: usize) -> (String, String) {
    let tag = format!("hello-{name}-{round}");
    (format!("echo {tag}\n"), format!("\n{tag}\r"))
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The last `n` bytes, printable.
pub fn tail_text(bytes: &[u8], n: usize) -> String {
    let from = bytes.len().saturating_sub(n);
    format!("{:?}", String::from_utf8_lossy(&bytes[from..]))
}

/// Boots again of a testbed guest that disappeared before its banner.
const BOOT_RETRIES: usize = 2;

/// Everything a [`ConsoleMux`] reported, per console, in arrival order.
pub struct Transcript {
    rx: Receiver<ConsoleEvent>,
    output: BTreeMap<String, Vec<u8>>,
    /// Non-output events in arrival order.
    pub log: Vec<Happened>,
    closed: bool,
}

/// A non-output [`ConsoleEvent`].
#[derive(Debug)]
pub enum Happened {
    Attached(String),
    Ended(String, ConsoleEnd),
    AttachFailed(String, virt_reactor::Error),
}

impl Happened {
    pub fn name(&self) -> &str {
        match self {
            Happened::Attached(n) | Happened::Ended(n, _) | Happened::AttachFailed(n, _) => n,
        }
    }
}

impl Transcript {
    pub fn new(rx: Receiver<ConsoleEvent>) -> Transcript {
        Transcript {
            rx,
            output: BTreeMap::new(),
            log: Vec::new(),
            closed: false,
        }
    }

    fn absorb(&mut self, event: ConsoleEvent) {
        match event {
            ConsoleEvent::Output { name, bytes } => self
                .output
                .entry(name)
                .or_default()
                .extend_from_slice(&bytes),
            ConsoleEvent::Attached { name } => self.log.push(Happened::Attached(name)),
            ConsoleEvent::Ended { name, end } => self.log.push(Happened::Ended(name, end)),
            ConsoleEvent::AttachFailed { name, error } => {
                self.log.push(Happened::AttachFailed(name, error))
            }
            other => panic!("a console event this test does not know: {other:?}"),
        }
    }

    /// Everything console `name` printed.
    pub fn output(&self, name: &str) -> &[u8] {
        self.output.get(name).map_or(&[], Vec::as_slice)
    }

    /// Where `name`'s output ends now; see [`output_since`](Self::output_since).
    pub fn mark(&self, name: &str) -> usize {
        self.output(name).len()
    }

    pub fn output_since(&self, name: &str, mark: usize) -> &[u8] {
        &self.output(name)[mark.min(self.output(name).len())..]
    }

    pub fn attached_count(&self, name: &str) -> usize {
        self.log
            .iter()
            .filter(|h| matches!(h, Happened::Attached(n) if n == name))
            .count()
    }

    pub fn ends(&self, name: &str) -> Vec<&ConsoleEnd> {
        self.log
            .iter()
            .filter_map(|h| match h {
                Happened::Ended(n, end) if n == name => Some(end),
                _ => None,
            })
            .collect()
    }

    pub fn failures(&self, name: &str) -> Vec<&virt_reactor::Error> {
        self.log
            .iter()
            .filter_map(|h| match h {
                Happened::AttachFailed(n, e) if n == name => Some(e),
                _ => None,
            })
            .collect()
    }

    /// How many ends and attach failures `name` has had: a console that is expected
    /// to stay alive must keep this number.
    pub fn trouble(&self, name: &str) -> usize {
        self.ends(name).len() + self.failures(name).len()
    }

    /// Receives events until `check` says done (`Ok(Some(_))`) or fails
    /// (`Err(why)`), for at most `timeout`; panics with the transcript otherwise.
    pub fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Transcript) -> Result<Option<T>, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            match check(self) {
                Ok(Some(done)) => return done,
                Ok(None) => {}
                Err(why) => panic!("while waiting for {what}: {why}\n{}", self.describe()),
            }
            let now = Instant::now();
            if now >= deadline || self.closed {
                panic!(
                    "{} waiting for {what}\n{}",
                    if self.closed {
                        "the event channel closed".to_owned()
                    } else {
                        format!("timed out after {timeout:?}")
                    },
                    self.describe()
                );
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(event) => {
                    self.absorb(event);
                    while let Ok(event) = self.rx.try_recv() {
                        self.absorb(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Boots `names` with `boot` and waits for every banner. A testbed guest that
    /// disappears before its banner (its kernel panicked or its init died, and
    /// `panic=-1` with `on_reboot=destroy` removes the domain: see
    /// testbed/domain.xml.in; rare, under TCG on loaded CPUs) is booted again, at
    /// most [`BOOT_RETRIES`] times, and its dead boot's records are forgotten.
    pub fn boot_and_wait(&mut self, names: &[String], boot: impl Fn(&[String])) {
        boot(names);
        for _ in 0..BOOT_RETRIES {
            let dead = self.wait("every banner", BOOT_TIMEOUT, |t| {
                let mut dead = Vec::new();
                for name in names {
                    if contains(t.output(name), banner(name).as_bytes()) {
                        continue;
                    }
                    match (&t.ends(name)[..], t.failures(name).len()) {
                        ([], 0) => return Ok(None),
                        ([ConsoleEnd::GuestGone], 0) => dead.push(name.clone()),
                        _ => return Err(format!("{name} ended or failed to attach")),
                    }
                }
                Ok(Some(dead))
            });
            if dead.is_empty() {
                return;
            }
            for name in &dead {
                eprintln!("{name} disappeared before its banner; booting it again");
                self.forget(name);
            }
            boot(&dead);
        }
        self.wait_banners(names, None);
    }

    /// Drops what console `name` reported.
    fn forget(&mut self, name: &str) {
        self.output.remove(name);
        self.log.retain(|h| h.name() != name);
    }

    /// Waits for the banner of every console in `names` (printed after `marks`, if
    /// given); fails at once if one of them ends or cannot attach.
    pub fn wait_banners(&mut self, names: &[String], marks: Option<&BTreeMap<String, usize>>) {
        let trouble: Vec<usize> = names.iter().map(|n| self.trouble(n)).collect();
        self.wait("every banner", BOOT_TIMEOUT, |t| {
            for (name, before) in names.iter().zip(&trouble) {
                if t.trouble(name) != *before {
                    return Err(format!("{name} ended or failed to attach"));
                }
            }
            Ok(names
                .iter()
                .all(|n| {
                    let mark = marks.and_then(|m| m.get(n)).copied().unwrap_or(0);
                    contains(t.output_since(n, mark), banner(n).as_bytes())
                })
                .then_some(()))
        });
    }

    /// One echo round trip on each console of `names`, all sent before any reply
    /// is awaited; each reply must arrive on its own console. `send` queues input.
    pub fn echo_round(
        &mut self,
        names: &[String],
        round: usize,
        send: impl Fn(&str, &[u8]) -> virt_reactor::Result<()>,
    ) {
        let marks: Vec<usize> = names.iter().map(|n| self.mark(n)).collect();
        let trouble: Vec<usize> = names.iter().map(|n| self.trouble(n)).collect();
        for name in names {
            let (command, _) = echo_command(name, round);
            send(name, command.as_bytes())
                .unwrap_or_else(|e| panic!("send echo round {round} to {name}: {e}"));
        }
        self.wait(&format!("echo round {round}"), ECHO_TIMEOUT, |t| {
            let mut all = true;
            for ((name, mark), before) in names.iter().zip(&marks).zip(&trouble) {
                if t.trouble(name) != *before {
                    return Err(format!("{name} ended or failed during the round"));
                }
                let (_, reply) = echo_command(name, round);
                all &= contains(t.output_since(name, *mark), reply.as_bytes());
            }
            Ok(all.then_some(()))
        });
    }

    /// Receives until every sender is gone (the mux, its handlers, its workers),
    /// for at most `timeout`; returns whether that happened.
    pub fn drain_until_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(event) => self.absorb(event),
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
        true
    }

    /// The events and the tail of each console's output, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = String::from("console events:\n");
        for h in &self.log {
            s.push_str(&format!("  {h:?}\n"));
        }
        for (name, bytes) in &self.output {
            s.push_str(&format!(
                "output of {name} ({} bytes), last 300: {}\n",
                bytes.len(),
                tail_text(bytes, 300)
            ));
        }
        s
    }
}

/// A private daemon, a reactor (state `()`) running on a thread of its own, a
/// connection and a [`ConsoleMux`] on it. Dropping it (also when a test fails) destroys the guests it
/// booted, detaches the consoles and stops the reactor; the daemon's drop then kills
/// whatever is left.
pub struct MuxRig {
    pub testbed: Testbed,
    pub handle: ReactorHandle<()>,
    guests: Option<Guests>,
    mux: Option<ConsoleMux<()>>,
    conn: Option<Connect>,
    loop_thread: Option<JoinHandle<virt_reactor::Result<DrainReport>>>,
    /// Last, so that it outlives everything that talks to it.
    pub daemon: PrivateDaemon,
}

impl MuxRig {
    pub fn start(options: ConsoleOptions) -> (MuxRig, Transcript) {
        // Errors are returned, not printed.
        virt::error::clear_error_callback();
        let testbed = testbed();
        let daemon = PrivateDaemon::start().expect("start a private libvirtd");
        // Registered here, before the connection opens; moved to its thread once the
        // mux is on it.
        let mut reactor = Reactor::register().expect("register the reactor's event loop");
        let handle = reactor.handle();
        let uri = daemon.uri("qemu");
        let conn = virt_reactor::connect(&uri)
            .unwrap_or_else(|e| panic!("connect {uri}: {e}\n{}", daemon.log_tail(30)));
        let (mux, rx) = ConsoleMux::new(&mut reactor, &conn, options).expect("a console mux");
        let loop_thread = spawn_reactor(reactor, ());
        let rig = MuxRig {
            testbed,
            handle,
            guests: Some(Guests::new()),
            mux: Some(mux),
            conn: Some(conn),
            loop_thread: Some(loop_thread),
            daemon,
        };
        (rig, Transcript::new(rx))
    }

    pub fn mux(&self) -> &ConsoleMux<()> {
        self.mux.as_ref().expect("the rig is running")
    }

    pub fn conn(&self) -> &Connect {
        self.conn.as_ref().expect("the rig is running")
    }

    pub fn guests(&self) -> &Guests {
        self.guests.as_ref().expect("the rig is running")
    }

    /// Boots transient testbed guests through [`ConsoleMux::boot`] (create paused,
    /// attach, resume), each tracked for destruction first.
    pub fn boot(&self, names: &[String]) {
        for name in names {
            self.guests().track(self.conn(), name);
            self.mux()
                .boot(name, &self.testbed.guest_xml(name, GuestMode::Plain))
                .unwrap_or_else(|e| panic!("boot {name}: {e}"));
        }
    }

    pub fn domain(&self, name: &str) -> Domain {
        self.conn()
            .lookup_domain_by_name(name)
            .unwrap_or_else(|e| panic!("look up {name}: {e}"))
    }

    /// Runs [`ConsoleMux::detach_all`] on the loop thread and waits for it.
    pub fn detach_all(&self) {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let mux = self.mux().clone();
        self.handle
            .execute(move |reactor, state| {
                mux.detach_all(reactor, state);
                let _ = done_tx.send(());
            })
            .expect("reach the reactor");
        done.recv_timeout(END_TIMEOUT)
            .expect("the reactor detaches the consoles");
    }

    /// A second, independent connection to the same daemon.
    pub fn connect_again(&self) -> Connect {
        virt_reactor::connect(&self.daemon.uri("qemu")).expect("a second connection")
    }

    /// Tears everything down and reports how the reactor ended: destroys the
    /// guests, detaches the remaining consoles, closes the connection, stops the
    /// reactor and drains libvirt's registrations. Close other connections first.
    pub fn finish(mut self) -> DrainReport {
        self.teardown()
            .unwrap_or_else(|e| panic!("tearing the rig down: {e}"))
    }

    fn teardown(&mut self) -> Result<DrainReport, String> {
        let Some(loop_thread) = self.loop_thread.take() else {
            return Err("already torn down".into());
        };
        if let Some(guests) = self.guests.take() {
            guests.destroy_all();
        }
        let mut problems = Vec::new();
        if let Some(mux) = self.mux.take() {
            let (done_tx, done) = crossbeam_channel::bounded(1);
            let sent = self.handle.execute(move |reactor, state| {
                mux.detach_all(reactor, state);
                let _ = done_tx.send(());
            });
            if sent.is_err() || done.recv_timeout(DRAIN_TIMEOUT).is_err() {
                problems.push("the reactor did not detach the consoles".to_owned());
            }
        }
        self.conn.take();
        self.handle.stop();
        match loop_thread.join() {
            Ok(Ok(report)) if problems.is_empty() => Ok(report),
            Ok(Ok(_)) => Err(problems.join("; ")),
            Ok(Err(e)) => {
                problems.push(format!("the reactor ended with {e}"));
                Err(problems.join("; "))
            }
            Err(_) => {
                problems.push("the reactor thread panicked".into());
                Err(problems.join("; "))
            }
        }
    }
}

impl Drop for MuxRig {
    fn drop(&mut self) {
        if self.loop_thread.is_some() {
            if let Err(e) = self.teardown() {
                eprintln!("console rig teardown: {e}");
            }
        }
    }
}

/// Runs `reactor` with `state` on a thread of its own until its handle's `stop`,
/// then shuts it down. Take the handle (`reactor.handle()`) before.
pub fn spawn_reactor<S: Send + 'static>(
    mut reactor: Reactor<S>,
    mut state: S,
) -> JoinHandle<virt_reactor::Result<DrainReport>> {
    thread::Builder::new()
        .name("reactor".into())
        .spawn(move || {
            reactor.run(&mut state)?;
            reactor.shutdown(DRAIN_TIMEOUT, &mut state)
        })
        .expect("spawn the reactor thread")
}

/// What a [`Tap`] saw on its stream.
#[derive(Debug)]
pub enum Tapped {
    Output(Vec<u8>),
    /// `read` returned 0: end of stream.
    End,
    /// `read` failed.
    Failed(String),
    /// The stream left the reactor.
    Closed(String),
}

/// What [`Tap`]s saw, with their streams' tokens, in order: the state of a reactor
/// whose taps report into it ([`Tap::in_state`]).
pub type TapLog = Vec<(StreamToken, Tapped)>;

/// Where a [`Tap`] reports.
pub trait TapSink<S>: Send + 'static {
    fn report(&mut self, state: &mut S, token: StreamToken, tapped: Tapped);
}

/// To a test thread, from a reactor running on another thread.
impl<S> TapSink<S> for Sender<(StreamToken, Tapped)> {
    fn report(&mut self, _state: &mut S, token: StreamToken, tapped: Tapped) {
        let _ = self.send((token, tapped));
    }
}

/// Into the reactor's state, a [`TapLog`].
pub struct IntoState;

impl TapSink<TapLog> for IntoState {
    fn report(&mut self, state: &mut TapLog, token: StreamToken, tapped: Tapped) {
        state.push((token, tapped));
    }
}

/// A handler that reports everything its stream carries, with the stream's token,
/// to a channel or into the reactor's state: the raw-console counterpart of the
/// mux's handler.
pub struct Tap<K = Sender<(StreamToken, Tapped)>> {
    sink: K,
    buf: Vec<u8>,
    token: Option<StreamToken>,
}

impl Tap {
    pub fn new(tx: Sender<(StreamToken, Tapped)>) -> Tap {
        Tap::with_sink(tx)
    }

    /// A tap that reports into its reactor's state, a [`TapLog`].
    pub fn in_state() -> Tap<IntoState> {
        Tap::with_sink(IntoState)
    }
}

impl<K> Tap<K> {
    fn with_sink(sink: K) -> Tap<K> {
        Tap {
            sink,
            buf: vec![0; 4096],
            token: None,
        }
    }
}

impl<S, K: TapSink<S>> StreamHandler<S> for Tap<K> {
    fn ready(&mut self, state: &mut S, cx: &mut StreamCtx<'_>, _readiness: Readiness) -> Flow {
        let token = cx.token();
        self.token = Some(token);
        loop {
            match cx.read(&mut self.buf) {
                Ok(0) => {
                    self.sink.report(state, token, Tapped::End);
                    return Flow::Finish;
                }
                Ok(n) => {
                    let output = Tapped::Output(self.buf[..n].to_vec());
                    self.sink.report(state, token, output);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Flow::Continue,
                Err(e) => {
                    self.sink
                        .report(state, token, Tapped::Failed(e.to_string()));
                    return Flow::Abort;
                }
            }
        }
    }

    fn closed(&mut self, state: &mut S, end: StreamEnd) {
        if let Some(token) = self.token {
            let closed = Tapped::Closed(format!("{end:?}"));
            self.sink.report(state, token, closed);
        }
    }
}

/// One process, from `/proc`.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub state: char,
}

impl Proc {
    pub fn read(pid: u32) -> Option<Proc> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next()?.chars().next()?;
        let ppid = rest.next()?.parse().ok()?;
        Some(Proc {
            pid,
            ppid,
            comm,
            state,
        })
    }

    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    pub fn cmdline(&self) -> String {
        fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    }
}

/// Every process now.
pub fn processes() -> Vec<Proc> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(Proc::read)
        .collect()
}

/// Live processes whose command line or environment contains `needle`.
pub fn live_processes_mentioning(needle: &str) -> Vec<Proc> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|p| p.pid != me && p.is_live())
        .filter(|p| {
            ["cmdline", "environ"].iter().any(|f| {
                fs::read(format!("/proc/{}/{f}", p.pid))
                    .is_ok_and(|bytes| contains(&bytes, needle.as_bytes()))
            })
        })
        .collect()
}

/// The live descendants of `pid` (children, their children, …).
pub fn descendants(pid: u32) -> Vec<Proc> {
    let all = processes();
    let mut found: Vec<Proc> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.ppid == parent && p.is_live()) {
            frontier.push(p.pid);
            found.push(p.clone());
        }
    }
    found
}

/// Builds example `name` with cargo (same profile as this test) and returns its
/// executable, as cargo reports it.
pub fn example_binary(name: &str) -> PathBuf {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo()).args([
        "build",
        "--example",
        name,
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let output = cmd.output().expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let target = format!("\"kind\":[\"example\"],\"crate_types\":[\"bin\"],\"name\":\"{name}\"");
    stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&target))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .unwrap_or_else(|| panic!("cargo reported no executable for example {name}:\n{stdout}"))
}

static HOMES: AtomicU32 = AtomicU32::new(0);

/// A fresh directory below /tmp owned by nobody:nogroup (mode 0700), removed on drop.
pub struct NobodyHome(pub PathBuf);

impl NobodyHome {
    pub fn new() -> NobodyHome {
        let path = PathBuf::from(format!(
            "/tmp/consoles-home-{}-{}",
            std::process::id(),
            HOMES.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod home");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown home to nobody");
        NobodyHome(path)
    }
}

impl Drop for NobodyHome {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `console_mux` example booting testbed guests on the embedded driver, run as
/// `scripts/main.sh` runs it as root: `setpriv --reuid=nobody --regid=nogroup
/// --clear-groups env HOME=<private home> TESTBED_DIR=<testbed> console_mux`,
/// with stdin, stdout and stderr piped.
///
/// Dropping it before it exited closes its stdin (it then destroys its guests and
/// exits), kills it if it does not exit, and runs `testbed/cleanup.sh` on its
/// embed root (orphaned QEMU, stale pty locks).
pub struct MuxProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines_rx: Receiver<String>,
    /// Every stdout line so far.
    pub lines: Vec<String>,
    stdout_done: bool,
    stderr: Arc<Mutex<String>>,
    /// The stderr reader reached end of file: `stderr` is complete.
    stderr_done: Arc<AtomicBool>,
    status: Option<ExitStatus>,
    /// The embed root the example uses: `/tmp/console-mux-<its pid>`.
    pub root: PathBuf,
    pub home: NobodyHome,
}

impl MuxProcess {
    pub fn spawn(args: &[&str]) -> MuxProcess {
        MuxProcess::spawn_with_testbed(args, testbed_dir())
    }

    /// As [`spawn`](Self::spawn), with `TESTBED_DIR=testbed`.
    pub fn spawn_with_testbed(args: &[&str], testbed: &Path) -> MuxProcess {
        let binary = example_binary("console_mux");
        let home = NobodyHome::new();
        let mut child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "env"])
            .arg(format!("HOME={}", home.0.display()))
            .arg(format!("TESTBED_DIR={}", testbed.display()))
            .arg(&binary)
            .args(args)
            // As from a login shell: the embed root goes to /tmp.
            .env_remove("TMPDIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        // setpriv and env exec, so the example keeps this pid.
        let root = PathBuf::from(format!("/tmp/console-mux-{}", child.id()));
        let (lines_tx, lines_rx) = crossbeam_channel::unbounded();
        let stdout = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_done = Arc::new(AtomicBool::new(false));
        {
            let (mut pipe, stderr) = (child.stderr.take().expect("piped stderr"), stderr.clone());
            let done = Arc::clone(&stderr_done);
            thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    lock(&stderr).push_str(&text);
                }
                done.store(true, Ordering::Release);
            });
        }
        let stdin = child.stdin.take();
        MuxProcess {
            child,
            stdin,
            lines_rx,
            lines: Vec::new(),
            stdout_done: false,
            stderr,
            stderr_done,
            status: None,
            root,
            home,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pump(&mut self, until: Instant) {
        let now = Instant::now();
        if self.stdout_done {
            thread::sleep(
                until
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(50)),
            );
            return;
        }
        match self
            .lines_rx
            .recv_timeout(until.saturating_duration_since(now))
        {
            Ok(line) => {
                self.lines.push(line);
                self.lines.extend(self.lines_rx.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.stdout_done = true,
        }
    }

    /// Reads stdout until `check` holds for the lines so far; panics after
    /// `timeout` or if the process exits first.
    pub fn wait_lines(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(&self.lines) {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.describe()
                );
            }
            if self.stdout_done {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                    panic!(
                        "console_mux exited ({status}) before {what}\n{}",
                        self.describe()
                    );
                }
            }
            self.pump(deadline);
        }
    }

    /// How many stdout lines are exactly `line`.
    pub fn count(&self, line: &str) -> usize {
        self.lines.iter().filter(|l| *l == line).count()
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("write to console_mux");
        stdin.flush().expect("flush console_mux's stdin");
    }

    /// Ends its input, which quits it.
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits for it to exit and for the rest of its output.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status.is_none() {
                self.status = self.child.try_wait().expect("wait for console_mux");
            }
            // Both pipes read to their end, or an error message may still be in flight.
            let drained = self.stdout_done && self.stderr_done.load(Ordering::Acquire);
            if let (Some(status), true) = (self.status, drained) {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "console_mux did not exit within {timeout:?}\n{}",
                    self.describe()
                );
            }
            self.pump((Instant::now() + Duration::from_millis(50)).min(deadline));
        }
    }

    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    pub fn describe(&self) -> String {
        format!(
            "--- console_mux stdout ---\n{}\n--- stderr ---\n{}",
            self.lines.join("\n"),
            self.stderr()
        )
    }
}

impl Drop for MuxProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.stdin.take();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if self.status.is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let root = self.root.display().to_string();
        if self.root.exists() || !live_processes_mentioning(&format!("{root}/")).is_empty() {
            let _ = Command::new("bash")
                .arg(repo().join("testbed/cleanup.sh"))
                .arg("--force")
                .arg(&self.root)
                .stdout(Stdio::null())
                .status();
        }
    }
}
