//! [`Reactor`]: non-blocking libvirt streams in a slab, each with its handler, all
//! driven by one event loop, with handlers that share the application's state.
//!
//! Each stream's libvirt event callback records the event in the reactor's inbox
//! (see `inbox`); after each loop iteration the reactor looks the token up and calls
//! the handler with `&mut` access to the stream and to the application's state,
//! outside any libvirt callback, so handlers may finish, abort or re-insert streams
//! and call any libvirt API. Domain lifecycle events reach their handlers the same
//! way.

use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use rustc_hash::{FxHashMap, FxHashSet};
use slab::Slab;
use virt::connect::Connect;

use super::handler::{Flow, StreamCtx, StreamEnd, StreamHandler};
use super::inbox::{Inbox, News};
use super::lane::{Lane, Retired, Then};
use super::stream::Stream;
use super::token::StreamToken;
use super::writer::{Outbox, StreamWriter};
use crate::engine::LoopStats;
use crate::event_loop::connect::is_remote;
#[cfg(feature = "default-loop")]
use crate::event_loop::default_loop::DefaultLoop;
use crate::event_loop::driver::Driver;
use crate::event_loop::{DrainReport, EventLoop};
use crate::sys::connection::{
    self as sys_connection, connection_key, LifecycleFn, LIFECYCLE_SLOTS,
};
use crate::sys::panic::payload_message;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleEvent};
use crate::vocab::interest::{Interest, Readiness};

/// Bytes the reactor sends from one stream's outbox per iteration, so that one busy
/// writer cannot hold the loop.
const OUTBOX_BUDGET: usize = 64 * 1024;

/// Default bound of a stream's outbox.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 1 << 20;

/// A stream handler as the reactor keeps it.
type BoxedHandler<S> = Box<dyn StreamHandler<S> + Send>;

/// A domain lifecycle handler as the reactor keeps it.
type LifecycleHandler<S> = Box<dyn FnMut(&mut S, &LifecycleEvent) + Send>;

/// A connection close handler as the reactor keeps it.
type CloseHandler<S> = Box<dyn FnOnce(&mut S, CloseReason) + Send>;

/// Work for the loop thread: runs with the reactor and the application's state.
pub(crate) type Job<S> = Box<dyn FnOnce(&mut Reactor<S>, &mut S) + Send>;

/// A `Send + Clone` handle on a [`Reactor`]: run closures on the loop thread with
/// the reactor and the application's state, run blocking work off it, and stop the
/// loop, from any thread.
pub struct ReactorHandle<S: 'static> {
    pub(crate) jobs: Sender<Job<S>>,
    pub(crate) inbox: Arc<Inbox>,
}

impl<S: 'static> Clone for ReactorHandle<S> {
    fn clone(&self) -> Self {
        ReactorHandle {
            jobs: self.jobs.clone(),
            inbox: Arc::clone(&self.inbox),
        }
    }
}

impl<S: 'static> ReactorHandle<S> {
    /// Runs `f` on the loop thread at its next iteration, with the reactor (to
    /// insert streams, change interest, ...) and the application's state.
    ///
    /// # Errors
    ///
    /// [`Error::ReactorGone`] if the reactor was dropped.
    pub fn execute<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&mut Reactor<S>, &mut S) + Send + 'static,
    {
        self.jobs
            .send(Box::new(f))
            .map_err(|_| Error::ReactorGone)?;
        self.inbox.waker().wake();
        Ok(())
    }

    /// Runs blocking `work` on a worker thread, then `then` with its result on the
    /// loop thread: the one way to make blocking libvirt calls from a handler.
    ///
    /// Calls whose replies arrive through the loop itself must not run on the loop
    /// thread: with an in-process driver such as `qemu:///embed`, creating a domain
    /// waits for QEMU's monitor, whose socket is a watch on this loop. So do lookups,
    /// `virDomainCreate`, `virConnectOpen` and console opens here. A panic in `work`
    /// is returned by the reactor's `run_once`, and `then` is not called.
    ///
    /// # Errors
    ///
    /// The worker thread cannot be spawned.
    pub fn spawn_blocking<T, W, F>(&self, work: W, then: F) -> Result<()>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
        F: FnOnce(&mut Reactor<S>, &mut S, T) + Send + 'static,
    {
        let handle = self.clone();
        std::thread::Builder::new()
            .name("virt-reactor-blocking".into())
            .spawn(move || match panic::catch_unwind(AssertUnwindSafe(work)) {
                Ok(result) => {
                    let delivered =
                        handle.execute(move |reactor, state| then(reactor, state, result));
                    if delivered.is_err() {
                        log::warn!("blocking work finished after the reactor was dropped");
                    }
                }
                Err(payload) => {
                    let error = Error::CallbackPanicked {
                        origin: "blocking work".to_owned(),
                        message: payload_message(payload.as_ref()),
                    };
                    handle.inbox.post(|news| news.panics.push(error));
                }
            })
            .map(drop)
            .map_err(Error::Io)
    }

    /// Interrupts a loop sleeping in poll.
    pub fn wake(&self) {
        self.inbox.waker().wake();
    }

    /// Makes [`Reactor::run`] return after its current iteration.
    pub fn stop(&self) {
        self.inbox.waker().stop();
    }
}

impl<S: 'static> fmt::Debug for ReactorHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReactorHandle { .. }")
    }
}

/// Names a subscription of a [`Reactor`]: to domain lifecycle events, or to a
/// connection's closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

struct Slot<S> {
    stream: Stream,
    handler: BoxedHandler<S>,
    token: StreamToken,
    /// What the handler asked for.
    interest: Interest,
    /// What libvirt's callback is registered for now: the handler's interest, plus
    /// WRITABLE while the outbox holds bytes; never WRITABLE for a stream that sends
    /// through a lane (its writability is the lane's room).
    registered: Interest,
    outbox: Option<Arc<Outbox>>,
    /// The connection was found dead: the close watch will fail the stream with
    /// its reason.
    lost: bool,
}

/// A connection some of the reactor's streams use, and for a remote connection the
/// lane its streams send through, which also watches it for closure. In-process
/// connections have no peer to lose.
struct Connection {
    /// Streams and close subscriptions.
    users: usize,
    lane: Option<Lane>,
}

/// A stream whose end is under way on its lane, and what to tell its handler.
struct Ending<S> {
    handler: BoxedHandler<S>,
    abort: bool,
    failure: Option<Error>,
}

/// A subscription to a connection's closing.
struct CloseSubscription<S> {
    connection: usize,
    handler: CloseHandler<S>,
}

/// What waits for a remote lifecycle registration's outcome.
pub(crate) type Registered<S> = Box<dyn FnOnce(&mut Reactor<S>, &mut S, Result<()>) + Send>;

struct Subscription<S> {
    conn: Connect,
    slot: usize,
    /// libvirt's callback id; `None` while a daemon is being asked for one.
    libvirt_id: Option<i32>,
    /// `None` once it panicked: never called again.
    handler: Option<LifecycleHandler<S>>,
}

/// The lifecycle trampoline slots a connection uses, by connection key (its
/// address). A claimed slot's subscription holds a reference to its connection
/// until the slot is released, so no other connection can have that address
/// meanwhile.
#[derive(Default)]
struct Slots {
    claimed: u64,
}

/// Many non-blocking libvirt streams on one thread, with handlers that get `&mut`
/// access to the application's state `S`.
///
/// # Running
///
/// - [`run`](Self::run) owns the calling thread until [`ReactorHandle::stop`];
/// - [`run_once`](Self::run_once) runs one iteration;
/// - a program with its own `mio::Poll` registers the reactor there (it is a
///   `mio::event::Source`), sleeps at most [`next_timeout`](Self::next_timeout), and
///   calls [`dispatch`](Self::dispatch) after every poll, whether or not its token
///   fired: a due timer makes no fd readable.
///
/// Other threads reach the reactor through its [`ReactorHandle`]; blocking libvirt
/// work goes through [`ReactorHandle::spawn_blocking`]. The reactor is `Send`: it
/// may be built on one thread and run on another.
///
/// # Panics
///
/// Every callback the reactor makes runs under `catch_unwind`. A panic is returned
/// as [`Error::CallbackPanicked`] by the `run_once` (or `run`, `dispatch`) that was
/// running it, after the rest of that iteration ran; the reactor stays usable. What
/// panicked is never called again: a stream handler is dropped and its stream
/// aborted (a panic in [`StreamHandler::closed`] only drops the handler), a lifecycle
/// handler is disabled (a close handler is called once anyway), a [`Watch`](crate::Watch) or [`Timer`](crate::Timer) closure
/// is disabled, a job from [`ReactorHandle::execute`] is dropped, and blocking work
/// that panicked never reaches its `then`.
pub struct Reactor<S: 'static = ()> {
    driver: Driver,
    slots: Slab<Slot<S>>,
    /// Generation of each slab key; bumped whenever the key is vacated.
    generations: Vec<u32>,
    connections: HashMap<usize, Connection>,
    jobs: Receiver<Job<S>>,
    handle: ReactorHandle<S>,
    inbox: Arc<Inbox>,
    news: News,
    scratch: Vec<u8>,
    /// Streams sending through a lane that want to hear when it has room.
    writers: FxHashSet<StreamToken>,
    /// Scratch list of writers with room, reused each iteration.
    ready_writers: Vec<StreamToken>,
    /// Handlers of streams whose finish or abort runs on a lane.
    ending: FxHashMap<StreamToken, Ending<S>>,
    /// Lanes of connections that have no stream left, by connection, until their
    /// threads are done: a new stream of the connection revives its lane, or a new
    /// lane waits for the old one.
    retired: FxHashMap<usize, Retired>,
    subscriptions: FxHashMap<u64, Subscription<S>>,
    close_subscriptions: FxHashMap<u64, CloseSubscription<S>>,
    next_subscription: u64,
    lifecycle_slots: FxHashMap<usize, Slots>,
    /// Deregistrations running on worker threads, each holding its connection.
    daemon_calls: usize,
    /// Who waits for a remote lifecycle registration, by subscription.
    awaiting_registration: FxHashMap<u64, Registered<S>>,
    /// The first panic of the iteration under way.
    panicked: Option<Error>,
}

impl<S: 'static> Reactor<S> {
    /// Registers virt-reactor as libvirt's event loop (`virEventRegisterImpl`) and
    /// makes the reactor that drives it. Once per process, before any connection is
    /// opened ([`crate::connect`] refuses to open one earlier).
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] on a second call; [`Error::ForeignImplRegistered`]
    /// if another implementation (such as libvirt's default one) was registered
    /// first; [`Error::Io`] if epoll cannot be set up. After an error nothing is
    /// installed, and a retry reports the same cause.
    #[doc(alias = "virEventRegisterImpl")]
    pub fn register() -> Result<Reactor<S>> {
        EventLoop::register().map(|event_loop| Reactor::with_driver(Driver::Ours(event_loop)))
    }

    /// Registers libvirt's default event loop (`virEventRegisterDefaultImpl`) and makes
    /// a reactor that runs it (`virEventRunDefaultImpl`), with the same streams,
    /// handlers, budgets and commands as on our loop. For benchmarks that compare the
    /// two loops under the same stream code; behind the `default-loop` feature.
    ///
    /// Such a reactor cannot be embedded in another `mio::Poll`, reports empty
    /// [`stats`](Self::stats), and its [`shutdown`](Self::shutdown) drains by running
    /// a few iterations.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] if this process registered a loop already;
    /// libvirt's error if registration fails.
    #[cfg(feature = "default-loop")]
    #[doc(alias = "virEventRegisterDefaultImpl")]
    #[doc(alias = "virEventRunDefaultImpl")]
    pub fn register_default_loop() -> Result<Reactor<S>> {
        DefaultLoop::register().map(|default| Reactor::with_driver(Driver::Default(default)))
    }

    fn with_driver(driver: Driver) -> Reactor<S> {
        let (jobs_tx, jobs) = crossbeam_channel::unbounded();
        let inbox = Inbox::new(driver.waker());
        let handle = ReactorHandle {
            jobs: jobs_tx,
            inbox: Arc::clone(&inbox),
        };
        Reactor {
            driver,
            slots: Slab::new(),
            generations: Vec::new(),
            connections: HashMap::new(),
            jobs,
            handle,
            inbox,
            news: News::default(),
            scratch: vec![0; OUTBOX_BUDGET],
            writers: FxHashSet::default(),
            ready_writers: Vec::new(),
            ending: FxHashMap::default(),
            retired: FxHashMap::default(),
            subscriptions: FxHashMap::default(),
            close_subscriptions: FxHashMap::default(),
            next_subscription: 0,
            lifecycle_slots: FxHashMap::default(),
            daemon_calls: 0,
            awaiting_registration: FxHashMap::default(),
            panicked: None,
        }
    }

    /// The cross-thread handle.
    pub fn handle(&self) -> ReactorHandle<S> {
        self.handle.clone()
    }

    /// What libvirt has registered on the loop right now.
    pub fn stats(&self) -> LoopStats {
        self.driver.stats()
    }

    /// Streams in the reactor, counting those whose finish or abort is still under
    /// way (their handlers have not been told the end yet).
    pub fn len(&self) -> usize {
        self.slots.len() + self.ending.len()
    }

    /// No streams in the reactor, and no end under way.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.ending.is_empty()
    }

    /// Whether `token` names a stream in the reactor.
    pub fn contains(&self, token: StreamToken) -> bool {
        self.slot(token).is_ok()
    }

    /// Adds a stream with its handler and starts delivering `interest` events.
    ///
    /// # Errors
    ///
    /// libvirt's error if the event callback cannot be registered (for example, the
    /// stream already has one). The stream is dropped (aborted) then.
    #[doc(alias = "virStreamEventAddCallback")]
    pub fn insert<H>(
        &mut self,
        mut stream: Stream,
        interest: Interest,
        handler: H,
    ) -> Result<StreamToken>
    where
        H: StreamHandler<S> + Send + 'static,
    {
        let key = self.slots.vacant_key();
        if self.generations.len() <= key {
            self.generations.resize(key + 1, 0);
        }
        let token = StreamToken {
            key: u32::try_from(key).map_err(|_| Error::InvalidToken)?,
            generation: self.generations[key],
        };
        let connection = stream.connection_key();
        self.track_connection(connection, stream.connection(), stream.is_remote())?;
        if let Some(own) = stream.lane() {
            // Inserted again: keep its lane, so its sends stay in order.
            own.retarget(Arc::clone(&self.inbox), token);
        } else if let Some(lane) = self
            .connections
            .get(&connection)
            .and_then(|c| c.lane.as_ref())
        {
            let own = lane.attach(stream.raw().new_ref(), Arc::clone(&self.inbox), token);
            stream.set_lane(own);
        }
        let registered = libvirt_interest(&stream, interest);
        let inbox = Arc::clone(&self.inbox);
        let callback = Box::new(move |readiness| {
            inbox.record(|news| news.streams.push((token, readiness)));
        });
        if let Err(e) = stream.raw().add_callback(registered, callback) {
            self.untrack_connection(connection);
            return Err(e);
        }
        self.slots.insert(Slot {
            stream,
            handler: Box::new(handler),
            token,
            interest,
            registered,
            outbox: None,
            lost: false,
        });
        self.sync_registration(token)?;
        log::debug!("inserted stream {token:?} for {interest:?}");
        Ok(token)
    }

    /// Changes what a stream's handler is told about, from outside the handler
    /// (inside it, use [`StreamCtx::set_interest`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`] for a stream that is not in the reactor; libvirt's
    /// error if the callback cannot be updated.
    #[doc(alias = "virStreamEventUpdateCallback")]
    pub fn set_interest(&mut self, token: StreamToken, interest: Interest) -> Result<()> {
        self.slot_mut(token)?.interest = interest;
        self.sync_registration(token)
    }

    /// A writer that queues bytes for the stream from any thread, with a bounded
    /// buffer of `capacity` bytes (created on first use; later calls share it).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn writer(&mut self, token: StreamToken, capacity: usize) -> Result<StreamWriter> {
        let inbox = Arc::clone(&self.inbox);
        let slot = self.slot_mut(token)?;
        let outbox = slot
            .outbox
            .get_or_insert_with(|| Outbox::new(capacity))
            .clone();
        Ok(StreamWriter {
            outbox,
            token,
            inbox,
        })
    }

    /// Takes a stream out, unfinished, with its handler; its callback is removed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn remove(
        &mut self,
        token: StreamToken,
    ) -> Result<(Stream, Box<dyn StreamHandler<S> + Send>)> {
        self.slot(token)?;
        let slot = self.vacate(token);
        Ok((slot.stream, slot.handler))
    }

    /// Calls `handler` on the loop thread with each lifecycle event of every domain
    /// on `conn`, in the order libvirt queued them, with the application's state.
    ///
    /// The handler stays with the reactor (never inside libvirt), so it may own
    /// anything, a `Connect` included. A connection holds up to 32 lifecycle
    /// subscriptions at a time.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriptionLimit`] beyond that; for an in-process driver,
    /// libvirt's error, e.g. when the driver has no domain events. On a remote
    /// connection the registration is a call to the daemon, made on a worker thread
    /// so that the loop never waits for it: events flow once the daemon has
    /// answered, and a refusal is logged and ends the subscription.
    #[doc(alias = "virConnectDomainEventRegisterAny")]
    pub fn subscribe_lifecycle<F>(&mut self, conn: &Connect, handler: F) -> Result<SubscriptionId>
    where
        F: FnMut(&mut S, &LifecycleEvent) + Send + 'static,
    {
        let key = connection_key(conn);
        let slots = self.lifecycle_slots.entry(key).or_default();
        let Some(slot) = (0..LIFECYCLE_SLOTS).find(|slot| slots.claimed & (1 << slot) == 0) else {
            return Err(Error::SubscriptionLimit {
                limit: LIFECYCLE_SLOTS,
            });
        };
        slots.claimed |= 1 << slot;
        let id = self.subscription_id();
        let inbox = Arc::clone(&self.inbox);
        let callback: LifecycleFn =
            Box::new(move |event| inbox.post(|news| news.lifecycle.push((id, event))));
        let mut subscription = Subscription {
            conn: conn.clone(),
            slot,
            libvirt_id: None,
            handler: Some(Box::new(handler)),
        };
        if is_remote(conn) {
            let (conn, inbox) = (conn.clone(), Arc::clone(&self.inbox));
            std::thread::Builder::new()
                .name("virt-reactor-subscribe".into())
                .spawn(move || {
                    let registered = sys_connection::register_lifecycle(&conn, slot, callback);
                    inbox.post(|news| news.registered.push((id, conn, slot, registered)));
                })
                .map_err(|e| {
                    self.release_slot(key, slot);
                    Error::Io(e)
                })?;
            self.daemon_calls += 1;
        } else {
            match sys_connection::register_lifecycle(conn, slot, callback) {
                Ok(libvirt_id) => subscription.libvirt_id = Some(libvirt_id),
                Err(e) => {
                    self.release_slot(key, slot);
                    return Err(e);
                }
            }
        }
        self.subscriptions.insert(id, subscription);
        Ok(SubscriptionId(id))
    }

    /// Has `then` called on the loop thread once the daemon answered the remote
    /// registration of lifecycle subscription `id`, with its outcome. Gives `then`
    /// back when no answer is awaited: the subscription is registered already.
    pub(crate) fn when_registered(
        &mut self,
        id: SubscriptionId,
        then: Registered<S>,
    ) -> Option<Registered<S>> {
        match self.subscriptions.get(&id.0) {
            Some(subscription) if subscription.libvirt_id.is_none() => {
                self.awaiting_registration.insert(id.0, then);
                None
            }
            _ => Some(then),
        }
    }

    /// The daemon answered a remote registration made by `subscribe_lifecycle`.
    fn registered(
        &mut self,
        id: u64,
        conn: Connect,
        slot: usize,
        result: Result<i32>,
        state: &mut S,
    ) {
        self.daemon_calls -= 1;
        let outcome = match (self.subscriptions.get_mut(&id), result) {
            (Some(subscription), Ok(libvirt_id)) => {
                subscription.libvirt_id = Some(libvirt_id);
                Ok(())
            }
            // Unsubscribed while the daemon was asked: undo the registration.
            (None, Ok(libvirt_id)) => {
                let undone = self.deregister(Subscription {
                    conn,
                    slot,
                    libvirt_id: Some(libvirt_id),
                    handler: None,
                });
                if let Err(e) = undone {
                    log::warn!("lifecycle subscription {id}: {e}");
                }
                Ok(())
            }
            (subscription, Err(e)) => {
                if subscription.is_some() {
                    log::warn!("lifecycle subscription {id}: the daemon refused it: {e}");
                    self.subscriptions.remove(&id);
                }
                self.release_slot(connection_key(&conn), slot);
                Err(e)
            }
        };
        if let Some(then) = self.awaiting_registration.remove(&id) {
            then(self, state, outcome);
        }
    }

    /// Calls `handler` once, on the loop thread with the application's state, when
    /// libvirt closes `conn` for any reason but the program closing it: the socket
    /// failed, the daemon went away or stopped answering keepalive messages.
    ///
    /// On a remote connection the close callback is registered and unregistered off
    /// the loop, by the connection's sender thread, which also serves its streams
    /// (libvirt keeps one close callback per connection). In-process drivers
    /// (`test:///`, `qemu:///embed`) have no peer to lose: their handler is never
    /// called.
    ///
    /// # Errors
    ///
    /// The connection's sender thread cannot be started.
    #[doc(alias = "virConnectRegisterCloseCallback")]
    pub fn subscribe_close<F>(&mut self, conn: &Connect, handler: F) -> Result<SubscriptionId>
    where
        F: FnOnce(&mut S, CloseReason) + Send + 'static,
    {
        let connection = connection_key(conn);
        self.track_connection(connection, conn, is_remote(conn))?;
        let id = self.subscription_id();
        self.close_subscriptions.insert(
            id,
            CloseSubscription {
                connection,
                handler: Box::new(handler),
            },
        );
        Ok(SubscriptionId(id))
    }

    /// Ends a subscription: its handler is dropped now, on this thread. On a remote
    /// connection libvirt's deregistration (a call to the daemon) runs on a worker
    /// thread, and a failure there is logged.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`] for an unknown subscription; libvirt's error for an
    /// in-process connection.
    #[doc(alias = "virConnectDomainEventDeregisterAny")]
    pub fn unsubscribe(&mut self, id: SubscriptionId) -> Result<()> {
        if let Some(close) = self.close_subscriptions.remove(&id.0) {
            self.untrack_connection(close.connection);
            return Ok(());
        }
        let subscription = self
            .subscriptions
            .remove(&id.0)
            .ok_or(Error::InvalidToken)?;
        self.deregister(subscription)
    }

    fn deregister(&mut self, subscription: Subscription<S>) -> Result<()> {
        let Subscription {
            conn,
            slot,
            libvirt_id,
            handler,
        } = subscription;
        drop(handler);
        // Still being registered: `registered` undoes it when the daemon answers.
        let Some(libvirt_id) = libvirt_id else {
            return Ok(());
        };
        // libvirt forgets the callback on the client side before it tells the
        // daemon, so the slot is free again whatever the daemon answers.
        let key = connection_key(&conn);
        if !is_remote(&conn) {
            let deregistered = sys_connection::deregister_lifecycle(&conn, libvirt_id);
            self.release_slot(key, slot);
            return deregistered;
        }
        let inbox = Arc::clone(&self.inbox);
        self.daemon_calls += 1;
        std::thread::Builder::new()
            .name("virt-reactor-unsubscribe".into())
            .spawn(move || {
                if let Err(e) = sys_connection::deregister_lifecycle(&conn, libvirt_id) {
                    log::warn!("deregistering domain event callback {libvirt_id}: {e}");
                }
                inbox.post(|news| news.released.push((key, slot)));
                // The connection goes after the release is posted: its address
                // stays taken until then.
                drop(conn);
            })
            .map(drop)
            .map_err(|e| {
                self.daemon_calls -= 1;
                Error::Io(e)
            })
    }

    /// A new subscription's id, for either kind.
    fn subscription_id(&mut self) -> u64 {
        self.next_subscription += 1;
        self.next_subscription
    }

    fn release_slot(&mut self, key: usize, slot: usize) {
        if let Some(slots) = self.lifecycle_slots.get_mut(&key) {
            slots.claimed &= !(1 << slot);
            if slots.claimed == 0 {
                self.lifecycle_slots.remove(&key);
            }
        }
    }

    /// Finishes a stream from outside its handler, as if it returned [`Flow::Finish`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn finish(&mut self, token: StreamToken, state: &mut S) -> Result<()> {
        self.slot(token)?;
        self.apply(token, Flow::Finish, state);
        Ok(())
    }

    /// Aborts a stream from outside its handler, as if it returned [`Flow::Abort`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn abort(&mut self, token: StreamToken, state: &mut S) -> Result<()> {
        self.slot(token)?;
        self.apply(token, Flow::Abort, state);
        Ok(())
    }

    /// Fails a stream from outside its handler, as if it returned
    /// [`Flow::Fail`] with `error`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn fail(&mut self, token: StreamToken, error: Error, state: &mut S) -> Result<()> {
        self.slot(token)?;
        self.apply(token, Flow::Fail(error), state);
        Ok(())
    }

    /// Runs until [`ReactorHandle::stop`] is called.
    ///
    /// # Errors
    ///
    /// As [`run_once`](Self::run_once); the reactor stays usable.
    pub fn run(&mut self, state: &mut S) -> Result<()> {
        loop {
            let iteration = self.run_once(None, state);
            let stop = self.driver.take_stop_request();
            iteration?;
            if stop {
                return Ok(());
            }
        }
    }

    /// One iteration: jobs from other threads, one event-loop iteration (sleeping at
    /// most `timeout`, or until the next timer if `None`), then the handlers of
    /// every stream that became ready, domain events, and streams of lost
    /// connections.
    ///
    /// # Errors
    ///
    /// A panic in a callback ([`Error::CallbackPanicked`]; see
    /// [Panics](Self#panics)), or a poll failure.
    pub fn run_once(&mut self, timeout: Option<Duration>, state: &mut S) -> Result<()> {
        let guard = self.driver.enter_loop_thread();
        // Jobs may end streams, which the caller may be waiting for: then this
        // iteration does not sleep.
        let worked = self.run_jobs(state);
        let timeout = if worked || self.inbox.has_news() || self.writer_has_room() {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        let looped = self.driver.run_once(timeout);
        if self.inbox.has_news() {
            self.handle_inbox(state);
        }
        self.serve_writers(state);
        drop(guard);
        looped?;
        match self.panicked.take() {
            Some(panic) => Err(panic),
            None => Ok(()),
        }
    }

    /// Dispatches whatever is ready now without blocking, for a reactor embedded in
    /// another `mio::Poll`: call it after every poll of that `Poll`.
    ///
    /// # Errors
    ///
    /// As [`run_once`](Self::run_once).
    pub fn dispatch(&mut self, state: &mut S) -> Result<()> {
        self.run_once(Some(Duration::ZERO), state)
    }

    /// Consumes a pending [`ReactorHandle::stop`], for drivers other than
    /// [`run`](Self::run).
    #[cfg(feature = "tokio")]
    pub(crate) fn take_stop_request(&self) -> bool {
        self.driver.take_stop_request()
    }

    /// The fd that becomes readable when the loop has work: what an async runtime
    /// waits on.
    #[cfg(feature = "tokio")]
    pub(crate) fn poll_fd(&self) -> std::io::Result<std::os::fd::RawFd> {
        self.driver.embeddable()
    }

    /// How long an embedding poll may sleep before [`dispatch`](Self::dispatch) must
    /// run again: `Some(ZERO)` when work is pending, the time to the next timer, or
    /// `None` when nothing is scheduled. Call it right before that poll sleeps.
    pub fn next_timeout(&self) -> Option<Duration> {
        if self.inbox.has_news() || !self.jobs.is_empty() || self.writer_has_room() {
            return Some(Duration::ZERO);
        }
        self.driver.next_timeout()
    }

    /// Aborts every stream (handlers see [`StreamEnd::Aborted`]) and ends every
    /// lifecycle subscription, waits for the aborts and deregistrations that run on
    /// worker threads, then runs the loop until libvirt has removed every watch and
    /// timer it registered and every free callback has run.
    /// Close connections (and drop what holds them) before calling it: libvirt
    /// removes a connection's watches only when its last reference goes.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] when a daemon did not answer an abort or a deregistration
    /// in time (its thread carries on alone); [`Error::DrainTimedOut`] with what is left; or an
    /// error of [`run_once`](Self::run_once).
    pub fn shutdown(&mut self, timeout: Duration, state: &mut S) -> Result<DrainReport> {
        let deadline = Instant::now() + timeout;
        let tokens: Vec<StreamToken> = self.slots.iter().map(|(_, s)| s.token).collect();
        for token in tokens {
            self.apply(token, Flow::Abort, state);
        }
        let subscriptions: Vec<u64> = self
            .subscriptions
            .keys()
            .chain(self.close_subscriptions.keys())
            .copied()
            .collect();
        for id in subscriptions {
            if let Err(e) = self.unsubscribe(SubscriptionId(id)) {
                log::warn!("shutdown: {e}");
            }
        }
        // Aborts on lanes, remote (de)registrations and retiring lanes hold their
        // connections until the daemon has answered.
        while !self.ending.is_empty()
            || self.daemon_calls > 0
            || self.retired.values().any(Retired::is_running)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "shutdown: {} stream(s) and {} subscription(s) still waiting for \
                     their daemon",
                    self.ending.len(),
                    self.daemon_calls
                );
                return Err(Error::TimedOut);
            }
            self.run_once(Some(left.min(Duration::from_millis(50))), state)?;
        }
        let _on_loop = self.driver.enter_loop_thread();
        self.driver
            .drain(deadline.saturating_duration_since(Instant::now()))
    }

    /// Runs the jobs from other threads; true if there were any.
    fn run_jobs(&mut self, state: &mut S) -> bool {
        let mut any = false;
        while let Ok(job) = self.jobs.try_recv() {
            any = true;
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| job(self, state)));
            if let Err(payload) = outcome {
                self.note_panic("job from ReactorHandle::execute", payload.as_ref());
            }
        }
        any
    }

    /// Keeps the first panic of the iteration for `run_once` to return.
    fn note_panic(&mut self, origin: &str, payload: &(dyn std::any::Any + Send)) {
        let error = Error::CallbackPanicked {
            origin: origin.to_owned(),
            message: payload_message(payload),
        };
        log::error!("{error}");
        self.panicked.get_or_insert(error);
    }

    /// Calls a handler's `closed`, catching a panic (the handler is dropped then).
    fn close(
        &mut self,
        token: StreamToken,
        mut handler: BoxedHandler<S>,
        end: StreamEnd,
        state: &mut S,
    ) {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler.closed(state, end)));
        if let Err(payload) = outcome {
            self.note_panic(&format!("closed of stream {token:?}"), payload.as_ref());
        }
        self.drop_handler(token, handler);
    }

    /// Drops a handler, catching a panic in its drop.
    fn drop_handler(&mut self, token: StreamToken, handler: BoxedHandler<S>) {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| drop(handler))) {
            self.note_panic(
                &format!("drop of the handler of {token:?}"),
                payload.as_ref(),
            );
        }
    }

    /// A lane finished or aborted a stream: tell its handler.
    fn ended(&mut self, token: StreamToken, result: Result<()>, state: &mut S) {
        let Some(Ending {
            handler,
            abort,
            failure,
        }) = self.ending.remove(&token)
        else {
            return;
        };
        self.close(
            token,
            handler,
            stream_end(token, abort, failure, result),
            state,
        );
    }

    /// Whether some stream that sends through a lane wants room and has it.
    fn writer_has_room(&self) -> bool {
        self.writers.iter().any(|&token| self.has_room(token))
    }

    fn has_room(&self, token: StreamToken) -> bool {
        self.slot(token)
            .ok()
            .and_then(|slot| slot.stream.lane())
            .is_some_and(|lane| lane.has_room())
    }

    /// Tells the handlers of lane streams with room that they are WRITABLE (their
    /// libvirt callback is never registered for it).
    fn serve_writers(&mut self, state: &mut S) {
        if self.writers.is_empty() {
            return;
        }
        let mut ready = std::mem::take(&mut self.ready_writers);
        ready.extend(self.writers.iter().copied().filter(|&t| self.has_room(t)));
        for &token in &ready {
            self.handle_stream_event(token, Readiness::WRITABLE, state);
        }
        ready.clear();
        self.ready_writers = ready;
    }

    fn handle_inbox(&mut self, state: &mut S) {
        let mut news = std::mem::take(&mut self.news);
        self.inbox.take(&mut news);
        for (token, readiness) in news.streams.drain(..) {
            self.handle_stream_event(token, readiness, state);
        }
        for token in news.flush.drain(..) {
            if self.contains(token) {
                if let Err(e) = self.sync_registration(token) {
                    log::warn!("stream {token:?}: cannot ask for WRITABLE: {e}");
                }
            }
        }
        for (token, error) in news.send_failed.drain(..) {
            if self.contains(token) {
                self.apply(token, Flow::Fail(error), state);
            }
        }
        for (token, result) in news.ended.drain(..) {
            self.ended(token, result, state);
        }
        for (connection, reason) in news.closed.drain(..) {
            self.fail_connection(connection, reason, state);
        }
        for (id, event) in news.lifecycle.drain(..) {
            self.deliver_lifecycle(id, &event, state);
        }
        for (connection, slot) in news.released.drain(..) {
            self.daemon_calls -= 1;
            self.release_slot(connection, slot);
        }
        for (id, conn, slot, result) in news.registered.drain(..) {
            self.registered(id, conn, slot, result, state);
        }
        for panic in news.panics.drain(..) {
            self.panicked.get_or_insert(panic);
        }
        self.news = news;
    }

    fn deliver_lifecycle(&mut self, id: u64, event: &LifecycleEvent, state: &mut S) {
        let Some(subscription) = self.subscriptions.get_mut(&id) else {
            return; // unsubscribed meanwhile
        };
        let Some(handler) = subscription.handler.as_mut() else {
            return; // disabled by a panic
        };
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(state, event)));
        if let Err(payload) = outcome {
            let disabled = subscription.handler.take();
            self.note_panic(&format!("lifecycle handler {id}"), payload.as_ref());
            if panic::catch_unwind(AssertUnwindSafe(|| drop(disabled))).is_err() {
                log::error!("dropping lifecycle handler {id} panicked too");
            }
        }
    }

    fn handle_stream_event(&mut self, token: StreamToken, readiness: Readiness, state: &mut S) {
        let Some(slot) = self
            .slots
            .get_mut(token.key as usize)
            .filter(|s| s.token == token)
        else {
            return; // the stream ended earlier in this batch
        };
        if slot.lost {
            return; // waiting for the close watch
        }
        if readiness.is_writable() {
            match flush_outbox(slot, &mut self.scratch[..OUTBOX_BUDGET]) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = self.sync_registration(token) {
                        self.apply(token, Flow::Fail(e), state);
                        return;
                    }
                }
                Err(e) => {
                    self.apply(token, Flow::Fail(e), state);
                    return;
                }
            }
        }
        let slot = self
            .slots
            .get_mut(token.key as usize)
            .expect("checked above");
        let wanted = readiness.for_watch(slot.interest);
        if wanted.is_empty() {
            return;
        }
        let mut cx = StreamCtx {
            stream: &mut slot.stream,
            token,
            interest: slot.interest,
            scratch: &mut self.scratch,
        };
        let handler = &mut slot.handler;
        let outcome =
            panic::catch_unwind(AssertUnwindSafe(|| handler.ready(state, &mut cx, wanted)));
        let new_interest = cx.interest;
        match outcome {
            Ok(flow) => {
                if new_interest != slot.interest {
                    slot.interest = new_interest;
                    if let Err(e) = self.sync_registration(token) {
                        self.apply(token, Flow::Fail(e), state);
                        return;
                    }
                }
                self.apply(token, flow, state);
            }
            Err(payload) => {
                self.note_panic(&format!("stream handler {token:?}"), payload.as_ref());
                let slot = self.vacate(token);
                // Dropping an active stream aborts it, off the loop for a lane's.
                drop(slot.stream);
                // Its state may be half-updated: drop it without calling it again.
                self.drop_handler(token, slot.handler);
            }
        }
    }

    /// Carries out what a handler asked for.
    fn apply(&mut self, token: StreamToken, flow: Flow, state: &mut S) {
        let (abort, failure) = match flow {
            Flow::Continue => return,
            Flow::Remove => {
                let slot = self.vacate(token);
                self.close(token, slot.handler, StreamEnd::Removed(slot.stream), state);
                return;
            }
            Flow::Finish => (false, None),
            Flow::Abort => (true, None),
            Flow::Fail(e) => {
                if self.await_close_watch(token, &e) {
                    return;
                }
                (true, Some(e))
            }
        };
        let slot = self.vacate(token);
        let (mut stream, handler) = (slot.stream, slot.handler);
        if stream.lane().is_some() {
            // The daemon answers finish and abort: wait for it off the loop.
            self.ending.insert(
                token,
                Ending {
                    handler,
                    abort,
                    failure,
                },
            );
            let inbox = Arc::clone(&self.inbox);
            stream.end_on_lane(abort, |stream| Then::Notify {
                inbox,
                token,
                stream,
            });
            return;
        }
        let result = if abort {
            stream.abort()
        } else {
            stream.finish()
        };
        drop(stream);
        let end = stream_end(token, abort, failure, result.map_err(Error::from));
        self.close(token, handler, end, state);
    }

    /// A stream failing because its connection died is failed by the connection's
    /// close watch instead, with libvirt's reason, rather than with whatever error
    /// the dead socket produced first ("client socket is closed", "Broken pipe").
    /// Returns true when the stream now waits for that.
    fn await_close_watch(&mut self, token: StreamToken, error: &Error) -> bool {
        if matches!(error, Error::ConnectionClosed { .. }) {
            return false;
        }
        let Ok(slot) = self.slot(token) else {
            return false;
        };
        let conn = slot.stream.connection();
        let watched = self
            .connections
            .get(&slot.stream.connection_key())
            .and_then(|c| c.lane.as_ref())
            .is_some_and(Lane::is_watched);
        if !watched || conn.is_alive().unwrap_or(true) {
            return false;
        }
        log::debug!(
            "stream {token:?} failed on a dead connection ({error}); the close watch ends it"
        );
        let slot = self.slot_mut(token).expect("checked above");
        slot.lost = true;
        slot.interest = Interest::NONE;
        if let Err(e) = self.sync_registration(token) {
            log::debug!("stream {token:?}: pausing: {e}");
        }
        true
    }

    /// Takes a stream's slot out: removes its libvirt callback, closes its outbox,
    /// retires its token, and forgets its connection if it was the last stream.
    fn vacate(&mut self, token: StreamToken) -> Slot<S> {
        let key = token.key as usize;
        let slot = self.slots.remove(key);
        self.generations[key] = self.generations[key].wrapping_add(1);
        if let Err(e) = slot.stream.raw().remove_callback() {
            log::debug!("stream {token:?}: remove callback: {e}");
        }
        if let Some(outbox) = &slot.outbox {
            outbox.close();
        }
        self.writers.remove(&token);
        self.untrack_connection(slot.stream.connection_key());
        slot
    }

    fn track_connection(&mut self, connection: usize, conn: &Connect, remote: bool) -> Result<()> {
        if let Some(entry) = self.connections.get_mut(&connection) {
            entry.users += 1;
            return Ok(());
        }
        let lane = if remote {
            self.retired.retain(|_, lane| lane.is_running());
            let predecessor = self.retired.remove(&connection);
            match predecessor.as_ref().and_then(Retired::revive) {
                Some(lane) => Some(lane),
                None => Some(Lane::spawn(
                    conn,
                    connection,
                    Arc::clone(&self.inbox),
                    predecessor,
                )?),
            }
        } else {
            None
        };
        self.connections
            .insert(connection, Connection { users: 1, lane });
        Ok(())
    }

    fn untrack_connection(&mut self, connection: usize) {
        if let Some(entry) = self.connections.get_mut(&connection) {
            entry.users -= 1;
            if entry.users == 0 {
                if let Some(lane) = self.connections.remove(&connection).and_then(|c| c.lane) {
                    self.retired.insert(connection, lane.retire());
                }
            }
        }
    }

    /// Makes libvirt's callback registration match what the stream wants: the
    /// handler's interest, plus WRITABLE while bytes wait in the outbox. A stream
    /// on a lane hears of WRITABLE from the lane's room instead (`writers`).
    fn sync_registration(&mut self, token: StreamToken) -> Result<()> {
        let slot = self.slot_mut(token)?;
        let mut wanted = slot.interest;
        if slot.outbox.as_ref().is_some_and(|o| !o.is_empty()) {
            wanted |= Interest::WRITABLE;
        }
        let laned = slot.stream.lane().is_some();
        let registered = libvirt_interest(&slot.stream, wanted);
        if registered != slot.registered {
            slot.stream.raw().update_callback(registered)?;
            slot.registered = registered;
        }
        if laned && wanted.is_writable() {
            self.writers.insert(token);
        } else {
            self.writers.remove(&token);
        }
        Ok(())
    }

    /// libvirt leaves a lost connection's streams stuck (no event, recv -2 forever),
    /// so fail each of them here; then tell the connection's close subscriptions.
    fn fail_connection(&mut self, connection: usize, reason: CloseReason, state: &mut S) {
        let tokens: Vec<StreamToken> = self
            .slots
            .iter()
            .filter(|(_, s)| s.stream.connection_key() == connection)
            .map(|(_, s)| s.token)
            .collect();
        log::warn!(
            "connection lost ({reason}): failing {} stream(s)",
            tokens.len()
        );
        for token in tokens {
            self.apply(token, Flow::Fail(Error::ConnectionClosed { reason }), state);
        }
        let watchers: Vec<u64> = self
            .close_subscriptions
            .iter()
            .filter(|(_, c)| c.connection == connection)
            .map(|(&id, _)| id)
            .collect();
        for id in watchers {
            let close = self.close_subscriptions.remove(&id).expect("listed above");
            self.untrack_connection(connection);
            let handler = close.handler;
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(state, reason)));
            if let Err(payload) = outcome {
                self.note_panic(&format!("close handler {id}"), payload.as_ref());
            }
        }
    }

    fn slot(&self, token: StreamToken) -> Result<&Slot<S>> {
        self.slots
            .get(token.key as usize)
            .filter(|s| s.token == token)
            .ok_or(Error::InvalidToken)
    }

    fn slot_mut(&mut self, token: StreamToken) -> Result<&mut Slot<S>> {
        self.slots
            .get_mut(token.key as usize)
            .filter(|s| s.token == token)
            .ok_or(Error::InvalidToken)
    }
}

/// How a stream ended, from what its handler asked for (`abort`, with `failure`
/// when it failed) and libvirt's answer to the finish or abort.
fn stream_end(
    token: StreamToken,
    abort: bool,
    failure: Option<Error>,
    result: Result<()>,
) -> StreamEnd {
    if let (true, Err(e)) = (abort, &result) {
        log::debug!("stream {token:?}: abort: {e}");
    }
    match (failure, result) {
        (Some(e), _) => StreamEnd::Failed(e),
        (None, _) if abort => StreamEnd::Aborted,
        (None, Ok(())) => StreamEnd::Finished,
        (None, Err(e)) => StreamEnd::Failed(e),
    }
}

/// What libvirt's callback is registered for when the stream wants `wanted`.
fn libvirt_interest(stream: &Stream, wanted: Interest) -> Interest {
    if stream.lane().is_some() {
        wanted.without(Interest::WRITABLE)
    } else {
        wanted
    }
}

/// Sends what the outbox holds, up to [`OUTBOX_BUDGET`] bytes. Returns true when
/// that emptied it (the registration then changes).
fn flush_outbox<S>(slot: &mut Slot<S>, scratch: &mut [u8]) -> Result<bool> {
    let Some(outbox) = slot.outbox.clone() else {
        return Ok(false);
    };
    let n = outbox.peek(scratch);
    if n == 0 {
        return Ok(false);
    }
    let sent = match std::io::Write::write(&mut slot.stream, &scratch[..n]) {
        Ok(sent) => sent,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e.into()),
    };
    Ok(outbox.consume(sent))
}

impl<S: 'static> mio::event::Source for Reactor<S> {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        SourceFd(&self.driver.embeddable()?).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        SourceFd(&self.driver.embeddable()?).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> std::io::Result<()> {
        SourceFd(&self.driver.embeddable()?).deregister(registry)
    }
}

impl<S: 'static> Drop for Reactor<S> {
    fn drop(&mut self) {
        let subscriptions: Vec<Subscription<S>> =
            self.subscriptions.drain().map(|(_, s)| s).collect();
        for subscription in subscriptions {
            if let Err(e) = self.deregister(subscription) {
                log::warn!("dropping the reactor: {e}");
            }
        }
    }
}

impl<S: 'static> fmt::Debug for Reactor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("streams", &self.slots.len())
            .field("connections", &self.connections.len())
            .field("subscriptions", &self.subscriptions.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::{Reactor, ReactorHandle};

    fn is_send<T: Send>() {}

    /// Built on one thread, run on another: whatever the state is, since the state
    /// is lent to each run call rather than kept, and handlers must be `Send`.
    #[test]
    fn a_reactor_and_its_handle_are_send_whatever_the_state() {
        is_send::<Reactor<Rc<u8>>>();
        is_send::<ReactorHandle<Rc<u8>>>();
        is_send::<Reactor<()>>();
    }
}
