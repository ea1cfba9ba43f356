//! Sending off the loop thread: one sender thread ("lane") per remote connection.
//!
//! On a remote connection, `virStreamSend` and `virStreamSendHole` never return -2:
//! libvirt's client writes the packet in its own `poll` (`virNetClientSendStream`),
//! which waits as long as the daemon does not read its socket, and `virStreamFinish`
//! and `virStreamAbort` also wait for the daemon's reply. Made on the loop thread,
//! those calls would stall every other stream, and a frozen daemon would hang the
//! whole process. So the reactor never makes them there: each stream of a remote
//! connection queues its sends on its connection's lane, a bounded queue per stream
//! (see [`capacity`]). A full queue is `WouldBlock`; the lane's thread
//! makes the blocking calls, one packet per stream per turn, and wakes the loop when
//! room appears. Finish and abort go through the same queue, after the stream's
//! data, and their result comes back to the reactor as a command.
//!
//! The lane's thread also registers the connection's close callback, which tells
//! the reactor when libvirt gives up on the connection: with a daemon that supports
//! it, registering and unregistering are calls to the daemon as well. libvirt keeps
//! one close callback per connection: a new stream of a connection whose lane was
//! let go of revives that lane while its thread still runs, and a new lane waits
//! until its [`Retired`] predecessor has unregistered.
//!
//! The lane's thread ends once no stream and no reactor holds the lane and its
//! queues are empty; it then drops its connection reference, whose close may wait
//! for the daemon too. A frozen daemon holds the thread in libvirt's `poll` until
//! keepalive gives up on the connection.
//!
//! After libvirt reports a stream's failure, the lane waits a moment ([`SETTLE`])
//! before its next call to the daemon: the daemon may still be removing that stream
//! on another thread, and meanwhile libvirtd drops a call of the same connection
//! without an answer, which would hold the lane in libvirt forever.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use virt::connect::Connect;

use super::inbox::Inbox;
use super::token::StreamToken;
use crate::sys::connection::{register_close, unregister_close};
use crate::sys::stream::RawStream;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::CloseReason;
use crate::vocab::sync::{lock, wait};

/// libvirt's largest stream packet.
pub(crate) const PACKET: usize = 256 * 1024;

/// Bytes a stream may have queued on its lane, when `senders` streams of the lane
/// send data. Alone, four packets: the lane never idles while the loop refills, and
/// the loop, woken once half of them are sent, refills two per wake-up. Beside
/// others, one packet, since the others' packets keep the lane busy meanwhile: an
/// upload then holds one packet's memory, as a blocking sender would.
pub(crate) fn capacity(senders: usize) -> usize {
    if senders > 1 {
        PACKET
    } else {
        4 * PACKET
    }
}

/// How long the lane waits before retrying a send that libvirt refused with -2 (a
/// stream that is not remote after all).
const RETRY: Duration = Duration::from_millis(5);

/// How long the lane makes no call to the daemon after libvirt reported a stream's
/// failure. A stream the daemon ends on its own (a console taken over by another
/// client's forced open) is removed by a daemon worker thread. If a message of the
/// connection reaches that stream's filter meanwhile, libvirtd (9.0,
/// `daemonStreamFilter` finding itself the stream's last holder) frees the message
/// unanswered: a call then waits forever, a sent packet is lost. The client hears of
/// the failure before the removal is over (the error is queued first); the removal
/// holds the daemon's lock for well under a millisecond.
const SETTLE: Duration = Duration::from_millis(200);

/// Takes back a buffer the lane has sent in full (see [`LaneStream::set_recycle`]).
pub(crate) type Recycle = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

/// A connection's lane. Cloning counts an owner; the thread ends when the last owner
/// is gone and nothing is queued.
pub(crate) struct Lane {
    shared: Arc<Shared>,
}

/// One stream's place on a lane, held by the `Stream`.
pub(crate) struct LaneStream {
    lane: Lane,
    id: u64,
}

/// What happens once a stream's end (finish or abort) is done.
pub(crate) enum Then {
    /// Tell the reactor, then drop the stream on the lane thread: its last
    /// reference may be the connection's, whose close waits for the daemon.
    Notify {
        inbox: Arc<Inbox>,
        token: StreamToken,
        stream: Box<dyn Send>,
    },
    /// Answer a caller waiting in `Stream::finish` or `Stream::abort`.
    Reply(crossbeam_channel::Sender<Result<()>>),
    /// Nobody waits (a dropped stream); release its connection here, off the loop.
    Release(Option<Connect>),
}

/// A lane its reactor let go of, while its thread may still be finishing.
pub(crate) struct Retired(Weak<Shared>);

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// The connection's close callback is ours: its streams hear of its loss.
    watched: AtomicBool,
    /// The connection is gone: no daemon is left to race with, so no settling
    /// (see [`SETTLE`]); the calls fail at once.
    lost: Arc<AtomicBool>,
    /// Set once the thread has unregistered the close callback and let go of the
    /// connection.
    done: Mutex<bool>,
    ended: Condvar,
}

#[derive(Default)]
struct State {
    queues: FxHashMap<u64, Queue>,
    /// Streams with work, served round-robin, one packet each per turn.
    turns: VecDeque<u64>,
    next_id: u64,
    owners: usize,
    /// Streams that have queued data (see `capacity`).
    senders: usize,
    /// The thread decided to end (no owner, nothing queued): no reviving.
    exiting: bool,
    /// No call to the daemon before then (see [`SETTLE`]).
    quiet_until: Option<Instant>,
}

impl State {
    /// libvirt reported a stream's failure: let the daemon finish removing it.
    fn settle(&mut self) {
        self.quiet_until = Some(Instant::now() + SETTLE);
    }

    /// Counts stream `id` among the senders, and returns what it may have queued.
    fn sender_capacity(&mut self, id: u64) -> usize {
        if let Some(queue) = self.queues.get_mut(&id) {
            if !queue.sender {
                queue.sender = true;
                self.senders += 1;
            }
        }
        capacity(self.senders)
    }
}

struct Queue {
    raw: RawStream,
    /// Who hears of room and failures.
    inbox: Arc<Inbox>,
    token: StreamToken,
    ops: VecDeque<Op>,
    /// Data bytes queued.
    queued: usize,
    /// A send found the queue full: wake the loop when room appears.
    starved: bool,
    /// It has queued data: counted in `State::senders`.
    sender: bool,
    /// A send failed; later sends are refused.
    failed: bool,
    /// An abort is queued: what is left of a packet in flight is dropped.
    aborting: bool,
    scheduled: bool,
    /// Where buffers sent in full go, instead of being freed.
    recycle: Option<Recycle>,
}

enum Op {
    Data(Vec<u8>),
    Hole(u64),
    End { abort: bool, then: Then },
}

impl Lane {
    /// Starts the lane of `conn`, whose losses are reported to the reactor's inbox
    /// as `connection`, once `predecessor` (the connection's previous lane) is done.
    pub(crate) fn spawn(
        conn: &Connect,
        connection: usize,
        inbox: Arc<Inbox>,
        predecessor: Option<Retired>,
    ) -> Result<Lane> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                owners: 1,
                ..State::default()
            }),
            work: Condvar::new(),
            watched: AtomicBool::new(false),
            lost: Arc::default(),
            done: Mutex::new(false),
            ended: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let conn = conn.clone();
        std::thread::Builder::new()
            .name("virt-reactor-send".into())
            .spawn(move || {
                if let Some(predecessor) = predecessor.and_then(|p| p.0.upgrade()) {
                    predecessor.wait_done();
                }
                worker.watch(&conn, connection, inbox);
                worker.run();
                if worker.watched.load(Ordering::Acquire) {
                    // A call dropped by the daemon would hold this thread for good.
                    let pause = worker.pause(&worker.lock());
                    if let Some(pause) = pause {
                        std::thread::sleep(pause);
                    }
                    if let Err(e) = unregister_close(&conn) {
                        log::debug!("unregistering the close callback: {e}");
                    }
                }
                drop(conn);
                *lock(&worker.done) = true;
                worker.ended.notify_all();
            })
            .map_err(Error::Io)?;
        Ok(Lane { shared })
    }

    /// Lets go of the lane: its thread finishes what is queued, then ends.
    pub(crate) fn retire(self) -> Retired {
        Retired(Arc::downgrade(&self.shared))
    }

    /// Whether the connection's close callback is registered, so that a loss of the
    /// connection will be reported.
    pub(crate) fn is_watched(&self) -> bool {
        self.shared.watched.load(Ordering::Acquire)
    }

    /// Gives `raw` (a reference of its own) a queue on this lane; `inbox` and
    /// `token` hear of room and failures.
    pub(crate) fn attach(
        &self,
        raw: RawStream,
        inbox: Arc<Inbox>,
        token: StreamToken,
    ) -> LaneStream {
        let mut state = self.shared.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queues.insert(
            id,
            Queue {
                raw,
                inbox,
                token,
                ops: VecDeque::new(),
                queued: 0,
                starved: false,
                sender: false,
                failed: false,
                aborting: false,
                scheduled: false,
                recycle: None,
            },
        );
        drop(state);
        LaneStream {
            lane: self.clone(),
            id,
        }
    }
}

impl Retired {
    /// The lane again, unless its thread is ending already.
    pub(crate) fn revive(&self) -> Option<Lane> {
        let shared = self.0.upgrade()?;
        let mut state = shared.lock();
        if state.exiting {
            return None;
        }
        state.owners += 1;
        drop(state);
        Some(Lane { shared })
    }

    /// Whether its thread has yet to let go of the connection.
    pub(crate) fn is_running(&self) -> bool {
        self.0.upgrade().is_some_and(|shared| !*lock(&shared.done))
    }
}

impl Clone for Lane {
    fn clone(&self) -> Lane {
        self.shared.lock().owners += 1;
        Lane {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.owners -= 1;
        if state.owners == 0 {
            self.shared.work.notify_one();
        }
    }
}

impl LaneStream {
    /// Points room and failure news at another reactor slot (a stream re-inserted).
    pub(crate) fn retarget(&self, inbox: Arc<Inbox>, token: StreamToken) {
        if let Some(queue) = self.lane.shared.lock().queues.get_mut(&self.id) {
            queue.inbox = inbox;
            queue.token = token;
        }
    }

    /// Queues as much of `buf` as fits.
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.lane.shared.lock();
        let capacity = state.sender_capacity(self.id);
        let queue = self.queue(&mut state)?;
        let room = capacity.saturating_sub(queue.queued);
        if room == 0 {
            queue.starved = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(room);
        let mut rest = &buf[..n];
        if let Some(Op::Data(last)) = queue.ops.back_mut() {
            let fits = rest.len().min(PACKET.saturating_sub(last.len()));
            last.extend_from_slice(&rest[..fits]);
            rest = &rest[fits..];
        }
        for piece in rest.chunks(PACKET) {
            queue.ops.push_back(Op::Data(piece.to_vec()));
        }
        queue.queued += n;
        self.lane.shared.schedule(&mut state, self.id);
        Ok(n)
    }

    /// Queues all of `data` without copying it, taking the buffer (`data` is left
    /// empty), when it is at most one packet and fits whole; false, with nothing
    /// taken, when it does not (then [`send`](Self::send) takes what fits).
    pub(crate) fn send_owned(&self, data: &mut Vec<u8>) -> io::Result<bool> {
        let mut state = self.lane.shared.lock();
        let capacity = state.sender_capacity(self.id);
        let queue = self.queue(&mut state)?;
        if data.len() > PACKET || queue.queued + data.len() > capacity {
            return Ok(false);
        }
        queue.queued += data.len();
        queue.ops.push_back(Op::Data(std::mem::take(data)));
        self.lane.shared.schedule(&mut state, self.id);
        Ok(true)
    }

    /// Hands every buffer this stream's sends leave behind, once sent in full, to
    /// `recycle` (called on the lane's thread, without the lane's lock), instead of
    /// freeing it: a producer that queues owned buffers ([`send_owned`](Self::send_owned))
    /// can then reuse them rather than allocate fresh memory (and fault its pages in)
    /// for each packet.
    pub(crate) fn set_recycle(&self, recycle: Recycle) {
        if let Some(queue) = self.lane.shared.lock().queues.get_mut(&self.id) {
            queue.recycle = Some(recycle);
        }
    }

    /// Queues a hole, after the data queued so far.
    pub(crate) fn send_hole(&self, length: u64) -> io::Result<()> {
        let mut state = self.lane.shared.lock();
        self.queue(&mut state)?.ops.push_back(Op::Hole(length));
        self.lane.shared.schedule(&mut state, self.id);
        Ok(())
    }

    /// Whether a send would take at least one byte now.
    pub(crate) fn has_room(&self) -> bool {
        let mut state = self.lane.shared.lock();
        let capacity = capacity(state.senders);
        match state.queues.get_mut(&self.id) {
            Some(queue) => {
                let room = !queue.failed && queue.queued < capacity;
                queue.starved |= !room;
                room
            }
            // Ended: a send reports it at once.
            None => true,
        }
    }

    /// Ends the stream after its queued data (finish), or at once, dropping what is
    /// queued (abort).
    pub(crate) fn end(&self, abort: bool, then: Then) {
        let mut state = self.lane.shared.lock();
        let Some(queue) = state.queues.get_mut(&self.id) else {
            drop(state);
            then.done(Err(Error::StreamClosed));
            return;
        };
        if abort {
            queue.ops.retain(|op| matches!(op, Op::End { .. }));
            queue.queued = 0;
            queue.aborting = true;
        }
        queue.ops.push_back(Op::End { abort, then });
        self.lane.shared.schedule(&mut state, self.id);
    }

    /// The stream's queue. After a failed send, `WouldBlock` until the reactor has
    /// ended the stream with that send's error .
    fn queue<'a>(&self, state: &'a mut State) -> io::Result<&'a mut Queue> {
        match state.queues.get_mut(&self.id) {
            Some(queue) if queue.failed => Err(io::ErrorKind::WouldBlock.into()),
            Some(queue) => Ok(queue),
            None => Err(io::Error::other(Error::StreamClosed)),
        }
    }
}

impl Then {
    fn done(self, result: Result<()>) {
        match self {
            Then::Notify {
                inbox,
                token,
                stream,
            } => {
                inbox.post(|news| news.ended.push((token, result)));
                drop(stream);
            }
            Then::Reply(reply) => {
                let _ = reply.send(result);
            }
            Then::Release(conn) => {
                if let Err(e) = result {
                    log::debug!("aborting a dropped stream: {e}");
                }
                drop(conn);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Registers the close callback of `conn`. libvirt calls it from whichever
    /// thread finds the connection gone, often this lane's, so it wakes the loop.
    fn watch(&self, conn: &Connect, connection: usize, inbox: Arc<Inbox>) {
        let posted = Arc::clone(&inbox);
        let lost = Arc::clone(&self.lost);
        let registered = register_close(
            conn,
            Box::new(move |reason| {
                lost.store(true, Ordering::Release);
                posted.post(|news| news.closed.push((connection, reason)));
            }),
        );
        match registered {
            Ok(()) => self.watched.store(true, Ordering::Release),
            Err(e) => log::warn!(
                "cannot watch the connection for closure ({e}; does something else hold \
                 its close callback?): its streams fail with the first error they meet \
                 when it is lost"
            ),
        }
        // Lost before the callback was in place: libvirt will not call it.
        if !conn.is_alive().unwrap_or(true) {
            self.lost.store(true, Ordering::Release);
            inbox.post(|news| news.closed.push((connection, CloseReason::Error)));
        }
    }

    /// How long to wait before the next call to the daemon.
    fn pause(&self, state: &State) -> Option<Duration> {
        if self.lost.load(Ordering::Acquire) {
            return None;
        }
        state
            .quiet_until
            .and_then(|until| until.checked_duration_since(Instant::now()))
    }

    fn wait_done(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = wait(&self.ended, done);
        }
    }

    fn schedule(&self, state: &mut State, id: u64) {
        if let Some(queue) = state.queues.get_mut(&id) {
            if !queue.scheduled && !queue.ops.is_empty() {
                queue.scheduled = true;
                state.turns.push_back(id);
                self.work.notify_one();
            }
        }
    }

    /// The lane's thread: one operation per turn, round-robin over the streams.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            let Some(id) = state.turns.pop_front() else {
                if state.owners == 0 && state.queues.is_empty() {
                    state.exiting = true;
                    return;
                }
                state = wait(&self.work, state);
                continue;
            };
            let Some(queue) = state.queues.get_mut(&id) else {
                continue;
            };
            queue.scheduled = false;
            let Some(op) = queue.ops.pop_front() else {
                continue;
            };
            let raw = queue.raw.new_ref();
            let pause = self.pause(&state);
            drop(state);
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
            match op {
                Op::Data(bytes) => {
                    let sent = send_packet(&raw, &bytes);
                    state = self.lock();
                    let (retry, spent) = self.after_send(&mut state, id, bytes, sent);
                    let recycle = state.queues.get(&id).and_then(|q| q.recycle.clone());
                    if let (Some(recycle), Some(spent)) = (recycle, spent) {
                        drop(state);
                        recycle(spent);
                        state = self.lock();
                    }
                    if retry {
                        drop(state);
                        std::thread::sleep(RETRY);
                        state = self.lock();
                    }
                }
                Op::Hole(length) => {
                    let sent = raw.send_hole(length).map(|()| 0);
                    state = self.lock();
                    self.after_send(&mut state, id, Vec::new(), sent);
                }
                Op::End { abort, then } => {
                    let result = if abort { raw.abort() } else { raw.finish() };
                    drop(raw);
                    state = self.lock();
                    if result.is_err() {
                        state.settle();
                    }
                    let queue = state.queues.remove(&id);
                    if queue.as_ref().is_some_and(|q| q.sender) {
                        state.senders -= 1;
                    }
                    drop(state);
                    // Outside the lock: the queue's reference is a libvirt call to
                    // release, and dropping the stream drops its LaneStream.
                    drop(queue);
                    then.done(result);
                    state = self.lock();
                }
            }
        }
    }

    /// Books a send's outcome: room for the stream, or its failure. True when libvirt
    /// took nothing (-2), so the lane should pause before retrying; and the buffer,
    /// when it was sent in full.
    fn after_send(
        &self,
        state: &mut State,
        id: u64,
        mut bytes: Vec<u8>,
        sent: Result<usize>,
    ) -> (bool, Option<Vec<u8>>) {
        let capacity = capacity(state.senders);
        if sent.is_err() {
            state.settle();
        }
        let Some(queue) = state.queues.get_mut(&id) else {
            return (false, None);
        };
        let mut retry = false;
        let mut spent = None;
        match sent {
            Ok(n) => {
                // An abort may have zeroed the count meanwhile.
                queue.queued = queue.queued.saturating_sub(n);
                if n < bytes.len() && !queue.aborting {
                    // libvirt took part of it (a local stream): the rest stays first.
                    bytes.drain(..n);
                    queue.ops.push_front(Op::Data(bytes));
                    retry = n == 0;
                } else if n == bytes.len() {
                    spent = Some(bytes);
                }
            }
            Err(error) => {
                queue.failed = true;
                queue.queued = 0;
                queue.ops.retain(|op| matches!(op, Op::End { .. }));
                let token = queue.token;
                queue
                    .inbox
                    .post(|news| news.send_failed.push((token, error)));
            }
        }
        // Woken at half empty, the loop refills several packets at once.
        if queue.starved && queue.queued <= capacity / 2 {
            queue.starved = false;
            queue.inbox.waker().wake();
        }
        self.schedule(state, id);
        (retry, spent)
    }
}

/// One blocking send; `Ok(0)` when libvirt answered -2.
fn send_packet(raw: &RawStream, bytes: &[u8]) -> Result<usize> {
    match raw.send(bytes) {
        n if n >= 0 => Ok(n as usize),
        -2 => Ok(0),
        _ => Err(Error::last_libvirt()),
    }
}

impl fmt::Debug for LaneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaneStream").field("id", &self.id).finish()
    }
}
