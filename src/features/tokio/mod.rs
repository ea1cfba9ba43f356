//! libvirt from a tokio runtime (feature `tokio`): the same event loop, driven by a
//! task, and streams that are `AsyncRead` and `AsyncWrite`.
//!
//! [`register`] installs the loop and returns a [`Handle`] (cheap to clone, `Send`)
//! and the [`Driver`], a future to spawn once: it waits on the loop's epoll fd with
//! `AsyncFd` and on the next libvirt timer, and dispatches after every wake-up.
//! libvirt's own fds stay level-triggered inside the loop; the driver clears the
//! edge-triggered `AsyncFd` readiness only once the loop has nothing left to
//! dispatch. libvirt's callbacks, and every handler of the reactor, run inside the
//! driver, one at a time. On a `current_thread` runtime that is one thread. On a
//! `multi_thread` runtime different workers may poll the driver over time, never two
//! at once; to keep libvirt on one thread there, run the driver on a thread with a
//! `current_thread` runtime of its own and use the [`Handle`] from any runtime.
//!
//! # Quick start
//!
//! ```no_run
//! use tokio::io::AsyncReadExt;
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> virt_reactor::Result<()> {
//!     let (handle, driver) = virt_reactor::tokio::register()?;
//!     let driver = tokio::spawn(driver.run());
//!     // Blocking calls (connect, lookups, creating domains) go to tokio's blocking pool.
//!     let conn = handle.blocking(|| virt_reactor::connect("test:///default")).await??;
//!     let domain = handle
//!         .blocking(move || conn.lookup_domain_by_name("test"))
//!         .await??;
//!     let mut console = handle.open_console(domain, Default::default()).await?;
//!     let mut buf = [0u8; 4096];
//!     let n = console.read(&mut buf).await?;
//!     println!("{}", String::from_utf8_lossy(&buf[..n]));
//!     drop(console); // an unfinished stream is aborted
//!     handle.stop();
//!     driver.await.expect("driver task")?;
//!     Ok(())
//! }
//! ```
//!
//! # Which calls block
//!
//! Opening a connection, lookups, creating or destroying a domain, opening a console
//! and attaching a volume to a stream wait for the daemon (or, with an in-process
//! driver such as `qemu:///embed`, for replies that come through this very loop):
//! run them with [`Handle::blocking`], on tokio's blocking pool. The stream calls do
//! not block: a read receives only what libvirt already holds (the stream is
//! NONBLOCK), and writes go through a buffer the driver drains to the connection's
//! sender thread.

mod stream;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

pub use stream::AsyncStream;
use stream::ReceiveBuffers;

use crate::event_loop::connect::{connect, is_remote};
use crate::features::console::{self, ConsoleOptions};
use crate::features::volume::{self, VolumeRange};
use crate::streams::reactor::{Reactor, ReactorHandle, SubscriptionId};
use crate::streams::stream::Stream;
use crate::streams::transfer::TransferStats;
use crate::sys::async_fd;
use crate::vocab::error::{Error, Result};
use crate::vocab::events::{CloseReason, LifecycleEvent};

/// How long [`Driver::run`] gives libvirt at the end to remove what it registered.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// Registers the loop with libvirt (once per process, before any connection) and
/// returns the handle and the driver to spawn.
///
/// # Errors
///
/// As [`Reactor::register`]; `Error::Io` when the loop's fd cannot be registered
/// with the runtime (call it inside one).
pub fn register() -> Result<(Handle, Driver)> {
    let reactor = Reactor::<()>::register()?;
    let fd = async_fd::register(reactor.poll_fd()?)?;
    let handle = Handle {
        reactor: reactor.handle(),
        buffers: Arc::default(),
    };
    Ok((handle, Driver { reactor, fd }))
}

/// The task that runs libvirt's loop: spawn [`run`](Self::run) once.
#[must_use = "the loop runs only while the driver's future is polled"]
pub struct Driver {
    reactor: Reactor<()>,
    fd: AsyncFd<OwnedFd>,
}

impl Driver {
    /// Runs the loop until [`Handle::stop`], then aborts the streams left and lets
    /// libvirt remove what it registered (close connections first), for a few
    /// seconds at most.
    ///
    /// # Errors
    ///
    /// A panic in a callback ([`Error::CallbackPanicked`], the loop stops then), a
    /// poll failure, or the drain's error.
    pub async fn run(mut self) -> Result<crate::DrainReport> {
        // One timer for the whole run, moved to each next deadline. A timer created
        // afresh each turn, after a turn that had none, makes tokio's time driver
        // wake its own thread (an eventfd write and a needless epoll_wait return):
        // once per turn, a third of the async path's syscalls in a download.
        let sleep = tokio::time::sleep(IDLE);
        tokio::pin!(sleep);
        let mut next = self.reactor.next_timeout();
        loop {
            // The readiness this turn's dispatch answers, taken before it (so a
            // wake-up that comes during the dispatch is not cleared with it).
            let guard = match next {
                Some(timeout) if timeout.is_zero() => {
                    Requeue::default().await;
                    None
                }
                Some(timeout) => {
                    let deadline = tokio::time::Instant::now() + timeout;
                    // libvirt's timers count in milliseconds: a deadline that moved
                    // by less is left as it is.
                    let current = sleep.deadline();
                    let moved = deadline.max(current) - deadline.min(current);
                    if sleep.is_elapsed() || moved > TIMER_SLACK {
                        sleep.as_mut().reset(deadline);
                    }
                    tokio::select! {
                        ready = self.fd.readable() => Some(ready?),
                        () = &mut sleep => None,
                    }
                }
                None => Some(self.fd.readable().await?),
            };
            // Readiness left set by an earlier turn that could not clear it (more
            // work was pending then): taken now, so that this dispatch, which may
            // take all there is, can clear it after. Left set, it would cost one
            // more dispatch that finds nothing, each time.
            let guard = match guard {
                Some(guard) => Some(guard),
                None => ready_now(&self.fd).await?,
            };
            self.reactor.dispatch(&mut ())?;
            if self.reactor.take_stop_request() {
                break;
            }
            next = self.reactor.next_timeout();
            // The epoll fd stays readable while the loop has work: clear the edge
            // only when the next dispatch may wait.
            if next != Some(Duration::ZERO) {
                if let Some(mut guard) = guard {
                    guard.clear_ready();
                }
            }
        }
        let Driver { mut reactor, fd } = self;
        drop(fd);
        // The shutdown runs iterations of its own until libvirt is done: on the
        // blocking pool, not on a runtime thread.
        tokio::task::spawn_blocking(move || reactor.shutdown(SHUTDOWN, &mut ()))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }
}

/// The epoll fd's readiness if tokio has seen it readable, without waiting.
async fn ready_now(
    fd: &AsyncFd<OwnedFd>,
) -> std::io::Result<Option<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>>> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match fd.poll_read_ready(cx) {
            std::task::Poll::Ready(ready) => ready.map(Some),
            std::task::Poll::Pending => Ok(None),
        })
    })
    .await
}

/// Where the driver's timer waits while libvirt has no timer: anywhere far.
const IDLE: Duration = Duration::from_secs(24 * 3600);
/// How far the driver's timer may be from libvirt's next deadline before it is moved
/// (a timer that fires early only costs a dispatch that finds nothing due).
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Goes to the back of the runtime's queue once: the tasks woken meanwhile (readers
/// and writers of the streams) run before the driver dispatches again. Unlike
/// `tokio::task::yield_now`, it does not make the runtime poll its I/O driver
/// before coming back (an `epoll_wait` each time); the dispatch polls the loop's
/// own fds anyway, and the runtime still polls its I/O driver every few dozen
/// tasks.
#[derive(Default)]
struct Requeue {
    queued: bool,
}

impl std::future::Future for Requeue {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.queued {
            return std::task::Poll::Ready(());
        }
        self.queued = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("reactor", &self.reactor)
            .finish_non_exhaustive()
    }
}

/// The async side of the loop: opens streams, runs blocking calls, subscribes to
/// events, stops the driver. Cheap to clone; `Send`.
#[derive(Clone, Debug)]
pub struct Handle {
    reactor: ReactorHandle<()>,
    buffers: Arc<ReceiveBuffers>,
}

impl Handle {
    /// Runs `work` on tokio's blocking pool: for libvirt calls that wait.
    ///
    /// # Errors
    ///
    /// `Error::Io` if the work panicked or the runtime is shutting down.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }

    /// Runs `f` with the reactor on the driver, and returns what it returned.
    ///
    /// # Errors
    ///
    /// [`Error::ReactorGone`] once the driver has ended.
    pub async fn with_reactor<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Reactor<()>) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.reactor.execute(move |reactor, ()| {
            let _ = tx.send(f(reactor));
        })?;
        rx.await.map_err(|_| Error::ReactorGone)
    }

    /// Hands `stream` (attached already, e.g. by a volume download or a console) to
    /// the driver as an [`AsyncStream`].
    ///
    /// # Errors
    ///
    /// libvirt's error if the stream's callback cannot be registered;
    /// [`Error::ReactorGone`].
    pub async fn stream(&self, stream: Stream) -> Result<AsyncStream> {
        let (handle, buffers) = (self.reactor.clone(), Arc::clone(&self.buffers));
        self.with_reactor(move |reactor| AsyncStream::insert(reactor, handle, buffers, stream))
            .await?
    }

    /// Opens `domain`'s console (on the blocking pool) as an [`AsyncStream`]; a
    /// remote console on a connection of its own, as [`console::ConsoleMux`] does.
    ///
    /// # Errors
    ///
    /// As [`console::open_stream`]; [`Error::ReactorGone`].
    pub async fn open_console(
        &self,
        domain: virt::domain::Domain,
        options: ConsoleOptions,
    ) -> Result<AsyncStream> {
        let stream = self
            .blocking(move || {
                // A remote console gets a connection of its own: the daemon stops
                // reading a client whose streams hold its request quota, so one
                // flooded console would stall every other one on a shared
                // connection (docs/architecture.md, "Never waiting on the network").
                let conn = domain.connect()?;
                if !is_remote(&conn) {
                    return console::open_stream(&domain, &options);
                }
                let own = connect(&conn.uri()?)?;
                let domain = own.lookup_domain_by_name(&domain.name()?)?;
                console::open_stream(&domain, &options)
            })
            .await??;
        self.stream(stream).await
    }

    /// Downloads `vol` into `path` (see [`volume::download`]), calling `progress`
    /// on the driver after each step; resolves with the totals once libvirt
    /// confirmed the transfer and the file is in place.
    ///
    /// Dropping the future does not stop the transfer: it runs to its end inside
    /// the driver (and a failed or aborted one leaves no file behind).
    ///
    /// # Errors
    ///
    /// As [`volume::download`], and the transfer's error.
    pub async fn download(
        &self,
        vol: virt::storage_vol::StorageVol,
        path: std::path::PathBuf,
        range: VolumeRange,
        progress: impl FnMut(TransferStats) + Send + 'static,
    ) -> Result<TransferStats> {
        self.transfer(Way::Download, vol, path, range, progress)
            .await
    }

    /// Uploads the file at `path` into `vol` (see [`volume::upload`]), as
    /// [`download`](Self::download).
    ///
    /// # Errors
    ///
    /// As [`volume::upload`], and the transfer's error.
    pub async fn upload(
        &self,
        vol: virt::storage_vol::StorageVol,
        path: std::path::PathBuf,
        range: VolumeRange,
        progress: impl FnMut(TransferStats) + Send + 'static,
    ) -> Result<TransferStats> {
        self.transfer(Way::Upload, vol, path, range, progress).await
    }

    /// Starts a volume transfer `way` inside the driver (its first calls to libvirt
    /// included, which the volume functions make) and waits for its end.
    async fn transfer(
        &self,
        way: Way,
        vol: virt::storage_vol::StorageVol,
        path: std::path::PathBuf,
        range: VolumeRange,
        mut progress: impl FnMut(TransferStats) + Send + 'static,
    ) -> Result<TransferStats> {
        let (end_tx, end) = oneshot::channel();
        let started = self
            .with_reactor(move |reactor| {
                let start = match way {
                    Way::Download => volume::download,
                    Way::Upload => volume::upload,
                };
                start(
                    reactor,
                    &vol,
                    &path,
                    range,
                    move |_: &mut (), stats| progress(stats),
                    move |_: &mut (), result| {
                        let _ = end_tx.send(result);
                    },
                )
            })
            .await?;
        started?;
        end.await.map_err(|_| Error::ReactorGone)?
    }

    /// Domain lifecycle events of every domain on `conn`, as a `futures` stream;
    /// dropping it unsubscribes. On a remote connection subscribing is a call to
    /// the daemon, made inside the driver.
    ///
    /// # Errors
    ///
    /// As [`Reactor::subscribe_lifecycle`]; [`Error::ReactorGone`].
    pub async fn lifecycle_events(
        &self,
        conn: &virt::connect::Connect,
    ) -> Result<Events<LifecycleEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = conn.clone();
        let id = self
            .with_reactor(move |reactor| {
                reactor.subscribe_lifecycle(&conn, move |(), event| {
                    let _ = tx.send(event.clone());
                })
            })
            .await??;
        Ok(Events::new(rx, id, self.reactor.clone()))
    }

    /// The closing of `conn` (socket error, daemon gone, keepalive timeout) as a
    /// `futures` stream of at most one reason; dropping it unsubscribes.
    ///
    /// # Errors
    ///
    /// As [`Reactor::subscribe_close`]; [`Error::ReactorGone`].
    pub async fn close_events(&self, conn: &virt::connect::Connect) -> Result<Events<CloseReason>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = conn.clone();
        let id = self
            .with_reactor(move |reactor| {
                reactor.subscribe_close(&conn, move |(), reason| {
                    let _ = tx.send(reason);
                })
            })
            .await??;
        Ok(Events::new(rx, id, self.reactor.clone()))
    }

    /// Makes [`Driver::run`] finish after its current iteration.
    pub fn stop(&self) {
        self.reactor.stop();
    }
}

/// Which way [`Handle::transfer`] moves a volume's bytes.
#[derive(Clone, Copy, Debug)]
enum Way {
    Download,
    Upload,
}

/// Events of a subscription, as a `futures_core::Stream`; unsubscribed when dropped.
#[derive(Debug)]
pub struct Events<T> {
    rx: mpsc::UnboundedReceiver<T>,
    id: SubscriptionId,
    reactor: ReactorHandle<()>,
}

impl<T> Events<T> {
    fn new(rx: mpsc::UnboundedReceiver<T>, id: SubscriptionId, reactor: ReactorHandle<()>) -> Self {
        Events { rx, id, reactor }
    }

    /// The next event; `None` once the subscription can bring no more.
    pub async fn next(&mut self) -> Option<T> {
        self.rx.recv().await
    }
}

impl<T> futures_core::Stream for Events<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

impl<T> Drop for Events<T> {
    fn drop(&mut self) {
        let id = self.id;
        // A close subscription that fired is gone already: nothing to say then.
        let _ = self.reactor.execute(move |reactor, ()| {
            let _ = reactor.unsubscribe(id);
        });
    }
}
