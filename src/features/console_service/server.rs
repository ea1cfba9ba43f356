//! The service's one thread: libvirt's events, the listeners, the viewers and the
//! control connections, all on one `mio::Poll`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use slab::Slab;
use virt::connect::Connect;
use virt::error::ErrorNumber;

use super::accept::{out_of_fds, transient, Quiet, Reserve, ACCEPT_BUDGET};
use super::dir::{BoundSocket, SocketDir};
use super::floor::{Floor, Turn};
use super::hosts::{Change, Hosts};
use super::libvirt::{Existence, Libvirt, Listing};
use super::logfile::ConsoleLog;
use super::options::ServiceOptions;
use super::scrollback::Scrollback;
use super::status::{
    ConsoleStatus, LogStatus, Reply, Request, ScrollbackStatus, Status, ViewerStatus,
};
use super::token::Token as Secret;
use super::viewer::{notice, Command, Cut, Outbox, Piece, Role, Viewer, HELP};
use super::web::{Site, WebConn, WebStep};
use crate::features::console::{ConsoleEnd, ConsoleEvent, ConsoleOptions};
use crate::features::supervisor::SupervisorOptions;
use crate::streams::reactor::{Reactor, ReactorHandle};
use crate::vocab::error::Error;
use crate::vocab::events::LifecycleKind;

/// The reactor, on our poll.
pub(crate) const LIBVIRT: Token = Token(0);
pub(crate) const TCP: Token = Token(1);
pub(crate) const WEB: Token = Token(2);
pub(crate) const CONTROL: Token = Token(3);
pub(crate) const SIGNALS: Token = Token(4);
/// Console listeners, viewers and connections: `FIRST_SOURCE + slab key`.
pub(crate) const FIRST_SOURCE: usize = 5;

/// Bytes read from one viewer per loop iteration at most.
const READ_BUDGET: usize = 64 * 1024;
/// A viewer's console input waiting for its turn; beyond it the viewer is not read.
const INPUT_MAX: usize = 4096;
/// Longest `TOKEN NAME` line.
const HANDSHAKE_MAX: usize = 1024;
/// Time a TCP or web connection has to say what it wants.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A console's input queue was full: try again after this.
const INPUT_RETRY: Duration = Duration::from_millis(10);
/// Longest control request line.
const CONTROL_LINE_MAX: usize = 4096;
/// Output a control connection may leave unread before it is closed.
const CONTROL_OUT_MAX: usize = 4 << 20;
/// Existence checks after failed attaches, per end of a console.
const RECHECKS: u8 = 3;

/// What a slab entry on the poll is.
enum Source {
    /// A console's Unix listener.
    Listener {
        name: String,
        listener: UnixListener,
    },
    Viewer(Viewer),
    /// A TCP connection before its `TOKEN NAME` line.
    Handshake(Handshake),
    /// A web connection before it is a WebSocket viewer (or after its response).
    Web {
        conn: Box<WebConn>,
        id: u64,
        peer: String,
    },
    Control(Control),
}

impl Source {
    /// What is registered with the poll.
    fn io(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Source::Listener { listener, .. } => listener,
            Source::Viewer(viewer) => viewer.transport.source(),
            Source::Handshake(h) => &mut h.stream,
            Source::Web { conn, .. } => conn.source(),
            Source::Control(control) => &mut control.stream,
        }
    }
}

struct Handshake {
    stream: TcpStream,
    id: u64,
    peer: String,
    line: Vec<u8>,
    deadline: Instant,
}

struct Control {
    stream: UnixStream,
    input: Vec<u8>,
    out: Outbox,
}

enum State {
    Opening,
    Attached,
    Ended(String),
}

struct Console {
    listener: usize,
    socket: BoundSocket,
    state: State,
    scrollback: Scrollback,
    log: Option<ConsoleLog>,
    viewers: BTreeSet<usize>,
    /// The viewer that took the write role for itself alone.
    exclusive: Option<usize>,
    /// Existence checks after failed attaches since the console ended.
    checks: u8,
    floor: Floor,
    output_bytes: u64,
    input_bytes: u64,
}

pub(crate) struct Server {
    registry: Registry,
    handle: ReactorHandle<Libvirt>,
    options: ServiceOptions,
    dir: SocketDir,
    token: Option<Secret>,
    tcp: Option<TcpListener>,
    web: Option<TcpListener>,
    control: Option<(UnixListener, BoundSocket)>,
    /// TCP and web connections yet to say what they want, oldest first: id → key.
    pending: BTreeMap<u64, usize>,
    unix_ready: BTreeSet<usize>,
    tcp_ready: bool,
    web_ready: bool,
    control_ready: bool,
    reserve: Reserve,
    evicted: Quiet,
    refused: Quiet,
    sources: Slab<Source>,
    consoles: BTreeMap<String, Console>,
    hosts: Hosts,
    /// Viewers with more to read.
    retry: BTreeSet<usize>,
    /// Consoles whose input queue was full.
    stalled: BTreeSet<String>,
    next_peer: u64,
    viewers_cut: u64,
    /// A console printed since the last `take_output_served` (see `pacing`).
    output_served: bool,
    pub(crate) libvirt: Libvirt,
    /// Shutting down: consoles that attach now are not served.
    closing: bool,
    scratch: Vec<u8>,
}

impl Server {
    pub(crate) fn new(
        registry: Registry,
        handle: ReactorHandle<Libvirt>,
        options: ServiceOptions,
        dir: SocketDir,
        token: Option<Secret>,
    ) -> io::Result<Server> {
        Ok(Server {
            registry,
            handle,
            options,
            dir,
            token,
            tcp: None,
            web: None,
            control: None,
            pending: BTreeMap::new(),
            unix_ready: BTreeSet::new(),
            tcp_ready: false,
            web_ready: false,
            control_ready: false,
            reserve: Reserve::new()?,
            evicted: Quiet::default(),
            refused: Quiet::default(),
            sources: Slab::new(),
            consoles: BTreeMap::new(),
            hosts: Hosts::default(),
            retry: BTreeSet::new(),
            stalled: BTreeSet::new(),
            next_peer: 1,
            viewers_cut: 0,
            output_served: false,
            libvirt: Libvirt::default(),
            closing: false,
            scratch: vec![0; 16 * 1024],
        })
    }

    pub(crate) fn dir(&self) -> &SocketDir {
        &self.dir
    }

    /// Serves TCP viewers on `listener`.
    pub(crate) fn listen_tcp(&mut self, mut listener: TcpListener) -> io::Result<()> {
        self.registry
            .register(&mut listener, TCP, Interest::READABLE)?;
        self.tcp = Some(listener);
        Ok(())
    }

    /// Serves the web page and WebSocket viewers on `listener`.
    pub(crate) fn listen_web(&mut self, mut listener: TcpListener) -> io::Result<()> {
        self.registry
            .register(&mut listener, WEB, Interest::READABLE)?;
        self.web = Some(listener);
        Ok(())
    }

    /// Binds `DIR/control.sock`.
    pub(crate) fn listen_control(&mut self) -> io::Result<()> {
        let (mut listener, socket) = self.dir.bind("control.sock")?;
        self.registry
            .register(&mut listener, CONTROL, Interest::READABLE)?;
        self.control = Some((listener, socket));
        Ok(())
    }

    /// Starts connecting to every host, off the loop.
    pub(crate) fn start(&mut self, reactor: &mut Reactor<Libvirt>) -> crate::Result<()> {
        let mut supervision = SupervisorOptions::new("");
        supervision.keepalive = self.options.keepalive;
        supervision.backoff = self.options.backoff;
        self.hosts = Hosts::start(reactor, &self.options.connections, &supervision)?;
        Ok(())
    }

    fn console_options(&self) -> ConsoleOptions {
        ConsoleOptions {
            force: self.options.force,
            ..ConsoleOptions::default()
        }
    }

    /// How long the poll may sleep as far as the server is concerned.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        if self.tcp_ready
            || self.web_ready
            || self.control_ready
            || !self.unix_ready.is_empty()
            || !self.retry.is_empty()
        {
            // Out of descriptors with nothing to shed, more accepts would fail the
            // same way: wait a little instead of spinning.
            return Some(if self.reserve.starved() {
                INPUT_RETRY
            } else {
                Duration::ZERO
            });
        }
        let now = Instant::now();
        let stalled = (!self.stalled.is_empty()).then_some(now + INPUT_RETRY);
        let floors = self.consoles.values().filter_map(|c| c.floor.deadline());
        let handshakes = self.oldest_pending().map(|(_, at)| at);
        stalled
            .into_iter()
            .chain(floors)
            .chain(handshakes)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// The key and deadline of the connection waiting longest to say what it wants.
    fn oldest_pending(&self) -> Option<(usize, Instant)> {
        let (_, &key) = self.pending.first_key_value()?;
        match self.sources.get(key) {
            Some(Source::Handshake(h)) => Some((key, h.deadline)),
            Some(Source::Web { conn, .. }) => Some((key, conn.deadline())),
            _ => None,
        }
    }

    pub(crate) fn event(&mut self, event: &Event) {
        match event.token() {
            LIBVIRT | SIGNALS => {} // handled by the caller
            TCP => self.tcp_ready = true,
            WEB => self.web_ready = true,
            CONTROL => self.control_ready = true,
            Token(n) => self.source_ready(n - FIRST_SOURCE, event),
        }
    }

    /// After libvirt's dispatch: the set-up's outcome, console events, lifecycle
    /// events, retried input, deadlines. Returns an error that ends the service.
    pub(crate) fn after_dispatch(&mut self, reactor: &mut Reactor<Libvirt>) -> Result<(), String> {
        self.accept_ready();
        self.console_events();
        self.host_changes(reactor)?;
        for (host, domain, kind) in std::mem::take(&mut self.libvirt.lifecycle) {
            self.lifecycle(host, &domain, kind);
        }
        for (host, listed) in std::mem::take(&mut self.libvirt.listed) {
            self.listed(host, listed);
        }
        for (name, existence) in std::mem::take(&mut self.libvirt.checked) {
            self.checked(&name, existence);
        }
        for key in std::mem::take(&mut self.retry) {
            self.read_source(key);
        }
        for name in std::mem::take(&mut self.stalled) {
            self.pump(&name);
        }
        let now = Instant::now();
        let floors: Vec<String> = self
            .consoles
            .iter()
            .filter(|(_, c)| c.floor.deadline().is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in floors {
            self.pump(&name);
        }
        while let Some((key, at)) = self.oldest_pending() {
            if at > now {
                break;
            }
            self.close(key, "said nothing useful in time");
        }
        Ok(())
    }

    /// What became of the hosts' connections. Fails if a first connection failed.
    fn host_changes(&mut self, reactor: &mut Reactor<Libvirt>) -> Result<(), String> {
        let console_options = self.console_options();
        for change in self.hosts.changes(reactor, &console_options) {
            match change {
                Change::Up { host } => self.list_domains(host),
                Change::Down { host, why } => self.host_down(host, &why),
                Change::Failed { why } => return Err(why),
            }
        }
        Ok(())
    }

    /// Lists a host's domains on a worker; [`listed`](Self::listed) attaches.
    fn list_domains(&self, host: usize) {
        let Some(session) = self.hosts.get(host).and_then(|h| h.session.as_ref()) else {
            return;
        };
        let conn = session.conn.clone();
        let spawned = self.handle.spawn_blocking(
            move || list_domains(&conn),
            move |_, libvirt: &mut Libvirt, listed| libvirt.listed.push((host, listed)),
        );
        if let Err(e) = spawned {
            log::error!("cannot list domains: {e}");
        }
    }

    /// A host's domains, right after it connected: its running domains are
    /// attached (again), consoles of domains that vanished meanwhile go, and those
    /// that exist but do not run wait for them to start.
    fn listed(&mut self, host: usize, listed: Listing) {
        let label = self.hosts.get(host).map(|h| h.endpoint.label.clone());
        let domains: BTreeMap<String, bool> = match listed {
            Ok(domains) => domains.into_iter().collect(),
            Err(e) => {
                log::error!("{}: list domains: {e}", label.unwrap_or_default());
                return;
            }
        };
        let served: Vec<(String, String)> = self
            .consoles
            .keys()
            .filter_map(|key| match self.hosts.locate(key) {
                Some((h, domain)) if h == host => Some((key.clone(), domain.to_owned())),
                _ => None,
            })
            .collect();
        for (key, domain) in &served {
            match domains.get(domain) {
                Some(true) => self.attach(key),
                Some(false) => {}
                None => {
                    log::warn!("{key}: the domain vanished while the connection was down");
                    self.unserve(key, "guest gone while the connection was down");
                }
            }
        }
        let mut attaching = 0;
        for (domain, _) in domains.iter().filter(|(_, &running)| running) {
            let key = self.hosts.key(host, domain);
            if !self.consoles.contains_key(&key) && self.wanted(&key) {
                self.attach(&key);
                attaching += 1;
            }
        }
        if attaching > 0 {
            log::info!("attaching {attaching} console(s)");
        } else if self.consoles.is_empty() {
            log::info!("no matching domain runs yet; waiting for one to start");
        }
    }

    /// A host's connection was lost: each of its consoles ended, its viewers stay.
    fn host_down(&mut self, host: usize, why: &str) {
        let keys: Vec<String> = self
            .consoles
            .iter()
            .filter(|(key, console)| {
                !matches!(console.state, State::Ended(_))
                    && self.hosts.locate(key).is_some_and(|(h, _)| h == host)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            if let Some(console) = self.consoles.get_mut(&key) {
                console.state = State::Ended(why.to_owned());
            }
            self.tell_all(&key, &format!("console ended: {why}"));
        }
    }

    /// Reopens every log (SIGHUP).
    pub(crate) fn reopen_logs(&mut self) {
        let mut reopened = 0;
        for console in self.consoles.values_mut() {
            if let Some(log) = &mut console.log {
                log.reopen();
                reopened += 1;
            }
        }
        log::info!("reopened {reopened} log(s)");
    }

    /// Attaches the console named `key`, if its host is connected.
    fn attach(&self, key: &str) {
        if self.closing || !self.wanted(key) {
            return;
        }
        if let Some((session, domain)) = self.hosts.session_of(key) {
            if let Err(e) = session.mux.attach(domain) {
                log::warn!("{key}: cannot attach: {e}");
            }
        }
    }

    /// Whether `--domain` asks for the console `key`: by its name, or by its
    /// domain's on any host.
    fn wanted(&self, key: &str) -> bool {
        let domain = self.hosts.locate(key).map_or(key, |(_, domain)| domain);
        self.options.domains.is_empty()
            || self.options.domains.iter().any(|d| d == key || d == domain)
    }

    fn lifecycle(&mut self, host: usize, domain: &str, kind: LifecycleKind) {
        let key = self.hosts.key(host, domain);
        let name = key.as_str();
        match kind {
            LifecycleKind::Started => {
                log::info!("{name}: started");
                if let Some(console) = self.consoles.get_mut(name) {
                    if let State::Ended(_) = console.state {
                        console.state = State::Opening;
                    }
                }
                self.attach(name);
            }
            // A transient domain is removed before its stopped event is sent, but
            // its console may end first, while a lookup still finds it.
            LifecycleKind::Stopped if self.consoles.contains_key(name) => {
                self.check_existence(name);
            }
            LifecycleKind::Undefined => {
                if matches!(self.consoles.get(name), Some(c) if matches!(c.state, State::Ended(_)))
                {
                    self.unserve(name, "domain undefined");
                }
            }
            _ => {}
        }
    }

    /// Whether a console printed since the last call.
    pub(crate) fn take_output_served(&mut self) -> bool {
        std::mem::take(&mut self.output_served)
    }

    /// Serves what the consoles of every connected host reported.
    fn console_events(&mut self) {
        let events: Vec<(String, ConsoleEvent)> = self
            .hosts
            .sessions()
            .flat_map(|(host, session)| {
                let hosts = &self.hosts;
                session.events.try_iter().map(move |event| {
                    let domain = match &event {
                        ConsoleEvent::Attached { name }
                        | ConsoleEvent::Output { name, .. }
                        | ConsoleEvent::Ended { name, .. }
                        | ConsoleEvent::AttachFailed { name, .. } => name,
                    };
                    (hosts.key(host, domain), event)
                })
            })
            .collect();
        for (key, event) in events {
            match event {
                ConsoleEvent::Attached { .. } => self.attached(&key),
                ConsoleEvent::Output { bytes, .. } => self.output(&key, &bytes),
                // The host's supervisor reports the loss too, and reconnects.
                ConsoleEvent::Ended {
                    end: ConsoleEnd::ConnectionLost(reason),
                    ..
                } => {
                    let why = self.hosts.lost(&key, &reason.to_string());
                    self.ended(&key, why, false);
                }
                ConsoleEvent::Ended { end, .. } => self.ended(&key, end.to_string(), true),
                ConsoleEvent::AttachFailed { error, .. } => self.attach_failed(&key, &error),
            }
        }
    }

    fn attached(&mut self, name: &str) {
        if self.closing {
            return;
        }
        if let Some(console) = self.consoles.get_mut(name) {
            console.state = State::Attached;
            log::info!("{name}: console attached again");
            self.tell_all(name, "console attached");
            return;
        }
        if let Err(e) = self.serve(name) {
            log::error!("{name}: cannot serve the console: {e}");
        }
    }

    /// Binds `DIR/NAME.sock` for a console that just attached, with its ring and log.
    fn serve(&mut self, name: &str) -> io::Result<()> {
        let (mut listener, socket) = self.dir.bind(&format!("{name}.sock"))?;
        let log = match &self.options.log {
            Some(options) => match ConsoleLog::open(name, options) {
                Ok(log) => Some(log),
                Err(e) => {
                    socket.remove();
                    return Err(io::Error::new(e.kind(), format!("its log: {e}")));
                }
            },
            None => None,
        };
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        self.registry
            .register(&mut listener, Token(FIRST_SOURCE + key), Interest::READABLE)?;
        entry.insert(Source::Listener {
            name: name.to_owned(),
            listener,
        });
        log::info!("{name}: serving on {}", socket.path.display());
        println!("+ {name} {}", socket.path.display());
        self.consoles.insert(
            name.to_owned(),
            Console {
                listener: key,
                socket,
                state: State::Attached,
                scrollback: Scrollback::new(self.options.scrollback),
                log,
                viewers: BTreeSet::new(),
                exclusive: None,
                checks: 0,
                floor: Floor::default(),
                output_bytes: 0,
                input_bytes: 0,
            },
        );
        Ok(())
    }

    /// A console ended: its viewers stay (the guest may start again) unless the
    /// domain is gone, which a worker finds out.
    fn ended(&mut self, name: &str, why: String, check: bool) {
        let Some(console) = self.consoles.get_mut(name) else {
            log::info!("{name}: console ended ({why})");
            return;
        };
        log::info!("{name}: console ended ({why})");
        console.state = State::Ended(why.clone());
        console.checks = 0;
        self.tell_all(name, &format!("console ended: {why}"));
        if check {
            self.check_existence(name);
        }
    }

    /// Finds out on a worker whether the domain of a console that ended still
    /// exists; [`checked`](Self::checked) acts on the answer.
    fn check_existence(&mut self, name: &str) {
        if self.closing {
            return;
        }
        let Some((session, domain)) = self.hosts.session_of(name) else {
            return;
        };
        let (conn, owned) = (session.conn.clone(), domain.to_owned());
        let spawned = self
            .handle
            .spawn_blocking(move || existence(&conn, &owned), {
                let name = name.to_owned();
                move |_, libvirt: &mut Libvirt, existence| libvirt.checked.push((name, existence))
            });
        if let Err(e) = spawned {
            log::warn!("{name}: cannot check whether the domain still exists: {e}");
        }
    }

    /// An attach failed. A console that ended keeps the reason it ended for: the
    /// domain may have looked alive while it was stopping, so it is looked at again
    /// (a few times at most, so that a running domain whose console cannot be opened
    /// is not retried in a loop). One that was starting says why it could not.
    fn attach_failed(&mut self, name: &str, error: &Error) {
        log::warn!("{name}: cannot attach to the console: {error}");
        let Some(console) = self.consoles.get_mut(name) else {
            return;
        };
        if let State::Ended(_) = console.state {
            if console.checks < RECHECKS {
                console.checks += 1;
                self.check_existence(name);
            }
            return;
        }
        let why = format!("cannot attach: {error}");
        console.state = State::Ended(why.clone());
        self.tell_all(name, &format!("console not attached: {why}"));
    }

    fn checked(&mut self, name: &str, existence: Existence) {
        match existence {
            Existence::Gone => self.unserve(name, "guest gone"),
            Existence::Running => self.attach(name),
            Existence::Stopped => {}
        }
    }

    /// Stops serving a console: its socket goes, its viewers are told and closed.
    fn unserve(&mut self, name: &str, why: &str) {
        let Some(console) = self.consoles.remove(name) else {
            return;
        };
        self.unix_ready.remove(&console.listener);
        self.drop_source(console.listener);
        console.socket.remove();
        let text = notice(&format!("{name}: {why}"));
        for key in console.viewers {
            if let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) {
                let _ = viewer.send(text.as_bytes(), usize::MAX);
            }
            self.drop_source(key);
        }
        log::info!(
            "{name}: no longer served ({why}); removed {}",
            console.socket.path.display()
        );
        println!("- {name} {}", console.socket.path.display());
    }

    /// The console printed: into its ring, its log, and to each viewer; those too
    /// far behind are cut off.
    fn output(&mut self, name: &str, bytes: &[u8]) {
        let Some(console) = self.consoles.get_mut(name) else {
            return;
        };
        console.output_bytes += bytes.len() as u64;
        self.output_served = true;
        console.scrollback.push(bytes);
        if let Some(log) = &mut console.log {
            log.write(bytes);
        }
        let mut cut = Vec::new();
        for &key in &console.viewers {
            if let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) {
                if let Err(why) = viewer.send(bytes, self.options.viewer_buffer) {
                    cut.push((key, why));
                }
            }
        }
        for (key, why) in cut {
            self.cut(key, why);
        }
    }

    fn cut(&mut self, key: usize, why: Cut) {
        let reason = match why {
            Cut::TooSlow(pending) => {
                self.viewers_cut += 1;
                format!(
                    "too slow ({pending} bytes pending, limit {}); disconnected",
                    self.options.viewer_buffer
                )
            }
            Cut::Gone(e) => format!("gone ({e})"),
        };
        self.close(key, &reason);
    }

    /// A notice to one viewer.
    fn tell(&mut self, key: usize, text: &str) {
        let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
            return;
        };
        if let Err(why) = viewer.send(notice(text).as_bytes(), self.options.viewer_buffer) {
            self.cut(key, why);
        }
    }

    /// A notice to every viewer of a console.
    fn tell_all(&mut self, name: &str, text: &str) {
        let keys: Vec<usize> = match self.consoles.get(name) {
            Some(console) => console.viewers.iter().copied().collect(),
            None => return,
        };
        for key in keys {
            self.tell(key, &format!("{name}: {text}"));
        }
    }

    fn source_ready(&mut self, key: usize, event: &Event) {
        let writable = event.is_writable();
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let flushed = match self.sources.get_mut(key) {
            Some(Source::Listener { .. }) => {
                self.unix_ready.insert(key);
                return;
            }
            Some(Source::Viewer(viewer)) if writable => viewer.flush(),
            Some(Source::Control(control)) if writable => control.out.flush(&mut control.stream),
            Some(_) => Ok(()),
            None => return, // closed earlier in this batch
        };
        if let Err(e) = flushed {
            self.close(key, &format!("gone ({e})"));
            return;
        }
        // A web connection also moves on when it may write (a response in parts).
        if readable || matches!(self.sources.get(key), Some(Source::Web { .. })) {
            self.read_source(key);
        }
        // A full hangup (both directions): the peer is gone. A half-close (it only
        // stopped sending) keeps a Unix viewer attached for output.
        if event.is_write_closed() && self.sources.contains(key) {
            self.close(key, "hung up");
        }
    }

    fn read_source(&mut self, key: usize) {
        match self.sources.get(key) {
            Some(Source::Viewer(_)) => self.read_viewer(key),
            Some(Source::Handshake(_)) => self.read_handshake(key),
            Some(Source::Web { .. }) => self.drive_web(key),
            Some(Source::Control(_)) => self.read_control(key),
            Some(Source::Listener { .. }) | None => {}
        }
    }

    /// Reads what a viewer sent, up to [`READ_BUDGET`], while its input has room.
    fn read_viewer(&mut self, key: usize) {
        let mut read = 0;
        loop {
            let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
                return;
            };
            let room = INPUT_MAX.saturating_sub(viewer.input.len());
            if viewer.read_closed || room == 0 {
                return; // reading resumes once its input has gone out
            }
            if read >= READ_BUDGET {
                self.retry.insert(key); // be fair to the others
                return;
            }
            let limit = room.min(self.scratch.len());
            match viewer.transport.read(&mut self.scratch[..limit]) {
                Ok(0) => {
                    viewer.read_closed = true;
                    if viewer.transport.kind() == "unix" {
                        log::debug!("{}: stopped sending", viewer.peer);
                    } else {
                        // TCP cannot tell a half-close from a close until a write
                        // fails; a quiet console never writes.
                        self.close(key, "closed");
                    }
                    return;
                }
                Ok(n) => {
                    read += n;
                    let pieces = viewer.received(&self.scratch[..n]);
                    self.pieces(key, pieces);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(key, &format!("gone ({e})"));
                    return;
                }
            }
        }
    }

    fn pieces(&mut self, key: usize, pieces: Vec<Piece>) {
        for piece in pieces {
            let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
                return;
            };
            match piece {
                Piece::Input(_) if viewer.role == Role::ReadOnly => {
                    if !std::mem::replace(&mut viewer.told_read_only, true) {
                        self.tell(key, "read-only: your input is ignored (Ctrl-] rw to write)");
                    }
                }
                Piece::Input(bytes) => self.queue_input(key, &bytes),
                Piece::Command(command) => self.command(key, command),
            }
        }
    }

    /// Sends waiting input to the console, writer by writer, as the floor allows.
    fn pump(&mut self, name: &str) {
        let now = Instant::now();
        let Some((session, domain)) = self.hosts.session_of(name) else {
            return;
        };
        loop {
            let Some(console) = self.consoles.get_mut(name) else {
                return;
            };
            let Some(turn) = console.floor.turn(now) else {
                return;
            };
            let (key, given) = match turn {
                Turn::Holder(key) => (key, false),
                Turn::Given(key) => (key, true),
            };
            let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
                console.floor.leave(key);
                continue;
            };
            if viewer.input.is_empty() {
                if given {
                    console.floor.leave(key);
                    continue;
                }
                return; // the holder is mid-line
            }
            let line_end = viewer.input.iter().position(|&b| b == b'\r' || b == b'\n');
            let upto = line_end.map_or(viewer.input.len(), |at| at + 1);
            let was_full = viewer.input.len() >= INPUT_MAX;
            match session.mux.try_send(domain, &viewer.input[..upto]) {
                Ok(n) => {
                    viewer.input.drain(..n);
                    console.input_bytes += n as u64;
                    let line_ended = line_end.is_some() && n == upto;
                    console.floor.sent(key, line_ended, now);
                    if was_full && n > 0 {
                        self.retry.insert(key); // its reading stopped: read on
                    }
                    if n < upto {
                        self.stalled.insert(name.to_owned());
                        return;
                    }
                    if !line_ended {
                        return;
                    }
                    if !viewer.input.is_empty() {
                        console.floor.ask(key);
                    }
                }
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stalled.insert(name.to_owned());
                    return;
                }
                Err(e) => {
                    // Not attached now: there is nowhere for the input to go.
                    let dropped = viewer.input.len();
                    viewer.input.clear();
                    console.floor.leave(key);
                    if was_full {
                        self.retry.insert(key);
                    }
                    self.tell(key, &format!("input not sent ({dropped} bytes): {e}"));
                    return;
                }
            }
        }
    }

    fn command(&mut self, key: usize, command: Command) {
        let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
            return;
        };
        let (name, id, peer, role) = (
            viewer.console.clone(),
            viewer.id,
            viewer.peer.clone(),
            viewer.role,
        );
        let Some(console) = self.consoles.get(&name) else {
            return;
        };
        let exclusive = console.exclusive;
        let viewers: Vec<usize> = console.viewers.iter().copied().collect();
        match command {
            Command::ReadWrite => {
                match exclusive {
                    Some(other) if other != key => {
                        let holder = self.viewer_label(other);
                        self.tell(
                        key,
                        &format!("refused: {holder} holds the write role alone (Ctrl-] take to take it)"),
                    );
                    }
                    _ => {
                        self.set_role(key, Role::ReadWrite);
                        self.tell(key, &format!("viewer {id}: read-write"));
                    }
                }
            }
            Command::ReadOnly => {
                self.set_role(key, Role::ReadOnly);
                self.tell(key, &format!("viewer {id}: read-only"));
            }
            Command::Take => {
                for other in viewers.into_iter().filter(|&k| k != key) {
                    if matches!(self.sources.get(other), Some(Source::Viewer(v)) if v.role == Role::ReadWrite)
                    {
                        self.set_role(other, Role::ReadOnly);
                        self.tell(
                            other,
                            &format!("you lost the write role to viewer {id} ({peer}); you are read-only"),
                        );
                    }
                }
                self.set_role(key, Role::ReadWrite);
                if let Some(console) = self.consoles.get_mut(&name) {
                    console.exclusive = Some(key);
                }
                self.tell(key, &format!("viewer {id}: read-write, alone"));
            }
            Command::Kick(target) => {
                if role != Role::ReadWrite {
                    self.tell(key, "refused: a read-only viewer cannot kick");
                    return;
                }
                match self.find_viewer(&name, target) {
                    Some(other) => {
                        self.tell(other, &format!("kicked by viewer {id} ({peer})"));
                        self.close(other, &format!("kicked by viewer {id}"));
                        self.tell(key, &format!("kicked viewer {target}"));
                    }
                    None => self.tell(key, &format!("no viewer {target} on {name}")),
                }
            }
            Command::Break => {
                if role != Role::ReadWrite {
                    self.tell(key, "refused: a read-only viewer cannot send a break");
                } else if self.options.break_sequence.is_empty() {
                    self.tell(
                        key,
                        "no break sequence is set (virt-consoled --break-sequence); \
                         libvirt's console streams carry bytes, not a serial break",
                    );
                } else {
                    self.queue_input(key, &self.options.break_sequence.clone());
                }
            }
            Command::Who => {
                let list: Vec<String> = viewers
                    .iter()
                    .map(|&k| {
                        let mark = if k == key { " (you)" } else { "" };
                        format!("{}{mark}", self.viewer_label(k))
                    })
                    .collect();
                self.tell(key, &format!("{name}: {}", list.join(", ")));
            }
            Command::Help => self.tell(key, HELP),
            Command::Unknown(text) => self.tell(
                key,
                &format!("unknown command {text:?}; Ctrl-] help lists them"),
            ),
        }
    }

    /// Queues console input from a writer and sends what the floor allows.
    fn queue_input(&mut self, key: usize, bytes: &[u8]) {
        let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
            return;
        };
        viewer.input.extend_from_slice(bytes);
        let name = viewer.console.clone();
        if let Some(console) = self.consoles.get_mut(&name) {
            console.floor.ask(key);
        }
        self.pump(&name);
    }

    /// `viewer N (PEER, ROLE)`.
    fn viewer_label(&self, key: usize) -> String {
        match self.sources.get(key) {
            Some(Source::Viewer(v)) => {
                let alone = self
                    .consoles
                    .get(&v.console)
                    .is_some_and(|c| c.exclusive == Some(key));
                let role = if alone { "rw alone" } else { v.role.as_str() };
                format!("viewer {} ({}, {role})", v.id, v.peer)
            }
            _ => format!("viewer at {key}"),
        }
    }

    fn find_viewer(&self, name: &str, id: u64) -> Option<usize> {
        let console = self.consoles.get(name)?;
        console
            .viewers
            .iter()
            .copied()
            .find(|&k| matches!(self.sources.get(k), Some(Source::Viewer(v)) if v.id == id))
    }

    fn set_role(&mut self, key: usize, role: Role) {
        let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
            return;
        };
        viewer.role = role;
        viewer.told_read_only = false;
        if role == Role::ReadOnly {
            viewer.input.clear();
            let name = viewer.console.clone();
            if let Some(console) = self.consoles.get_mut(&name) {
                console.floor.leave(key);
                if console.exclusive == Some(key) {
                    console.exclusive = None;
                }
            }
            self.retry.insert(key);
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
        if self.control_ready {
            self.control_ready = self.accept_control();
        }
        if self.tcp_ready {
            self.tcp_ready = self.accept_tcp(TCP);
        }
        if self.web_ready {
            self.web_ready = self.accept_tcp(WEB);
        }
    }

    /// Returns whether connections may be left.
    fn accept_unix(&mut self, key: usize) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let Some(Source::Listener { name, listener }) = self.sources.get(key) else {
                return false;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    let (name, id) = (name.clone(), self.next_id());
                    let viewer = Viewer::new(Box::new(stream), id, format!("unix#{id}"), &name);
                    if let Some(key) = self.add(Source::Viewer(viewer)) {
                        self.join(key);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if transient(&e) => {}
                Err(e) if out_of_fds(&e) => {
                    // A TCP connection yet to prove itself makes room for a Unix one.
                    if let Some((oldest, _)) = self.oldest_pending() {
                        self.evicted.warn(|| {
                            format!("{name}: out of file descriptors; closing the oldest TCP connection still in its handshake")
                        });
                        self.close(oldest, "closed: a Unix viewer needs the descriptor");
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

    /// Accepts on the TCP or the web listener. Returns whether connections may be
    /// left.
    fn accept_tcp(&mut self, which: Token) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let listener = match which {
                TCP => self.tcp.as_ref(),
                _ => self.web.as_ref(),
            };
            let Some(listener) = listener else {
                return false;
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    if self.pending.len() >= self.options.max_pending {
                        if let Some((oldest, _)) = self.oldest_pending() {
                            let max = self.options.max_pending;
                            self.evicted.warn(|| {
                                format!("{max} TCP connections wait to say what they want (--max-pending); closing the oldest")
                            });
                            self.close(oldest, "closed to make room (--max-pending)");
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let id = self.next_id();
                    let source = if which == TCP {
                        Source::Handshake(Handshake {
                            stream,
                            id,
                            peer: format!("tcp#{id} {addr}"),
                            line: Vec::new(),
                            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                        })
                    } else {
                        Source::Web {
                            conn: Box::new(WebConn::new(stream, addr)),
                            id,
                            peer: format!("web#{id} {addr}"),
                        }
                    };
                    if let Some(key) = self.add(source) {
                        self.pending.insert(id, key);
                        self.read_source(key); // it may have sent already
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if transient(&e) => {}
                Err(e) if out_of_fds(&e) => {
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

    fn accept_control(&mut self) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let Some((listener, _)) = &self.control else {
                return false;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.add(Source::Control(Control {
                        stream,
                        input: Vec::new(),
                        out: Outbox::default(),
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if transient(&e) => {}
                Err(e) if out_of_fds(&e) => {
                    if !self.reserve.shed("control", || listener.accept().map(drop)) {
                        return true;
                    }
                }
                Err(e) => {
                    log::warn!("control accept: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn next_id(&mut self) -> u64 {
        self.next_peer += 1;
        self.next_peer - 1
    }

    /// Registers a new connection. Readable always, even for a viewer that only
    /// watches: that is how its going away is noticed while the console is quiet.
    fn add(&mut self, mut source: Source) -> Option<usize> {
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        let registered = self.registry.register(
            source.io(),
            Token(FIRST_SOURCE + key),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            log::warn!("cannot register a connection: {e}");
            return None;
        }
        entry.insert(source);
        Some(key)
    }

    /// Attaches the viewer at `key` to its console: a greeting, the replay, and the
    /// console's state if it is not attached.
    fn join(&mut self, key: usize) {
        let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) else {
            return;
        };
        let name = viewer.console.clone();
        let Some(console) = self.consoles.get_mut(&name) else {
            self.close(key, &format!("no console {name:?}"));
            return;
        };
        console.viewers.insert(key);
        if console.exclusive.is_some() {
            viewer.role = Role::ReadOnly; // someone holds the write role alone
        }
        let greeting = notice(&format!(
            "{name}: you are viewer {} ({}), one of {}; commands: Ctrl-] help Enter (virt-console: ~?)",
            viewer.id,
            viewer.role.as_str(),
            console.viewers.len()
        ));
        let (a, b) = console.scrollback.replay();
        let replay = [greeting.as_bytes(), a, b].concat();
        let state = match &console.state {
            State::Attached => None,
            State::Opening => Some("console not attached yet".to_owned()),
            State::Ended(why) => Some(format!("console not attached: {why}")),
        };
        log::info!(
            "{name}: {} attached ({})",
            viewer.peer,
            viewers(console.viewers.len())
        );
        if let Err(why) = viewer.send(&replay, self.options.viewer_buffer.max(replay.len())) {
            self.cut(key, why);
            return;
        }
        if let Some(state) = state {
            self.tell(key, &format!("{name}: {state}"));
        }
    }

    /// Reads a TCP connection's `TOKEN NAME` line; it becomes a viewer in place.
    fn read_handshake(&mut self, key: usize) {
        loop {
            let Some(Source::Handshake(h)) = self.sources.get_mut(key) else {
                return;
            };
            match io::Read::read(&mut h.stream, &mut self.scratch[..HANDSHAKE_MAX]) {
                Ok(0) => {
                    self.close(key, "closed before its TOKEN NAME line");
                    return;
                }
                Ok(n) => h.line.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(key, &format!("gone ({e})"));
                    return;
                }
            }
            let Some(end) = h.line.iter().position(|&b| b == b'\n') else {
                if h.line.len() > HANDSHAKE_MAX {
                    self.close(key, "handshake line too long");
                    return;
                }
                continue;
            };
            let rest = h.line.split_off(end + 1);
            let id = h.id;
            let line = String::from_utf8_lossy(&h.line).into_owned();
            let (token, name) = line
                .trim_end_matches(['\r', '\n'])
                .split_once(' ')
                .unwrap_or(("", ""));
            let name = name.trim().to_owned();
            if !self
                .token
                .as_ref()
                .is_some_and(|t| t.matches(token.as_bytes()))
            {
                let peer = h.peer.clone();
                self.refused.warn(|| format!("{peer}: wrong token; closed"));
                self.drop_source(key);
                return;
            }
            if !self.consoles.contains_key(&name) {
                let reply = notice(&format!("no console {name:?}"));
                let _ = io::Write::write(&mut h.stream, reply.as_bytes());
                log::info!("{}: no console {name:?}; closed", h.peer);
                self.drop_source(key);
                return;
            }
            self.pending.remove(&id);
            let replaced = self.replace(key, |source| match source {
                Source::Handshake(h) => Some(Source::Viewer(Viewer::new(
                    Box::new(h.stream),
                    h.id,
                    h.peer,
                    &name,
                ))),
                other => Some(other),
            });
            let Some(key) = replaced else { return };
            self.join(key);
            if let Some(Source::Viewer(viewer)) = self.sources.get_mut(key) {
                let pieces = viewer.received(&rest);
                self.pieces(key, pieces);
            }
            self.read_viewer(key);
            return;
        }
    }

    /// Drives a web connection: a page, the API, or a WebSocket that becomes a
    /// viewer in place.
    fn drive_web(&mut self, key: usize) {
        let Server {
            sources,
            token,
            consoles,
            ..
        } = self;
        let Some(Source::Web { conn, .. }) = sources.get_mut(key) else {
            return;
        };
        let site = SiteView {
            token: token.as_ref(),
            consoles,
        };
        match conn.ready(&site) {
            WebStep::Pending => {}
            WebStep::Closed => self.drop_source(key),
            WebStep::Upgraded { console } => {
                let mut upgraded = None;
                let replaced = self.replace(key, |source| match source {
                    Source::Web { conn, id, peer } => {
                        let transport = conn.into_viewer()?;
                        upgraded = Some(id);
                        Some(Source::Viewer(Viewer::new(
                            Box::new(transport),
                            id,
                            peer,
                            &console,
                        )))
                    }
                    other => Some(other),
                });
                if let (Some(key), Some(id)) = (replaced, upgraded) {
                    self.pending.remove(&id);
                    self.join(key);
                    self.read_viewer(key);
                }
            }
        }
    }

    /// Replaces the source at `key` by what `f` makes of it (nothing: it is gone),
    /// keeping its registration. Returns its key: the same one, as the slab reuses
    /// the slot just freed (or else it is registered again under the new one).
    fn replace(&mut self, key: usize, f: impl FnOnce(Source) -> Option<Source>) -> Option<usize> {
        let old = self.sources.remove(key);
        let new_key = self.sources.insert(f(old)?);
        if new_key != key {
            if let Err(e) = self.registry.reregister(
                self.sources[new_key].io(),
                Token(FIRST_SOURCE + new_key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("cannot register a connection again: {e}");
            }
        }
        Some(new_key)
    }

    /// Reads control requests, a JSON object per line, and answers each.
    fn read_control(&mut self, key: usize) {
        loop {
            let Some(Source::Control(control)) = self.sources.get_mut(key) else {
                return;
            };
            match io::Read::read(&mut control.stream, &mut self.scratch) {
                Ok(0) => {
                    self.drop_source(key);
                    return;
                }
                Ok(n) => control.input.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_source(key);
                    return;
                }
            }
            while let Some(Source::Control(control)) = self.sources.get_mut(key) {
                let Some(end) = control.input.iter().position(|&b| b == b'\n') else {
                    if control.input.len() > CONTROL_LINE_MAX {
                        let reply = reply(Err("request line too long".into()));
                        let _ = control.out.send(reply.as_bytes(), &mut control.stream);
                        self.drop_source(key);
                        return;
                    }
                    break;
                };
                let line: Vec<u8> = control.input.drain(..=end).collect();
                let answer = self.answer(&line);
                let Some(Source::Control(control)) = self.sources.get_mut(key) else {
                    return;
                };
                let sent = control.out.send(answer.as_bytes(), &mut control.stream);
                if sent.is_err() || control.out.len() > CONTROL_OUT_MAX {
                    self.drop_source(key);
                    return;
                }
            }
        }
    }

    fn answer(&mut self, line: &[u8]) -> String {
        match serde_json::from_slice::<Request>(line) {
            Ok(Request::Status) => {
                let mut text = serde_json::to_string(&self.status()).unwrap_or_default();
                text.push('\n');
                text
            }
            Ok(Request::Kick { console, viewer }) => match self.find_viewer(&console, viewer) {
                Some(key) => {
                    self.tell(key, "kicked by the service's administrator");
                    self.close(key, "kicked through the control socket");
                    reply(Ok(()))
                }
                None => reply(Err(format!("no viewer {viewer} on console {console:?}"))),
            },
            Err(e) => reply(Err(format!("bad request: {e}"))),
        }
    }

    /// What `{"cmd":"status"}` answers.
    pub(crate) fn status(&self) -> Status {
        let consoles = self
            .consoles
            .iter()
            .map(|(name, console)| {
                let (state, end) = match &console.state {
                    State::Attached => ("attached", None),
                    State::Opening => ("opening", None),
                    State::Ended(why) => ("ended", Some(why.clone())),
                };
                ConsoleStatus {
                    name: name.clone(),
                    state: state.to_owned(),
                    end,
                    output_bytes: console.output_bytes,
                    input_bytes: console.input_bytes,
                    scrollback: ScrollbackStatus {
                        capacity: console.scrollback.capacity(),
                        used: console.scrollback.len(),
                    },
                    log: console.log.as_ref().map(|log| LogStatus {
                        path: log.path().display().to_string(),
                        bytes: log.size(),
                        rotations: log.rotations,
                        lost_bytes: log.lost,
                        error: log.last_error.clone(),
                    }),
                    viewers: console
                        .viewers
                        .iter()
                        .filter_map(|&key| match self.sources.get(key) {
                            Some(Source::Viewer(v)) => Some(ViewerStatus {
                                id: v.id,
                                peer: v.peer.clone(),
                                transport: v.transport.kind().to_owned(),
                                role: v.role.as_str().to_owned(),
                                exclusive: console.exclusive == Some(key),
                                sent_bytes: v.out.sent,
                                queued_bytes: v.out.len(),
                            }),
                            _ => None,
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            hosts: self.hosts.status(),
            consoles,
            viewers_cut: self.viewers_cut,
        }
    }

    /// Closes a connection and logs why.
    fn close(&mut self, key: usize, why: &str) {
        match self.sources.get(key) {
            Some(Source::Viewer(viewer)) => {
                let (name, peer) = (viewer.console.clone(), viewer.peer.clone());
                self.drop_source(key);
                let left = self.consoles.get(&name).map_or(0, |c| c.viewers.len());
                let left = viewers(left);
                if why.starts_with("too slow") {
                    log::warn!("{name}: {peer} {why} ({left} left)");
                } else {
                    log::info!("{name}: {peer} {why} ({left} left)");
                }
            }
            // Many may come at once, from anyone on the machine.
            Some(_) => {
                log::debug!("connection {key}: {why}");
                self.drop_source(key);
            }
            None => {}
        }
    }

    /// Removes a source from the slab, the poll and its console.
    fn drop_source(&mut self, key: usize) {
        if !self.sources.contains(key) {
            return;
        }
        self.retry.remove(&key);
        let mut source = self.sources.remove(key);
        let _ = self.registry.deregister(source.io());
        match source {
            Source::Viewer(viewer) => {
                if let Some(console) = self.consoles.get_mut(&viewer.console) {
                    console.viewers.remove(&key);
                    console.floor.leave(key);
                    if console.exclusive == Some(key) {
                        console.exclusive = None;
                    }
                }
                self.pump(&viewer.console); // the floor may have come free
            }
            Source::Handshake(Handshake { id, .. }) | Source::Web { id, .. } => {
                self.pending.remove(&id);
            }
            Source::Control(_) | Source::Listener { .. } => {}
        }
    }

    /// Clean shutdown: stop listening, finish the consoles, tell and close the
    /// viewers, remove the sockets.
    pub(crate) fn shut_down(&mut self, reactor: &mut Reactor<Libvirt>) {
        self.closing = true;
        for listener in [self.tcp.take(), self.web.take()].into_iter().flatten() {
            let mut listener = listener;
            let _ = self.registry.deregister(&mut listener);
        }
        // Deregistering from lifecycle events is a call to the daemon: the reactor
        // makes it off the loop.
        self.hosts.stop(reactor, &mut self.libvirt);
        self.console_events();
        let names: Vec<String> = self.consoles.keys().cloned().collect();
        for name in names {
            self.unserve(&name, "the service is shutting down");
        }
        let keys: Vec<usize> = self.sources.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.drop_source(key);
        }
        if let Some((mut listener, socket)) = self.control.take() {
            let _ = self.registry.deregister(&mut listener);
            socket.remove();
        }
        self.hosts.close();
    }
}

/// What the web front may know of the service.
struct SiteView<'a> {
    token: Option<&'a Secret>,
    consoles: &'a BTreeMap<String, Console>,
}

impl Site for SiteView<'_> {
    fn token_ok(&self, given: &[u8]) -> bool {
        self.token.is_some_and(|t| t.matches(given))
    }

    fn consoles_json(&self) -> String {
        let list: Vec<serde_json::Value> = self
            .consoles
            .iter()
            .map(|(name, console)| {
                let state = match console.state {
                    State::Attached => "attached",
                    State::Opening => "opening",
                    State::Ended(_) => "ended",
                };
                serde_json::json!({"name": name, "state": state, "viewers": console.viewers.len()})
            })
            .collect();
        serde_json::Value::Array(list).to_string()
    }

    fn has_console(&self, name: &str) -> bool {
        self.consoles.contains_key(name)
    }
}

fn viewers(n: usize) -> String {
    if n == 1 {
        "1 viewer".to_owned()
    } else {
        format!("{n} viewers")
    }
}

fn reply(result: Result<(), String>) -> String {
    let reply = match result {
        Ok(()) => Reply {
            ok: true,
            error: None,
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e),
        },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_default();
    text.push('\n');
    text
}

/// On a worker thread: every domain of `conn`, and whether it runs.
fn list_domains(conn: &Connect) -> Listing {
    let domains = conn
        .list_all_domains(0)
        .map_err(|e| format!("list domains: {e}"))?;
    Ok(domains
        .into_iter()
        .filter_map(|domain| Some((domain.name().ok()?, domain.is_active().ok()?)))
        .collect())
}

/// On a worker thread: whether the domain `name` still exists, and runs.
fn existence(conn: &Connect, name: &str) -> Existence {
    match conn.lookup_domain_by_name(name) {
        Ok(domain) => match domain.is_active() {
            Ok(true) => Existence::Running,
            _ => Existence::Stopped,
        },
        Err(e) if e.code().is(ErrorNumber::NoDomain) => Existence::Gone,
        Err(e) => {
            log::warn!("{name}: cannot look the domain up: {e}");
            Existence::Stopped
        }
    }
}
