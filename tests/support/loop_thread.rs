//! A reactor running on a thread of its own, for tests that call libvirt from the
//! test thread: it runs closures on the loop thread, can be paused and resumed, and
//! shuts down (which drains it) at the end.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use virt::connect::Connect;
use virt_reactor::{
    CloseReason, DrainReport, LifecycleEvent, Reactor, ReactorHandle, SubscriptionId,
};

/// How long the loop may take to release everything libvirt registered.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A lifecycle event with the thread that delivered it.
pub type Delivered = (LifecycleEvent, ThreadId);

/// The reactor, running on a thread of its own until [`finish`](Self::finish).
pub struct LoopThread {
    handle: ReactorHandle<()>,
    resume: Sender<()>,
    paused: Receiver<()>,
    thread: JoinHandle<virt_reactor::Result<DrainReport>>,
}

impl LoopThread {
    /// Registers the reactor (once per process) and runs it on a new thread.
    pub fn start() -> LoopThread {
        let mut reactor = Reactor::register().expect("register the event loop");
        let handle = reactor.handle();
        let (resume, resumed) = mpsc::channel();
        let (paused_tx, paused) = mpsc::channel();
        let thread = thread::spawn(move || {
            loop {
                reactor.run(&mut ())?;
                let _ = paused_tx.send(());
                if resumed.recv().is_err() {
                    break; // finishing
                }
            }
            reactor.shutdown(DRAIN_TIMEOUT, &mut ())
        });
        LoopThread {
            handle,
            resume,
            paused,
            thread,
        }
    }

    /// The loop thread.
    pub fn id(&self) -> ThreadId {
        self.thread.thread().id()
    }

    /// Runs `f` with the reactor on the loop thread, and returns what it returned.
    /// Waits for as long as the loop is paused.
    pub fn on_loop<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reactor) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        self.handle
            .execute(move |reactor, _| {
                let _ = tx.send(f(reactor));
            })
            .expect("the reactor is there");
        rx.recv().expect("the loop ran the closure")
    }

    /// Subscribes `handler` to the lifecycle events of `conn`.
    pub fn subscribe(
        &self,
        conn: &Connect,
        mut handler: impl FnMut(&LifecycleEvent) + Send + 'static,
    ) -> SubscriptionId {
        let conn = conn.clone();
        self.on_loop(move |reactor| {
            reactor.subscribe_lifecycle(&conn, move |_, event: &LifecycleEvent| handler(event))
        })
        .expect("subscribe to lifecycle events")
    }

    /// Subscribes to the lifecycle events of `conn`: each arrives on the receiver
    /// with the thread that delivered it.
    pub fn deliveries(&self, conn: &Connect) -> (SubscriptionId, Receiver<Delivered>) {
        let (tx, rx) = mpsc::channel();
        let id = self.subscribe(conn, move |event| {
            // The receiver may be gone when a test has seen what it needs.
            let _ = tx.send((event.clone(), thread::current().id()));
        });
        (id, rx)
    }

    /// Subscribes to the closing of `conn`: the reason arrives on the receiver.
    pub fn closes(&self, conn: &Connect) -> (SubscriptionId, Receiver<CloseReason>) {
        let (tx, rx) = mpsc::channel();
        let conn = conn.clone();
        let id = self
            .on_loop(move |reactor| {
                reactor.subscribe_close(&conn, move |_, reason| {
                    let _ = tx.send(reason);
                })
            })
            .expect("subscribe to the connection's closing");
        (id, rx)
    }

    /// Ends a subscription: its handler is dropped by the time this returns.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.on_loop(move |reactor| reactor.unsubscribe(id))
            .expect("deregister the subscription");
    }

    /// Returns once the loop thread has stopped running the loop.
    pub fn pause(&self) {
        self.handle.stop();
        self.paused
            .recv_timeout(Duration::from_secs(5))
            .expect("the loop stops when asked");
    }

    /// Runs the loop again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.resume.send(()).expect("the loop thread is waiting");
    }

    /// Stops the loop and shuts it down (drains it); call after closing every
    /// connection.
    pub fn finish(self) -> DrainReport {
        self.handle.stop();
        drop(self.resume);
        self.thread
            .join()
            .expect("loop thread panicked")
            .expect("the loop ran and drained cleanly")
    }
}
