//! Scenario 8: console echo at scale (1, 24, 48 guests), both loops, and the
//! loop's own delay from readiness to handler, told apart from the guests' CPU.
//!
//! A child is scenario 4's (`consoles::latency`) with `probe=1`: every round sends
//! one `echo mN` to every console and waits for all replies. Beside it, while the
//! rounds are timed:
//!
//! * **the loop probe**: a socket pair's end watched on the loop under test with
//!   [`virt_reactor::Watch`] (`virEventAddHandle`, so the same on both loops). A
//!   thread of its own writes it at random moments (2–6 ms apart, the next write
//!   only once the last was handled) and notes when; the handler takes the time
//!   since. That is the OS waking the loop thread plus whatever the loop dispatches
//!   before it.
//! * **the floor probe**: the same, read by a bare thread that only polls its
//!   socket (epoll through mio) (no libvirt): what the machine's scheduler alone costs at this load.
//! * **where the CPU goes**: the child's CPU, the run's QEMU processes', the
//!   daemon's and the machine's busy share over the timed rounds; and the loop
//!   thread's and floor thread's runqueue wait per wake-up (`/proc/…/schedstat`:
//!   time runnable but not running, over the times it was put on a CPU).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use virt_reactor::{Interest, Watch};

use crate::floods::qemu_pids;
use crate::report::{figure, Figure, Results};
use crate::setup::Env;
use crate::sys::{cpu_time, Usage};
use crate::{run_case, run_child, wanted, Case, Figures, Loop, Opts};

pub(crate) const SCENARIO: &str = "Scenario 8: consoles at scale";
/// Untimed passes until every console answers, booting lost guests again between.
const WARM_ATTEMPTS: usize = 3;

const FIGURES: &[Figure] = &[
    figure("p50_ms", "echo median ms"),
    figure("p99_ms", "echo p99 ms"),
    figure("probe_p50_us", "loop delay, readiness → handler, median µs"),
    figure("probe_p99_us", "loop delay p99 µs"),
    figure("probe_max_us", "loop delay max µs"),
    figure("floor_p50_us", "bare-thread wake-up (floor) median µs"),
    figure("floor_p99_us", "floor p99 µs"),
    figure("floor_max_us", "floor max µs"),
    figure("loop_runq_us", "loop thread runqueue wait per wake-up µs"),
    figure("floor_runq_us", "floor thread runqueue wait per wake-up µs"),
    figure("client_cpu_pct", "client CPU %"),
    figure("qemu_cpu_pct", "QEMU CPU % (the run's guests)"),
    figure("daemon_cpu_pct", "libvirtd CPU %"),
    figure("machine_busy_pct", "machine busy % (all CPUs)"),
    figure("probes", "probe samples"),
    figure("samples", "echoes timed"),
    figure("lost", "echoes lost (5 s)"),
];

pub(crate) fn scenario8(opts: &Opts, env: &mut Env, results: &mut Results) {
    let counts: &[usize] = if opts.quick { &[1, 3] } else { &[1, 24, 48] };
    // Rounds for a few seconds each (a round takes about 2 ms per console here),
    // so that even one console gives the probe hundreds of samples.
    let rounds = |n: usize| if opts.quick { 30 } else { (2400 / n).max(100) };
    for &n in counts {
        let label = format!("N={n}");
        if !wanted(&label) {
            continue;
        }
        // Booted up to each count in turn, and one untimed child waits until every
        // console answers: no timed run shares the CPUs with a boot.
        let guests = env.boot_guests(&opts.testbed, n)[..n].to_vec();
        let args = |samples: usize| {
            vec![
                format!("uri={}", env.uri),
                format!("guests={}", guests.join(",")),
                format!("samples={samples}"),
                "upload=0".to_owned(),
                "probe=1".to_owned(),
                format!("daemon={}", crate::DAEMON_PID.get().copied().unwrap_or(0)),
            ]
        };
        // A guest that died booting is booted again.
        let mut answered = Err(String::new());
        for _ in 0..WARM_ATTEMPTS {
            answered = run_child(Loop::Ours, "console", &args(1));
            if answered.is_ok() {
                break;
            }
            env.reboot_missing(&opts.testbed);
        }
        if let Err(e) = answered {
            eprintln!("compare: {SCENARIO} N={n}: the guests never answered: {e}");
            results.note(format!(
                "**Failed:** {SCENARIO}, N={n}: the guests never answered"
            ));
            continue;
        }
        run_case(
            Case::new(
                SCENARIO,
                label,
                "console",
                args(rounds(n)),
                FIGURES.to_vec(),
                opts.runs,
            ),
            results,
        );
    }
    results.note(format!(
        "Scenario 8: echo rounds (one `echo mN` to every console, waiting for all replies; \
         {} rounds at N=1, {} at N=24, {} at N=48) on N testbed guests (TCG, plain read/eval console), one child per \
         run and loop. The loop probe is a socket watched with `Watch::add` on the loop \
         under test, written 2–6 ms apart at random by a thread of its own; the floor \
         probe is the same read by a bare thread that only polls (epoll). CPU \
         shares are % of one CPU over the timed rounds, the machine's of all CPUs.",
        rounds(1),
        rounds(24),
        rounds(48)
    ));
}

/// Nanoseconds on a clock shared by a probe's writer and its reader.
fn since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// A socket pair written at random moments by a thread of its own; whoever reads
/// it records how long after the write it got to it.
struct Probe {
    tx: UnixStream,
    rx: UnixStream,
    base: Instant,
    /// When the unread write was made (ns since `base`); 0: none pending.
    written: AtomicU64,
    /// Recording (the timed rounds run).
    armed: AtomicBool,
    stop: AtomicBool,
    delays_us: Mutex<Vec<f64>>,
}

impl Probe {
    fn new() -> Arc<Probe> {
        let (tx, rx) = UnixStream::pair().expect("a socket pair");
        rx.set_nonblocking(true).expect("non-blocking");
        Arc::new(Probe {
            tx,
            rx,
            base: Instant::now(),
            written: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            delays_us: Mutex::new(Vec::new()),
        })
    }

    /// The writer: until stopped, every 2–6 ms (and only once the last write was
    /// read), notes the time and writes.
    fn start_writer(self: &Arc<Probe>) -> JoinHandle<()> {
        let probe = Arc::clone(self);
        thread::spawn(move || {
            let mut rng = fastrand::Rng::new();
            while !probe.stop.load(Ordering::Acquire) {
                thread::sleep(Duration::from_micros(rng.u64(2000..6000)));
                if probe.written.load(Ordering::Acquire) != 0 {
                    continue;
                }
                probe
                    .written
                    .store(since(probe.base).max(1), Ordering::Release);
                (&probe.tx).write_all(b"p").expect("write the probe");
            }
        })
    }

    /// On readiness: empties the socket and records the delay since the write.
    fn on_ready(&self) {
        let now = since(self.base);
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
        let written = self.written.swap(0, Ordering::AcqRel);
        if written != 0 && self.armed.load(Ordering::Acquire) {
            let delay_us = now.saturating_sub(written) as f64 / 1e3;
            self.delays_us.lock().expect("delays").push(delay_us);
        }
    }

    /// (median, p99, max) µs and the count, of what was recorded.
    fn figures(&self) -> ((f64, f64, f64), usize) {
        let mut v = self.delays_us.lock().expect("delays").clone();
        v.sort_by(f64::total_cmp);
        (percentiles(&v), v.len())
    }
}

/// (median, p99, max) of sorted values; NaN for none.
fn percentiles(sorted: &[f64]) -> (f64, f64, f64) {
    if sorted.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let at =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    (at(0.5), at(0.99), sorted[sorted.len() - 1])
}

/// A thread's (runqueue wait ns, times run) from `/proc/self/task/TID/schedstat`.
fn schedstat(tid: i32) -> (u64, u64) {
    task_schedstat(&format!("/proc/self/task/{tid}"))
}

/// A task's (runqueue wait ns, times run), from `TASK/schedstat` (`TASK` is
/// `/proc/PID/task/TID`).
pub(crate) fn task_schedstat(task: &str) -> (u64, u64) {
    let text = fs::read_to_string(format!("{task}/schedstat")).unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

/// The calling thread's id (`/proc/thread-self` is `PID/task/TID`).
fn gettid() -> i32 {
    fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
pub(crate) fn machine_jiffies() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Runqueue wait per run in µs, between two (wait ns, runs) readings.
pub(crate) fn runq_us(after: (u64, u64), before: (u64, u64)) -> f64 {
    after.0.saturating_sub(before.0) as f64 / 1e3 / after.1.saturating_sub(before.1).max(1) as f64
}

pub(crate) fn per_cent(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64 * 100.0
}

/// What is read at the start and end of the timed rounds.
struct Snapshot {
    at: Instant,
    client: Duration,
    qemu: Duration,
    daemon: Duration,
    machine: (u64, u64),
    loop_sched: (u64, u64),
    floor_sched: (u64, u64),
}

/// Scenario 8's instruments in a console child: both probes, and the CPU shares.
pub(crate) struct Scale {
    probe: Arc<Probe>,
    floor: Arc<Probe>,
    threads: Vec<JoinHandle<()>>,
    /// Keeps the loop probe registered.
    _watch: Watch,
    loop_tid: i32,
    floor_tid: Arc<AtomicU64>,
    qemu: Vec<u32>,
    daemon: Option<u32>,
    start: Mutex<Option<Snapshot>>,
    figures: Mutex<Figures>,
}

impl Scale {
    /// On the loop thread, after the loop was registered: the loop probe's watch,
    /// both writers and the floor thread.
    pub(crate) fn start(guests: &[String], daemon: Option<u32>) -> Scale {
        let probe = Probe::new();
        let watch = {
            let probe = Arc::clone(&probe);
            Watch::add(probe.rx.as_raw_fd(), Interest::READABLE, move |_, _, _| {
                probe.on_ready();
            })
            .expect("watch the probe")
        };
        let floor = Probe::new();
        let floor_tid = Arc::new(AtomicU64::new(0));
        let floor_thread = {
            let (floor, tid) = (Arc::clone(&floor), Arc::clone(&floor_tid));
            thread::spawn(move || {
                tid.store(gettid() as u64, Ordering::Release);
                let mut poll = mio::Poll::new().expect("epoll");
                let fd = floor.rx.as_raw_fd();
                poll.registry()
                    .register(&mut SourceFd(&fd), mio::Token(0), mio::Interest::READABLE)
                    .expect("register the floor probe");
                let mut events = mio::Events::with_capacity(4);
                while !floor.stop.load(Ordering::Acquire) {
                    // A 100 ms timeout sees `stop`.
                    let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
                    if !events.is_empty() {
                        floor.on_ready();
                    }
                }
            })
        };
        Scale {
            threads: vec![probe.start_writer(), floor.start_writer(), floor_thread],
            probe,
            floor,
            _watch: watch,
            loop_tid: gettid(),
            floor_tid,
            qemu: qemu_pids(guests),
            daemon,
            start: Mutex::new(None),
            figures: Mutex::new(Vec::new()),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            client: Usage::now().cpu,
            qemu: cpu_time(&self.qemu),
            daemon: cpu_time(self.daemon.as_slice()),
            machine: machine_jiffies(),
            loop_sched: schedstat(self.loop_tid),
            floor_sched: schedstat(self.floor_tid.load(Ordering::Acquire) as i32),
        }
    }

    /// The timed rounds begin: record from here.
    pub(crate) fn arm(&self) {
        *self.start.lock().expect("start") = Some(self.snapshot());
        self.probe.armed.store(true, Ordering::Release);
        self.floor.armed.store(true, Ordering::Release);
    }

    /// The timed rounds are over: the figures of the window since `arm`.
    pub(crate) fn disarm(&self) {
        self.probe.armed.store(false, Ordering::Release);
        self.floor.armed.store(false, Ordering::Release);
        let end = self.snapshot();
        let Some(start) = self.start.lock().expect("start").take() else {
            return;
        };
        let wall = (end.at - start.at).as_secs_f64();
        let pct = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() / wall * 100.0;
        let ((p50, p99, max), probes) = self.probe.figures();
        let ((f50, f99, fmax), _) = self.floor.figures();
        let (busy, total) = (
            end.machine.0.saturating_sub(start.machine.0),
            end.machine.1.saturating_sub(start.machine.1),
        );
        *self.figures.lock().expect("figures") = vec![
            ("probe_p50_us", p50),
            ("probe_p99_us", p99),
            ("probe_max_us", max),
            ("floor_p50_us", f50),
            ("floor_p99_us", f99),
            ("floor_max_us", fmax),
            ("loop_runq_us", runq_us(end.loop_sched, start.loop_sched)),
            ("floor_runq_us", runq_us(end.floor_sched, start.floor_sched)),
            ("client_cpu_pct", pct(end.client, start.client)),
            ("qemu_cpu_pct", pct(end.qemu, start.qemu)),
            ("daemon_cpu_pct", pct(end.daemon, start.daemon)),
            ("machine_busy_pct", per_cent(busy, total)),
            ("probes", probes as f64),
        ];
    }

    /// Stops the probes' threads; the figures of the timed window.
    pub(crate) fn finish(mut self) -> Figures {
        for probe in [&self.probe, &self.floor] {
            probe.stop.store(true, Ordering::Release);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.figures.lock().expect("figures"))
    }
}
