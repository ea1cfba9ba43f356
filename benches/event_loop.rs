//! Event-loop cost, ours against libvirt's default loop, side by side in one run.
//!
//! `cargo bench --bench event_loop` runs every scenario alternately with each loop,
//! one child process per run (libvirt's registration is per process), and prints the
//! median, min–max and the ratio ours/default of each figure.
//!
//! Scenarios:
//! - `busy`: one socketpair holding data; the callback reads one byte per call, so
//!   every dispatch is a level-triggered re-report. Figure: dispatches per second.
//! - `idle N`: one always-ready watch plus N idle watches (both ends of N/2 idle
//!   socketpairs). Figure: microseconds per loop iteration.
//! - `timers N`: the same with N idle disabled timers instead of idle watches.

use std::env;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virt_reactor::{EventLoop, Interest, Timer, Watch};

const RUNS: usize = 5;
const BUSY_BYTES: usize = 1 << 20;
const ITERATIONS: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Loop {
    Ours,
    Default,
}

impl Loop {
    fn name(self) -> &'static str {
        match self {
            Loop::Ours => "ours",
            Loop::Default => "default",
        }
    }

    fn parse(s: &str) -> Loop {
        match s {
            "ours" => Loop::Ours,
            "default" => Loop::Default,
            other => panic!("unknown loop {other:?}"),
        }
    }
}

/// Drives whichever loop this process registered.
enum Driver {
    Ours(Box<EventLoop>),
    Default,
}

impl Driver {
    fn register(kind: Loop) -> Driver {
        match kind {
            Loop::Ours => Driver::Ours(Box::new(
                EventLoop::register().expect("register virt-reactor"),
            )),
            Loop::Default => {
                virt::event::event_register_default_impl().expect("register default impl");
                Driver::Default
            }
        }
    }

    fn iterate(&mut self) {
        match self {
            Driver::Ours(ev) => ev.run_once(None).expect("run_once"),
            Driver::Default => virt::event::event_run_default_impl().expect("run default impl"),
        }
    }
}

fn main() {
    let args: Vec<String> = env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("--child") {
        let kind = Loop::parse(&args[1]);
        let scenario = args[2].as_str();
        let n: usize = args[3].parse().expect("count");
        let value = match scenario {
            "busy" => busy(kind),
            "idle" => per_iteration(kind, n, 0),
            "timers" => per_iteration(kind, 0, n),
            other => panic!("unknown scenario {other:?}"),
        };
        println!("{value}");
        return;
    }
    parent(&args);
}

fn parent(filter: &[String]) {
    let mut cases: Vec<(&str, usize, &str)> = vec![("busy", 0, "dispatches/s")];
    for n in [0, 1_000, 10_000] {
        cases.push(("idle", n, "µs/iteration"));
    }
    for n in [1_000, 10_000] {
        cases.push(("timers", n, "µs/iteration"));
    }
    println!(
        "| scenario | figure | ours median (min–max) | default median (min–max) | ours/default |"
    );
    println!("|---|---|---|---|---|");
    for (scenario, n, unit) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| f == scenario) {
            continue;
        }
        let mut ours = Vec::new();
        let mut default = Vec::new();
        for _ in 0..RUNS {
            ours.push(child(Loop::Ours, scenario, n));
            default.push(child(Loop::Default, scenario, n));
        }
        let (o, d) = (summary(&mut ours), summary(&mut default));
        let label = if n == 0 {
            scenario.to_owned()
        } else {
            format!("{scenario} {n}")
        };
        println!(
            "| {label} | {unit} | {} ({}–{}) | {} ({}–{}) | {} |",
            num(o.0),
            num(o.1),
            num(o.2),
            num(d.0),
            num(d.1),
            num(d.2),
            num(o.0 / d.0)
        );
    }
}

fn child(kind: Loop, scenario: &str, n: usize) -> f64 {
    let out = Command::new(env::current_exe().expect("own path"))
        .args(["--child", kind.name(), scenario, &n.to_string()])
        .output()
        .expect("spawn bench child");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("child prints a number")
}

/// Three significant digits, whatever the magnitude.
fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.decimals$}")
    }
}

/// (median, min, max)
fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// Dispatches per second: one byte read per level-triggered callback.
fn busy(kind: Loop) -> f64 {
    let mut driver = Driver::register(kind);
    let (mut writer, reader) = UnixStream::pair().expect("socketpair");
    reader.set_nonblocking(true).expect("nonblocking");
    writer.set_nonblocking(true).expect("nonblocking");
    let reads = Arc::new(AtomicU64::new(0));
    let counter = reads.clone();
    let fd = reader.as_raw_fd();
    let _watch = Watch::add(fd, Interest::READABLE, move |_, _, _| {
        let mut byte = [0u8; 1];
        if (&reader).read(&mut byte).unwrap_or(0) == 1 {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
    .expect("watch");
    let mut written = 0;
    let chunk = vec![0u8; 64 * 1024];
    let start = Instant::now();
    while reads.load(Ordering::Relaxed) < BUSY_BYTES as u64 {
        if written < BUSY_BYTES {
            written += writer
                .write(&chunk[..(BUSY_BYTES - written).min(chunk.len())])
                .unwrap_or(0);
        }
        driver.iterate();
    }
    BUSY_BYTES as f64 / start.elapsed().as_secs_f64()
}

/// Microseconds per iteration with one always-ready watch and many idle registrations.
fn per_iteration(kind: Loop, idle_watches: usize, idle_timers: usize) -> f64 {
    let mut driver = Driver::register(kind);
    let mut keep = Vec::new();
    let mut watches = Vec::new();
    for _ in 0..idle_watches / 2 {
        let (a, b) = UnixStream::pair().expect("socketpair (raise `ulimit -n`?)");
        for end in [&a, &b] {
            watches.push(
                Watch::add(end.as_raw_fd(), Interest::READABLE, |_, _, _| {}).expect("idle watch"),
            );
        }
        keep.push((a, b));
    }
    let timers: Vec<Timer> = (0..idle_timers)
        .map(|_| Timer::add(None, |_| {}).expect("idle timer"))
        .collect();
    // Always ready: holds a byte nobody reads.
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    tx.write_all(b"x").expect("write");
    let ticks = Arc::new(AtomicU64::new(0));
    let counter = ticks.clone();
    let _active = Watch::add(rx.as_raw_fd(), Interest::READABLE, move |_, _, _| {
        counter.fetch_add(1, Ordering::Relaxed);
    })
    .expect("active watch");
    for _ in 0..1_000 {
        driver.iterate(); // warm up
    }
    let start = Instant::now();
    for _ in 0..ITERATIONS {
        driver.iterate();
    }
    let elapsed = start.elapsed();
    assert!(
        ticks.load(Ordering::Relaxed) >= ITERATIONS,
        "the ready watch fired every iteration"
    );
    drop((timers, watches));
    elapsed.as_secs_f64() * 1e6 / ITERATIONS as f64
}
