//! Many guest consoles on one reactor.
//!
//! A [`ConsoleMux`] opens consoles (`virDomainOpenConsole` on non-blocking streams),
//! bridges each to the reactor, and reports what happens as [`ConsoleEvent`]s on a
//! channel: output, and the end of a console told apart by cause. Input goes through
//! each console's bounded [`StreamWriter`].
//!
//! How libvirt 9.0 signals the ends (see `docs/architecture.md`):
//!
//! | what happened | remote stream | in-process (embedded) stream |
//! |---|---|---|
//! | guest gone | READABLE, then recv 0 | READABLE\|ERROR\|HANGUP, recv 0 |
//! | another client took over with FORCE | READABLE, recv -1 "stream had I/O failure" | ERROR, recv -2 |
//! | connection lost | nothing: the reactor's close watch fails the stream | n/a |
//!
//! After end of stream the callback is removed before finishing (READABLE would
//! otherwise repeat on every iteration), and a finish error after the guest died is
//! expected, not reported. A send after the guest died can still succeed, so output
//! and ends, never sends, tell whether a console is alive.
//!
//! Opening a console and creating a guest are blocking calls; with an in-process
//! driver their replies come through the loop itself, so the mux makes them on worker
//! threads ([`ReactorHandle::spawn_blocking`]) and hands the finished stream to the
//! reactor.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::{Arc, Mutex, Weak};

use crossbeam_channel::{Receiver, Sender};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};

use crate::event_loop::connect::{connect, is_remote};
use crate::streams::handler::{Flow, StreamCtx, StreamEnd, StreamHandler};
use crate::streams::reactor::{Reactor, ReactorHandle, SubscriptionId};
use crate::streams::stream::Stream;
use crate::streams::token::StreamToken;
use crate::streams::writer::StreamWriter;
use crate::sys::flags::{CONSOLE_FORCE, DOMAIN_START_PAUSED};
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleKind};
use crate::vocab::interest::{Interest, Readiness};
use crate::vocab::sync::lock;

/// How consoles are opened and buffered.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    /// The console device alias (e.g. `"serial0"`, `"console1"`); `None` is the
    /// domain's first console.
    pub device: Option<String>,
    /// Take the console over even if another client holds it
    /// (`VIR_DOMAIN_CONSOLE_FORCE`); that client's console then ends as
    /// [`ConsoleEnd::TakenOver`].
    pub force: bool,
    /// Attach again when a guest whose console ended starts again.
    pub reopen: bool,
    /// Bound of each console's input queue, in bytes.
    pub input_capacity: usize,
    /// Output bytes read from one console per readiness event at most, so that one
    /// chatty guest cannot hold the loop.
    pub read_budget: usize,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            device: None,
            force: false,
            reopen: false,
            input_capacity: 64 * 1024,
            read_budget: 64 * 1024,
        }
    }
}

/// Why a console ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConsoleEnd {
    /// The guest stopped (destroyed, powered off, crashed).
    GuestGone,
    /// Another client opened the console with FORCE.
    TakenOver,
    /// The connection to libvirt was lost.
    ConnectionLost(CloseReason),
    /// The console was detached on request.
    Detached,
    /// Anything else, with libvirt's error.
    Failed(Error),
}

impl fmt::Display for ConsoleEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleEnd::GuestGone => f.write_str("guest gone"),
            ConsoleEnd::TakenOver => f.write_str("taken over by another client"),
            ConsoleEnd::ConnectionLost(reason) => write!(f, "connection lost ({reason})"),
            ConsoleEnd::Detached => f.write_str("detached"),
            ConsoleEnd::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// What the consoles of a [`ConsoleMux`] report.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConsoleEvent {
    /// The console is attached (again, after a restart, if it was before).
    Attached {
        /// The domain.
        name: String,
    },
    /// Bytes the guest wrote.
    Output {
        /// The domain.
        name: String,
        /// What it wrote.
        bytes: Vec<u8>,
    },
    /// The console ended.
    Ended {
        /// The domain.
        name: String,
        /// Why.
        end: ConsoleEnd,
    },
    /// Opening the console (or booting the guest) failed.
    AttachFailed {
        /// The domain.
        name: String,
        /// Why; [`Error::ConsoleBusy`] when another client holds it.
        error: Error,
    },
}

/// Opens `domain`'s console into a new non-blocking stream.
///
/// This blocks on libvirt; with an in-process driver call it off the loop thread.
///
/// # Errors
///
/// [`Error::ConsoleBusy`] when another client holds the console and `force` is off;
/// libvirt's error otherwise.
#[doc(alias = "virDomainOpenConsole")]
pub fn open_stream(domain: &Domain, options: &ConsoleOptions) -> Result<Stream> {
    let mut stream = Stream::new(&domain.connect()?)?;
    let flags = if options.force { CONSOLE_FORCE } else { 0 };
    stream
        .with_virt(|virt_stream| domain.open_console(options.device.as_deref(), virt_stream, flags))
        .map_err(|e| {
            if e.code().is(ErrorNumber::OperationFailed) && e.message().contains("console session")
            {
                Error::ConsoleBusy {
                    domain: domain.name().unwrap_or_default(),
                }
            } else {
                Error::Libvirt(e)
            }
        })?;
    Ok(stream)
}

/// Many guest consoles, attached to one reactor whose state is `S`. Cheap to clone;
/// usable from any thread.
pub struct ConsoleMux<S: 'static> {
    shared: Arc<Shared<S>>,
}

impl<S: 'static> Clone for ConsoleMux<S> {
    fn clone(&self) -> Self {
        ConsoleMux {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<S: 'static> {
    conn: Connect,
    handle: ReactorHandle<S>,
    options: ConsoleOptions,
    events: Sender<ConsoleEvent>,
    consoles: Mutex<BTreeMap<String, Slot>>,
    /// Lifecycle events, when `reopen` is on.
    subscription: Mutex<Option<SubscriptionId>>,
}

#[derive(Default)]
struct Slot {
    attached: Option<(StreamToken, StreamWriter)>,
    /// An open is under way on a worker thread.
    opening: bool,
    /// The guest started again while its old console had not been seen to end yet
    /// (the end arrives through the reactor's inbox, after the iteration that
    /// delivered the event): reopen as soon as it has.
    reopen_after_end: bool,
}

impl<S: 'static> ConsoleMux<S> {
    /// A mux for consoles of domains on `conn`, driven by `reactor`. Returns the
    /// channel its events arrive on.
    ///
    /// # Errors
    ///
    /// With `reopen`, libvirt's error if lifecycle events cannot be subscribed.
    pub fn new(
        reactor: &mut Reactor<S>,
        conn: &Connect,
        options: ConsoleOptions,
    ) -> Result<(ConsoleMux<S>, Receiver<ConsoleEvent>)> {
        let (events, receiver) = crossbeam_channel::unbounded();
        let reopen = options.reopen;
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            handle: reactor.handle(),
            options,
            events,
            consoles: Mutex::new(BTreeMap::new()),
            subscription: Mutex::new(None),
        });
        if reopen {
            let weak = Arc::downgrade(&shared);
            let subscription = reactor.subscribe_lifecycle(conn, move |_: &mut S, event| {
                if event.kind == LifecycleKind::Started {
                    reopen_if_known(&weak, &event.domain);
                }
            })?;
            *lock(&shared.subscription) = Some(subscription);
        }
        Ok((ConsoleMux { shared }, receiver))
    }

    /// Attaches to the console of the running domain `name`. The result arrives as
    /// [`ConsoleEvent::Attached`] or [`ConsoleEvent::AttachFailed`].
    ///
    /// # Errors
    ///
    /// Only if the worker thread cannot be started.
    pub fn attach(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        if !self.shared.start_opening(&name) {
            return Ok(()); // already attached or opening
        }
        let shared = Arc::clone(&self.shared);
        self.shared.handle.spawn_blocking(
            {
                let shared = Arc::clone(&shared);
                let name = name.clone();
                move || shared.open(&name)
            },
            move |reactor, _, opened| shared.finish_opening(reactor, &name, opened),
        )
    }

    /// Creates a transient guest from `xml`, paused, attaches to its console, and
    /// only then lets it run, so that its first output is not lost (QEMU drops
    /// console output that no client reads). The result arrives as for
    /// [`attach`](Self::attach).
    ///
    /// # Errors
    ///
    /// Only if the worker thread cannot be started.
    pub fn boot(&self, name: &str, xml: &str) -> Result<()> {
        let name = name.to_owned();
        if !self.shared.start_opening(&name) {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let xml = xml.to_owned();
        std::thread::Builder::new()
            .name(format!("boot {name}"))
            .spawn(move || shared.boot(&name, &xml))
            .map(drop)
            .map_err(Error::Io)
    }

    /// Queues `bytes` for the console of `name`, waiting while its input queue is
    /// full. On the loop thread use [`try_send`](Self::try_send).
    ///
    /// # Errors
    ///
    /// [`Error::NotAttached`], or [`Error::StreamClosed`] if the console ended;
    /// [`Error::OnLoopThread`] when it would have to wait on the loop thread.
    pub fn send(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.writer(name)?.write_all(bytes)
    }

    /// Queues as much of `bytes` as fits now; safe on the loop thread.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send); `Error::Io` with `WouldBlock` when the queue is full.
    pub fn try_send(&self, name: &str, bytes: &[u8]) -> Result<usize> {
        Ok(self.writer(name)?.try_write(bytes)?)
    }

    /// Sends `bytes` to every attached console; returns the names that failed.
    pub fn broadcast(&self, bytes: &[u8]) -> Vec<(String, Error)> {
        self.attached()
            .into_iter()
            .filter_map(|name| self.send(&name, bytes).err().map(|e| (name, e)))
            .collect()
    }

    /// Domains whose console is attached now.
    pub fn attached(&self) -> Vec<String> {
        lock(&self.shared.consoles)
            .iter()
            .filter(|(_, slot)| slot.attached.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Every domain this mux has attached to, attached now or not.
    pub fn names(&self) -> Vec<String> {
        lock(&self.shared.consoles).keys().cloned().collect()
    }

    /// Finishes every console (each ends as [`ConsoleEnd::Detached`]) and stops
    /// reopening. Call it on the loop thread, e.g. from [`ReactorHandle::execute`].
    pub fn detach_all(&self, reactor: &mut Reactor<S>, state: &mut S) {
        // Taken out first: no lock of ours is held across a call into libvirt.
        let subscription = lock(&self.shared.subscription).take();
        if let Some(subscription) = subscription {
            if let Err(e) = reactor.unsubscribe(subscription) {
                log::warn!("cannot unsubscribe from lifecycle events: {e}");
            }
        }
        let tokens: Vec<StreamToken> = lock(&self.shared.consoles)
            .values()
            .filter_map(|slot| slot.attached.as_ref().map(|(token, _)| *token))
            .collect();
        for token in tokens {
            let _ = reactor.finish(token, state);
        }
    }

    fn writer(&self, name: &str) -> Result<StreamWriter> {
        lock(&self.shared.consoles)
            .get(name)
            .and_then(|slot| slot.attached.as_ref())
            .map(|(_, writer)| writer.clone())
            .ok_or_else(|| Error::NotAttached {
                domain: name.to_owned(),
            })
    }
}

impl<S: 'static> Shared<S> {
    /// Marks `name` as opening; false if it is attached or opening already.
    fn start_opening(&self, name: &str) -> bool {
        let mut consoles = lock(&self.consoles);
        let slot = consoles.entry(name.to_owned()).or_default();
        if slot.opening || slot.attached.is_some() {
            return false;
        }
        slot.opening = true;
        true
    }

    /// On a worker thread: opens `name`'s console.
    ///
    /// On a remote connection each console gets a connection of its own. The daemon
    /// stops reading a client's socket while that client's streams hold its request
    /// quota (`max_client_requests`, 5 by default) in packets the guest has not
    /// taken yet, so on a shared connection one console flooded with input would
    /// hold up every other console's input, and every call.
    fn open(&self, name: &str) -> Result<Stream> {
        let conn = if is_remote(&self.conn) {
            connect(&self.conn.uri()?)?
        } else {
            self.conn.clone()
        };
        let domain = conn.lookup_domain_by_name(name)?;
        open_stream(&domain, &self.options)
    }

    /// On a worker thread: create paused, open the console, hand it to the reactor,
    /// wait until it is attached, resume.
    fn boot(self: Arc<Self>, name: &str, xml: &str) {
        let created = self
            .conn
            .create_domain_xml(xml, DOMAIN_START_PAUSED)
            .map_err(Error::Libvirt)
            .and_then(|domain| self.open(name).map(|s| (domain, s)));
        let (domain, stream) = match created {
            Ok(pair) => pair,
            Err(error) => {
                let shared = Arc::clone(&self);
                let name = name.to_owned();
                let _ = self
                    .handle
                    .execute(move |reactor, _| shared.finish_opening(reactor, &name, Err(error)));
                return;
            }
        };
        let (attached_tx, attached) = crossbeam_channel::bounded(1);
        let shared = Arc::clone(&self);
        let owned_name = name.to_owned();
        let sent = self.handle.execute(move |reactor, _| {
            shared.finish_opening(reactor, &owned_name, Ok(stream));
            let _ = attached_tx.send(());
        });
        if sent.is_ok() && attached.recv().is_ok() {
            if let Err(e) = domain.resume() {
                log::warn!("{name}: cannot resume after attaching its console: {e}");
            }
        }
    }

    /// On the loop thread: insert an opened console stream, or report the failure.
    fn finish_opening(
        self: Arc<Self>,
        reactor: &mut Reactor<S>,
        name: &str,
        opened: Result<Stream>,
    ) {
        let inserted = opened.and_then(|stream| {
            let handler = ConsoleHandler {
                name: name.to_owned(),
                shared: Arc::clone(&self),
                buf: vec![0; 16 * 1024],
                budget: self.options.read_budget,
                end: None,
            };
            let token = reactor.insert(stream, Interest::READABLE, handler)?;
            let writer = reactor.writer(token, self.options.input_capacity)?;
            Ok((token, writer))
        });
        let event = {
            let mut consoles = lock(&self.consoles);
            let slot = consoles.entry(name.to_owned()).or_default();
            slot.opening = false;
            match inserted {
                Ok(attached) => {
                    slot.attached = Some(attached);
                    ConsoleEvent::Attached {
                        name: name.to_owned(),
                    }
                }
                Err(error) => ConsoleEvent::AttachFailed {
                    name: name.to_owned(),
                    error,
                },
            }
        };
        let _ = self.events.send(event);
    }
}

/// On a guest's start: attach again to a known console, now or, if the old one has
/// not ended yet, once it has.
fn reopen_if_known<S: 'static>(shared: &Weak<Shared<S>>, name: &str) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    {
        let mut consoles = lock(&shared.consoles);
        let Some(slot) = consoles.get_mut(name) else {
            return;
        };
        if slot.attached.is_some() {
            slot.reopen_after_end = true;
            return;
        }
    }
    reopen(shared, name);
}

fn reopen<S: 'static>(shared: Arc<Shared<S>>, name: &str) {
    let mux = ConsoleMux { shared };
    if let Err(e) = mux.attach(name) {
        log::warn!("{name}: cannot reopen its console: {e}");
    }
}

/// Bridges one console stream to the mux's event channel.
struct ConsoleHandler<S: 'static> {
    name: String,
    shared: Arc<Shared<S>>,
    buf: Vec<u8>,
    budget: usize,
    /// Set once the end is known from the stream itself, before finish/abort.
    end: Option<ConsoleEnd>,
}

impl<S: 'static> ConsoleHandler<S> {
    fn output(&self, bytes: &[u8]) {
        let _ = self.shared.events.send(ConsoleEvent::Output {
            name: self.name.clone(),
            bytes: bytes.to_vec(),
        });
    }
}

impl<S: 'static> StreamHandler<S> for ConsoleHandler<S> {
    fn ready(&mut self, _: &mut S, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let mut read = 0;
        while read < self.budget {
            match cx.read(&mut self.buf) {
                Ok(0) => {
                    self.end = Some(ConsoleEnd::GuestGone);
                    return Flow::Finish;
                }
                Ok(n) => {
                    self.output(&self.buf[..n]);
                    read += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // An in-process stream reports a takeover as ERROR with nothing
                    // to read.
                    if readiness.is_error() && read == 0 {
                        self.end = Some(ConsoleEnd::TakenOver);
                        return Flow::Abort;
                    }
                    break;
                }
                Err(e) => {
                    let error = Error::from(e);
                    self.end = Some(if is_takeover(&error) {
                        ConsoleEnd::TakenOver
                    } else {
                        ConsoleEnd::Failed(error)
                    });
                    return Flow::Abort;
                }
            }
        }
        Flow::Continue
    }

    fn closed(&mut self, _: &mut S, end: StreamEnd) {
        let end = match (self.end.take(), end) {
            // The end was seen on the stream; a finish error after it is expected.
            (Some(seen), _) => seen,
            (None, StreamEnd::Failed(Error::ConnectionClosed { reason })) => {
                ConsoleEnd::ConnectionLost(reason)
            }
            (None, StreamEnd::Failed(e)) => ConsoleEnd::Failed(e),
            (None, _) => ConsoleEnd::Detached,
        };
        let reopen_now = match lock(&self.shared.consoles).get_mut(&self.name) {
            Some(slot) => {
                slot.attached = None;
                std::mem::take(&mut slot.reopen_after_end) && !matches!(end, ConsoleEnd::Detached)
            }
            None => false,
        };
        let _ = self.shared.events.send(ConsoleEvent::Ended {
            name: self.name.clone(),
            end,
        });
        if reopen_now {
            reopen(Arc::clone(&self.shared), &self.name);
        }
    }
}

/// A remote console taken over by another client fails its receive with this RPC
/// error (libvirt's daemon relays "stream had I/O failure").
fn is_takeover(error: &Error) -> bool {
    error
        .libvirt()
        .is_some_and(|e| e.domain().is(ErrorDomain::Rpc) || e.code().is(ErrorNumber::Rpc))
        && error.to_string().contains("I/O failure")
}

impl<S: 'static> fmt::Debug for ConsoleMux<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleMux")
            .field("consoles", &self.names())
            .finish_non_exhaustive()
    }
}
