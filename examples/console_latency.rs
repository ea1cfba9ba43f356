//! Console figures on testbed guests through one [`ConsoleMux`]: boot-to-banner
//! time per guest, and echo round-trip latency on one console and on all consoles
//! at once. A bench example: it prints a table, then one `RESULT key=value ...` line
//! for harnesses to parse. It measures; it asserts nothing.
//!
//! ```text
//! console_latency [--uri URI] [--guests 8] [--rounds 200] [--warmup 3]
//! ```
//!
//! Without `--uri` it boots the guests on libvirt's in-process QEMU driver in a
//! private root, as `console_mux` does (as root on a host without the
//! `libvirt-qemu` user, run it unprivileged, the way `scripts/main.sh` runs
//! `console_mux`). With `--uri` it boots them through that connection.
//!
//! 1. Boot: the guests one after the other, each with [`ConsoleMux::boot`] (create
//!    paused, attach the console, resume); timed from the `boot` call until the
//!    banner line has arrived.
//! 2. One console: `--rounds` sequential round trips (`echo r-NAME-K` until the line
//!    `r-NAME-K` comes back) on the first guest while the others idle.
//! 3. All consoles at once: every console runs its own sequence concurrently,
//!    sending its next line as soon as its previous reply arrived.
//!
//! Each round trip is timed from queueing the input ([`ConsoleMux::send`]) to
//! receiving the [`ConsoleEvent::Output`] that completes the reply, so it includes
//! the reactor's hops both ways. The first `--warmup` rounds of each console are
//! not counted. All guests are destroyed at the end, also after a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

#[path = "common/owned_dir.rs"]
mod owned_dir;

use clap::Parser;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use owned_dir::OwnedDir;
use virt::connect::Connect;
use virt_reactor::console::{ConsoleEvent, ConsoleMux, ConsoleOptions};
use virt_reactor::testbed::{self, GuestMode, Guests, Testbed, BANNER};
use virt_reactor::Reactor;

#[derive(Parser)]
#[command(about = "Console boot and echo latency on testbed guests")]
struct Args {
    /// Boot the guests through this connection (default: the in-process driver).
    #[arg(long)]
    uri: Option<String>,
    /// Guests to boot.
    #[arg(long, default_value_t = 8)]
    guests: usize,
    /// Counted round trips per console and phase.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Round trips per console and phase that are not counted.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Where the testbed kernel and initramfs are (testbed/build.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed"))]
    testbed: PathBuf,
}

type BoxError = Box<dyn std::error::Error>;

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("console_latency: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), BoxError> {
    if args.guests == 0 || args.rounds == 0 {
        return Err("--guests and --rounds must be at least 1".into());
    }
    let testbed = Testbed::open(&args.testbed)?;
    // Built here, and run on a thread of its own once the mux is made.
    let mut reactor = Reactor::register()?;
    let mut state = Loop::default();
    let root = match &args.uri {
        Some(_) => None,
        None => Some(OwnedDir::create(
            std::env::temp_dir().join(format!("console-latency-{}", std::process::id())),
        )?),
    };
    let uri = match (&args.uri, &root) {
        (Some(uri), _) => uri.clone(),
        (None, Some(root)) => testbed::embed_root(root.path())?,
        (None, None) => unreachable!("no uri means an embedded root"),
    };
    println!("driver: {uri}");
    let conn = connect(&mut reactor, &mut state, uri)?;
    let (mux, events) = ConsoleMux::new(&mut reactor, &conn, ConsoleOptions::default())?;
    let handle = reactor.handle();
    let loop_thread = thread::spawn(move || -> virt_reactor::Result<()> {
        reactor.run(&mut state)?;
        reactor
            .shutdown(Duration::from_secs(10), &mut state)
            .map(drop)
    });
    let guests = Guests::new();

    let result = measure(args, &testbed, &conn, &mux, events, &guests);

    guests.destroy_all();
    drop(guests);
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let detach = mux.clone();
    handle.execute(move |reactor, state| {
        detach.detach_all(reactor, state);
        let _ = done_tx.send(());
    })?;
    let _ = done.recv_timeout(Duration::from_secs(10));
    drop((mux, conn));
    handle.stop();
    let drained = loop_thread
        .join()
        .map_err(|_| "the reactor thread panicked")?;
    drop(root);
    result.and(drained.map_err(Into::into))
}

/// The reactor's state: the connection, once the worker that opens it is done.
#[derive(Default)]
struct Loop {
    connected: Option<virt_reactor::Result<Connect>>,
}

/// Opens `uri` off this thread while this thread runs the loop: with the
/// in-process driver, opening it waits on QEMU, whose monitor the loop serves.
fn connect(
    reactor: &mut Reactor<Loop>,
    state: &mut Loop,
    uri: String,
) -> Result<Connect, BoxError> {
    reactor.handle().spawn_blocking(
        move || virt_reactor::connect(&uri),
        |_, state: &mut Loop, connected| state.connected = Some(connected),
    )?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        reactor.run_once(Some(Duration::from_millis(100)), state)?;
        if let Some(connected) = state.connected.take() {
            return Ok(connected?);
        }
        if Instant::now() >= deadline {
            return Err(format!("no connection after {BOOT_TIMEOUT:?}").into());
        }
    }
}

fn measure(
    args: &Args,
    testbed: &Testbed,
    conn: &Connect,
    mux: &ConsoleMux<Loop>,
    events: Receiver<ConsoleEvent>,
    guests: &Guests,
) -> Result<(), BoxError> {
    let names: Vec<String> = (1..=args.guests).map(|i| format!("lat-{i}")).collect();
    let mut consoles = Consoles {
        events,
        output: HashMap::new(),
    };

    // 1. Boot, one guest at a time.
    let mut boots = Vec::new();
    for name in &names {
        guests.track(conn, name);
        let started = Instant::now();
        mux.boot(name, &testbed.guest_xml(name, GuestMode::Plain))?;
        let banner = format!("{BANNER} name={name}\r");
        consoles.wait(BOOT_TIMEOUT, |c| c.has(name, 0, &banner))?;
        boots.push(started.elapsed());
        println!(
            "boot-to-banner {name}: {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
    let boot = Stats::of(&boots);
    println!(
        "boot-to-banner, {} guests one after the other: median {:.2} s, max {:.2} s",
        names.len(),
        boot.median.as_secs_f64(),
        boot.max.as_secs_f64()
    );

    // 2. One console.
    let one = echo_phase(mux, &mut consoles, &names[..1], args, "a")?;
    let one = Stats::of(&one[0]);
    println!(
        "echo, 1 console, {} round trips: {}",
        args.rounds,
        one.millis()
    );

    // 3. Every console at once.
    let all = echo_phase(mux, &mut consoles, &names, args, "b")?;
    let flat: Vec<Duration> = all.iter().flatten().copied().collect();
    let every = Stats::of(&flat);
    println!(
        "echo, {} consoles at once, {} x {} round trips: {}",
        names.len(),
        names.len(),
        args.rounds,
        every.millis()
    );
    let medians: Vec<String> = all
        .iter()
        .zip(&names)
        .map(|(samples, name)| {
            format!(
                "{name} {:.2}",
                Stats::of(samples).median.as_secs_f64() * 1e3
            )
        })
        .collect();
    println!("  per-console medians (ms): {}", medians.join(", "));
    println!(
        "RESULT guests={} rounds={} boot_median_s={:.3} boot_max_s={:.3} \
         echo1_median_ms={:.3} echo1_p99_ms={:.3} echo{n}_median_ms={:.3} echo{n}_p99_ms={:.3}",
        names.len(),
        args.rounds,
        boot.median.as_secs_f64(),
        boot.max.as_secs_f64(),
        one.median.as_secs_f64() * 1e3,
        one.p99.as_secs_f64() * 1e3,
        every.median.as_secs_f64() * 1e3,
        every.p99.as_secs_f64() * 1e3,
        n = names.len(),
    );
    Ok(())
}

/// Round trips on `names`, all concurrently, each console sequentially; returns
/// the counted latencies per console.
fn echo_phase(
    mux: &ConsoleMux<Loop>,
    consoles: &mut Consoles,
    names: &[String],
    args: &Args,
    phase: &str,
) -> Result<Vec<Vec<Duration>>, BoxError> {
    struct Pending {
        round: usize,
        reply: String,
        mark: usize,
        sent: Instant,
    }
    let total = args.warmup + args.rounds;
    let send = |consoles: &Consoles, name: &str, round: usize| -> Result<Pending, BoxError> {
        let tag = format!("r-{name}-{phase}{round}");
        let pending = Pending {
            round,
            reply: format!("\n{tag}\r"),
            mark: consoles.len(name),
            sent: Instant::now(),
        };
        mux.send(name, format!("echo {tag}\n").as_bytes())?;
        Ok(pending)
    };
    let mut pending = Vec::new();
    for name in names {
        pending.push(Some(send(consoles, name, 0)?));
    }
    let mut samples = vec![Vec::with_capacity(args.rounds); names.len()];
    while pending.iter().any(Option::is_some) {
        let name = consoles.next(ECHO_TIMEOUT)?;
        let Some(i) = names.iter().position(|n| *n == name) else {
            continue;
        };
        let Some(p) = &pending[i] else { continue };
        if !consoles.has(&name, p.mark, &p.reply) {
            continue;
        }
        let elapsed = p.sent.elapsed();
        let round = p.round;
        if round >= args.warmup {
            samples[i].push(elapsed);
        }
        pending[i] = if round + 1 < total {
            Some(send(consoles, &name, round + 1)?)
        } else {
            None
        };
    }
    Ok(samples)
}

/// Output per console, from the mux's events.
struct Consoles {
    events: Receiver<ConsoleEvent>,
    output: HashMap<String, Vec<u8>>,
}

impl Consoles {
    /// Receives one event; returns the console it was about.
    fn next(&mut self, timeout: Duration) -> Result<String, BoxError> {
        match self.events.recv_timeout(timeout) {
            Ok(ConsoleEvent::Output { name, bytes }) => {
                self.output.entry(name.clone()).or_default().extend(bytes);
                Ok(name)
            }
            Ok(ConsoleEvent::Attached { name }) => Ok(name),
            Ok(ConsoleEvent::Ended { name, end }) => Err(format!("{name}: ended: {end}").into()),
            Ok(ConsoleEvent::AttachFailed { name, error }) => {
                Err(format!("{name}: cannot attach: {error}").into())
            }
            Ok(other) => Err(format!("unexpected event {other:?}").into()),
            Err(RecvTimeoutError::Timeout) => Err(format!("nothing for {timeout:?}").into()),
            Err(RecvTimeoutError::Disconnected) => Err("the mux is gone".into()),
        }
    }

    fn wait(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Consoles) -> bool,
    ) -> Result<(), BoxError> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("timed out after {timeout:?}").into());
            }
            self.next(left)?;
        }
        Ok(())
    }

    fn len(&self, name: &str) -> usize {
        self.output.get(name).map_or(0, Vec::len)
    }

    /// Whether `name` printed `needle` after byte `from`.
    fn has(&self, name: &str, from: usize, needle: &str) -> bool {
        let Some(out) = self.output.get(name) else {
            return false;
        };
        let hay = &out[from.min(out.len())..];
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

struct Stats {
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of(samples: &[Duration]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |q: f64| {
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1]
        };
        Stats {
            median: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: *sorted.last().expect("at least one sample"),
        }
    }

    fn millis(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.median),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}
