//! A console server: every guest console on a Unix socket `DIR/NAME.sock`, for any
//! plain client (`socat - UNIX-CONNECT:DIR/NAME.sock`, `nc -U`, a program).
//!
//! ```text
//! console_server                                    # boot 2 testbed guests (embedded driver)
//! console_server --uri qemu:///system [--domain NAME ...] [--dir DIR]
//! console_server --uri URI --tcp 127.0.0.1:7000     # also TCP, loopback only, with a token
//! ```
//!
//! One thread and one `mio::Poll` own everything: the listening sockets, the clients
//! and libvirt's events (the [`Reactor`] is one more `mio::event::Source` on that
//! poll; after each poll the thread calls `reactor.dispatch()`, and it caps its poll
//! timeout with `reactor.next_timeout()`). Blocking libvirt calls (connecting,
//! creating guests, opening consoles) run on worker threads through the
//! [`ConsoleMux`], which hands the finished streams to the reactor.
//!
//! * Several clients may attach to one console: all get its output, and their input
//!   is merged (chunk by chunk, as it is read).
//! * Each client has a bounded output buffer (`--client-buffer`); a client that falls
//!   further behind is disconnected and logged, so it never blocks the loop.
//! * A console that starts gets a socket (mode 0600, in a 0700 directory); the socket
//!   goes when the console ends (guest destroyed, powered off).
//! * `--dir DIR` that does not exist is created (0700) and removed at exit. One that
//!   exists is used only if it is a real directory (not a symbolic link), ours, and
//!   mode 0700; anything else (`/tmp`, a shared or sticky directory, a link) is
//!   refused, never chmodded. Nothing else in it is touched.
//! * With `--uri`, lifecycle events tell when a domain starts, and its console is
//!   attached then.
//! * TCP only with `--tcp ADDR`, only on a loopback address. A TCP client first sends
//!   `TOKEN NAME\n`; a wrong token closes the connection. The token is random and
//!   printed at start, or kept in `--token-file`.
//! * Hostile local users cannot exhaust the server: at most `--max-pending` TCP
//!   connections wait for their line (a new one closes the oldest waiting one),
//!   accepts are budgeted per loop iteration (Unix listeners first, each with its
//!   own budget), a client that closes is removed at once, and a reserve descriptor
//!   lets the server shed connections when it runs out of descriptors (EMFILE). A
//!   Unix client that finds no descriptor free takes one from a TCP connection that
//!   has not sent its line yet.
//! * SIGINT, SIGTERM or `--exit-after SECONDS` shut down cleanly: consoles finished,
//!   guests this run booted destroyed, sockets and directory removed.
//! * A Unix client that stops sending (half-close, e.g. `socat` after end of input)
//!   still gets output until it closes for good. Over TCP a close and a half-close
//!   look the same (a FIN) until something is written, so there end of input ends
//!   the session: closed TCP peers cannot pile up on a quiet console.
//!
//! Without `--uri` the guests run on libvirt's in-process QEMU driver, which libvirt
//! 9.0 refuses to run as root on a host without the `libvirt-qemu` user; there, run
//! it unprivileged as `scripts/main.sh` does for `console_mux`
//! (`setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME=… TESTBED_DIR=…`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "common/consoles.rs"]
mod common;
#[path = "common/owned_dir.rs"]
mod owned_dir;

use clap::Parser;
use common::{Destroyed, SetUp};
use mio::event::{Event, Source};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use owned_dir::OwnedDir;
use slab::Slab;
use virt_reactor::console::{ConsoleEnd, ConsoleEvent, ConsoleOptions};
use virt_reactor::{LifecycleKind, Reactor, SubscriptionId};

/// The reactor (libvirt's events, and jobs from other threads: signals, the set-up
/// workers) on our poll.
const LIBVIRT: Token = Token(0);
/// The TCP listener.
const TCP: Token = Token(1);
/// Console listeners and clients: `FIRST_SOURCE + slab key`.
const FIRST_SOURCE: usize = 2;

/// Bytes read from one client per readiness, so one chatty client cannot hold the loop.
const READ_BUDGET: usize = 64 * 1024;
/// Longest `TOKEN NAME\n` line a TCP client may send.
const HANDSHAKE_MAX: usize = 1024;
/// How long a TCP client has to send that line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon to retry input that did not fit into a console's input queue.
const INPUT_RETRY: Duration = Duration::from_millis(10);
/// How long shutdown waits for guests still booting, and for destroying guests.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for a daemon's answers, so that a frozen one cannot hold
/// the exit (every stream's end and the connection's close are calls to it).
const DAEMON_GRACE: Duration = Duration::from_millis(500);
/// The least a drain gets: enough for a healthy daemon's answers.
const MIN_DRAIN: Duration = Duration::from_millis(100);

/// How long shutdown waits for libvirt: destroying guests this run booted takes
/// seconds, anything else is quick unless the daemon does not answer.
fn shutdown_grace(booted: &[String]) -> Duration {
    if booted.is_empty() {
        DAEMON_GRACE
    } else {
        SHUTDOWN_WAIT
    }
}
/// `sizeof(sockaddr_un.sun_path) - 1`.
const SUN_PATH_MAX: usize = 107;
/// Connections accepted per listener and loop iteration, so that a flood of them
/// cannot keep the loop from serving (and reaping) the clients it has.
const ACCEPT_BUDGET: usize = 32;
/// At most one log line per this, for what a hostile peer can repeat at will.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(about = "Serve guest consoles on Unix sockets (and loopback TCP) from one thread")]
struct Args {
    /// Attach to the running domains of this connection, and to each domain that
    /// starts later, instead of booting testbed guests.
    #[arg(long)]
    uri: Option<String>,
    /// With --uri: serve only these domains (default: all of them).
    #[arg(long = "domain", requires = "uri")]
    domains: Vec<String>,
    /// Testbed guests to boot (without --uri).
    #[arg(long, default_value_t = 2, conflicts_with = "uri")]
    guests: usize,
    /// Where the testbed kernel and initramfs are (testbed/build.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed"))]
    testbed: PathBuf,
    /// Directory of the console sockets (default: a fresh temporary directory).
    /// Created mode 0700 if missing, and then removed at exit; an existing one must
    /// be a real directory of ours with mode 0700, else it is refused.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also serve on TCP at this loopback address (port 0 picks one). A client
    /// first sends "TOKEN NAME\n".
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// With --tcp: read the token from this file, or write a new random one there
    /// (mode 0600) if it does not exist.
    #[arg(long, requires = "tcp")]
    token_file: Option<PathBuf>,
    /// With --tcp: most connections waiting for their "TOKEN NAME" line; one more
    /// closes the oldest waiting one.
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = at_least_one)]
    max_pending: usize,
    /// Output bytes a client may fall behind before it is disconnected.
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES", value_parser = at_least_one)]
    client_buffer: usize,
    /// Shut down cleanly after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    exit_after: Option<Duration>,
    /// Take consoles over from other clients (VIR_DOMAIN_CONSOLE_FORCE).
    #[arg(long)]
    force: bool,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// A duration from now that a deadline can hold: finite and not negative.
fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|&d| Instant::now().checked_add(d).is_some())
        .ok_or_else(|| "not a usable number of seconds (0 or more, finite)".to_owned())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    virt::error::clear_error_callback();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("console_server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The reactor's state: what reaches the loop thread through libvirt's events,
/// `execute` jobs (signals) and `spawn_blocking` (the set-up, the shutdown).
#[derive(Default)]
struct Libvirt {
    /// The set-up's outcome, once it is known.
    setup: Option<Result<Session, String>>,
    /// Names of domains that started (from the lifecycle subscription).
    started: Vec<String>,
    /// Why to quit, when asked to (a signal).
    quit: Option<&'static str>,
    /// How many guests the shutdown destroyed, once it has.
    destroyed: Option<usize>,
    /// Lifecycle events of a daemon's domains (`--uri`).
    subscription: Option<SubscriptionId>,
}

impl Destroyed for Libvirt {
    fn destroyed(&mut self) -> &mut Option<usize> {
        &mut self.destroyed
    }
}

type Session = common::Session<Libvirt>;

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Refuse what we will not do before touching anything.
    if let Some(addr) = args.tcp {
        if !addr.ip().is_loopback() {
            return Err(format!("--tcp {addr}: only loopback addresses are served").into());
        }
    }

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    // libvirt's events are one more source on our poll.
    let mut reactor = Reactor::<Libvirt>::register()?;
    poll.registry()
        .register(&mut reactor, LIBVIRT, Interest::READABLE)?;
    let registry = poll.registry().try_clone()?;
    let reserve = Reserve::new()?;
    {
        // The job wakes the reactor, so our poll.
        let handle = reactor.handle();
        ctrlc::set_handler(move || {
            let _ = handle.execute(|_, libvirt| libvirt.quit = Some("signal"));
        })?;
    }

    // From here on, what this run creates is removed when its owner drops, on every
    // path out, errors included.
    let dir = SocketDir::prepare(args.dir.as_deref())?;
    let tcp = match args.tcp {
        Some(addr) => Some(TcpFront::bind(
            addr,
            args.token_file.as_deref(),
            poll.registry(),
        )?),
        None => None,
    };
    let embed_root = match args.uri {
        Some(_) => None,
        None => Some(OwnedDir::create(
            std::env::temp_dir().join(format!("console-server-{}", std::process::id())),
        )?),
    };
    println!("console_server: consoles in {}", dir.path.display());

    // Connecting and booting block on replies that, with the in-process driver,
    // come through this very loop: workers do them while this thread polls.
    let (embedded, domains) = (args.uri.is_none(), args.domains.clone());
    SetUp {
        uri: args.uri.clone(),
        root: embed_root.as_ref().map(|r| r.path().to_path_buf()),
        guests: args.guests,
        testbed: args.testbed.clone(),
        options: ConsoleOptions {
            force: args.force,
            ..ConsoleOptions::default()
        },
    }
    .start(&reactor.handle(), move |reactor, libvirt, ready| {
        libvirt.setup = match ready {
            Ok((session, uri)) if !embedded => {
                watch_running(reactor, libvirt, session, uri, domains).transpose()
            }
            ready => Some(ready.map(|(session, _)| session)),
        }
    })?;

    let mut server = Server {
        registry,
        dir,
        tcp,
        max_pending: args.max_pending,
        pending: BTreeMap::new(),
        unix_ready: BTreeSet::new(),
        tcp_ready: false,
        reserve,
        evicted: Quiet::default(),
        refused: Quiet::default(),
        sources: Slab::new(),
        consoles: BTreeMap::new(),
        client_buffer: args.client_buffer,
        filter: (!args.domains.is_empty()).then(|| args.domains.iter().cloned().collect()),
        session: None,
        pending_boots: BTreeSet::new(),
        retry: BTreeSet::new(),
        restarted: BTreeSet::new(),
        next_peer: 1,
        libvirt: Libvirt::default(),
        setup_finished: false,
        closing: false,
        scratch: vec![0; 16 * 1024],
    };
    // `seconds` made sure that the deadline fits; `None` would mean never.
    let exit_at = args.exit_after.and_then(|d| Instant::now().checked_add(d));

    let outcome: Result<(), String> = loop {
        // Our own deadlines first: next_timeout() must come right before the poll.
        let mut timeout = server.timeout();
        if let Some(at) = exit_at {
            timeout = min_timeout(timeout, Some(at.saturating_duration_since(Instant::now())));
        }
        timeout = min_timeout(timeout, reactor.next_timeout());
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(format!("poll: {e}")),
        }
        for event in events.iter() {
            match event.token() {
                LIBVIRT => {} // dispatched below on every iteration
                TCP => server.tcp_ready = true,
                Token(n) => server.source_ready(n - FIRST_SOURCE, event),
            }
        }
        // After the clients' events, so that those that closed are gone first.
        server.accept_ready();
        // Every iteration, not only when LIBVIRT fired: libvirt's timers make no fd
        // readable, the poll just times out for them.
        match reactor.dispatch(&mut server.libvirt) {
            Ok(()) => {}
            Err(e @ virt_reactor::Error::CallbackPanicked { .. }) => log::error!("{e}"),
            Err(e) => break Err(format!("libvirt event loop: {e}")),
        }
        if let Some(quit) = server.after_dispatch() {
            break quit;
        }
        if exit_at.is_some_and(|at| Instant::now() >= at) {
            log::info!("--exit-after reached");
            break Ok(());
        }
    };

    let shutting_down = Instant::now();
    let finished = server.shut_down(&mut reactor);
    // The in-process driver's last watches go once its guests are gone: seconds. A
    // daemon's streams end within what is left of its grace.
    let drain = match embed_root {
        Some(_) => Duration::from_secs(10),
        None => DAEMON_GRACE
            .saturating_sub(shutting_down.elapsed())
            .max(MIN_DRAIN),
    };
    let report = reactor.shutdown(drain, &mut server.libvirt);
    match &report {
        Ok(report) => log::debug!("drained: {report:?}"),
        Err(e) => log::warn!("draining libvirt's loop: {e}"),
    }
    // The sockets' directory, then the embedded driver's root, now that it is done.
    drop(server);
    drop(embed_root);
    outcome.and(finished).map_err(Into::into)
}

/// On the loop thread, for a daemon's domains: subscribes to lifecycle events, then
/// attaches to the running domains from a worker, which reports (the result is
/// `None` then). Subscribe first, then list: a domain starting in between is seen
/// twice, and attaching twice is harmless.
fn watch_running(
    reactor: &mut Reactor<Libvirt>,
    libvirt: &mut Libvirt,
    session: Session,
    uri: String,
    domains: Vec<String>,
) -> Result<Option<Session>, String> {
    let subscription = reactor
        .subscribe_lifecycle(&session.conn, |libvirt: &mut Libvirt, event| {
            if event.kind == LifecycleKind::Started {
                libvirt.started.push(event.domain.clone());
            }
        })
        .map_err(|e| format!("lifecycle events: {e}"))?;
    libvirt.subscription = Some(subscription);
    reactor
        .handle()
        .spawn_blocking(
            move || attach_running(&session, &uri, &domains).map(|()| session),
            |_, libvirt, session| libvirt.setup = Some(session),
        )
        .map_err(|e| e.to_string())?;
    Ok(None)
}

/// On a worker thread: attaches to the running `domains` (all if empty).
fn attach_running(session: &Session, uri: &str, domains: &[String]) -> Result<(), String> {
    let running = session
        .conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| format!("{uri}: list domains: {e}"))?;
    let mut attached = 0;
    for domain in running {
        let Ok(name) = domain.name() else { continue };
        if domains.is_empty() || domains.contains(&name) {
            session.mux.attach(&name).map_err(|e| e.to_string())?;
            attached += 1;
        }
    }
    if attached == 0 {
        log::info!("no matching domain runs yet; waiting for one to start");
    }
    Ok(())
}

/// One console served on a socket.
struct Console {
    /// Slab key of its listener.
    listener: usize,
    path: PathBuf,
    /// Device and inode of the socket file, so that only our own file is removed.
    file_id: (u64, u64),
    clients: BTreeSet<usize>,
}

enum SourceKind {
    Listener {
        name: String,
        listener: UnixListener,
    },
    Client(Client),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }
}

struct Client {
    conn: Conn,
    /// The `N` of `peer`: the order of accepting.
    id: u64,
    /// For logs: `unix#N` or `tcp#N ADDR`.
    peer: String,
    /// The console it is attached to; `None` while a TCP client has not sent its
    /// `TOKEN NAME` line.
    console: Option<String>,
    /// Output not yet written, bounded by `--client-buffer`.
    out: VecDeque<u8>,
    /// Input read but not yet taken by the console (or the handshake line so far).
    input: Vec<u8>,
    /// The client shut down its sending side; it still gets output.
    read_closed: bool,
    handshake_deadline: Option<Instant>,
}

/// Why a client is closed.
enum Cut {
    /// Fell more than `--client-buffer` bytes behind.
    TooSlow(usize),
    /// Writing failed (it went away).
    Gone(io::Error),
}

impl Client {
    /// Writes what is buffered until the socket would block.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            match self.conn.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends `bytes` now as far as the socket takes them and buffers the rest, up to
    /// `limit` bytes.
    fn send(&mut self, mut bytes: &[u8], limit: usize) -> Result<(), Cut> {
        while self.out.is_empty() && !bytes.is_empty() {
            match self.conn.write(bytes) {
                Ok(0) => return Err(Cut::Gone(io::ErrorKind::WriteZero.into())),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Cut::Gone(e)),
            }
        }
        self.out.extend(bytes);
        if self.out.len() > limit {
            return Err(Cut::TooSlow(self.out.len()));
        }
        Ok(())
    }
}

struct Server {
    registry: Registry,
    dir: SocketDir,
    tcp: Option<TcpFront>,
    /// `--max-pending`.
    max_pending: usize,
    /// TCP clients still in their handshake, oldest (and first due) first: id → key.
    pending: BTreeMap<u64, usize>,
    /// Unix listeners (slab keys) that may have connections left to accept.
    unix_ready: BTreeSet<usize>,
    /// The TCP listener may have connections left to accept.
    tcp_ready: bool,
    reserve: Reserve,
    /// Log of handshakes closed to make room for new ones.
    evicted: Quiet,
    /// Log of wrong tokens.
    refused: Quiet,
    sources: Slab<SourceKind>,
    consoles: BTreeMap<String, Console>,
    client_buffer: usize,
    /// `--domain`: the only domains served.
    filter: Option<BTreeSet<String>>,
    session: Option<Session>,
    /// Guests booted whose console has not reported yet.
    pending_boots: BTreeSet<String>,
    /// Clients with input to push or data left to read.
    retry: BTreeSet<usize>,
    /// Domains that started again while their old console was still served: the
    /// old console's end may only be seen after the start, so attach again then.
    restarted: BTreeSet<String>,
    next_peer: u64,
    /// The reactor's state.
    libvirt: Libvirt,
    /// The set-up has reported (ready or failed).
    setup_finished: bool,
    /// Shutting down: consoles that attach now are not served.
    closing: bool,
    scratch: Vec<u8>,
}

impl Server {
    /// How long the poll may sleep as far as the server is concerned.
    fn timeout(&self) -> Option<Duration> {
        if self.tcp_ready || !self.unix_ready.is_empty() {
            return Some(Duration::ZERO); // accept the rest without waiting for an edge
        }
        let timeout = (!self.retry.is_empty()).then_some(INPUT_RETRY);
        min_timeout(
            timeout,
            self.oldest_pending()
                .map(|(_, at)| at.saturating_duration_since(Instant::now())),
        )
    }

    /// The key and handshake deadline of the TCP client waiting longest.
    fn oldest_pending(&self) -> Option<(usize, Instant)> {
        let (_, &key) = self.pending.first_key_value()?;
        match self.sources.get(key) {
            Some(SourceKind::Client(Client {
                handshake_deadline: Some(at),
                ..
            })) => Some((key, *at)),
            _ => None,
        }
    }

    fn ready(&mut self, session: Session) {
        self.setup_finished = true;
        self.pending_boots = session.booted.iter().cloned().collect();
        self.session = Some(session);
    }

    /// After libvirt's dispatch: the set-up's outcome, a signal, console events,
    /// started domains, retried input, handshake deadlines. Returns how to quit, if
    /// so.
    fn after_dispatch(&mut self) -> Option<Result<(), String>> {
        let mut quit = None;
        match self.libvirt.setup.take() {
            Some(Ok(session)) => self.ready(session),
            Some(Err(e)) => {
                self.setup_finished = true;
                quit = Some(Err(e));
            }
            None => {}
        }
        if let Some(why) = self.libvirt.quit.take() {
            log::info!("{why}: shutting down");
            quit.get_or_insert(Ok(()));
        }
        if let Some(lost) = self.console_events() {
            quit.get_or_insert(Err(lost));
        }
        let started = match self.session {
            Some(_) => std::mem::take(&mut self.libvirt.started),
            None => Vec::new(),
        };
        for name in started {
            if self.filter.as_ref().is_some_and(|f| !f.contains(&name)) {
                continue;
            }
            log::info!("{name}: started");
            if self.consoles.contains_key(&name) {
                self.restarted.insert(name.clone());
            }
            self.attach(&name);
        }
        for key in std::mem::take(&mut self.retry) {
            self.read_client(key);
        }
        while let Some((key, at)) = self.oldest_pending() {
            if at > Instant::now() {
                break;
            }
            self.close_client(key, "sent no TOKEN NAME line in time");
        }
        quit
    }

    fn attach(&self, name: &str) {
        if let Some(session) = &self.session {
            if let Err(e) = session.mux.attach(name) {
                log::warn!("{name}: cannot attach: {e}");
            }
        }
    }

    /// Serves what the consoles reported. Returns an error when the connection to
    /// libvirt was lost.
    fn console_events(&mut self) -> Option<String> {
        let events: Vec<ConsoleEvent> = match &self.session {
            Some(session) => session.events.try_iter().collect(),
            None => return None,
        };
        let mut lost = None;
        for event in events {
            match event {
                ConsoleEvent::Attached { name } => {
                    self.pending_boots.remove(&name);
                    if self.closing {
                        continue;
                    }
                    if let Err(e) = self.serve(&name) {
                        log::error!("{name}: cannot serve the console: {e}");
                    }
                }
                ConsoleEvent::Output { name, bytes } => self.output(&name, &bytes),
                ConsoleEvent::Ended { name, end } => {
                    let what = match &end {
                        ConsoleEnd::GuestGone => "guest gone".to_owned(),
                        other => other.to_string(),
                    };
                    self.unserve(&name, &what);
                    if self.restarted.remove(&name) && !self.closing {
                        self.attach(&name);
                    }
                    if let ConsoleEnd::ConnectionLost(reason) = end {
                        lost = Some(format!("the connection to libvirt was lost ({reason})"));
                    }
                }
                ConsoleEvent::AttachFailed { name, error } => {
                    self.pending_boots.remove(&name);
                    log::warn!("{name}: cannot attach to the console: {error}");
                }
                _ => {}
            }
        }
        lost
    }

    /// Binds `DIR/NAME.sock` for a console that just attached. The socket is bound
    /// under a temporary name, made 0600, then renamed, so it never appears with
    /// wider permissions.
    fn serve(&mut self, name: &str) -> io::Result<()> {
        if self.consoles.contains_key(name) {
            return Ok(());
        }
        let path = self.dir.socket_path(name)?;
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let staging = self.dir.path.join(format!(".bind-{}", std::process::id()));
        let _ = fs::remove_file(&staging);
        let mut listener = UnixListener::bind(&staging)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", staging.display())))?;
        let placed = fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::rename(&staging, &path))
            .and_then(|()| fs::symlink_metadata(&path));
        let meta = match placed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(&staging);
                return Err(e);
            }
        };
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        self.registry
            .register(&mut listener, Token(FIRST_SOURCE + key), Interest::READABLE)?;
        entry.insert(SourceKind::Listener {
            name: name.to_owned(),
            listener,
        });
        log::info!("{name}: serving on {}", path.display());
        println!("+ {name} {}", path.display());
        self.consoles.insert(
            name.to_owned(),
            Console {
                listener: key,
                path,
                file_id: (meta.dev(), meta.ino()),
                clients: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// Stops serving a console: its socket goes, its clients are told and closed.
    fn unserve(&mut self, name: &str, why: &str) {
        let Some(console) = self.consoles.remove(name) else {
            log::info!("{name}: console ended ({why})");
            return;
        };
        self.unix_ready.remove(&console.listener);
        if let SourceKind::Listener { mut listener, .. } = self.sources.remove(console.listener) {
            let _ = self.registry.deregister(&mut listener);
        }
        if fs::symlink_metadata(&console.path).is_ok_and(|m| (m.dev(), m.ino()) == console.file_id)
        {
            let _ = fs::remove_file(&console.path);
        }
        let note = format!("\r\n[console_server: {name}: {why}]\r\n");
        for key in console.clients {
            if let Some(SourceKind::Client(client)) = self.sources.get_mut(key) {
                let _ = client.flush();
                let _ = client.conn.write(note.as_bytes());
            }
            self.drop_source(key);
        }
        log::info!(
            "{name}: console ended ({why}); removed {}",
            console.path.display()
        );
        println!("- {name} {}", console.path.display());
    }

    /// Hands a console's output to each of its clients; cuts off those too far behind.
    fn output(&mut self, name: &str, bytes: &[u8]) {
        let Some(console) = self.consoles.get(name) else {
            return;
        };
        let mut cut = Vec::new();
        for &key in &console.clients {
            if let Some(SourceKind::Client(client)) = self.sources.get_mut(key) {
                if let Err(why) = client.send(bytes, self.client_buffer) {
                    cut.push((key, why));
                }
            }
        }
        for (key, why) in cut {
            let reason = match why {
                Cut::TooSlow(pending) => format!(
                    "too slow ({pending} bytes pending, limit {}); disconnected",
                    self.client_buffer
                ),
                Cut::Gone(e) => format!("gone ({e})"),
            };
            self.close_client(key, &reason);
        }
    }

    fn source_ready(&mut self, key: usize, event: &Event) {
        match self.sources.get_mut(key) {
            Some(SourceKind::Listener { .. }) => {
                self.unix_ready.insert(key);
            }
            Some(SourceKind::Client(client)) => {
                if event.is_writable() {
                    if let Err(e) = client.flush() {
                        self.close_client(key, &format!("gone ({e})"));
                        return;
                    }
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read_client(key);
                }
                // A full hangup (both directions): the client is gone. A half-close
                // (it only stopped sending) keeps a Unix client attached for output.
                if event.is_write_closed() && self.sources.contains(key) {
                    self.close_client(key, "hung up");
                }
            }
            None => {} // closed earlier in this batch
        }
    }

    /// Accepts on the listeners that reported, Unix ones first and each with its own
    /// [`ACCEPT_BUDGET`]; one with connections left stays ready for the next round.
    fn accept_ready(&mut self) {
        self.reserve.refill();
        for key in std::mem::take(&mut self.unix_ready) {
            if self.accept_unix(key) {
                self.unix_ready.insert(key);
            }
        }
        if self.tcp_ready {
            self.tcp_ready = self.accept_tcp();
        }
    }

    /// Returns whether connections may be left.
    fn accept_unix(&mut self, key: usize) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let Some(SourceKind::Listener { name, listener }) = self.sources.get(key) else {
                return false;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    let (name, id) = (name.clone(), self.next_id());
                    self.add_client(Conn::Unix(stream), id, format!("unix#{id}"), Some(name));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if transient(&e) => {}
                Err(e) if out_of_fds(&e) => {
                    // A TCP client yet to prove itself makes room for a Unix one.
                    if let Some((oldest, _)) = self.oldest_pending() {
                        self.evicted.warn(|| {
                            format!("{name}: out of file descriptors; closing the oldest TCP connection still in its handshake")
                        });
                        self.close_client(oldest, "closed: a Unix client needs the descriptor");
                        continue;
                    }
                    if !self.reserve.shed(name, || listener.accept().map(drop)) {
                        return true; // nothing to shed now; come back next round
                    }
                }
                Err(e) => {
                    log::warn!("{name}: accept: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Returns whether connections may be left.
    fn accept_tcp(&mut self) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let Some(tcp) = &self.tcp else { return false };
            match tcp.listener.accept() {
                Ok((stream, addr)) => {
                    if self.pending.len() >= self.max_pending {
                        if let Some((oldest, _)) = self.oldest_pending() {
                            self.evict(oldest);
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let id = self.next_id();
                    self.add_client(Conn::Tcp(stream), id, format!("tcp#{id} {addr}"), None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if transient(&e) => {}
                Err(e) if out_of_fds(&e) => {
                    let listener = &tcp.listener;
                    if !self.reserve.shed("tcp", || listener.accept().map(drop)) {
                        return true; // nothing to shed now; come back next round
                    }
                }
                Err(e) => {
                    log::warn!("tcp accept: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Closes a TCP client still in its handshake to make room for a newer one.
    fn evict(&mut self, key: usize) {
        let max = self.max_pending;
        self.evicted.warn(|| {
            format!("{max} TCP connections wait for their TOKEN NAME line (--max-pending); closing the oldest")
        });
        self.close_client(key, "closed to make room (--max-pending)");
    }

    fn next_id(&mut self) -> u64 {
        self.next_peer += 1;
        self.next_peer - 1
    }

    /// Registers a new client: attached to `console`, or (TCP) waiting for its
    /// handshake line.
    fn add_client(&mut self, mut conn: Conn, id: u64, peer: String, console: Option<String>) {
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        // Readable always, even for a client that only listens: that is how its
        // going away is noticed while the console is quiet.
        if let Err(e) = self.registry.register(
            conn.source(),
            Token(FIRST_SOURCE + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("{peer}: cannot register: {e}");
            return;
        }
        let handshake_deadline = console
            .is_none()
            .then(|| Instant::now() + HANDSHAKE_TIMEOUT);
        entry.insert(SourceKind::Client(Client {
            conn,
            id,
            peer,
            console: None,
            out: VecDeque::new(),
            input: Vec::new(),
            read_closed: false,
            handshake_deadline,
        }));
        match console {
            Some(name) => self.join(key, &name),
            None => {
                self.pending.insert(id, key);
                self.read_client(key); // the line may be there already
            }
        }
    }

    /// Attaches client `key` to console `name`.
    fn join(&mut self, key: usize, name: &str) {
        let Some(console) = self.consoles.get_mut(name) else {
            self.close_client(key, &format!("no console {name:?}"));
            return;
        };
        console.clients.insert(key);
        let count = console.clients.len();
        if let Some(SourceKind::Client(client)) = self.sources.get_mut(key) {
            client.console = Some(name.to_owned());
            client.handshake_deadline = None;
            self.pending.remove(&client.id);
            log::info!("{name}: {} attached ({})", client.peer, clients(count));
        }
    }

    /// Reads what a client sent (up to [`READ_BUDGET`]) and passes it to its console.
    fn read_client(&mut self, key: usize) {
        let mut read = 0;
        loop {
            let Some(SourceKind::Client(client)) = self.sources.get_mut(key) else {
                return;
            };
            if client.console.is_some() && !client.input.is_empty() {
                self.push_input(key);
                let Some(SourceKind::Client(client)) = self.sources.get(key) else {
                    return;
                };
                if !client.input.is_empty() {
                    // The console's input queue is full: read no more until it drains.
                    self.retry.insert(key);
                    return;
                }
                continue;
            }
            if client.read_closed {
                return;
            }
            if read >= READ_BUDGET {
                self.retry.insert(key); // more may wait; be fair to the others
                return;
            }
            match client.conn.read(&mut self.scratch) {
                Ok(0) => {
                    client.read_closed = true;
                    if client.console.is_none() {
                        self.close_client(key, "closed before its TOKEN NAME line");
                    } else if matches!(client.conn, Conn::Tcp(_)) {
                        // Maybe only a half-close, but TCP cannot tell it from a
                        // close until a write fails; a quiet console never writes.
                        self.close_client(key, "closed");
                    } else {
                        log::debug!("{}: stopped sending", client.peer);
                    }
                    return;
                }
                Ok(n) => {
                    read += n;
                    client.input.extend_from_slice(&self.scratch[..n]);
                    if client.console.is_none() && !self.handshake(key) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close_client(key, &format!("gone ({e})"));
                    return;
                }
            }
        }
    }

    /// Queues a client's pending input on its console, as much as fits.
    fn push_input(&mut self, key: usize) {
        let Some(session) = &self.session else { return };
        let Some(SourceKind::Client(client)) = self.sources.get_mut(key) else {
            return;
        };
        let Some(name) = &client.console else { return };
        match session.mux.try_send(name, &client.input) {
            Ok(n) => {
                client.input.drain(..n);
            }
            Err(virt_reactor::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // The console is ending; its end closes this client.
                log::debug!("{name}: input from {} dropped: {e}", client.peer);
                client.input.clear();
            }
        }
    }

    /// Checks a TCP client's `TOKEN NAME` line once it is complete. Returns whether
    /// the client is still there.
    fn handshake(&mut self, key: usize) -> bool {
        let Some(SourceKind::Client(client)) = self.sources.get_mut(key) else {
            return false;
        };
        let Some(end) = client.input.iter().position(|&b| b == b'\n') else {
            if client.input.len() > HANDSHAKE_MAX {
                self.close_client(key, "handshake line too long");
                return false;
            }
            return true; // wait for the rest of the line
        };
        let line: Vec<u8> = client.input.drain(..=end).collect();
        let peer = client.peer.clone();
        let line = String::from_utf8_lossy(&line);
        let (token, name) = line
            .trim_end_matches(['\r', '\n'])
            .split_once(' ')
            .unwrap_or(("", ""));
        let expected = self.tcp.as_ref().map_or("", |t| t.token.as_str());
        if expected.is_empty() || !same_token(token.as_bytes(), expected.as_bytes()) {
            self.refused.warn(|| format!("{peer}: wrong token; closed"));
            self.drop_source(key);
            return false;
        }
        let name = name.trim();
        if !self.consoles.contains_key(name) {
            if let Some(SourceKind::Client(client)) = self.sources.get_mut(key) {
                let reply = format!("console_server: no console {name:?}\r\n");
                let _ = client.conn.write(reply.as_bytes());
            }
            log::info!("{peer}: no console {name:?}; closed");
            self.drop_source(key);
            return false;
        }
        self.join(key, name);
        true
    }

    /// Closes a client and logs why.
    fn close_client(&mut self, key: usize, why: &str) {
        let Some(SourceKind::Client(client)) = self.sources.get(key) else {
            return;
        };
        let peer = client.peer.clone();
        let console = client.console.clone();
        self.drop_source(key);
        match console {
            Some(name) => {
                let left = self.consoles.get(&name).map_or(0, |c| c.clients.len());
                if why.starts_with("too slow") {
                    log::warn!("{name}: {peer} {why} ({} left)", clients(left));
                } else {
                    log::info!("{name}: {peer} {why} ({} left)", clients(left));
                }
            }
            // Many may come at once, from anyone on the machine.
            None => log::debug!("{peer}: {why}"),
        }
    }

    /// Removes a source from the slab, the poll and its console.
    fn drop_source(&mut self, key: usize) {
        if !self.sources.contains(key) {
            return;
        }
        self.retry.remove(&key);
        match self.sources.remove(key) {
            SourceKind::Client(mut client) => {
                if client.console.is_none() {
                    self.pending.remove(&client.id);
                }
                let _ = self.registry.deregister(client.conn.source());
                if let Some(console) = client.console.and_then(|n| self.consoles.get_mut(&n)) {
                    console.clients.remove(&key);
                }
            }
            SourceKind::Listener { mut listener, .. } => {
                let _ = self.registry.deregister(&mut listener);
            }
        }
    }

    /// Clean shutdown: finish the consoles (their sockets go), wait for guests still
    /// booting, destroy the guests this run booted off the loop while the reactor
    /// keeps running.
    fn shut_down(&mut self, reactor: &mut Reactor<Libvirt>) -> Result<(), String> {
        self.closing = true;
        if let Some(mut tcp) = self.tcp.take() {
            let _ = self.registry.deregister(&mut tcp.listener);
        }
        let mut result = Ok(());
        // The set-up may still be connecting.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !self.setup_finished {
            if let Err(e) = reactor.run_once(Some(Duration::from_millis(20)), &mut self.libvirt) {
                log::warn!("{e}");
            }
            match self.libvirt.setup.take() {
                Some(Ok(session)) => self.ready(session),
                Some(Err(e)) => {
                    self.setup_finished = true;
                    log::warn!("set-up failed during shutdown: {e}");
                }
                None => {}
            }
            if Instant::now() > deadline {
                result = Err("timed out waiting for the set-up to finish".to_owned());
                break;
            }
        }
        // Deregistering from lifecycle events is a call to the daemon: the reactor
        // makes it off the loop.
        let subscription = self.libvirt.subscription.take();
        if let Some(subscription) = subscription {
            if let Err(e) = reactor.unsubscribe(subscription) {
                log::warn!("lifecycle events: {e}");
            }
        }
        // Guests still booting come up with a console; wait for them so that they
        // are destroyed, not left running.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !self.pending_boots.is_empty() && Instant::now() < deadline {
            if let Err(e) = reactor.run_once(Some(Duration::from_millis(50)), &mut self.libvirt) {
                log::warn!("{e}");
            }
            let _ = self.console_events();
        }
        if let Some(mux) = self.session.as_ref().map(|s| s.mux.clone()) {
            mux.detach_all(reactor, &mut self.libvirt);
        }
        let _ = self.console_events();
        // Whatever is still served (nothing, normally) and any TCP client in its
        // handshake.
        let names: Vec<String> = self.consoles.keys().cloned().collect();
        for name in names {
            self.unserve(&name, "server shutting down");
        }
        let keys: Vec<usize> = self.sources.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.drop_source(key);
        }

        let Some(session) = self.session.take() else {
            return result;
        };
        let grace = shutdown_grace(&session.booted);
        let destroyed = session.end(reactor, &mut self.libvirt, grace, |event| {
            log::debug!("after detach: {event:?}");
        });
        match destroyed {
            Ok(n) => {
                if n > 0 {
                    log::info!("destroyed {n} guest(s)");
                }
                result
            }
            Err(virt_reactor::Error::TimedOut) => Err(format!(
                "libvirt did not answer within {grace:?}; exiting without a clean close"
            )),
            Err(e) => {
                log::warn!("{e}");
                result
            }
        }
    }
}

/// The directory of the sockets.
struct SocketDir {
    path: PathBuf,
    /// This run made it, so it removes it at exit.
    created: bool,
}

impl SocketDir {
    /// Makes the directory (mode 0700), or takes an existing one only if it is a real
    /// directory of ours with mode 0700: it never changes what it did not create.
    fn prepare(dir: Option<&Path>) -> Result<SocketDir, String> {
        let Some(given) = dir else {
            let base = std::env::temp_dir();
            for n in 0..100 {
                let path = base.join(format!("console-server-{}-{n}", std::process::id()));
                match SocketDir::create(&path) {
                    Ok(dir) => return Ok(dir),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
            return Err(format!(
                "{}: no free console-server-PID-N name",
                base.display()
            ));
        };
        // Without a trailing slash, which would make lstat follow a symbolic link.
        let path: PathBuf = given.components().collect();
        let fail = |why: String| format!("--dir {}: {why}", given.display());
        match SocketDir::create(&path) {
            Ok(dir) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = fs::symlink_metadata(&path).map_err(|e| fail(e.to_string()))?;
                if meta.file_type().is_symlink() {
                    return Err(fail("is a symbolic link; give the directory itself".into()));
                }
                if !meta.is_dir() {
                    return Err(fail("exists and is not a directory".into()));
                }
                if meta.uid() != effective_uid() {
                    return Err(fail(format!("owned by uid {}, not by us", meta.uid())));
                }
                let mode = meta.mode() & 0o7777;
                if mode != 0o700 {
                    return Err(fail(format!(
                        "mode {mode:04o}; an existing directory must be private (0700); \
                         give a path that does not exist yet and it is made so"
                    )));
                }
                let path = fs::canonicalize(&path).map_err(|e| fail(e.to_string()))?;
                Ok(SocketDir {
                    path,
                    created: false,
                })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// Creates `path` (not its parents), mode 0700 whatever the umask.
    fn create(path: &Path) -> io::Result<SocketDir> {
        fs::DirBuilder::new().mode(0o700).create(path)?;
        // Owned from here: an error below removes it again.
        let mut dir = SocketDir {
            path: path.to_owned(),
            created: true,
        };
        // The umask may have taken bits off; fix them on what we made, not on
        // whatever a link put there since.
        let made = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(path)?;
        if made.metadata()?.mode() & 0o7777 != 0o700 {
            made.set_permissions(fs::Permissions::from_mode(0o700))?;
        }
        dir.path = fs::canonicalize(path)?;
        Ok(dir)
    }

    /// `DIR/NAME.sock`, for names that make a safe file name that fits `sun_path`.
    fn socket_path(&self, name: &str) -> io::Result<PathBuf> {
        let bad = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("domain name {name:?} {why}"),
            ))
        };
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
            return bad("is not usable as a file name");
        }
        let path = self.path.join(format!("{name}.sock"));
        if path.as_os_str().len() > SUN_PATH_MAX {
            return bad("makes a socket path too long for a Unix socket; use a shorter --dir");
        }
        Ok(path)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        // Our sockets are gone already; a directory this run made goes too, but only
        // if empty: what someone else put there is not ours to delete.
        let _ = fs::remove_file(self.path.join(format!(".bind-{}", std::process::id())));
        if self.created {
            if let Err(e) = fs::remove_dir(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The TCP listener and the token its clients must send.
struct TcpFront {
    listener: TcpListener,
    token: String,
}

impl TcpFront {
    fn bind(
        addr: SocketAddr,
        token_file: Option<&Path>,
        registry: &Registry,
    ) -> Result<TcpFront, String> {
        let mut listener = TcpListener::bind(addr).map_err(|e| format!("--tcp {addr}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("--tcp {addr}: {e}"))?;
        registry
            .register(&mut listener, TCP, Interest::READABLE)
            .map_err(|e| format!("--tcp {addr}: {e}"))?;
        // Last, so that no other error leaves a new token file behind.
        let token = match token_file {
            Some(path) => token_from_file(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?,
            None => random_token().map_err(|e| format!("/dev/urandom: {e}"))?,
        };
        match token_file {
            Some(path) => println!("console_server: tcp {local}, token in {}", path.display()),
            None => println!("console_server: tcp {local}, token {token}"),
        }
        Ok(TcpFront { listener, token })
    }
}

/// The token in `path`, or a new one written there (mode 0600) if it does not exist.
fn token_from_file(path: &Path) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.is_empty() || token.contains(char::is_whitespace) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the token must be one word",
                ));
            }
            if fs::metadata(path)?.mode() & 0o077 != 0 {
                log::warn!("{}: readable by others; chmod 600 it", path.display());
            }
            Ok(token)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = random_token()?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            writeln!(file, "{token}")?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// A descriptor held in reserve. Out of descriptors (EMFILE, ENFILE), accept leaves
/// the connection in the backlog, and the edge-triggered listener would not report
/// it again: giving this one up lets the connection be accepted and closed at once.
struct Reserve {
    file: Option<fs::File>,
    shed: u64,
    log: Quiet,
}

impl Reserve {
    fn new() -> io::Result<Reserve> {
        Ok(Reserve {
            file: Some(fs::File::open("/dev/null")?),
            shed: 0,
            log: Quiet::default(),
        })
    }

    /// Reopens the reserve if an earlier attempt found no descriptor free.
    fn refill(&mut self) {
        if self.file.is_none() {
            self.file = fs::File::open("/dev/null").ok();
        }
    }

    /// Gives up the reserve for `accept`, which accepts and closes one connection.
    /// Returns false when there is nothing to shed or no descriptor came free.
    fn shed(&mut self, what: &str, accept: impl FnOnce() -> io::Result<()>) -> bool {
        if self.file.take().is_none() {
            return false;
        }
        let accepted = accept();
        self.refill();
        match accepted {
            Ok(()) => {
                self.shed += 1;
                let shed = self.shed;
                self.log.warn(|| {
                    format!(
                        "{what}: out of file descriptors; closed {shed} new connection(s) so far"
                    )
                });
                true
            }
            Err(_) => false,
        }
    }
}

/// Accept errors about one connection only: go on with the next.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// Whether an accept failed for want of a descriptor.
fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Logs at most once per [`LOG_EVERY`], saying how many lines it held back.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Quiet {
    fn warn(&mut self, line: impl FnOnce() -> String) {
        if self.last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.held += 1;
            return;
        }
        self.last = Some(Instant::now());
        match std::mem::take(&mut self.held) {
            0 => log::warn!("{}", line()),
            held => log::warn!("{} ({held} similar lines held back)", line()),
        }
    }
}

/// 128 random bits, in hex.
fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without stopping at the first difference.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn clients(n: usize) -> String {
    if n == 1 {
        "1 client".to_owned()
    } else {
        format!("{n} clients")
    }
}

fn min_timeout(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Who this process runs as: `/proc/self` belongs to its effective uid.
fn effective_uid() -> u32 {
    fs::metadata("/proc/self").map_or(0, |m| m.uid())
}
