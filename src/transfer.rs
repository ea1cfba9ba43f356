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

use crate::error::Error;
use crate::interest::{Interest, Readiness};
use crate::reactor::{Flow, StreamCtx, StreamEnd, StreamHandler};
use crate::stream::Received;

/// libvirt's largest stream packet; bigger sends are split anyway.
const CHUNK: usize = 256 * 1024;

/// Default bytes moved per readiness event: one packet.
///
/// A remote send blocks until its packet is on the socket, so the budget is how long
/// one upload may hold the loop from everything else. With 1 MiB (four packets) a
/// console beside a 1 GiB upload waited about 14 ms per echo here; with one packet,
/// about 3 ms, and the upload itself ran no slower (`docs/benchmarks.md`, scenario 4).
pub const DEFAULT_BUDGET: usize = 256 * 1024;

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

type DataSink = Box<dyn FnMut(&[u8]) -> io::Result<()>>;
type HoleSink = Box<dyn FnMut(u64) -> io::Result<()>>;
type DataSource = Box<dyn FnMut(&mut [u8]) -> io::Result<usize>>;
type HoleSource = Box<dyn FnMut() -> io::Result<(bool, u64)>>;
type Skip = Box<dyn FnMut(u64) -> io::Result<()>>;
type Progress = Box<dyn FnMut(TransferStats)>;
type OnEnd = Box<dyn FnOnce(Result<TransferStats, Error>)>;

enum Direction {
    Recv {
        data: DataSink,
        /// `None`: holes are received as zeros through `data`.
        hole: Option<HoleSink>,
    },
    Send {
        data: DataSource,
        /// `None`: a plain (non-sparse) send.
        sparse: Option<(HoleSource, Skip)>,
        /// Data bytes left in the current data section (sparse sends).
        section_left: u64,
        /// Bytes of `buf` read from the source but not yet taken by the stream (a
        /// local stream may take a send in parts).
        unsent: Range<usize>,
    },
}

/// A whole-stream transfer, driven by the reactor.
pub struct Transfer {
    direction: Direction,
    buf: Vec<u8>,
    budget: usize,
    stats: TransferStats,
    progress: Option<Progress>,
    on_end: Option<OnEnd>,
}

/// Receives the whole stream, calling `sink` with each piece of data; holes arrive
/// as zeros.
pub fn recv_all<F>(sink: F) -> Transfer
where
    F: FnMut(&[u8]) -> io::Result<()> + 'static,
{
    Transfer::new(Direction::Recv {
        data: Box::new(sink),
        hole: None,
    })
}

/// Receives the whole stream keeping holes: `data` gets each piece of data, `hole`
/// the length of each hole.
pub fn sparse_recv_all<F, H>(data: F, hole: H) -> Transfer
where
    F: FnMut(&[u8]) -> io::Result<()> + 'static,
    H: FnMut(u64) -> io::Result<()> + 'static,
{
    Transfer::new(Direction::Recv {
        data: Box::new(data),
        hole: Some(Box::new(hole)),
    })
}

/// Sends until `source` returns 0: it fills the buffer it is given and returns how
/// many bytes it wrote.
pub fn send_all<F>(source: F) -> Transfer
where
    F: FnMut(&mut [u8]) -> io::Result<usize> + 'static,
{
    Transfer::new(Direction::Send {
        data: Box::new(source),
        sparse: None,
        section_left: 0,
        unsent: 0..0,
    })
}

/// Sends keeping holes. `hole` says where the source is: `(true, n)` for n bytes of
/// data ahead, `(false, n)` for a hole of n bytes, `(_, 0)` at the end. A hole is
/// sent with `virStreamSendHole` and then passed over with `skip(n)`; data is read
/// with `data`.
pub fn sparse_send_all<F, H, K>(data: F, hole: H, skip: K) -> Transfer
where
    F: FnMut(&mut [u8]) -> io::Result<usize> + 'static,
    H: FnMut() -> io::Result<(bool, u64)> + 'static,
    K: FnMut(u64) -> io::Result<()> + 'static,
{
    Transfer::new(Direction::Send {
        data: Box::new(data),
        sparse: Some((Box::new(hole), Box::new(skip))),
        section_left: 0,
        unsent: 0..0,
    })
}

impl Transfer {
    fn new(direction: Direction) -> Transfer {
        Transfer {
            direction,
            buf: vec![0; CHUNK],
            budget: DEFAULT_BUDGET,
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

    /// Bytes moved per readiness event at most (default [`DEFAULT_BUDGET`]).
    pub fn budget(mut self, bytes: usize) -> Transfer {
        self.budget = bytes.max(1);
        self
    }

    /// Calls `f` after each readiness event that moved something.
    pub fn on_progress(mut self, f: impl FnMut(TransferStats) + 'static) -> Transfer {
        self.progress = Some(Box::new(f));
        self
    }

    /// Calls `f` once at the end: the totals once libvirt confirmed completion
    /// (`virStreamFinish`), or the error that ended the transfer.
    pub fn on_end(mut self, f: impl FnOnce(Result<TransferStats, Error>) + 'static) -> Transfer {
        self.on_end = Some(Box::new(f));
        self
    }

    fn receive(&mut self, cx: &StreamCtx<'_>) -> io::Result<Flow> {
        let Direction::Recv { data, hole } = &mut self.direction else {
            unreachable!("receive on a send transfer");
        };
        let mut moved = 0;
        while moved < self.budget {
            let got = if hole.is_some() {
                cx.recv_sparse(&mut self.buf)
            } else {
                cx.recv(&mut self.buf).map(|n| match n {
                    0 => Received::End,
                    n => Received::Data(n),
                })
            };
            match got {
                Ok(Received::Data(n)) => {
                    data(&self.buf[..n])?;
                    self.stats.data_bytes += n as u64;
                    moved += n;
                }
                Ok(Received::Hole(length)) => {
                    if let Some(hole) = hole {
                        hole(length)?;
                    }
                    self.stats.holes += 1;
                    self.stats.hole_bytes += length;
                }
                Ok(Received::End) => return Ok(Flow::Finish),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Flow::Continue)
    }

    fn send(&mut self, cx: &StreamCtx<'_>) -> io::Result<Flow> {
        let Direction::Send {
            data,
            sparse,
            section_left,
            unsent,
        } = &mut self.direction
        else {
            unreachable!("send on a receive transfer");
        };
        let mut moved = 0;
        while moved < self.budget {
            if unsent.start < unsent.end {
                match cx.send(&self.buf[unsent.clone()]) {
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
            let mut want = self.buf.len();
            if let Some((hole, skip)) = sparse {
                if *section_left == 0 {
                    let (in_data, length) = hole()?;
                    if length == 0 {
                        return Ok(Flow::Finish);
                    }
                    if !in_data {
                        cx.send_hole(length)?;
                        skip(length)?;
                        self.stats.holes += 1;
                        self.stats.hole_bytes += length;
                        continue;
                    }
                    *section_left = length;
                }
                want = want.min(usize::try_from(*section_left).unwrap_or(usize::MAX));
            }
            let n = data(&mut self.buf[..want])?;
            if n == 0 {
                return Ok(Flow::Finish);
            }
            if sparse.is_some() {
                *section_left -= n as u64;
            }
            *unsent = 0..n;
        }
        Ok(Flow::Continue)
    }
}

impl StreamHandler for Transfer {
    fn ready(&mut self, cx: &mut StreamCtx<'_>, readiness: Readiness) -> Flow {
        let before = self.stats;
        let moved = if readiness.is_readable() && matches!(self.direction, Direction::Recv { .. }) {
            self.receive(cx)
        } else if readiness.is_writable() && matches!(self.direction, Direction::Send { .. }) {
            self.send(cx)
        } else if readiness.is_error() || readiness.is_hangup() {
            // Local streams: the reader is told the end by a receive; a writer has
            // nowhere to write anymore.
            match self.direction {
                Direction::Recv { .. } => self.receive(cx),
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
                progress(self.stats);
            }
        }
        match moved {
            Ok(flow) => flow,
            Err(e) => Flow::Fail(Error::from_io(e)),
        }
    }

    fn closed(&mut self, end: StreamEnd) {
        let result = match end {
            StreamEnd::Finished => Ok(self.stats),
            StreamEnd::Failed(e) => Err(e),
            StreamEnd::Aborted => Err(Error::Aborted),
            StreamEnd::Removed(_) => Err(Error::Aborted),
        };
        match self.on_end.take() {
            Some(on_end) => on_end(result),
            None => {
                if let Err(e) = result {
                    log::warn!("transfer failed: {e}");
                }
            }
        }
    }
}

impl fmt::Debug for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfer")
            .field("interest", &self.interest())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
