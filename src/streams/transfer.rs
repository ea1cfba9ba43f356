//! Whole-stream transfers on the reactor: the non-blocking counterparts of
//! `virStreamSendAll`, `virStreamRecvAll`, `virStreamSparseSendAll` and
//! `virStreamSparseRecvAll`, which libvirt refuses for `VIR_STREAM_NONBLOCK` streams.
//!
//! A [`Transfer`] is a [`StreamHandler`]: insert it with the stream and the interest
//! from [`Transfer::interest`]. Each time the stream is ready it moves at most its
//! budget of bytes, so one transfer never holds the loop from the others (a remote
//! `virStreamSend` blocks until its packet is written). The callbacks follow
//! Sys::Virt::Stream: `sparse_send_all($handler, $hole_handler, $skip_handler)` and
//! `sparse_recv_all($handler, $hole_handler)`.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::handler::{Flow, StreamCtx, StreamEnd, StreamHandler};
use super::stream::{Received, Stream};
use crate::vocab::error::Error;
use crate::vocab::interest::{Interest, Readiness};
use crate::vocab::sync::lock;

/// libvirt's largest stream packet; bigger sends are split anyway.
const CHUNK: usize = 256 * 1024;

/// Buffers a sending transfer keeps for reuse, at most (see `Direction::Send::spare`).
const SPARE: usize = 1;

/// Default bytes a sending transfer moves per readiness event: one packet.
///
/// A send reads the source on the loop thread (a remote stream's packet then goes to
/// its sender thread), so the budget is how long one upload may hold the loop from
/// everything else. Measured when remote sends still blocked the loop: with 1 MiB
/// (four packets) a console beside a 1 GiB upload waited about 14 ms per echo; with
/// one packet, about 3 ms, and the upload ran no slower (`docs/benchmarks.md`,
/// scenario 4).
pub const DEFAULT_BUDGET: usize = 256 * 1024;

/// Default bytes a receiving transfer takes per readiness event: eight packets.
///
/// A receive never waits for the daemon: it takes packets libvirt's client already
/// holds. That client reads its socket dry whenever it reads (in any blocking call,
/// too) and queues every packet in memory, without limit, until the stream's reader
/// takes it. One packet per event drains such a backlog no faster than it refills;
/// eight do, and hold the loop for about as long as writing 2 MiB takes
/// (`docs/benchmarks.md`, "Memory of active streams").
///
/// The budget is reached only while such a backlog drains: in steady state an
/// event finds about half a packet queued. A console's echo beside 16 downloads
/// was the same with 256 KiB, 1 MiB and 2 MiB (p99 about 6 ms), so the smaller
/// budgets buy no latency (`docs/benchmarks.md`, "Console echo beside 16
/// downloads").
pub const DEFAULT_RECEIVE_BUDGET: usize = 8 * CHUNK;

/// What a transfer has moved so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Data bytes moved.
    pub data_bytes: u64,
    /// Holes moved.
    pub holes: u64,
    /// Bytes those holes span.
    pub hole_bytes: u64,
}

impl TransferStats {
    /// Bytes of the stream covered so far, data and holes.
    pub fn position(&self) -> u64 {
        self.data_bytes + self.hole_bytes
    }
}

/// Where a receiving transfer puts what arrives.
pub(crate) trait Sink: Send + 'static {
    fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// A hole (sparse transfers only).
    fn hole(&mut self, length: u64) -> io::Result<()>;
    /// The stream is complete: confirm what arrived, or fail the transfer.
    fn complete(&mut self, _stats: &TransferStats) -> Result<(), Error> {
        Ok(())
    }
    /// The transfer failed: undo what can be undone.
    fn discard(&mut self) {}
}

/// Where a sending transfer takes what it sends.
pub(crate) trait Source: Send + 'static {
    /// Fills `buf`; 0 at the end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sparse transfers: `(true, n)` for n bytes of data ahead, `(false, n)` for a
    /// hole of n bytes, `(_, 0)` at the end.
    fn section(&mut self) -> io::Result<(bool, u64)>;
    /// Passes over a hole that was sent.
    fn skip(&mut self, length: u64) -> io::Result<()>;
}

/// Closures as a sink, for the public constructors.
struct FnSink<F, H> {
    data: F,
    hole: H,
}

impl<F, H> Sink for FnSink<F, H>
where
    F: FnMut(&[u8]) -> io::Result<()> + Send + 'static,
    H: FnMut(u64) -> io::Result<()> + Send + 'static,
{
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        (self.data)(bytes)
    }

    fn hole(&mut self, length: u64) -> io::Result<()> {
        (self.hole)(length)
    }
}

/// Closures as a source, for the public constructors.
struct FnSource<F, H, K> {
    data: F,
    section: H,
    skip: K,
}

impl<F, H, K> Source for FnSource<F, H, K>
where
    F: FnMut(&mut [u8]) -> io::Result<usize> + Send + 'static,
    H: FnMut() -> io::Result<(bool, u64)> + Send + 'static,
    K: FnMut(u64) -> io::Result<()> + Send + 'static,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (self.data)(buf)
    }

    fn section(&mut self) -> io::Result<(bool, u64)> {
        (self.section)()
    }

    fn skip(&mut self, length: u64) -> io::Result<()> {
        (self.skip)(length)
    }
}

type Progress<S> = Box<dyn FnMut(&mut S, TransferStats) + Send>;
type OnEnd<S> = Box<dyn FnOnce(&mut S, Result<TransferStats, Error>) + Send>;

enum Direction {
    Recv {
        sink: Box<dyn Sink>,
        /// Holes arrive as holes; otherwise as zeros through `data`.
        sparse: bool,
    },
    Send {
        source: Box<dyn Source>,
        sparse: bool,
        /// Data bytes left in the current data section (sparse sends).
        section_left: u64,
        /// What was read from the source, until the stream takes it (whole, or in
        /// parts: a local stream): each sending transfer has a buffer of its own.
        buf: Vec<u8>,
        /// Bytes of `buf` read from the source but not yet taken by the stream.
        unsent: Range<usize>,
        /// Buffers a remote stream's sender thread gave back once it sent them:
        /// the next reads go into them, so an upload neither copies each packet
        /// again nor allocates (and faults in) a fresh one. `None` until the first
        /// send, which lends them out if the stream has a sender thread.
        spare: Option<Arc<Mutex<Vec<Vec<u8>>>>>,
    },
}

/// A whole-stream transfer, driven by the reactor; its progress and end callbacks
/// get the application's state `S`.
pub struct Transfer<S> {
    direction: Direction,
    budget: usize,
    stats: TransferStats,
    progress: Option<Progress<S>>,
    on_end: Option<OnEnd<S>>,
}

/// Receives the whole stream, calling `sink` with each piece of data; holes arrive
/// as zeros.
pub fn recv_all<S, F>(sink: F) -> Transfer<S>
where
    F: FnMut(&[u8]) -> io::Result<()> + Send + 'static,
{
    Transfer::receive(
        FnSink {
            data: sink,
            hole: |_| Ok(()),
        },
        false,
    )
}

/// Receives the whole stream keeping holes: `data` gets each piece of data, `hole`
/// the length of each hole.
pub fn sparse_recv_all<S, F, H>(data: F, hole: H) -> Transfer<S>
where
    F: FnMut(&[u8]) -> io::Result<()> + Send + 'static,
    H: FnMut(u64) -> io::Result<()> + Send + 'static,
{
    Transfer::receive(FnSink { data, hole }, true)
}

/// Sends until `source` returns 0: it fills the buffer it is given and returns how
/// many bytes it wrote.
pub fn send_all<S, F>(source: F) -> Transfer<S>
where
    F: FnMut(&mut [u8]) -> io::Result<usize> + Send + 'static,
{
    let source = FnSource {
        data: source,
        section: || Ok((true, u64::MAX)),
        skip: |_| Ok(()),
    };
    Transfer::send(source, false)
}

/// Sends keeping holes. `hole` says where the source is: `(true, n)` for n bytes of
/// data ahead, `(false, n)` for a hole of n bytes, `(_, 0)` at the end. A hole is
/// sent with `virStreamSendHole` and then passed over with `skip(n)`; data is read
/// with `data`.
pub fn sparse_send_all<S, F, H, K>(data: F, hole: H, skip: K) -> Transfer<S>
where
    F: FnMut(&mut [u8]) -> io::Result<usize> + Send + 'static,
    H: FnMut() -> io::Result<(bool, u64)> + Send + 'static,
    K: FnMut(u64) -> io::Result<()> + Send + 'static,
{
    let source = FnSource {
        data,
        section: hole,
        skip,
    };
    Transfer::send(source, true)
}

impl<S> Transfer<S> {
    /// Receives the whole stream into `sink`, holes as holes when `sparse`.
    pub(crate) fn receive(sink: impl Sink, sparse: bool) -> Transfer<S> {
        Transfer::new(Direction::Recv {
            sink: Box::new(sink),
            sparse,
        })
    }

    /// Sends all of `source`, holes as holes when `sparse`.
    pub(crate) fn send(source: impl Source, sparse: bool) -> Transfer<S> {
        Transfer::new(Direction::Send {
            source: Box::new(source),
            sparse,
            section_left: 0,
            buf: Vec::new(),
            unsent: 0..0,
            spare: None,
        })
    }

    fn new(direction: Direction) -> Transfer<S> {
        let budget = match direction {
            Direction::Recv { .. } => DEFAULT_RECEIVE_BUDGET,
            Direction::Send { .. } => DEFAULT_BUDGET,
        };
        Transfer {
            direction,
            budget,
            stats: TransferStats::default(),
            progress: None,
            on_end: None,
        }
    }

    /// The interest to insert the stream with.
    pub fn interest(&self) -> Interest {
        match self.direction {
            Direction::Recv { .. } => Interest::READABLE,
            Direction::Send { .. } => Interest::WRITABLE,
        }
    }

    /// Bytes moved per readiness event at most (default [`DEFAULT_BUDGET`] for a
    /// send, [`DEFAULT_RECEIVE_BUDGET`] for a receive).
    pub fn budget(mut self, bytes: usize) -> Transfer<S> {
        self.budget = bytes.max(1);
        self
    }

    /// Calls `f` after each readiness event that moved something.
    pub fn on_progress(
        mut self,
        f: impl FnMut(&mut S, TransferStats) + Send + 'static,
    ) -> Transfer<S> {
        self.progress = Some(Box::new(f));
        self
    }

    /// Calls `f` once at the end: the totals once libvirt confirmed completion
    /// (`virStreamFinish`), or the error that ended the transfer.
    pub fn on_end(
        mut self,
        f: impl FnOnce(&mut S, Result<TransferStats, Error>) + Send + 'static,
    ) -> Transfer<S> {
        self.on_end = Some(Box::new(f));
        self
    }

    /// Receives into the buffer the reactor lends its handlers.
    fn receive_from(&mut self, cx: &mut StreamCtx<'_>) -> io::Result<Flow> {
        if cx.scratch.len() < CHUNK {
            cx.scratch.resize(CHUNK, 0);
        }
        self.receive_into(cx.stream, &mut cx.scratch[..CHUNK])
    }

    fn receive_into(&mut self, stream: &mut Stream, buf: &mut [u8]) -> io::Result<Flow> {
        let Direction::Recv { sink, sparse } = &mut self.direction else {
            unreachable!("receive on a send transfer");
        };
        let mut moved = 0;
        while moved < self.budget {
            let got = if *sparse {
                stream.read_sparse(buf)
            } else {
                io::Read::read(stream, buf).map(Received::Data)
            };
            match got {
                Ok(Received::Data(0)) => return Ok(Flow::Finish),
                Ok(Received::Data(n)) => {
                    sink.data(&buf[..n])?;
                    self.stats.data_bytes += n as u64;
                    moved += n;
                }
                Ok(Received::Hole(length)) => {
                    sink.hole(length)?;
                    self.stats.holes += 1;
                    self.stats.hole_bytes += length;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Flow::Continue)
    }

    fn send_to(&mut self, stream: &mut Stream) -> io::Result<Flow> {
        let Direction::Send {
            source,
            sparse,
            section_left,
            buf,
            unsent,
            spare,
        } = &mut self.direction
        else {
            unreachable!("send on a receive transfer");
        };
        let spare = spare.get_or_insert_with(|| lend_buffers(stream));
        let mut moved = 0;
        while moved < self.budget {
            if unsent.start < unsent.end {
                match io::Write::write(stream, &buf[unsent.clone()]) {
                    Ok(n) => {
                        unsent.start += n;
                        self.stats.data_bytes += n as u64;
                        moved += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            let mut want = CHUNK;
            if *sparse {
                if *section_left == 0 {
                    let (in_data, length) = source.section()?;
                    if length == 0 {
                        return Ok(Flow::Finish);
                    }
                    if !in_data {
                        stream.write_hole(length)?;
                        source.skip(length)?;
                        self.stats.holes += 1;
                        self.stats.hole_bytes += length;
                        continue;
                    }
                    *section_left = length;
                }
                want = want.min(usize::try_from(*section_left).unwrap_or(usize::MAX));
            }
            // The buffer handed over last time was replaced only now, so that a
            // stream keeps no idle packet besides those its sender thread holds.
            if buf.is_empty() {
                *buf = lock(spare).pop().unwrap_or_default();
            }
            buf.resize(CHUNK, 0);
            let n = source.read(&mut buf[..want])?;
            if n == 0 {
                return Ok(Flow::Finish);
            }
            if *sparse {
                *section_left -= n as u64;
            }
            // A remote stream's sender thread takes the buffer itself when it has
            // room for all of it; otherwise the bytes are written (copied) above.
            buf.truncate(n);
            if stream.write_owned(buf)? {
                self.stats.data_bytes += n as u64;
                moved += n;
            } else {
                *unsent = 0..n;
            }
        }
        Ok(Flow::Continue)
    }
}

/// The buffers `stream`'s sender thread (if it has one) gives back once sent.
fn lend_buffers(stream: &Stream) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let spare = Arc::new(Mutex::new(Vec::new()));
    if let Some(lane) = stream.lane() {
        let back = Arc::downgrade(&spare);
        lane.set_recycle(Arc::new(move |buf: Vec<u8>| {
            if let Some(back) = back.upgrade() {
                let mut spare = lock(&back);
                if spare.len() < SPARE && buf.capacity() >= CHUNK {
                    spare.push(buf);
                }
            }
        }));
    }
    spare
}

impl<S> Transfer<S> {
    /// libvirt confirmed the stream: the sink has its say.
    fn complete(&mut self) -> Result<TransferStats, Error> {
        if let Direction::Recv { sink, .. } = &mut self.direction {
            sink.complete(&self.stats)?;
        }
        Ok(self.stats)
    }
}

impl<S> StreamHandler<S> for Transfer<S> {
    fn ready(&mut self, state: &mut S, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let before = self.stats;
        let moved = if readiness.is_readable() && matches!(self.direction, Direction::Recv { .. }) {
            self.receive_from(cx)
        } else if readiness.is_writable() && matches!(self.direction, Direction::Send { .. }) {
            self.send_to(cx)
        } else if readiness.is_error() || readiness.is_hangup() {
            // Local streams: the reader is told the end by a receive; a writer has
            // nowhere to write anymore.
            match self.direction {
                Direction::Recv { .. } => self.receive_from(cx),
                Direction::Send { .. } => Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("the stream reported {readiness:?}"),
                )),
            }
        } else {
            Ok(Flow::Continue)
        };
        if self.stats != before {
            if let Some(progress) = &mut self.progress {
                progress(state, self.stats);
            }
        }
        match moved {
            Ok(flow) => flow,
            Err(e) => Flow::Fail(e.into()),
        }
    }

    fn closed(&mut self, state: &mut S, end: StreamEnd) {
        let result = match end {
            StreamEnd::Finished => self.complete(),
            StreamEnd::Failed(e) => Err(e),
            StreamEnd::Aborted => Err(Error::Aborted),
            StreamEnd::Removed(_) => Err(Error::Aborted),
        };
        if result.is_err() {
            if let Direction::Recv { sink, .. } = &mut self.direction {
                sink.discard();
            }
        }
        match self.on_end.take() {
            Some(on_end) => on_end(state, result),
            None => {
                if let Err(e) = result {
                    log::warn!("transfer failed: {e}");
                }
            }
        }
    }
}

impl<S> fmt::Debug for Transfer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfer")
            .field("interest", &self.interest())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
