//! The console service: every guest console of a connection on one thread, for many
//! viewers at once, with scrollback, durable logs and a browser terminal. The
//! `virt-consoled` program runs it; `virt-console` is its interactive client.
//!
//! * **Every guest.** The running domains of the connection, and each one that
//!   starts later (or [`ServiceOptions::domains`] only). A console that ends (the
//!   guest stopped) keeps its socket, its ring and its viewers while the domain
//!   exists, and is attached again when it starts; a domain that is gone (a
//!   transient guest destroyed, a domain undefined) takes its socket with it.
//! * **Scrollback.** Each console keeps its last [`ServiceOptions::scrollback`]
//!   bytes, replayed to every viewer on attach, from a line start.
//! * **Viewers with roles.** Any number per console, read-write by default. A viewer
//!   sends in-band commands after Ctrl-] (0x1d), each ended by Enter: `rw`, `ro`,
//!   `take` (the write role alone: every other writer becomes read-only and is
//!   told), `kick N`, `break`, `who`, `help`; Ctrl-] Ctrl-] sends a Ctrl-]. The
//!   service's own lines are `\r\n[virt-consoled] TEXT\r\n`.
//! * **Input from several writers** goes out whole lines at a time, never
//!   interleaved: the writer whose input comes first holds the floor until its line
//!   ends (or it is idle for a second while others wait); the others' input waits in
//!   their own bounded queues, and their sockets are not read while those are full,
//!   so nothing is dropped.
//! * **Logs** (`DIR/NAME.log`, with [`ServiceOptions::log`]): every byte the guest
//!   printed, rotated by size at a line end, optionally timestamped, reopened on
//!   SIGHUP. Output reaches the ring and the log before any viewer, and a viewer
//!   more than [`ServiceOptions::viewer_buffer`] behind is cut off, so a slow viewer
//!   never holds up the log or the others.
//! * **Interfaces.** `DIR/NAME.sock` per console (0600 in a 0700 directory; plain
//!   `socat - UNIX-CONNECT:DIR/NAME.sock` works); `DIR/control.sock` answering JSON
//!   lines (`{"cmd":"status"}`, `{"cmd":"kick","console":NAME,"viewer":N}`); loopback
//!   TCP where a viewer first sends `TOKEN NAME\n`; a web page with an xterm.js
//!   terminal over WebSocket, the token in the URL's fragment.
//! * **Hostile local users** cannot exhaust it: connections that have not said what
//!   they want are bounded and time out, accepts are budgeted per iteration, and a
//!   reserve descriptor sheds connections when descriptors run out.

mod accept;
mod dir;
mod floor;
mod hosts;
mod libvirt;
mod logfile;
mod options;
mod pacing;
mod scrollback;
mod server;
mod status;
mod token;
mod transport;
mod viewer;
mod web;

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

pub use self::dir::default_dir;
use self::dir::SocketDir;
use self::libvirt::Libvirt;
pub use self::logfile::{ConsoleLog, LogOptions};
pub use self::options::ServiceOptions;
use self::pacing::Pacing;
use self::server::{Server, LIBVIRT, SIGNALS};
pub use self::status::{
    ConsoleStatus, HostStatus, LogStatus, ScrollbackStatus, Status, ViewerStatus,
};
use self::token::Token;
pub use self::viewer::COMMAND;
use crate::streams::reactor::Reactor;
use crate::vocab::error::{Error, Result};

/// How long libvirt may take, from the start of the shutdown, to answer the
/// consoles' ends; a frozen daemon must not hold the exit.
const DAEMON_GRACE: Duration = Duration::from_millis(500);
/// The least time given to the last answers, however long the shutdown took.
const MIN_DRAIN: Duration = Duration::from_millis(100);

/// Runs the service on this thread until a signal, `exit_after`, or the loss of the
/// connection. Registers the crate's event loop with libvirt, so call it before
/// anything else in the process opens a connection.
///
/// # Errors
///
/// Bad options (a non-loopback address, an unusable directory or token file), the
/// connection failing or being lost, and I/O errors of the listeners.
pub fn run(options: ServiceOptions) -> Result<()> {
    for (what, addr) in [("--tcp", options.tcp), ("--web", options.web)] {
        if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
            return Err(failed(format!(
                "{what} {addr}: only loopback addresses are served"
            )));
        }
    }
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    // libvirt's events are one more source on our poll.
    let mut reactor = Reactor::<Libvirt>::register()?;
    poll.registry()
        .register(&mut reactor, LIBVIRT, Interest::READABLE)?;
    let mut signals = if options.signals {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        Some(signals)
    } else {
        None
    };

    // From here on, what this run creates is removed when its owner drops, on every
    // path out, errors included.
    let dir = SocketDir::prepare(&options.dir).map_err(failed)?;
    let listeners = bind_listeners(&options)?;
    let token = match (&listeners.0, &listeners.1, &options.token_file) {
        (None, None, _) => None,
        (_, _, Some(path)) => Some(
            Token::from_file(path)
                .map_err(|e| failed(format!("--token-file {}: {e}", path.display())))?,
        ),
        (_, _, None) => Some(Token::random()?),
    };
    let exit_at = options
        .exit_after
        .and_then(|d| Instant::now().checked_add(d));
    let mut server = Server::new(
        poll.registry().try_clone()?,
        reactor.handle(),
        options.clone(),
        dir,
        token.clone(),
    )?;
    server.listen_control()?;
    println!(
        "virt-consoled: consoles in {}",
        server.dir().path().display()
    );
    announce(&listeners, token.as_ref(), &options);
    if let Some(tcp) = listeners.0 {
        server.listen_tcp(mio::net::TcpListener::from_std(tcp))?;
    }
    if let Some(web) = listeners.1 {
        server.listen_web(mio::net::TcpListener::from_std(web))?;
    }
    server.start(&mut reactor)?;

    let mut pacing = Pacing::default();
    // While output streams, libvirt is left unread until then (see `pacing`).
    let mut libvirt_paused_until: Option<Instant> = None;
    let outcome = loop {
        if libvirt_paused_until.is_some_and(|at| Instant::now() >= at) {
            libvirt_paused_until = None;
            if let Err(e) = poll
                .registry()
                .register(&mut reactor, LIBVIRT, Interest::READABLE)
            {
                break Err(Error::Io(e));
            }
        }
        // Our own deadlines first: next_timeout() must come right before the poll.
        let mut timeout = server.timeout();
        for at in [exit_at, libvirt_paused_until].into_iter().flatten() {
            let left = at.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        // Paused, libvirt's work (its timers, what it has read) waits for the end of
        // the pause, or for whatever else wakes the loop first.
        let libvirt = libvirt_paused_until.map_or_else(|| reactor.next_timeout(), |_| None);
        if let Some(libvirt) = libvirt {
            timeout = Some(timeout.map_or(libvirt, |t| t.min(libvirt)));
        }
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Error::Io(e)),
        }
        let mut quit = false;
        for event in events.iter() {
            if event.token() == SIGNALS {
                for signal in signals.iter_mut().flat_map(|s| s.pending()) {
                    if signal == SIGHUP {
                        server.reopen_logs();
                    } else {
                        log::info!("signal {signal}: shutting down");
                        quit = true;
                    }
                }
            }
            server.event(event);
        }
        // Every iteration, not only when LIBVIRT fired: libvirt's timers make no fd
        // readable, the poll just times out for them.
        match reactor.dispatch(&mut server.libvirt) {
            Ok(()) => {}
            Err(e @ Error::CallbackPanicked { .. }) => log::error!("{e}"),
            Err(e) => break Err(e),
        }
        if let Err(e) = server.after_dispatch(&mut reactor) {
            break Err(failed(e));
        }
        if server.take_output_served() && libvirt_paused_until.is_none() {
            if let Some(at) = pacing.served_output(Instant::now()) {
                if let Err(e) = poll.registry().deregister(&mut reactor) {
                    break Err(Error::Io(e));
                }
                libvirt_paused_until = Some(at);
            }
        }
        if quit {
            break Ok(());
        }
        if exit_at.is_some_and(|at| Instant::now() >= at) {
            log::info!("--exit-after reached");
            break Ok(());
        }
    };

    let shutting_down = Instant::now();
    server.shut_down(&mut reactor);
    let drain = DAEMON_GRACE
        .saturating_sub(shutting_down.elapsed())
        .max(MIN_DRAIN);
    if let Err(e) = reactor.shutdown(drain, &mut server.libvirt) {
        log::warn!("libvirt did not answer within {drain:?} ({e}); exiting without a clean close");
    }
    drop(server); // removes the directory if this run made it
    outcome
}

type Listeners = (Option<StdTcpListener>, Option<StdTcpListener>);

fn bind_listeners(options: &ServiceOptions) -> Result<Listeners> {
    let bind = |what: &str, addr: Option<SocketAddr>| -> Result<Option<StdTcpListener>> {
        let Some(addr) = addr else { return Ok(None) };
        let listener = StdTcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| failed(format!("{what} {addr}: {e}")))?;
        Ok(Some(listener))
    };
    Ok((bind("--tcp", options.tcp)?, bind("--web", options.web)?))
}

fn announce(listeners: &Listeners, token: Option<&Token>, options: &ServiceOptions) {
    let Some(token) = token else { return };
    // A token kept in a file is not printed.
    let (tcp_secret, web_secret) = match &options.token_file {
        Some(path) => {
            let file = format!(", the token in {}", path.display());
            (file.clone(), format!("/{file}"))
        }
        None => (
            format!(", token {}", token.as_str()),
            format!("/#token={}", token.as_str()),
        ),
    };
    let address = |listener: &Option<StdTcpListener>| listener.as_ref()?.local_addr().ok();
    if let Some(addr) = address(&listeners.0) {
        println!("virt-consoled: tcp {addr}{tcp_secret}");
    }
    if let Some(addr) = address(&listeners.1) {
        println!("virt-consoled: web http://{addr}{web_secret}");
    }
}

fn failed(text: impl Into<String>) -> Error {
    Error::Service(text.into())
}
