//! Scenario 10: whole programs, like for like. The same volumes move between the
//! same daemon and the same files on a tmpfs (or standard output), through:
//!
//! - `vol`, the program (examples/vol, release build);
//! - `vol_c`, a C client on libvirt's default loop (benches/c/vol_c.c): NONBLOCK
//!   streams with stream event callbacks, at most 256 KiB per stream per event;
//! - `virsh vol-download` / `vol-upload`, one process per volume, all at once;
//! - the library path under `vol` (`virt_reactor::volume::{download, upload}`) in a
//!   child of this bench, on our loop and on libvirt's default loop.
//!
//! Every program is measured from outside alike: wall time from the first spawn to
//! the last exit, CPU and peak RSS from `wait4` (for virsh, the CPU of all its
//! processes and the sum of their peaks, since they run at once), and the daemon's
//! CPU over the run. The files are checked byte by byte after each run, outside the
//! measurement; a download to standard output is checked as it arrives, by the
//! parent.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virt_reactor::volume::{self, Target, VolumeRange};

use crate::report::{figure, num, Figure, Results};
use crate::setup::{Env, POOL};
use crate::{data, sys, Figures, Opts, Params, CHILD_TIMEOUT, MIB};

pub(crate) const VOL_AGAINST_C: &str = "Scenario 10: vol against a C client on libvirt's loop";
pub(crate) const VIRSH_AGAINST_C: &str = "Scenario 10: virsh against the C client";
pub(crate) const LIBRARY_AGAINST_C: &str =
    "Scenario 10: the library path (our loop) against the C client";
pub(crate) const LIBRARY_LOOPS: &str =
    "Scenario 10: the library path into files, our loop against the default loop";

/// Stream counts, as the issue asks.
const STREAMS: [usize; 3] = [1, 16, 64];
/// Memory is judged on this case: 16 downloads of 32 MiB each.
pub(crate) const MEMORY_CASE: &str = "download N=16 → files";

const FIGURES: [Figure; 4] = [
    figure("mibps", "aggregate MiB/s"),
    figure("cpu_per_gib", "client CPU s/GiB"),
    figure("maxrss_mib", "peak RSS MiB (virsh: sum of its processes)"),
    figure("daemon_cpu_per_gib", "daemon CPU s/GiB"),
];

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    Vol,
    C,
    Virsh,
    LibraryOurs,
    LibraryDefault,
}

const SIDES: [Side; 5] = [
    Side::Vol,
    Side::C,
    Side::Virsh,
    Side::LibraryOurs,
    Side::LibraryDefault,
];

/// Each side's runs of a case, each run's figures by name.
type SideRuns = HashMap<Side, Vec<HashMap<String, f64>>>;

/// The tables: each sets one side against another, over the same runs.
const TABLES: [(&str, Side, Side); 4] = [
    (VOL_AGAINST_C, Side::Vol, Side::C),
    (VIRSH_AGAINST_C, Side::Virsh, Side::C),
    (LIBRARY_AGAINST_C, Side::LibraryOurs, Side::C),
    (LIBRARY_LOOPS, Side::LibraryOurs, Side::LibraryDefault),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Download,
    Upload,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// One case: a direction, a stream count, and whether the single download goes to
/// standard output instead of a file.
#[derive(Clone, Copy)]
struct Case {
    dir: Direction,
    streams: usize,
    stdout: bool,
}

impl Case {
    fn label(self) -> String {
        let place = match (self.dir, self.stdout) {
            (_, true) => "→ stdout",
            (Direction::Download, false) => "→ files",
            (Direction::Upload, false) => "← files",
        };
        format!("{} N={} {place}", self.dir.name(), self.streams)
    }
}

/// Where the bytes live: volumes `p{N}-{i}` of `total / N` bytes each, holding
/// `data::fill(i * len, ..)`, and source files of the same bytes.
struct Layout {
    total: u64,
    sources: PathBuf,
    out: PathBuf,
}

impl Layout {
    fn len(&self, streams: usize) -> u64 {
        self.total / streams as u64
    }

    fn volumes(&self, streams: usize) -> Vec<(String, u64)> {
        let len = self.len(streams);
        (0..streams)
            .map(|i| (format!("p{streams}-{i}"), i as u64 * len))
            .collect()
    }

    /// The file each volume of the case goes to or comes from.
    fn file(&self, case: Case, volume: &str) -> PathBuf {
        match case.dir {
            Direction::Download => self.out.join(volume),
            Direction::Upload => self.sources.join(volume),
        }
    }
}

pub(crate) fn scenario10(opts: &Opts, env: &Env, results: &mut Results) {
    let base = env
        .pool_dir
        .parent()
        .expect("the pool's parent")
        .join("programs");
    let layout = Layout {
        total: env.source_size,
        sources: base.join("sources"),
        out: base.join("out"),
    };
    for dir in [&layout.sources, &layout.out] {
        fs::create_dir_all(dir).expect("create the scenario's directories");
    }
    for streams in STREAMS {
        let len = layout.len(streams);
        for (name, offset) in layout.volumes(streams) {
            env.create_volume(&name, len);
            env.fill_volume(&name, offset, len);
            write_source(&layout.sources.join(&name), offset, len);
        }
    }
    let mut cases: Vec<Case> = STREAMS
        .iter()
        .map(|&streams| Case {
            dir: Direction::Download,
            streams,
            stdout: false,
        })
        .collect();
    cases.push(Case {
        dir: Direction::Download,
        streams: 1,
        stdout: true,
    });
    cases.extend(STREAMS.iter().map(|&streams| Case {
        dir: Direction::Upload,
        streams,
        stdout: false,
    }));
    let mut measured: Vec<(String, SideRuns)> = Vec::new();
    for case in cases {
        let label = case.label();
        if !crate::wanted(&label) {
            continue;
        }
        let started = Instant::now();
        let mut runs = SideRuns::new();
        for run in 0..opts.runs {
            let mut order = SIDES.to_vec();
            order.rotate_left(run % SIDES.len());
            for side in order {
                match run_side(side, case, &layout, env) {
                    Ok(figures) => runs.entry(side).or_default().push(figures),
                    Err(e) => {
                        results.failed_run(&format!("scenario 10 / {label} / {side:?}"), run, &e);
                    }
                }
            }
        }
        eprintln!(
            "compare: scenario 10 {label}: {} runs per program in {:.1} s",
            opts.runs,
            started.elapsed().as_secs_f64()
        );
        measured.push((label, runs));
    }
    for (scenario, a, b) in TABLES {
        for (label, runs) in &measured {
            let side = |s: Side| runs.get(&s).cloned().unwrap_or_default();
            results.add_sides(scenario, label, &FIGURES, &[side(a), side(b)]);
        }
    }
    for (label, _) in &measured {
        targets(results, label);
    }
    let _ = fs::remove_dir_all(&base);
    results.note(format!(
        "Scenario 10: {} MiB per case in all, split over N volumes of a `dir` pool on a \
         tmpfs, to or from files on the same tmpfs (or standard output, read and checked \
         by the bench). Wall time from the first spawn to the last exit (process start, \
         connection and lookups included alike); CPU and peak RSS from wait4; virsh runs \
         one process per volume, all at once, and its peak RSS is the sum of theirs.",
        layout.total / MIB
    ));
}

/// The targets: vol at least 1.0× the C client's throughput at no more
/// client CPU per GiB; 16 downloads' peak RSS at most 1.2× the C client's.
fn targets(results: &mut Results, label: &str) {
    let m = |key: &str, ours: bool| results.median_in(VOL_AGAINST_C, label, key, ours);
    let (Some(vol_mibps), Some(c_mibps), Some(vol_cpu), Some(c_cpu)) = (
        m("mibps", true),
        m("mibps", false),
        m("cpu_per_gib", true),
        m("cpu_per_gib", false),
    ) else {
        return;
    };
    let rss = (m("maxrss_mib", true), m("maxrss_mib", false));
    results.target(
        format!("S10 {label}: vol ≥ 1.0× the C client's throughput at ≤ its CPU/GiB"),
        format!(
            "{} / {} MiB/s = {}; CPU {} / {} s/GiB = {}",
            num(vol_mibps),
            num(c_mibps),
            num(vol_mibps / c_mibps),
            num(vol_cpu),
            num(c_cpu),
            num(vol_cpu / c_cpu)
        ),
        Some(vol_mibps >= c_mibps && vol_cpu <= c_cpu),
    );
    if let (MEMORY_CASE, (Some(vol_rss), Some(c_rss))) = (label, rss) {
        results.target(
            format!("S10 {label}: vol's peak RSS ≤ 1.2× the C client's"),
            format!(
                "{} / {} MiB = {}",
                num(vol_rss),
                num(c_rss),
                num(vol_rss / c_rss)
            ),
            Some(vol_rss <= 1.2 * c_rss),
        );
    }
}

fn write_source(path: &Path, base: u64, len: u64) {
    let file = File::create(path).expect("create a source file");
    data::write_file(&file, base, len).expect("write a source file");
}

/// The commands that make `side` move `case`'s volumes: one process, or one per
/// volume (virsh).
fn commands(side: Side, case: Case, layout: &Layout, env: &Env) -> Vec<Command> {
    let volumes = layout.volumes(case.streams);
    let file = |name: &str| -> String {
        if case.stdout {
            "-".to_owned()
        } else {
            layout.file(case, name).display().to_string()
        }
    };
    let pairs = volumes
        .iter()
        .flat_map(|(name, _)| [name.clone(), file(name)]);
    let dir = case.dir.name();
    match side {
        Side::Vol => {
            let mut c = Command::new(tool("vol"));
            c.args([dir, "--uri", &env.uri, "--pool", POOL]).args(pairs);
            vec![c]
        }
        Side::C => {
            let mut c = Command::new(tool("vol_c"));
            c.args([dir, &env.uri, POOL]).args(pairs);
            vec![c]
        }
        Side::Virsh => volumes
            .iter()
            .map(|(name, _)| {
                let mut c = Command::new("virsh");
                let target = if case.stdout {
                    "/dev/stdout".to_owned()
                } else {
                    file(name)
                };
                c.args(["-q", "-c", &env.uri, &format!("vol-{dir}"), "--pool", POOL])
                    .args([name.as_str(), &target]);
                c
            })
            .collect(),
        Side::LibraryOurs | Side::LibraryDefault => {
            let kind = if side == Side::LibraryOurs {
                "ours"
            } else {
                "default"
            };
            let list: Vec<String> = volumes
                .iter()
                .map(|(name, _)| format!("{name}={}", file(name)))
                .collect();
            let mut c = Command::new(std::env::current_exe().expect("own path"));
            c.args(["--child", "program"])
                .arg(format!("loop={kind}"))
                .arg(format!("uri={}", env.uri))
                .arg(format!("dir={dir}"))
                .arg(format!("pairs={}", list.join(",")));
            vec![c]
        }
    }
}

/// `command` behind the bench's wrapper (`COMPARE_PERF`, `COMPARE_WRAP`), if any.
fn wrapped(command: Command, side: Side, case: Case) -> Command {
    let tag: String = format!("programs-{side:?}-{}", case.label())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let wrapper = crate::wrapper(&tag);
    let Some((program, args)) = wrapper.split_first() else {
        return command;
    };
    let mut outer = Command::new(program);
    outer
        .args(args)
        .arg(command.get_program())
        .args(command.get_args());
    outer
}

/// `vol` and `vol_c` sit where scripts/bench.sh builds them.
fn tool(name: &str) -> PathBuf {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release");
    match name {
        "vol" => release.join("examples/vol"),
        _ => release.join(name),
    }
}

/// One run of one program on one case: its figures, once its bytes are checked.
fn run_side(
    side: Side,
    case: Case,
    layout: &Layout,
    env: &Env,
) -> Result<HashMap<String, f64>, String> {
    let volumes = layout.volumes(case.streams);
    let len = layout.len(case.streams);
    if case.dir == Direction::Upload {
        for (name, _) in &volumes {
            env.clear_volume(name);
        }
    }
    let daemon_before = crate::DAEMON_PID
        .get()
        .and_then(|&pid| sys::process_cpu_time(pid));
    let started = Instant::now();
    let mut children = Vec::new();
    for command in commands(side, case, layout, env) {
        let mut command = wrapped(command, side, case);
        command
            .stdin(Stdio::null())
            .stdout(if case.stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        children.push(
            command
                .spawn()
                .map_err(|e| format!("spawn {side:?}: {e}"))?,
        );
    }
    // Standard output is read and checked as it arrives (one volume: offset 0).
    let reader = case.stdout.then(|| {
        let mut out = children[0].stdout.take().expect("piped stdout");
        std::thread::spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; 1 << 20];
            let mut seen = 0u64;
            loop {
                let n = out
                    .read(&mut buf)
                    .map_err(|e| format!("read stdout: {e}"))?;
                if n == 0 {
                    return Ok(seen);
                }
                if !data::check(seen, &buf[..n]) {
                    return Err(format!("wrong bytes at {seen} on standard output"));
                }
                seen += n as u64;
            }
        })
    });
    let stderrs: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let mut err = c.stderr.take().expect("piped stderr");
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                text
            })
        })
        .collect();
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    let (finished, watchdog) = crossbeam_channel::bounded::<()>(1);
    let watched = pids.clone();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(CHILD_TIMEOUT).is_err() {
            eprintln!("compare: scenario 10 programs overran {CHILD_TIMEOUT:?}; killing them");
            watched.iter().for_each(|&pid| sys::kill_child(pid));
        }
    });
    let ended: Vec<_> = pids.iter().map(|&pid| sys::wait_child(pid)).collect();
    let wall = started.elapsed();
    let _ = finished.send(());
    let daemon_after = crate::DAEMON_PID
        .get()
        .and_then(|&pid| sys::process_cpu_time(pid));
    let stderr: String = stderrs
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .collect();
    let mut cpu = Duration::ZERO;
    let mut rss_kib = 0;
    for end in ended {
        let end = end.map_err(|e| format!("wait4: {e}"))?;
        if !end.success {
            return Err(format!("{side:?} failed: {stderr}"));
        }
        cpu += end.cpu;
        rss_kib += end.max_rss_kib;
    }
    // Outside the measurement: every byte where it belongs.
    match reader {
        Some(reader) => {
            let seen = reader.join().map_err(|_| "the stdout reader panicked")??;
            if seen != len {
                return Err(format!("{seen} of {len} bytes on standard output"));
            }
        }
        None => check(case, layout, env, &volumes, len)?,
    }
    let gib = layout.total as f64 / (1u64 << 30) as f64;
    let mut figures = HashMap::from([
        (
            "mibps".to_owned(),
            (layout.total / MIB) as f64 / wall.as_secs_f64(),
        ),
        ("cpu_per_gib".to_owned(), cpu.as_secs_f64() / gib),
        ("maxrss_mib".to_owned(), rss_kib as f64 / 1024.0),
    ]);
    if let (Some(before), Some(after)) = (daemon_before, daemon_after) {
        figures.insert(
            "daemon_cpu_per_gib".to_owned(),
            (after - before).as_secs_f64() / gib,
        );
    }
    Ok(figures)
}

/// Downloaded files hold the volumes' bytes (and go); uploaded volumes hold the
/// files'.
fn check(
    case: Case,
    layout: &Layout,
    env: &Env,
    volumes: &[(String, u64)],
    len: u64,
) -> Result<(), String> {
    for (name, offset) in volumes {
        match case.dir {
            Direction::Upload => env.check_volume(name, *offset, len)?,
            Direction::Download => {
                let path = layout.file(case, name);
                let result = check_file(&path, *offset, len);
                let _ = fs::remove_file(&path);
                result?;
            }
        }
    }
    Ok(())
}

fn check_file(path: &Path, base: u64, len: u64) -> Result<(), String> {
    let size = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size != len {
        return Err(format!("{}: {size} bytes, not {len}", path.display()));
    }
    data::check_file(path, base, len)
}

/// The child of the library path: `volume::download` / `volume::upload` for every
/// `VOL=FILE` pair at once on one reactor (our loop or the default one), as `vol`
/// does underneath; a download's FILE `-` is standard output.
pub(crate) fn library(p: &Params) -> Figures {
    let mut reactor = p.kind.reactor::<Vec<Result<(), String>>>();
    let conn = p.kind.connect(p.str("uri"));
    let pool = conn.lookup_storage_pool_by_name(POOL).expect("the pool");
    let upload = p.str("dir") == "upload";
    let pairs: Vec<(&str, &str)> = p
        .str("pairs")
        .split(',')
        .map(|pair| pair.split_once('=').expect("VOL=FILE"))
        .collect();
    let on_end = |ended: &mut Vec<Result<(), String>>, r: virt_reactor::Result<_>| {
        ended.push(r.map(drop).map_err(|e| e.to_string()));
    };
    let mut ended = Vec::new();
    for &(name, file) in &pairs {
        let vol = pool.lookup_storage_vol_by_name(name).expect("the volume");
        let range = VolumeRange::default();
        if upload {
            volume::upload(
                &mut reactor,
                &vol,
                Path::new(file),
                range,
                |_, _| {},
                on_end,
            )
            .expect("start an upload");
        } else {
            let target = if file == "-" {
                let stdout = std::io::stdout().as_fd().try_clone_to_owned();
                Target::Writer {
                    file: File::from(stdout.expect("standard output")),
                    name: PathBuf::from("-"),
                }
            } else {
                Target::Path(PathBuf::from(file))
            };
            volume::download_with(&mut reactor, &vol, target, range, None, |_, _| {}, on_end)
                .expect("start a download");
        }
        // As `vol`: what the start let libvirt queue is taken before the next.
        reactor
            .run_once(Some(Duration::ZERO), &mut ended)
            .expect("a loop iteration");
    }
    while ended.len() < pairs.len() {
        reactor
            .run_once(None, &mut ended)
            .expect("a loop iteration");
    }
    for result in ended {
        result.expect("a transfer");
    }
    Vec::new()
}
