//! A connection that heals: when libvirt loses it (the daemon died, restarted,
//! froze past keepalive, the network failed), it is opened again with bounded
//! exponential backoff and jitter, and its domain event subscriptions come back
//! with it.
//!
//! Every libvirt call the supervisor makes runs off the loop: `virConnectOpen` and
//! keepalive on a worker thread, each attempt bounded by
//! [`SupervisorOptions::connect_timeout`] (a frozen daemon accepts the socket and
//! then never answers), and remote event registration as
//! [`Reactor::subscribe_lifecycle`] does it. What happens arrives as
//! [`ConnectionEvent`]s on a channel, read on the loop thread after each dispatch,
//! as [`ConsoleMux`](crate::console::ConsoleMux)'s events are.
//!
//! Streams of a lost connection fail as before ([`Error::ConnectionClosed`]); it is
//! the application's to resume them on the connection [`ConnectionEvent::Reconnected`]
//! brings, since only it knows what a resumed stream means.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use virt::connect::Connect;

use crate::event_loop::connect::{connect_with, KeepAlive};
use crate::streams::reactor::{Reactor, ReactorHandle, Registered, SubscriptionId};
use crate::sys::connection::connection_key;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleEvent};
use crate::vocab::sync::lock;

/// How long to wait before each reconnection attempt: attempt `n` (from 1) waits
/// `first × 2ⁿ⁻¹`, at most `max`, scaled by a random factor in `[1 − jitter, 1]`
/// so that many clients of one restarted daemon do not all come back at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The wait before the first attempt.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// The fraction of each wait that is random, from 0 (none) to 1.
    pub jitter: f64,
}

impl Backoff {
    /// 200 ms, doubling up to 3 s, a quarter of it random: a restarted daemon is
    /// found again within about 3 s of its return.
    pub const DEFAULT: Backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(3),
        jitter: 0.25,
    };

    /// The wait before attempt `attempt` (from 1), with `random` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let full = self
            .first
            .saturating_mul(1 << doublings)
            .min(self.max.max(self.first));
        let jitter = self.jitter.clamp(0.0, 1.0);
        full.mul_f64(1.0 - jitter * random.clamp(0.0, 1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::DEFAULT
    }
}

/// What to connect to, and how to keep at it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SupervisorOptions {
    /// The connection's URI.
    pub uri: String,
    /// Keepalive for remote connections: how a frozen daemon is noticed.
    pub keepalive: KeepAlive,
    /// The waits between attempts.
    pub backoff: Backoff,
    /// Attempts after a loss before giving up; `None` keeps trying.
    pub max_attempts: Option<u32>,
    /// How long one `virConnectOpen` may take; a frozen daemon accepts the socket
    /// and never answers.
    pub connect_timeout: Duration,
}

impl SupervisorOptions {
    /// `uri` with [`KeepAlive::DEFAULT`], [`Backoff::DEFAULT`], no limit on
    /// attempts, and 10 s per attempt.
    pub fn new(uri: &str) -> Self {
        SupervisorOptions {
            uri: uri.to_owned(),
            keepalive: KeepAlive::DEFAULT,
            backoff: Backoff::DEFAULT,
            max_attempts: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection as a user names it on a command line: `[LABEL=]URI`. The label
/// names the host in output and qualifies its objects (`LABEL/NAME`) when a program
/// serves several connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Letters, digits, `.`, `_`, `-` and `:`, not starting with `.`: a usable file
    /// name.
    pub label: String,
    /// The libvirt URI.
    pub uri: String,
}

impl Endpoint {
    /// Parses `[LABEL=]URI`. Without a label, it is the URI's host (with its port),
    /// or `local` for a URI without one. An `=` after the scheme belongs to the URI
    /// (`qemu+unix:///session?socket=/run/s`).
    ///
    /// # Errors
    ///
    /// An empty URI or a label with other characters.
    pub fn parse(spec: &str) -> Result<Endpoint> {
        let (label, uri) = match spec.split_once('=') {
            Some((label, uri)) if !label.contains("://") && !label.contains('?') => {
                (label.to_owned(), uri)
            }
            _ => (default_label(spec), spec),
        };
        let bad = |why: &str| Err(Error::Service(format!("{spec:?}: {why}")));
        if uri.is_empty() {
            return bad("no URI");
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:".contains(c);
        if label.is_empty() || label.starts_with('.') || !label.chars().all(allowed) {
            return bad("a label is letters, digits, '.', '_', '-' and ':', not first a '.'");
        }
        Ok(Endpoint {
            label,
            uri: uri.to_owned(),
        })
    }

    /// Parses each of `specs`, refusing two with one label.
    ///
    /// # Errors
    ///
    /// As [`parse`](Self::parse); a label given twice.
    pub fn parse_all<'a>(specs: impl IntoIterator<Item = &'a str>) -> Result<Vec<Endpoint>> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for spec in specs {
            let endpoint = Endpoint::parse(spec)?;
            if endpoints.iter().any(|e| e.label == endpoint.label) {
                return Err(Error::Service(format!(
                    "two connections are labelled {:?}: name them LABEL=URI",
                    endpoint.label
                )));
            }
            endpoints.push(endpoint);
        }
        Ok(endpoints)
    }
}

/// The host (and port) of `uri`, or `local`.
fn default_label(uri: &str) -> String {
    let authority = uri
        .split_once("://")
        .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() {
        "local".to_owned()
    } else {
        host.to_owned()
    }
}

/// A change of a supervised connection.
#[derive(Clone)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The first connection is open.
    Connected {
        /// The connection.
        conn: Connect,
    },
    /// libvirt closed the connection.
    Lost {
        /// Why.
        reason: CloseReason,
    },
    /// Waiting `delay` before attempt `attempt` (from 1).
    Reconnecting {
        /// The attempt to come.
        attempt: u32,
        /// The wait before it.
        delay: Duration,
        /// Why the previous attempt failed; `None` before the first.
        error: Option<String>,
    },
    /// A new connection is open, its subscriptions registered again.
    Reconnected {
        /// The connection.
        conn: Connect,
        /// Attempts it took.
        attempts: u32,
        /// From the loss to now.
        down: Duration,
    },
    /// No more attempts: the first connection failed (a wrong URI is not a daemon
    /// that will come back), or [`SupervisorOptions::max_attempts`] ran out.
    GaveUp {
        /// The last attempt's error.
        error: Error,
    },
}

impl fmt::Debug for ConnectionEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionEvent::Connected { .. } => f.write_str("Connected"),
            ConnectionEvent::Lost { reason } => write!(f, "Lost({reason})"),
            ConnectionEvent::Reconnecting {
                attempt,
                delay,
                error,
            } => write!(f, "Reconnecting(#{attempt} in {delay:?}, {error:?})"),
            ConnectionEvent::Reconnected { attempts, down, .. } => {
                write!(f, "Reconnected(after {attempts} attempt(s), {down:?} down)")
            }
            ConnectionEvent::GaveUp { error } => write!(f, "GaveUp({error})"),
        }
    }
}

type LifecycleHandler<S> = Arc<Mutex<dyn FnMut(&mut S, &LifecycleEvent) + Send>>;

/// A supervised connection on a reactor whose state is `S`. Cheap to clone.
pub struct Supervisor<S: 'static> {
    shared: Arc<Shared<S>>,
}

impl<S: 'static> Clone for Supervisor<S> {
    fn clone(&self) -> Self {
        Supervisor {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: 'static> fmt::Debug for Supervisor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("uri", &self.shared.options.uri)
            .field("connected", &lock(&self.shared.state).conn.is_some())
            .finish_non_exhaustive()
    }
}

struct Shared<S: 'static> {
    options: SupervisorOptions,
    handle: ReactorHandle<S>,
    events: Sender<ConnectionEvent>,
    state: Mutex<State>,
    /// Kept across connections: registered again on each.
    lifecycle: Mutex<Vec<LifecycleHandler<S>>>,
}

#[derive(Default)]
struct State {
    conn: Option<Connect>,
    /// The current connection's subscriptions.
    subscriptions: Vec<SubscriptionId>,
    /// When the connection was lost; `None` before the first one.
    down_since: Option<Instant>,
    /// Lifecycle registrations the daemon has yet to answer, and the event that
    /// waits for them: a connection is announced once its subscriptions are live,
    /// so that what the application lists then cannot miss an event.
    registering: usize,
    announce: Option<ConnectionEvent>,
    stopped: bool,
}

impl<S: 'static> Supervisor<S> {
    /// Opens `options.uri` on a worker thread, and keeps it open. Returns the
    /// channel the connection's events arrive on.
    ///
    /// # Errors
    ///
    /// Only if the worker thread cannot be started.
    pub fn start(
        reactor: &mut Reactor<S>,
        options: SupervisorOptions,
    ) -> Result<(Supervisor<S>, Receiver<ConnectionEvent>)> {
        let (events, receiver) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            options,
            handle: reactor.handle(),
            events,
            state: Mutex::new(State::default()),
            lifecycle: Mutex::new(Vec::new()),
        });
        shared.attempt(0, Duration::ZERO)?;
        Ok((Supervisor { shared }, receiver))
    }

    /// The open connection; `None` while it is down.
    pub fn connection(&self) -> Option<Connect> {
        lock(&self.shared.state).conn.clone()
    }

    /// The URI this supervisor connects to.
    pub fn uri(&self) -> &str {
        &self.shared.options.uri
    }

    /// Calls `handler` with every domain lifecycle event of the connection, on
    /// the loop thread, across reconnections: it is registered again on each new
    /// connection. Events while the connection is down are lost with it.
    ///
    /// # Errors
    ///
    /// As [`Reactor::subscribe_lifecycle`] on the current connection.
    pub fn subscribe_lifecycle<F>(&self, reactor: &mut Reactor<S>, handler: F) -> Result<()>
    where
        F: FnMut(&mut S, &LifecycleEvent) + Send + 'static,
    {
        let handler: LifecycleHandler<S> = Arc::new(Mutex::new(handler));
        lock(&self.shared.lifecycle).push(Arc::clone(&handler));
        let conn = lock(&self.shared.state).conn.clone();
        if let Some(conn) = conn {
            let id = subscribe(reactor, &conn, handler)?;
            lock(&self.shared.state).subscriptions.push(id);
        }
        Ok(())
    }

    /// Stops supervising: no more attempts, the subscriptions end, and the
    /// connection is let go (it closes once nothing else holds it). Call it on the
    /// loop thread.
    pub fn stop(&self, reactor: &mut Reactor<S>) {
        let subscriptions = {
            let mut state = lock(&self.shared.state);
            state.stopped = true;
            state.conn = None;
            std::mem::take(&mut state.subscriptions)
        };
        unsubscribe(reactor, subscriptions);
        lock(&self.shared.lifecycle).clear();
    }
}

impl<S: 'static> Shared<S> {
    /// Opens the connection after `delay`, on a worker; attempt 0 is the first
    /// connection.
    fn attempt(self: &Arc<Self>, attempt: u32, delay: Duration) -> Result<()> {
        let (uri, keepalive, timeout) = (
            self.options.uri.clone(),
            self.options.keepalive,
            self.options.connect_timeout,
        );
        let shared = Arc::clone(self);
        self.handle.spawn_blocking(
            move || {
                std::thread::sleep(delay);
                open(uri, keepalive, timeout)
            },
            move |reactor, _, opened| shared.opened(reactor, attempt, opened),
        )
    }

    /// On the loop thread: an attempt's outcome.
    fn opened(self: &Arc<Self>, reactor: &mut Reactor<S>, attempt: u32, opened: Result<Connect>) {
        if lock(&self.state).stopped {
            return;
        }
        let conn = match opened {
            Ok(conn) => conn,
            Err(error) if attempt == 0 => {
                self.send(ConnectionEvent::GaveUp { error });
                return;
            }
            Err(error) => {
                log::warn!(
                    "{}: reconnection attempt {attempt}: {error}",
                    self.options.uri
                );
                self.retry(attempt + 1, Some(error));
                return;
            }
        };
        if let Err(error) = self.adopt(reactor, &conn) {
            log::warn!("{}: new connection unusable: {error}", self.options.uri);
            let attempt = attempt.max(1);
            self.retry(attempt + 1, Some(error));
            return;
        }
        let mut state = lock(&self.state);
        let event = match state.down_since {
            None => ConnectionEvent::Connected { conn },
            Some(since) => ConnectionEvent::Reconnected {
                conn,
                attempts: attempt,
                down: since.elapsed(),
            },
        };
        if state.registering == 0 {
            drop(state);
            self.send(event);
        } else {
            state.announce = Some(event);
        }
    }

    /// On the loop thread: the daemon answered one of the new connection's
    /// lifecycle registrations.
    fn registered(&self, conn: &Connect, outcome: Result<()>) {
        let mut state = lock(&self.state);
        if !state.conn.as_ref().is_some_and(|c| same(c, conn)) {
            return; // a connection lost meanwhile
        }
        if let Err(e) = outcome {
            log::error!("{}: lifecycle events refused: {e}", self.options.uri);
        }
        state.registering -= 1;
        if state.registering == 0 {
            if let Some(event) = state.announce.take() {
                drop(state);
                self.send(event);
            }
        }
    }

    /// Makes `conn` the current connection: watches its closing and registers the
    /// lifecycle handlers on it.
    fn adopt(self: &Arc<Self>, reactor: &mut Reactor<S>, conn: &Connect) -> Result<()> {
        let weak = Arc::downgrade(self);
        let close = reactor.subscribe_close(conn, move |_: &mut S, reason| {
            let Some(shared) = weak.upgrade() else { return };
            let handle = shared.handle.clone();
            // The close handler has no reactor to unsubscribe with: go through a job.
            if handle
                .execute(move |reactor, _| shared.lost(reactor, reason))
                .is_err()
            {
                log::debug!("connection lost after the reactor was dropped");
            }
        })?;
        let mut subscriptions = vec![close];
        let handlers = lock(&self.lifecycle).clone();
        for handler in handlers {
            match subscribe(reactor, conn, handler) {
                Ok(id) => subscriptions.push(id),
                Err(e) => {
                    unsubscribe(reactor, subscriptions);
                    return Err(e);
                }
            }
        }
        {
            let mut state = lock(&self.state);
            state.conn = Some(conn.clone());
            state.registering = 0;
            state.announce = None;
        }
        for &id in &subscriptions[1..] {
            let (shared, conn) = (Arc::clone(self), conn.clone());
            let then: Registered<S> =
                Box::new(move |_, _, outcome| shared.registered(&conn, outcome));
            if reactor.when_registered(id, then).is_none() {
                lock(&self.state).registering += 1;
            }
        }
        lock(&self.state).subscriptions = subscriptions;
        Ok(())
    }

    /// On the loop thread: libvirt closed the current connection.
    fn lost(self: &Arc<Self>, reactor: &mut Reactor<S>, reason: CloseReason) {
        let subscriptions = {
            let mut state = lock(&self.state);
            if state.stopped || state.conn.is_none() {
                return;
            }
            state.conn = None;
            state.down_since = Some(Instant::now());
            std::mem::take(&mut state.subscriptions)
        };
        unsubscribe(reactor, subscriptions);
        log::warn!("{}: connection lost ({reason})", self.options.uri);
        self.send(ConnectionEvent::Lost { reason });
        self.retry(1, None);
    }

    /// Schedules attempt `attempt` after a loss, or gives up.
    fn retry(self: &Arc<Self>, attempt: u32, error: Option<Error>) {
        if let Some(max) = self.options.max_attempts.filter(|max| attempt > *max) {
            let error = error.unwrap_or(Error::Service(format!("gave up after {max} attempt(s)")));
            self.send(ConnectionEvent::GaveUp { error });
            return;
        }
        let delay = self.options.backoff.delay(attempt, fastrand::f64());
        self.send(ConnectionEvent::Reconnecting {
            attempt,
            delay,
            error: error.map(|e| e.to_string()),
        });
        if let Err(error) = self.attempt(attempt, delay) {
            self.send(ConnectionEvent::GaveUp { error });
        }
    }

    fn send(&self, event: ConnectionEvent) {
        // Nobody listening is the application's choice, not an error.
        let _ = self.events.send(event);
    }
}

/// On a worker: opens `uri` with `keepalive`, giving up after `timeout`. An open
/// that answers late is closed by the thread that made it.
fn open(uri: String, keepalive: KeepAlive, timeout: Duration) -> Result<Connect> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("virt-reactor-connect".into())
        .spawn(move || {
            let _ = tx.send(connect_with(&uri, Some(keepalive)));
        })
        .map_err(Error::Io)?;
    rx.recv_timeout(timeout).unwrap_or(Err(Error::TimedOut))
}

/// Whether `a` and `b` are one connection.
fn same(a: &Connect, b: &Connect) -> bool {
    connection_key(a) == connection_key(b)
}

fn subscribe<S: 'static>(
    reactor: &mut Reactor<S>,
    conn: &Connect,
    handler: LifecycleHandler<S>,
) -> Result<SubscriptionId> {
    reactor.subscribe_lifecycle(conn, move |state: &mut S, event| {
        (lock(&handler))(state, event);
    })
}

fn unsubscribe<S: 'static>(reactor: &mut Reactor<S>, subscriptions: Vec<SubscriptionId>) {
    for id in subscriptions {
        if let Err(e) = reactor.unsubscribe(id) {
            log::debug!("unsubscribing {id:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Backoff, Endpoint};

    #[test]
    fn endpoints_are_labelled_by_hand_or_by_their_host() {
        let parsed = |spec: &str| Endpoint::parse(spec).map(|e| (e.label, e.uri)).ok();
        let pair = |label: &str, uri: &str| Some((label.to_owned(), uri.to_owned()));
        assert_eq!(
            parsed("a=qemu+tcp://10.0.0.2/system"),
            pair("a", "qemu+tcp://10.0.0.2/system")
        );
        assert_eq!(
            parsed("qemu+ssh://root@node-1:2222/system"),
            pair("node-1:2222", "qemu+ssh://root@node-1:2222/system")
        );
        assert_eq!(
            parsed("qemu+unix:///session?socket=/run/s"),
            pair("local", "qemu+unix:///session?socket=/run/s")
        );
        assert_eq!(
            parsed("h1=test+unix:///default?socket=/s"),
            pair("h1", "test+unix:///default?socket=/s")
        );
        assert!(Endpoint::parse("a/b=test:///default").is_err());
        assert!(Endpoint::parse("x=").is_err());
        assert!(Endpoint::parse("..=test:///default").is_err());
        let twice = Endpoint::parse_all(["test:///default", "qemu:///session"]);
        assert!(twice.unwrap_err().to_string().contains("\"local\""));
    }

    #[test]
    fn backoff_doubles_up_to_its_bound_and_jitter_only_shortens() {
        let backoff = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            jitter: 0.5,
        };
        let full: Vec<u64> = (1..=6)
            .map(|n| backoff.delay(n, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(full, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(3, 0.999_999).as_millis(), 200);
        assert_eq!(backoff.delay(40, 0.0), Duration::from_millis(1000));
        let none = Backoff {
            jitter: 0.0,
            ..backoff
        };
        assert_eq!(none.delay(2, 0.7), Duration::from_millis(200));
    }
}
