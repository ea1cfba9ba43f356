//! [`Reactor`]: non-blocking libvirt streams in a slab, each with its handler, all
//! driven by one [`EventLoop`].
//!
//! Each stream's libvirt event callback gets the stream's [`StreamToken`] as its
//! opaque. The callback only records the event (see `inbox`); after each loop
//! iteration the reactor looks the token up and calls the handler with `&mut` access,
//! outside any libvirt callback, so handlers may finish, abort or re-insert streams
//! and call any libvirt API.
//!
//! The loop underneath is normally our [`EventLoop`]; [`Reactor::register_default`]
//! runs the same reactor on libvirt's default loop instead (see `driver`).

mod driver;
mod handle;
mod handler;
pub(crate) mod inbox;
pub(crate) mod lane;

use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rustc_hash::{FxHashMap, FxHashSet};
use slab::Slab;

pub use handle::{ReactorHandle, StreamWriter};
pub use handler::{handler_fn, Flow, StreamCtx, StreamEnd, StreamHandler, StreamToken};

use crate::connection_events::CloseReason;
use crate::error::{Error, Result};
use crate::event_loop::{DrainReport, EventLoop};
use crate::interest::{Interest, Readiness};
use crate::stream::Stream;
use driver::{DefaultLoop, Driver};
use handle::{Command, Outbox};
use inbox::Inbox;
use lane::{Lane, Retired, Then};

/// Bytes the reactor sends from one stream's outbox per iteration, so that one busy
/// writer cannot hold the loop (a remote `virStreamSend` blocks until it is written).
const OUTBOX_BUDGET: usize = 64 * 1024;

/// Default bound of a stream's outbox.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 1 << 20;

struct Slot {
    stream: Stream,
    handler: Box<dyn StreamHandler>,
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
    streams: usize,
    lane: Option<Lane>,
}

/// A stream whose end is under way on its lane, and what to tell its handler.
struct Ending {
    handler: Box<dyn StreamHandler>,
    abort: bool,
    failure: Option<Error>,
}

/// Many non-blocking libvirt streams on one thread.
pub struct Reactor {
    driver: Driver,
    slots: Slab<Slot>,
    /// Generation of each slab key; bumped whenever the key is vacated.
    generations: Vec<u32>,
    connections: HashMap<usize, Connection>,
    commands: Receiver<Command>,
    handle: ReactorHandle,
    inbox: Inbox,
    scratch: Vec<u8>,
    /// Streams sending through a lane that want to hear when it has room.
    writers: FxHashSet<StreamToken>,
    /// Scratch list of writers with room, reused each iteration.
    ready_writers: Vec<StreamToken>,
    /// Handlers of streams whose finish or abort runs on a lane.
    ending: FxHashMap<StreamToken, Ending>,
    /// Lanes of connections that have no stream left, by connection, until their
    /// threads are done: a new stream of the connection revives its lane, or a new
    /// lane waits for the old one.
    retired: FxHashMap<usize, Retired>,
}

impl Reactor {
    /// A reactor driving its streams with `event_loop`.
    pub fn new(event_loop: EventLoop) -> Reactor {
        Reactor::with_driver(Driver::Ours(event_loop))
    }

    fn with_driver(driver: Driver) -> Reactor {
        let (tx, commands) = crossbeam_channel::unbounded();
        let handle = ReactorHandle {
            commands: tx,
            waker: driver.waker(),
        };
        Reactor {
            driver,
            slots: Slab::new(),
            generations: Vec::new(),
            connections: HashMap::new(),
            commands,
            handle,
            inbox: Inbox::default(),
            scratch: vec![0; OUTBOX_BUDGET],
            writers: FxHashSet::default(),
            ready_writers: Vec::new(),
            ending: FxHashMap::default(),
            retired: FxHashMap::default(),
        }
    }

    /// Registers libvirt's event loop and makes a reactor on it.
    ///
    /// # Errors
    ///
    /// As [`EventLoop::register`].
    pub fn register() -> Result<Reactor> {
        EventLoop::register().map(Reactor::new)
    }

    /// Registers libvirt's default event loop (`virEventRegisterDefaultImpl`) and makes
    /// a reactor that runs it (`virEventRunDefaultImpl`), with the same streams,
    /// handlers, budgets and commands as on our loop.
    ///
    /// It exists so that benchmarks can compare the two loops under identical stream
    /// code, and for programs that must keep libvirt's own loop. Such a reactor
    /// cannot be embedded in another `mio::Poll`, has no [`event_loop`](Self::event_loop),
    /// and its [`shutdown`](Self::shutdown) drains by running a few iterations (libvirt's
    /// loop reports nothing about what it holds). Open its connections with
    /// `virt::connect::Connect::open`: [`crate::connect`] insists on our loop.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] if any event implementation was registered in this
    /// process through virt-reactor; libvirt's error if registration fails.
    #[doc(alias = "virEventRegisterDefaultImpl")]
    #[doc(alias = "virEventRunDefaultImpl")]
    pub fn register_default() -> Result<Reactor> {
        DefaultLoop::register().map(|default| Reactor::with_driver(Driver::Default(default)))
    }

    /// Whether this reactor runs on libvirt's default loop
    /// ([`register_default`](Self::register_default)).
    pub fn is_default_loop(&self) -> bool {
        matches!(self.driver, Driver::Default(_))
    }

    /// The cross-thread handle.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// The event loop underneath, e.g. for statistics; `None` on a reactor running
    /// libvirt's default loop ([`register_default`](Self::register_default)).
    pub fn event_loop(&mut self) -> Option<&mut EventLoop> {
        match &mut self.driver {
            Driver::Ours(event_loop) => Some(event_loop),
            Driver::Default(_) => None,
        }
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
        H: StreamHandler + 'static,
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
        self.track_connection(connection, &stream)?;
        if let Some(own) = stream.lane() {
            // Inserted again: keep its lane, so its sends stay in order.
            own.retarget(self.handle.clone(), token);
        } else if let Some(lane) = self
            .connections
            .get(&connection)
            .and_then(|c| c.lane.as_ref())
        {
            let own = lane.attach(stream.raw().new_ref(), self.handle.clone(), token);
            stream.set_lane(own);
        }
        let registered = libvirt_interest(&stream, interest);
        if let Err(e) = stream
            .raw()
            .add_callback(registered.to_raw(), token.to_opaque())
        {
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

    /// Changes what a stream's handler is told about.
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
        let handle = self.handle.clone();
        let slot = self.slot_mut(token)?;
        let outbox = slot
            .outbox
            .get_or_insert_with(|| Outbox::new(capacity))
            .clone();
        Ok(StreamWriter {
            outbox,
            token,
            handle,
        })
    }

    /// Takes a stream out, unfinished, with its handler; its callback is removed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn remove(&mut self, token: StreamToken) -> Result<(Stream, Box<dyn StreamHandler>)> {
        self.slot(token)?;
        let slot = self.vacate(token);
        Ok((slot.stream, slot.handler))
    }

    /// Finishes a stream from outside its handler, as if it returned [`Flow::Finish`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn finish(&mut self, token: StreamToken) -> Result<()> {
        self.slot(token)?;
        self.apply(token, Flow::Finish);
        Ok(())
    }

    /// Aborts a stream from outside its handler, as if it returned [`Flow::Abort`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidToken`].
    pub fn abort(&mut self, token: StreamToken) -> Result<()> {
        self.slot(token)?;
        self.apply(token, Flow::Abort);
        Ok(())
    }

    /// Runs until [`ReactorHandle::stop`] is called.
    ///
    /// # Errors
    ///
    /// As [`run_once`](Self::run_once); the reactor stays usable.
    pub fn run(&mut self) -> Result<()> {
        loop {
            let iteration = self.run_once(None);
            let stop = self.driver.take_stop_request();
            iteration?;
            if stop {
                return Ok(());
            }
        }
    }

    /// Runs while `condition` holds, e.g. `|r| !r.is_empty()` to run until every
    /// stream has ended.
    ///
    /// # Errors
    ///
    /// As [`run_once`](Self::run_once).
    pub fn run_while(&mut self, mut condition: impl FnMut(&Reactor) -> bool) -> Result<()> {
        while condition(self) {
            self.run_once(None)?;
        }
        Ok(())
    }

    /// One iteration: commands from other threads, one event-loop iteration, then
    /// the handlers of every stream that became ready, and streams of lost
    /// connections.
    ///
    /// # Errors
    ///
    /// A panic in a handler ([`Error::CallbackPanicked`]; that stream is aborted, the
    /// others carry on) or in a loop callback, or a poll failure.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        // Commands may end streams (a lane's answer), which the caller may be
        // waiting for: then this iteration does not sleep.
        let commanded = self.run_commands();
        let timeout = if commanded || inbox::has_news() || self.writer_has_room() {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        let looped = self.driver.run_once(timeout);
        let handled = self.handle_inbox();
        let written = self.serve_writers();
        looped.and(handled).and(written)
    }

    /// Runs blocking `work` on a worker thread while this thread keeps running the
    /// loop, calling `between` after each iteration, until `work` returns its value
    /// or `timeout` passes.
    ///
    /// For calls whose replies come through this loop (with `qemu:///embed`,
    /// destroying or creating a guest waits on QEMU's monitor, a watch on this loop)
    /// when the loop thread must wait for them, e.g. at shutdown.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] (the worker is left to finish on its own), or an error
    /// of [`run_once`](Self::run_once).
    pub fn run_blocking<T, W>(
        &mut self,
        work: W,
        timeout: Duration,
        mut between: impl FnMut(&mut Reactor),
    ) -> Result<T>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
    {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let waker = self.handle.clone();
        std::thread::Builder::new()
            .name("virt-reactor-blocking".into())
            .spawn(move || {
                let _ = done_tx.send(work());
                waker.wake();
            })
            .map_err(Error::Io)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            self.run_once(Some(left.min(Duration::from_millis(100))))?;
            between(self);
            if let Ok(value) = done.try_recv() {
                return Ok(value);
            }
            if left.is_zero() {
                return Err(Error::TimedOut);
            }
        }
    }

    /// Dispatches whatever is ready now without blocking, for a reactor embedded in
    /// another `mio::Poll` (register the reactor there; see [`EventLoop`]'s
    /// Embedding section).
    ///
    /// # Errors
    ///
    /// As [`run_once`](Self::run_once).
    pub fn dispatch(&mut self) -> Result<()> {
        self.run_once(Some(Duration::ZERO))
    }

    /// How long an embedding poll may sleep before [`dispatch`](Self::dispatch) must
    /// run again; call it right before that poll.
    pub fn next_timeout(&self) -> Option<Duration> {
        if inbox::has_news() || !self.commands.is_empty() || self.writer_has_room() {
            return Some(Duration::ZERO);
        }
        self.driver.next_timeout()
    }

    /// Aborts every stream (handlers see [`StreamEnd::Aborted`]), waits for the
    /// aborts that run on sender threads, then drains the event loop: see
    /// [`EventLoop::drain`]. Close connections before calling it.
    ///
    /// # Errors
    ///
    /// [`Error::TimedOut`] when a daemon did not answer an abort in time (its sender
    /// thread carries on alone); otherwise as [`EventLoop::drain`].
    pub fn shutdown(&mut self, timeout: Duration) -> Result<DrainReport> {
        let deadline = Instant::now() + timeout;
        let tokens: Vec<StreamToken> = self.slots.iter().map(|(_, s)| s.token).collect();
        for token in tokens {
            self.apply(token, Flow::Abort);
        }
        while !self.ending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "shutdown: {} stream(s) still waiting for their daemon",
                    self.ending.len()
                );
                return Err(Error::TimedOut);
            }
            self.run_once(Some(left.min(Duration::from_millis(50))))?;
        }
        self.driver
            .drain(deadline.saturating_duration_since(Instant::now()))
    }

    /// Runs the commands from other threads; true if there were any.
    fn run_commands(&mut self) -> bool {
        let mut any = false;
        while let Ok(command) = self.commands.try_recv() {
            any = true;
            match command {
                Command::Execute(job) => job(self),
                Command::SetInterest(token, interest) => {
                    if let Err(e) = self.set_interest(token, interest) {
                        log::warn!("set_interest({token:?}) from another thread: {e}");
                    }
                }
                Command::Flush(token) => {
                    if self.contains(token) {
                        if let Err(e) = self.sync_registration(token) {
                            log::warn!("stream {token:?}: cannot ask for WRITABLE: {e}");
                        }
                    }
                }
                Command::SendFailed(token, error) => {
                    if self.contains(token) {
                        self.apply(token, Flow::Fail(error));
                    }
                }
                Command::Ended(token, result) => self.ended(token, result),
            }
        }
        any
    }

    /// A lane finished or aborted a stream: tell its handler.
    fn ended(&mut self, token: StreamToken, result: Result<()>) {
        let Some(Ending {
            mut handler,
            abort,
            failure,
        }) = self.ending.remove(&token)
        else {
            return;
        };
        handler.closed(stream_end(token, abort, failure, result));
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
    fn serve_writers(&mut self) -> Result<()> {
        if self.writers.is_empty() {
            return Ok(());
        }
        let mut ready = std::mem::take(&mut self.ready_writers);
        ready.extend(self.writers.iter().copied().filter(|&t| self.has_room(t)));
        let mut result = Ok(());
        for &token in &ready {
            if let Err(e) = self.handle_stream_event(token, Readiness::WRITABLE) {
                result = Err(e);
            }
        }
        ready.clear();
        self.ready_writers = ready;
        result
    }

    fn handle_inbox(&mut self) -> Result<()> {
        let mut news = std::mem::take(&mut self.inbox);
        inbox::take(&mut news);
        let mut result = Ok(());
        for &(opaque, events) in &news.streams {
            let token = StreamToken::from_opaque(opaque);
            if let Err(e) = self.handle_stream_event(token, Readiness::from_raw(events)) {
                result = Err(e);
            }
        }
        for &(connection, reason) in &news.closed {
            self.fail_connection(connection, reason);
        }
        news.streams.clear();
        news.closed.clear();
        self.inbox = news;
        result
    }

    fn handle_stream_event(&mut self, token: StreamToken, readiness: Readiness) -> Result<()> {
        let Some(slot) = self
            .slots
            .get_mut(token.key as usize)
            .filter(|s| s.token == token)
        else {
            return Ok(()); // the stream ended earlier in this batch
        };
        if slot.lost {
            return Ok(()); // waiting for the close watch
        }
        if readiness.is_writable() {
            match flush_outbox(slot, &mut self.scratch) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = self.sync_registration(token) {
                        self.apply(token, Flow::Fail(e));
                        return Ok(());
                    }
                }
                Err(e) => {
                    self.apply(token, Flow::Fail(e));
                    return Ok(());
                }
            }
        }
        let slot = self
            .slots
            .get_mut(token.key as usize)
            .expect("checked above");
        let wanted = readiness.for_watch(slot.interest.bits());
        if wanted == 0 {
            return Ok(());
        }
        let mut cx = StreamCtx {
            stream: &slot.stream,
            token,
            interest: slot.interest,
            handle: &self.handle,
        };
        let handler = &mut slot.handler;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            handler.ready(&mut cx, Readiness::from_raw(i32::from(wanted)))
        }));
        let new_interest = cx.interest;
        match outcome {
            Ok(flow) => {
                if new_interest != slot.interest {
                    slot.interest = new_interest;
                    if let Err(e) = self.sync_registration(token) {
                        self.apply(token, Flow::Fail(e));
                        return Ok(());
                    }
                }
                self.apply(token, flow);
                Ok(())
            }
            Err(payload) => {
                let error = Error::CallbackPanicked {
                    origin: format!("stream handler {token:?}"),
                    message: crate::ffi::panic::payload_message(payload.as_ref()),
                };
                log::error!("{error}; aborting that stream");
                let slot = self.vacate(token);
                // Dropping an active stream aborts it, off the loop for a lane's.
                drop(slot.stream);
                // Its state may be half-updated: drop it without calling it again.
                if panic::catch_unwind(AssertUnwindSafe(|| drop(slot.handler))).is_err() {
                    log::error!("dropping the panicked handler of {token:?} panicked too");
                }
                Err(error)
            }
        }
    }

    /// Carries out what a handler asked for.
    fn apply(&mut self, token: StreamToken, flow: Flow) {
        let (abort, failure) = match flow {
            Flow::Continue => return,
            Flow::Remove => {
                let slot = self.vacate(token);
                let mut handler = slot.handler;
                handler.closed(StreamEnd::Removed(slot.stream));
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
        let (mut stream, mut handler) = (slot.stream, slot.handler);
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
            let handle = self.handle.clone();
            stream.end_on_lane(abort, |stream| Then::Notify {
                handle,
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
        handler.closed(stream_end(token, abort, failure, result));
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
    fn vacate(&mut self, token: StreamToken) -> Slot {
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

    fn track_connection(&mut self, connection: usize, stream: &Stream) -> Result<()> {
        if let Some(entry) = self.connections.get_mut(&connection) {
            entry.streams += 1;
            return Ok(());
        }
        let lane = if stream.is_remote() {
            self.retired.retain(|_, lane| lane.is_running());
            let predecessor = self.retired.remove(&connection);
            match predecessor.as_ref().and_then(Retired::revive) {
                Some(lane) => Some(lane),
                None => Some(Lane::spawn(
                    stream.connection(),
                    connection,
                    self.handle.clone(),
                    predecessor,
                )?),
            }
        } else {
            None
        };
        self.connections
            .insert(connection, Connection { streams: 1, lane });
        Ok(())
    }

    fn untrack_connection(&mut self, connection: usize) {
        if let Some(entry) = self.connections.get_mut(&connection) {
            entry.streams -= 1;
            if entry.streams == 0 {
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
            slot.stream.raw().update_callback(registered.to_raw())?;
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
    /// so fail each of them here.
    fn fail_connection(&mut self, connection: usize, reason: CloseReason) {
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
            self.apply(token, Flow::Fail(Error::ConnectionClosed { reason }));
        }
    }

    fn slot(&self, token: StreamToken) -> Result<&Slot> {
        self.slots
            .get(token.key as usize)
            .filter(|s| s.token == token)
            .ok_or(Error::InvalidToken)
    }

    fn slot_mut(&mut self, token: StreamToken) -> Result<&mut Slot> {
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
        Interest::from_raw(wanted.to_raw() & !Interest::WRITABLE.to_raw())
    } else {
        wanted
    }
}

/// Sends what the outbox holds, up to [`OUTBOX_BUDGET`] bytes. Returns true when
/// that emptied it (the registration then changes).
fn flush_outbox(slot: &mut Slot, scratch: &mut [u8]) -> Result<bool> {
    let Some(outbox) = slot.outbox.clone() else {
        return Ok(false);
    };
    let n = outbox.peek(scratch);
    if n == 0 {
        return Ok(false);
    }
    let sent = match slot.stream.send(&scratch[..n]) {
        Ok(sent) => sent,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(Error::from_io(e)),
    };
    Ok(outbox.consume(sent))
}

impl mio::event::Source for Reactor {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        embeddable(&mut self.driver)?.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        embeddable(&mut self.driver)?.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> std::io::Result<()> {
        embeddable(&mut self.driver)?.deregister(registry)
    }
}

fn embeddable(driver: &mut Driver) -> std::io::Result<&mut EventLoop> {
    match driver {
        Driver::Ours(event_loop) => Ok(event_loop),
        Driver::Default(_) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "libvirt's default event loop cannot be embedded in a mio::Poll",
        )),
    }
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("streams", &self.slots.len())
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}
