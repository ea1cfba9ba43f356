//! Our reactor against libvirt's default event loop, scenario by scenario, in one
//! invocation.
//!
//! ```text
//! cargo bench --bench compare -- [--runs 5] [--only s1,s2,…,s9] [--quick]
//!                                [--out target/bench] [--svg docs/benchmarks-s2.svg]
//!                                [--callgrind] [--guests 3] [--scratch DIR]
//!                                [--filter CASE] [--tokio-io buf|copy]
//!                                [--service-guests 8,24] [--consoled PATH]
//!                                [--instructions RUNS] [--perf-stat]
//! ```
//!
//! The parent process starts a private unprivileged libvirtd (as `tests/support`
//! does), makes a storage pool with its volumes on /dev/shm, boots the testbed
//! guests, and then runs every case as one child process per run (libvirt's event
//! registration is per process), alternating ours and default, on the same daemon
//! and data. Children are this binary again with `--child`: each registers one loop
//! (`Reactor::register` or `Reactor::register_default_loop`), drives the same reactor and
//! transfer code on it, and prints its figures. The parent prints, per figure, the
//! median and min–max of the runs of each loop and the ratio ours/default, checks
//! the targets, and writes `results.md`, `raw.tsv` and the scenario 2 plot.
//!
//! Cases that set `Case::tokio` also run a third kind of child, `loop=tokio`: the
//! async path (`virt_reactor::tokio`, its driver on a current_thread runtime, the
//! bytes through `AsyncStream`s; module `asyncpath`), rotated with the other two, and
//! the report sets it against ours (the mio path it is built on) in a table of its
//! own.
//!
//! Scenarios: 1 volume download/upload throughput and client CPU (`streams`),
//! 2 per-iteration cost against idle watches and timers (`loops`), 3 a download
//! among idle streams (`streams`), 4 console echo latency (`consoles`), 5 memory
//! (`memory`), 6 the console service against conserver with `virsh console` per
//! guest (`service`: no children; the parent runs both services and measures them
//! from outside), 7 console echo latency with the consoles spread over 3 hosts
//! (network namespaces, a libvirtd on TCP each) against as many on one host
//! (`multihost`; no children of the default loop), 8 console echo at 1, 24 and 48
//! guests with the loop's own delay measured by a probe (`scale`), 9 console floods
//! through the console service beside a quiet console (`floods`; no children). `docs/benchmarks.md` has the
//! figures and the reasoning.

mod asyncpath;
mod consoles;
#[allow(dead_code, clippy::all, missing_docs, missing_debug_implementations)]
#[path = "../../tests/support/daemon.rs"]
mod daemon;
mod data;
mod floods;
#[path = "../../tests/support/hosts.rs"]
mod hosts;
mod loops;
mod memory;
mod multihost;
mod programs;
mod report;
mod scale;
mod service;
mod setup;
mod streams;
mod sys;

use std::collections::HashMap;
use std::env;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use virt::connect::Connect;
use virt_reactor::Reactor;

use report::{Figure, Results};
use setup::Env;

#[global_allocator]
static ALLOC: sys::Counting = sys::Counting;

const MIB: u64 = 1 << 20;
/// The longest any one child may run.
pub(crate) const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Which loop a child runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loop {
    Ours,
    Default,
    /// Ours, driven from tokio (`virt_reactor::tokio`): the async path.
    Tokio,
}

impl Loop {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Loop::Ours => "ours",
            Loop::Default => "default",
            Loop::Tokio => "tokio",
        }
    }

    fn parse(s: &str) -> Loop {
        match s {
            "ours" => Loop::Ours,
            "default" => Loop::Default,
            "tokio" => Loop::Tokio,
            other => panic!("unknown loop {other:?}"),
        }
    }

    /// The reactor on this loop, with handlers that share the state `S`.
    pub(crate) fn reactor<S>(self) -> Reactor<S> {
        match self {
            Loop::Ours => Reactor::register().expect("register virt-reactor's loop"),
            Loop::Default => Reactor::register_default_loop().expect("register the default loop"),
            Loop::Tokio => unreachable!("tokio children run the asyncpath module"),
        }
    }

    /// A connection, opened after registration.
    pub(crate) fn connect(self, uri: &str) -> Connect {
        match self {
            Loop::Ours | Loop::Tokio => virt_reactor::connect(uri).expect("connect"),
            Loop::Default => Connect::open(Some(uri)).expect("connect"),
        }
    }
}

/// What a child was asked to do: `key=value` arguments.
pub(crate) struct Params {
    pub(crate) kind: Loop,
    map: HashMap<String, String>,
}

impl Params {
    pub(crate) fn str(&self, key: &str) -> &str {
        self.map
            .get(key)
            .unwrap_or_else(|| panic!("child argument {key}= missing"))
    }

    pub(crate) fn num<T: std::str::FromStr>(&self, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.str(key).parse().expect("a number")
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }
}

/// Figures a child reports: `name value` lines after a `FIGURES` marker.
pub(crate) type Figures = Vec<(&'static str, f64)>;

#[derive(Parser)]
#[command(about = "virt-reactor against libvirt's default event loop")]
pub(crate) struct Opts {
    /// Runs per case and loop (the median of these is reported).
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
    /// Runs for the 64 × 64 MiB transfer cases (the longest).
    #[arg(long)]
    pub(crate) big_runs: Option<usize>,
    /// Scenarios to run, e.g. `s1,s2` (default: all).
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Small sizes and one run: a smoke test of the harness.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Where results.md and raw.tsv go.
    #[arg(long, default_value = "target/bench")]
    pub(crate) out: PathBuf,
    /// Write the scenario 2 plot (SVG) here.
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
    /// Also count instructions per iteration (scenario 2) under callgrind.
    #[arg(long)]
    pub(crate) callgrind: bool,
    /// Testbed guests for scenario 4.
    #[arg(long, default_value_t = 3)]
    pub(crate) guests: usize,
    /// Where the testbed kernel and initramfs are (testbed/build.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.testbed"))]
    pub(crate) testbed: PathBuf,
    /// A directory on a tmpfs for the storage pool (default: a new one in /dev/shm).
    #[arg(long)]
    pub(crate) scratch: Option<PathBuf>,
    /// How the async path's transfers move their bytes: `buf` (in place: downloads
    /// read with `AsyncBufRead`, uploads write with `AsyncStream::write_owned`) or
    /// `copy` (`AsyncRead::read` into a buffer of the child's, `AsyncWrite::write_all`
    /// from one).
    #[arg(long, default_value = "buf", value_parser = ["buf", "copy"])]
    pub(crate) tokio_io: String,
    /// Also count the client's instructions per GiB under callgrind, this many runs
    /// per loop, interleaved with the timed runs: scenario 1's cases that run the
    /// async path, ours and tokio (a run is a small and a large transfer; see
    /// `Case::instructions`). Needs valgrind. 0: off.
    #[arg(long, default_value_t = 0)]
    pub(crate) instructions: usize,
    /// Run scenario 1 and 3's children under `perf stat`, counting their measured
    /// part only: syscalls, context switches, page faults, task clock, and
    /// instructions and cycles where the CPU's counters are visible.
    #[arg(long)]
    pub(crate) perf_stat: bool,
    /// Only cases whose label contains this (e.g. `upload N=1`, which also takes
    /// `upload N=16`); a trailing `$` anchors it at the label's end (`N=1$`).
    #[arg(long)]
    pub(crate) filter: Option<String>,
    /// Guest counts for scenario 6 (the console service against conserver), in
    /// increasing order: the guests are booted up to each count in turn.
    #[arg(long, value_delimiter = ',', default_value = "8,24")]
    pub(crate) service_guests: Vec<usize>,
    /// The `virt-consoled` binary scenario 6 runs (scripts/bench.sh builds it).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/virt-consoled"))]
    pub(crate) consoled: PathBuf,
    /// Scenario 6: conserver's viewers acknowledge at once (TCP_QUICKACK after every
    /// read), which tells conserver's own Nagle waits (it never sets TCP_NODELAY)
    /// from the rest; `console` does not do that.
    #[arg(long)]
    pub(crate) quickack: bool,
    /// Scenario 7: daemon restarts under a supervised connection.
    #[arg(long, default_value_t = 10)]
    pub(crate) reconnects: usize,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    pub(crate) bench: bool,
}

impl Opts {
    pub(crate) fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s.eq_ignore_ascii_case(scenario))
    }
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        child(&args[1..]);
        return;
    }
    env_logger::init();
    virt::error::clear_error_callback();
    sys::raise_fd_limit();
    let opts = Opts::parse();
    parent(&opts);
}

fn child(args: &[String]) {
    env_logger::init();
    virt::error::clear_error_callback();
    sys::raise_fd_limit();
    let scenario = args[0].as_str();
    let mut map = HashMap::new();
    for arg in &args[1..] {
        let (k, v) = arg.split_once('=').expect("key=value");
        map.insert(k.to_owned(), v.to_owned());
    }
    let kind = Loop::parse(map.get("loop").expect("loop="));
    let params = Params { kind, map };
    let figures = match scenario {
        "transfer" if kind == Loop::Tokio => asyncpath::transfer(&params),
        "console" if kind == Loop::Tokio => asyncpath::latency(&params),
        "transfer" => streams::transfer(&params),
        "pingpong" => loops::pingpong(&params),
        "busy" => loops::busy(&params),
        "console" => consoles::latency(&params),
        "memory" => memory::measure(&params),
        // Its standard output may carry a download's bytes: no figures there.
        "program" => {
            programs::library(&params);
            return;
        }
        other => panic!("unknown scenario {other:?}"),
    };
    println!("FIGURES");
    for (name, value) in figures {
        println!("{name} {value}");
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the figures were measured on.
fn machine(libvirt: &str, load_before: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("?", |m| m.trim_start_matches([' ', '\t', ':']));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {model}, {} CPUs, {mem_gib:.0} GiB, Linux {}, libvirt {libvirt}; \
         load average (1, 5, 15 min) {load_before} at the start, {} at the end.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        loadavg()
    )
}

static PROFILED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What every child runs behind, if anything: `COMPARE_PERF=DIR` profiles each
/// with `perf record -g` into DIR; `COMPARE_WRAP='CMD ARGS'` runs each behind CMD
/// (split on spaces), each `{}` replaced by a file name of its own, e.g. for a perf
/// stat or strace -c: `COMPARE_WRAP='strace -f -c -o /tmp/s/{}.txt'`. `name` starts
/// the file names.
pub(crate) fn wrapper(name: &str) -> Vec<std::ffi::OsString> {
    let n = PROFILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(dir) = env::var_os("COMPARE_PERF") {
        let file = PathBuf::from(dir).join(format!("{name}-{n}.perf"));
        return ["perf", "record", "-q", "-F", "1999", "-g", "-o"]
            .map(Into::into)
            .into_iter()
            .chain([file.into(), "--".into()])
            .collect();
    }
    env::var("COMPARE_WRAP")
        .map(|wrap| {
            let file = format!("{name}-{n}");
            wrap.split_whitespace()
                .map(|word| word.replace("{}", &file).into())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one child and returns its figures.
pub(crate) fn run_child(
    kind: Loop,
    scenario: &str,
    args: &[String],
) -> Result<HashMap<String, f64>, String> {
    if PERF_STAT.load(std::sync::atomic::Ordering::Relaxed)
        && scenario == "transfer"
        && env::var_os("COMPARE_PERF").is_none()
    {
        return run_child_perf_stat(kind, scenario, args);
    }
    let wrapper = wrapper(&format!("{scenario}-{}", kind.name()));
    run_child_in(&wrapper, &[], kind, scenario, args)
}

/// Runs one child under callgrind (all its threads counted) and returns its figures
/// and the instructions it executed in all, from its first to its last.
pub(crate) fn run_child_callgrind(
    kind: Loop,
    scenario: &str,
    args: &[String],
    file: &std::path::Path,
) -> Result<(HashMap<String, f64>, f64), String> {
    let wrapper = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "-q".into(),
        format!("--callgrind-out-file={}", file.display()).into(),
    ];
    let figures = run_child_in(&wrapper, &[], kind, scenario, args)?;
    Ok((figures, callgrind_total(file)?))
}

/// What `--perf-stat` counts, where the machine has it: software events always,
/// hardware counters (instructions, cycles) only where the CPU lets perf see them
/// (not in this VM: "<not supported>", reported as missing).
const PERF_EVENTS: [(&str, &str); 6] = [
    ("task-clock", "perf_task_clock_ms"),
    ("raw_syscalls:sys_enter", "perf_syscalls"),
    ("context-switches", "perf_context_switches"),
    ("page-faults", "perf_page_faults"),
    ("instructions", "perf_instructions"),
    ("cycles", "perf_cycles"),
];

/// Runs one child under `perf stat`, its counters enabled by the child around its
/// measured part only (see `sys::perf_counting`); adds `<key>_per_gib` figures.
fn run_child_perf_stat(
    kind: Loop,
    scenario: &str,
    args: &[String],
) -> Result<HashMap<String, f64>, String> {
    use std::os::fd::AsRawFd;
    let dir = OUT
        .get()
        .map_or_else(|| PathBuf::from("target/bench"), Clone::clone)
        .join("perf-stat");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let n = PROFILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stem = dir.join(format!("{scenario}-{}-{n}", kind.name()));
    let fifo = |ext: &str| {
        let path = stem.with_extension(ext);
        sys::inheritable_fifo(&path)
            .map(|file| (path, file))
            .map_err(|e| format!("fifo: {e}"))
    };
    let ((ctl_path, ctl), (ack_path, ack)) = (fifo("ctl")?, fifo("ack")?);
    let out = stem.with_extension("txt");
    let events = PERF_EVENTS.map(|(event, _)| event).join(",");
    let wrapper: Vec<std::ffi::OsString> = vec![
        "perf".into(),
        "stat".into(),
        "-x,".into(),
        "-D".into(),
        "-1".into(),
        format!("--control=fd:{},{}", ctl.as_raw_fd(), ack.as_raw_fd()).into(),
        "-e".into(),
        events.into(),
        "-o".into(),
        out.clone().into(),
        "--".into(),
    ];
    let envs = [
        ("COMPARE_PERF_CTL", ctl_path.as_os_str()),
        ("COMPARE_PERF_ACK", ack_path.as_os_str()),
    ];
    let result = run_child_in(&wrapper, &envs, kind, scenario, args);
    drop((ctl, ack));
    let _ = std::fs::remove_file(&ctl_path);
    let _ = std::fs::remove_file(&ack_path);
    let mut figures = result?;
    let gib = *figures.get("gib").ok_or("the child reported no volume")?;
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    // CSV lines: value,unit,event,...
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(value), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let Some((_, key)) = PERF_EVENTS.iter().find(|(e, _)| e == event) else {
            continue;
        };
        if let Ok(value) = value.parse::<f64>() {
            figures.insert(format!("{key}_per_gib"), value / gib);
        }
    }
    Ok(figures)
}

/// The instructions a callgrind output file counts in all.
pub(crate) fn callgrind_total(file: &std::path::Path) -> Result<f64, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no totals in {}", file.display()))
}

/// Runs one child, behind `wrapper` (a command and its arguments, e.g. a profiler)
/// if not empty, and returns its figures.
fn run_child_in(
    wrapper: &[std::ffi::OsString],
    envs: &[(&str, &std::ffi::OsStr)],
    kind: Loop,
    scenario: &str,
    args: &[String],
) -> Result<HashMap<String, f64>, String> {
    let started = Instant::now();
    let daemon_before = DAEMON_PID.get().and_then(|&pid| sys::process_cpu_time(pid));
    let exe = env::current_exe().expect("own path");
    let mut command = match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut c = Command::new(program);
            c.args(wrapper_args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    command.envs(envs.iter().copied());
    let child = command
        .arg("--child")
        .arg(scenario)
        .arg(format!("loop={}", kind.name()))
        .args(args)
        .args(
            (kind == Loop::Tokio)
                .then(|| format!("io={}", TOKIO_IO.get().map_or("buf", String::as_str))),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    // A child that hangs is killed, so that one bad run cannot stop the others.
    let pid = child.id();
    let (finished, watchdog) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        if watchdog.recv_timeout(CHILD_TIMEOUT).is_err() {
            eprintln!("compare: child {pid} overran {CHILD_TIMEOUT:?}; killing it");
            sys::kill_child(pid);
        }
    });
    let out = child.wait_with_output();
    let _ = finished.send(());
    let out = out.map_err(|e| format!("wait: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{scenario} {} {args:?} failed ({}) after {:.1} s:\n{}",
            kind.name(),
            out.status,
            started.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut figures = parse_figures(&String::from_utf8_lossy(&out.stdout))?;
    // Children that move data report how much ("gib"): charge the daemon's CPU
    // during the run to it, so a profile can tell client-bound from daemon-bound.
    let daemon_after = DAEMON_PID.get().and_then(|&pid| sys::process_cpu_time(pid));
    if let (Some(&gib), Some(before), Some(after)) =
        (figures.get("gib"), daemon_before, daemon_after)
    {
        figures.insert(
            "daemon_cpu_per_gib".to_owned(),
            (after - before).as_secs_f64() / gib,
        );
    }
    Ok(figures)
}

/// The private daemon's pid, once it runs: its CPU time is read around each child.
pub(crate) static DAEMON_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

pub(crate) fn parse_figures(stdout: &str) -> Result<HashMap<String, f64>, String> {
    let body = stdout
        .split_once("FIGURES\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("no FIGURES in child output: {stdout}"))?;
    let mut figures = HashMap::new();
    for line in body.lines() {
        let (k, v) = line.split_once(' ').ok_or("bad figure line")?;
        figures.insert(k.to_owned(), v.parse().map_err(|_| "bad figure value")?);
    }
    Ok(figures)
}

/// One benchmark case: a child scenario with its arguments, run `runs` times per
/// loop, alternating.
pub(crate) struct Case<'a> {
    pub(crate) scenario: &'static str,
    pub(crate) label: String,
    pub(crate) child: &'static str,
    pub(crate) args: Vec<String>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) runs: usize,
    /// Also run the async path (`loop=tokio`), against ours.
    pub(crate) tokio: bool,
    /// Before each run (e.g. clear upload targets).
    pub(crate) before: Option<Box<dyn Fn() + 'a>>,
    /// After each run: check what the child left (e.g. uploaded bytes).
    pub(crate) after: Option<Box<dyn Fn() -> Result<(), String> + 'a>>,
    /// Instructions per GiB under callgrind (`--instructions RUNS`), for ours and
    /// tokio: the child arguments of a small and of a large transfer. A run is the
    /// pair, and the figure is the difference of their instruction counts over the
    /// difference of their volumes: what start-up and teardown cost (connect,
    /// runtime, lookups) cancels out.
    pub(crate) instructions: Option<(Vec<String>, Vec<String>)>,
}

impl<'a> Case<'a> {
    /// A case of `runs` runs per loop, on our loop and the default one, with nothing
    /// before or after each run.
    pub(crate) fn new(
        scenario: &'static str,
        label: String,
        child: &'static str,
        args: Vec<String>,
        figures: Vec<Figure>,
        runs: usize,
    ) -> Case<'a> {
        Case {
            scenario,
            label,
            child,
            args,
            figures,
            runs,
            tokio: false,
            before: None,
            after: None,
            instructions: None,
        }
    }
}

/// One callgrind run of `case` (see `Case::instructions`): instructions per GiB, in
/// all and outside the bulk passes over the data (see `callgrind_bulk`).
fn instructions_per_gib(case: &Case<'_>, kind: Loop, run: usize) -> Result<(f64, f64), String> {
    let (small, large) = case.instructions.as_ref().expect("instruction args");
    let dir = OUT
        .get()
        .map_or_else(|| PathBuf::from("target/bench"), Clone::clone)
        .join("callgrind");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut counts = Vec::new();
    for (size, args) in [("small", small), ("large", large)] {
        if let Some(before) = &case.before {
            before();
        }
        let tag: String = case
            .label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let file = dir.join(format!("{tag}.{}.{size}.{run}.out", kind.name()));
        let (figures, ir) = run_child_callgrind(kind, case.child, args, &file)?;
        let gib = *figures.get("gib").ok_or("the child reported no volume")?;
        let bulk = callgrind_bulk(&file)?;
        counts.push((gib, ir, ir - bulk));
    }
    let [(gib_small, ir_small, other_small), (gib_large, ir_large, other_large)] = counts[..]
    else {
        unreachable!("two sizes")
    };
    let gib = gib_large - gib_small;
    Ok((
        (ir_large - ir_small) / gib,
        (other_large - other_small) / gib,
    ))
}

/// The instructions a callgrind output file counts in the passes over the data
/// that both paths make alike: libc's `memcpy`/`memmove`/`memset` (callgrind
/// counts each byte of their `rep movsb`/`rep stosb` as an instruction, so they
/// weigh far more here than in cycles) and the benchmark's `data::check` and
/// `data::fill`. What remains is the loop, libvirt's protocol and the async bridge.
fn callgrind_bulk(file: &std::path::Path) -> Result<f64, String> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=no", "--threshold=100"])
        .arg(file)
        .output()
        .map_err(|e| format!("callgrind_annotate: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bulk = text
        .lines()
        .filter(|l| !l.contains("PROGRAM TOTALS"))
        .filter(|l| {
            ["memcpy", "memmove", "memset", "data::check", "data::fill"]
                .iter()
                .any(|f| l.contains(f))
        })
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .replace(',', "")
                .parse::<f64>()
                .ok()
        })
        .sum();
    Ok(bulk)
}

/// Whether `--filter` takes the case labelled `label`: its text anywhere in the
/// label, or with a trailing `$`, at the label's end ("N=1$" takes N=1, not N=16).
pub(crate) fn wanted(label: &str) -> bool {
    match FILTER.get().and_then(Option::as_ref) {
        None => true,
        Some(filter) => match filter.strip_suffix('$') {
            Some(end) => label.ends_with(end),
            None => label.contains(filter.as_str()),
        },
    }
}

/// Runs a case and adds its rows to `results`.
pub(crate) fn run_case(case: Case<'_>, results: &mut Results) {
    if !wanted(&case.label) {
        return;
    }
    let mut runs: [Vec<HashMap<String, f64>>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut instructions: [Vec<(f64, f64)>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let started = Instant::now();
    let kinds: &[Loop] = if case.tokio {
        &[Loop::Ours, Loop::Default, Loop::Tokio]
    } else {
        &[Loop::Ours, Loop::Default]
    };
    for run in 0..case.runs {
        // Rotate which loop goes first, so drift over time hits all alike.
        let mut order = kinds.to_vec();
        order.rotate_left(run % kinds.len());
        for kind in order {
            if let Some(before) = &case.before {
                before();
            }
            // A failed run is reported and left out; the others go on.
            let figures =
                run_child(kind, case.child, &case.args).and_then(|figures| match &case.after {
                    Some(after) => after().map(|()| figures),
                    None => Ok(figures),
                });
            // Interleaved with the timed runs: a callgrind run of the same loop.
            if case.instructions.is_some()
                && kind != Loop::Default
                && run < INSTRUCTION_RUNS.load(std::sync::atomic::Ordering::Relaxed)
            {
                match instructions_per_gib(&case, kind, run) {
                    Ok(ir) => instructions[kind as usize].push(ir),
                    Err(e) => eprintln!(
                        "compare: {} {} callgrind run {run} FAILED: {e}",
                        case.label,
                        kind.name()
                    ),
                }
            }
            match figures {
                Ok(figures) => runs[kind as usize].push(figures),
                Err(e) => results.failed_run(
                    &format!("{} / {} / {}", case.scenario, case.label, kind.name()),
                    run,
                    &e,
                ),
            }
        }
    }
    eprintln!(
        "compare: {} {}: {} runs per loop in {:.1} s",
        case.scenario,
        case.label,
        case.runs,
        started.elapsed().as_secs_f64()
    );
    for figure in case.figures {
        let pick = |rs: &[HashMap<String, f64>]| -> Vec<f64> {
            rs.iter()
                .map(|r| *r.get(figure.key).unwrap_or(&f64::NAN))
                .collect()
        };
        results.add(
            case.scenario,
            &case.label,
            figure,
            pick(&runs[0]),
            pick(&runs[1]),
            pick(&runs[2]),
        );
    }
    if instructions.iter().any(|v| !v.is_empty()) {
        let all = |i: usize| instructions[i].iter().map(|&(all, _)| all).collect();
        let other = |i: usize| instructions[i].iter().map(|&(_, other)| other).collect();
        results.add(
            case.scenario,
            &case.label,
            report::figure("ir_per_gib", "client instructions per GiB (callgrind)"),
            all(0),
            all(1),
            all(2),
        );
        results.add(
            case.scenario,
            &case.label,
            report::figure(
                "ir_other_per_gib",
                "client instructions per GiB besides copies and checks (callgrind)",
            ),
            other(0),
            other(1),
            other(2),
        );
    }
}

static FILTER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
static OUT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
/// `--perf-stat`: transfer children run under `perf stat`.
pub(crate) static PERF_STAT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Callgrind runs per loop for the cases with `Case::instructions`.
static INSTRUCTION_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static TOKIO_IO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn parent(opts: &Opts) {
    let _ = FILTER.set(opts.filter.clone());
    let _ = TOKIO_IO.set(opts.tokio_io.clone());
    let _ = OUT.set(opts.out.clone());
    INSTRUCTION_RUNS.store(opts.instructions, std::sync::atomic::Ordering::Relaxed);
    PERF_STAT.store(opts.perf_stat, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).expect("create the output directory");
    let mut results = Results::default();
    // Ctrl-C: the children die of it, the failed run panics, and unwinding removes
    // guests, daemon and pool (Env's Drop).
    let _ = ctrlc::set_handler(|| eprintln!("compare: interrupted; cleaning up"));
    let load_before = loadavg();
    let needs_daemon = ["s1", "s3", "s4", "s5", "s6", "s8", "s9", "s10"]
        .iter()
        .any(|s| opts.wants(s));
    let mut env = needs_daemon.then(|| Env::start(opts));
    eprintln!(
        "compare: {} CPUs, load {}, runs {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        opts.runs
    );
    // results.md is rewritten after each scenario, so a crash keeps what was done.
    let partial = |results: &Results| {
        let text = results.render(opts, started.elapsed());
        let _ = std::fs::write(opts.out.join("results.md"), text);
    };
    if opts.wants("s1") {
        streams::scenario1(opts, env.as_ref().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s2") {
        loops::scenario2(opts, &mut results);
        partial(&results);
    }
    if opts.wants("s3") {
        streams::scenario3(opts, env.as_ref().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s4") {
        consoles::scenario4(opts, env.as_mut().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s5") {
        memory::scenario5(opts, env.as_ref().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s6") {
        service::scenario6(opts, env.as_mut().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s8") {
        scale::scenario8(opts, env.as_mut().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s9") {
        floods::scenario9(opts, env.as_mut().expect("daemon"), &mut results);
        partial(&results);
    }
    if opts.wants("s7") {
        multihost::scenario7(opts, &mut results);
        partial(&results);
    }
    if opts.wants("s10") {
        programs::scenario10(opts, env.as_ref().expect("daemon"), &mut results);
    }
    let libvirt = env
        .as_ref()
        .and_then(|e| e.conn.lib_version().ok())
        .map_or_else(
            || "?".to_owned(),
            |v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000),
        );
    drop(env);
    results.note(machine(&libvirt, &load_before));
    let elapsed = started.elapsed();
    let text = results.render(opts, elapsed);
    println!("{text}");
    std::fs::write(opts.out.join("results.md"), &text).expect("write results.md");
    std::fs::write(opts.out.join("raw.tsv"), results.raw_tsv()).expect("write raw.tsv");
    if let Some(svg) = &opts.svg {
        if let Some(plot) = results.plot_s2() {
            std::fs::write(svg, plot).expect("write the plot");
            eprintln!("compare: wrote {}", svg.display());
        }
    }
}
