//! Prints domain lifecycle events as they arrive, delivered by virt-reactor's loop.
//!
//! With no arguments it opens libvirt's in-process test driver, drives a short
//! lifecycle itself (define, start, suspend, resume, destroy, undefine), and exits
//! once every event has arrived. With `--uri` it watches a real daemon until Ctrl-C,
//! through a supervised connection: when the daemon goes away (or freezes past
//! keepalive) it says so, reconnects with backoff, and the events flow again.
//!
//! ```text
//! cargo run --example events
//! cargo run --example events -- --uri qemu:///session
//! ```
//!
//! Either way it shuts down in the documented order: deregister, close the
//! connection, drain the loop, stop.

use std::fmt::Display;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use virt::connect::Connect;
use virt_reactor::supervisor::{ConnectionEvent, Supervisor, SupervisorOptions};
use virt_reactor::{
    DrainReport, LifecycleEvent, LifecycleKind, Reactor, ReactorHandle, SubscriptionId,
};

/// The scripted demo's domain, on `test:///default`.
const DEMO_DOMAIN: &str = "test-demo";
const DEMO_XML: &str = "<domain type='test'><name>test-demo</name>\
                        <memory unit='MiB'>16</memory><os><type>hvm</type></os></domain>";
/// The events the demo's script causes, in order.
const DEMO_EVENTS: [LifecycleKind; 6] = [
    LifecycleKind::Defined,
    LifecycleKind::Started,
    LifecycleKind::Suspended,
    LifecycleKind::Resumed,
    LifecycleKind::Stopped,
    LifecycleKind::Undefined,
];
/// How long the loop may take to release everything libvirt registered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Prints libvirt domain lifecycle events as they arrive.
#[derive(Debug, Parser)]
struct Args {
    /// Watch this connection until Ctrl-C, instead of the scripted demo on
    /// test:///default.
    #[arg(long, value_name = "URI")]
    uri: Option<String>,
    /// How long the demo waits for all its events, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    timeout: u64,
}

type Result<T> = std::result::Result<T, String>;

/// Turns an error into a one-line message saying what was being done.
trait Context<T> {
    fn context(self, doing: impl Display) -> Result<T>;
}

impl<T, E: Into<virt_reactor::Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, doing: impl Display) -> Result<T> {
        self.map_err(|e| format!("{doing}: {}", e.into()))
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    // Errors are printed once, below, rather than also by libvirt's default handler.
    virt::error::clear_error_callback();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("events: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut reactor = Reactor::register().context("registering the event loop")?;
    let handle = reactor.handle();
    let runner = thread::spawn(move || -> virt_reactor::Result<DrainReport> {
        reactor.run(&mut ())?;
        reactor.shutdown(DRAIN_TIMEOUT, &mut ())
    });

    // Both return only after deregistering and closing their connection.
    let watched = match &args.uri {
        None => demo(&handle, Duration::from_secs(args.timeout)),
        Some(uri) => watch(&handle, uri),
    };

    handle.stop();
    let drained = runner
        .join()
        .map_err(|_| "the event loop thread panicked".to_owned())?
        .context("running the event loop");
    watched?;
    let report = drained?;
    println!(
        "drain: {} iteration(s), removed {} watch(es) and {} timer(s), ran {} free callback(s)",
        report.iterations, report.handles_removed, report.timers_removed, report.frees_run
    );
    Ok(())
}

/// Runs `f` with the reactor on the loop thread, and returns what it returned.
fn on_loop<T: Send + 'static>(
    handle: &ReactorHandle<()>,
    f: impl FnOnce(&mut Reactor) -> virt_reactor::Result<T> + Send + 'static,
) -> virt_reactor::Result<T> {
    let (tx, rx) = mpsc::channel();
    handle.execute(move |reactor, _| {
        let _ = tx.send(f(reactor));
    })?;
    rx.recv().map_err(|_| virt_reactor::Error::ReactorGone)?
}

/// Subscribes `handler` to the lifecycle events of `conn`, on the loop thread.
fn subscribe(
    handle: &ReactorHandle<()>,
    conn: &Connect,
    handler: impl FnMut(&mut (), &LifecycleEvent) + Send + 'static,
) -> Result<SubscriptionId> {
    let conn = conn.clone();
    on_loop(handle, move |reactor| {
        reactor.subscribe_lifecycle(&conn, handler)
    })
    .context("subscribing to lifecycle events")
}

fn unsubscribe(handle: &ReactorHandle<()>, id: SubscriptionId) -> Result<()> {
    on_loop(handle, move |reactor| reactor.unsubscribe(id))
        .context("deregistering the subscription")
}

/// Drives a scripted lifecycle on the test driver and waits for all its events.
fn demo(handle: &ReactorHandle<()>, timeout: Duration) -> Result<()> {
    let conn = virt_reactor::connect("test:///default").context("opening test:///default")?;
    let (tx, rx) = mpsc::channel();
    let subscription = subscribe(handle, &conn, move |_, event| {
        println!("{event}");
        // The receiver is gone only once the demo has what it waited for.
        let _ = tx.send(event.clone());
    })?;

    let domain = conn
        .define_domain_xml(DEMO_XML)
        .context(format!("defining {DEMO_DOMAIN}"))?;
    domain.create().context(format!("starting {DEMO_DOMAIN}"))?;
    domain
        .suspend()
        .context(format!("suspending {DEMO_DOMAIN}"))?;
    domain.resume().context(format!("resuming {DEMO_DOMAIN}"))?;
    domain
        .destroy()
        .context(format!("destroying {DEMO_DOMAIN}"))?;
    domain
        .undefine()
        .context(format!("undefining {DEMO_DOMAIN}"))?;
    wait_for_demo_events(&rx, timeout)?;

    unsubscribe(handle, subscription)?;
    drop(domain);
    drop(conn);
    Ok(())
}

fn wait_for_demo_events(rx: &Receiver<LifecycleEvent>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for (seen, expected) in DEMO_EVENTS.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = rx.recv_timeout(left).map_err(|e| match e {
            RecvTimeoutError::Timeout => format!(
                "timed out after {timeout:?} waiting for the {expected} event of \
                 {DEMO_DOMAIN} ({seen} of {} arrived)",
                DEMO_EVENTS.len()
            ),
            RecvTimeoutError::Disconnected => "the subscription went away".to_owned(),
        })?;
        if event.domain != DEMO_DOMAIN || event.kind != *expected {
            return Err(format!(
                "expected the {expected} event of {DEMO_DOMAIN}, got \"{event}\""
            ));
        }
    }
    Ok(())
}

/// Prints the events of `uri` until Ctrl-C, reconnecting whenever the connection
/// is lost; ends with an error only if the first connection fails.
fn watch(handle: &ReactorHandle<()>, uri: &str) -> Result<()> {
    let (interrupt, interrupted) = crossbeam_channel::bounded(1);
    ctrlc::set_handler(move || {
        let _ = interrupt.try_send(());
    })
    .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;

    let options = SupervisorOptions::new(uri);
    let (supervisor, events) = on_loop(handle, move |reactor| {
        let (supervisor, events) = Supervisor::start(reactor, options)?;
        // Before the connection is announced: live by then.
        supervisor.subscribe_lifecycle(reactor, |_, event| println!("{event}"))?;
        Ok((supervisor, events))
    })
    .context("starting the connection")?;

    let outcome = loop {
        crossbeam_channel::select! {
            recv(interrupted) -> _ => {
                println!("interrupted, shutting down");
                break Ok(());
            }
            recv(events) -> event => match event {
                Ok(ConnectionEvent::Connected { .. }) => {
                    println!("watching {uri}; press Ctrl-C to stop");
                }
                Ok(ConnectionEvent::Lost { reason }) => {
                    println!("connection lost ({reason}); reconnecting");
                }
                Ok(ConnectionEvent::Reconnecting { attempt, delay, error }) => {
                    let failed = error.map(|e| format!(" ({e})")).unwrap_or_default();
                    println!("attempt {attempt} in {delay:.1?}{failed}");
                }
                Ok(ConnectionEvent::Reconnected { attempts, down, .. }) => {
                    println!("reconnected after {attempts} attempt(s), {down:.1?} down");
                }
                Ok(ConnectionEvent::GaveUp { error }) => break Err(format!("{uri}: {error}")),
                Ok(other) => println!("{other:?}"),
                Err(_) => break Err("the supervisor went away".to_owned()),
            },
        }
    };
    on_loop(handle, move |reactor| {
        supervisor.stop(reactor);
        Ok(())
    })
    .context("stopping the connection")?;
    outcome
}
