//! Scenario 9: console floods through the console service. N guests print as fast
//! as they can (`yes` with a 72-byte line) while one more, quiet, guest answers
//! echoes; `virt-consoled` logs every console and a viewer reads each.
//!
//! A run starts the release `virt-consoled` (`--log-dir`, a log size large enough
//! that no log rotates during the run) on the quiet guest and the N flooders,
//! attaches a viewer to each and warms them up, then:
//!
//! 1. **quiet**: echoes on the quiet console alone (5–15 ms apart, for a fixed
//!    window), nothing flooding: the baseline of the same run;
//! 2. **floods**: every flooder starts `yes`; after 2 s, the same echoes on the
//!    quiet console, while the viewers read everything. Over that window: bytes
//!    per second read by the viewers and written to the logs (the service's status:
//!    each log's bytes), the service's CPU per MiB delivered, the daemon's and the
//!    QEMUs' CPU;
//! 3. the floods are stopped (`kill $P`) and drained.
//!
//! The table sets the flood phase against the quiet phase; the target is the quiet
//! console's echo p99 within 2× of its value without floods.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::consoles::echo_figures;
use crate::report::{figure, Figure, Results};
use crate::scale::{machine_jiffies, per_cent, runq_us, task_schedstat};
use crate::service::{Service, Side, Viewers};
use crate::setup::Env;
use crate::sys::cpu_time;
use crate::{wanted, Opts, DAEMON_PID, MIB};

pub(crate) const SCENARIO: &str = "Scenario 9: console floods";

/// The nice value of the flooding guests' QEMUs in the second case of each N.
const FLOOD_NICE: i32 = 19;

/// Prints a 72-byte line as fast as the guest can, in the background; `kill $P`
/// stops it.
const FLOOD: &str =
    "yes f-0123456789012345678901234567890123456789012345678901234567890123456789 & P=$!\n";

const FIGURES: &[Figure] = &[
    figure("p50_ms", "quiet console echo median ms"),
    figure("p99_ms", "quiet console echo p99 ms"),
    figure("samples", "echoes timed"),
    figure("lost", "echoes lost (5 s)"),
    figure("viewer_kib_s", "KiB/s read by the viewers, all floods"),
    figure("viewer_kib_s_each", "KiB/s read by the viewers, per flood"),
    figure("log_kib_s", "KiB/s written to the logs"),
    figure("cpu_pct", "virt-consoled CPU %"),
    figure("cpu_ms_per_mib", "virt-consoled CPU ms per MiB delivered"),
    figure(
        "wakeups_s",
        "virt-consoled wake-ups per s (voluntary switches)",
    ),
    figure("bytes_per_wakeup", "bytes delivered per wake-up"),
    figure("daemon_pct", "libvirtd CPU %"),
    figure("qemu_pct", "QEMU CPU %, all the run's guests"),
    figure("machine_busy_pct", "machine busy % (all CPUs)"),
    figure(
        "service_runq_us",
        "virt-consoled runqueue wait per wake-up µs",
    ),
    figure(
        "quiet_qemu_runq_us",
        "quiet guest's QEMU runqueue wait per run µs",
    ),
    figure("viewers_cut", "viewers cut off (fell 1 MiB behind)"),
];

pub(crate) fn scenario9(opts: &Opts, env: &mut Env, results: &mut Results) {
    let counts: &[usize] = if opts.quick { &[1, 2] } else { &[1, 24] };
    let window = Duration::from_secs(if opts.quick { 3 } else { 15 });
    let base = env
        .pool_dir
        .parent()
        .expect("the pool's scratch directory")
        .join("s9");
    fs::create_dir_all(&base).expect("create the scenario 9 directory");
    for &n in counts {
        // bench-1 is the quiet console; the flooders follow. Booted up to each
        // count in turn; each run's warm-up waits for every console to answer.
        let names = &env.boot_guests(&opts.testbed, n + 1)[..=n];
        for flood_nice in [0, FLOOD_NICE] {
            case(opts, env, &base, (names, flood_nice), window, results);
        }
    }
    let _ = fs::remove_dir_all(&base);
    results.note(format!(
        "Scenario 9: virt-consoled (release, --log-dir, --force, one viewer per console) on \
         one quiet testbed guest and N flooding ones (`yes` with a 72-byte line, TCG). Each \
         run times echoes on the quiet console, 5–15 ms apart, for {} s alone, then for {} s \
         while the N guests flood; the flood figures are over that window. CPU shares are % \
         of one CPU. \"Flooders at nice {FLOOD_NICE}\": every thread of the flooding guests' \
         QEMUs and their autogroups reniced for the flood window (the quiet guest's, the daemon and the service \
         stay at 0), which tells the guests' CPU from the service's.",
        window.as_secs(),
        window.as_secs()
    ));
}

/// One case: `runs` runs of N floods beside the quiet console.
fn case(
    opts: &Opts,
    env: &Env,
    base: &Path,
    (names, flood_nice): (&[String], i32),
    window: Duration,
    results: &mut Results,
) {
    let n = names.len() - 1;
    let label = if flood_nice == 0 {
        format!("{n} flooding")
    } else {
        format!("{n} flooding, flooders at nice {flood_nice}")
    };
    if !wanted(&label) {
        return;
    }
    let started = Instant::now();
    let mut runs: [Vec<HashMap<String, f64>>; 2] = [Vec::new(), Vec::new()];
    for run in 0..opts.runs {
        // A guest that died booting is booted again (the warm-up waits for it).
        env.reboot_missing(&opts.testbed);
        match measure(opts, env, base, (names, flood_nice), window) {
            Ok([floods, quiet]) => {
                eprintln!(
                    "compare: {label} run {run}: quiet echo p99 {:.2} ms alone, {:.2} ms \
                     beside the floods; viewers {:.0} KiB/s, log {:.0} KiB/s, \
                     {:.1} ms CPU per MiB",
                    quiet["p99_ms"],
                    floods["p99_ms"],
                    floods["viewer_kib_s"],
                    floods["log_kib_s"],
                    floods["cpu_ms_per_mib"],
                );
                runs[0].push(floods);
                runs[1].push(quiet);
            }
            Err(e) => {
                eprintln!("compare: {SCENARIO} {label} run {run} FAILED: {e}");
                results.note(format!(
                    "**Failed run:** {SCENARIO} / {label}, run {}: {}",
                    run + 1,
                    e.lines().next().unwrap_or("")
                ));
            }
        }
    }
    eprintln!(
        "compare: {SCENARIO} {label}: {} runs in {:.1} s",
        opts.runs,
        started.elapsed().as_secs_f64()
    );
    results.add_sides(SCENARIO, &label, FIGURES, &runs);
}

/// One run: the flood phase's figures and the quiet phase's.
fn measure(
    opts: &Opts,
    env: &Env,
    base: &Path,
    (names, flood_nice): (&[String], i32),
    window: Duration,
) -> Result<[HashMap<String, f64>; 2], String> {
    // Only these consoles; no rotation during the run: each log's `bytes` in the
    // status is all it got.
    let mut extra = vec!["--log-size", "4294967296"];
    for name in names {
        extra.extend(["--domain", name.as_str()]);
    }
    let service = Service::start(Side::Ours, opts, env, base, (names, &extra))?;
    let mut viewers = Viewers::open(&service, names)?;
    viewers.warm_up(60)?;

    let (latencies, lost) = paced_echoes(&mut viewers, window);
    let quiet = echo_figures(latencies, lost, f64::NAN);

    for i in 1..names.len() {
        viewers.forget(i);
        viewers.send(i, FLOOD.as_bytes())?;
    }
    let flooding_qemus = qemu_pids(&names[1..]);
    renice(&flooding_qemus, flood_nice)?;
    viewers.drain_until(Instant::now() + Duration::from_secs(2));
    let qemus = qemu_pids(names);
    let quiet_qemu = qemu_pids(&names[..1]);
    let before = Counters::read(&service, &viewers, (&qemus, &quiet_qemu))?;
    let (latencies, lost) = paced_echoes(&mut viewers, window);
    let after = Counters::read(&service, &viewers, (&qemus, &quiet_qemu))?;
    let mut floods: HashMap<String, f64> = echo_figures(latencies, lost, f64::NAN)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let secs = (after.at - before.at).as_secs_f64();
    let viewer_bytes = (after.viewer_bytes - before.viewer_bytes) as f64;
    let cpu = (after.service - before.service).as_secs_f64();
    let pct = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() / secs * 100.0;
    let flooders = (names.len() - 1) as f64;
    for (key, value) in [
        ("viewer_kib_s", viewer_bytes / 1024.0 / secs),
        ("viewer_kib_s_each", viewer_bytes / 1024.0 / secs / flooders),
        (
            "log_kib_s",
            after.log_bytes.saturating_sub(before.log_bytes) as f64 / 1024.0 / secs,
        ),
        ("cpu_pct", cpu / secs * 100.0),
        ("cpu_ms_per_mib", cpu * 1e3 / (viewer_bytes / MIB as f64)),
        ("wakeups_s", (after.wakeups - before.wakeups) as f64 / secs),
        (
            "bytes_per_wakeup",
            viewer_bytes / (after.wakeups - before.wakeups).max(1) as f64,
        ),
        ("daemon_pct", pct(after.daemon, before.daemon)),
        ("qemu_pct", pct(after.qemu, before.qemu)),
        ("viewers_cut", after.viewers_cut),
        (
            "machine_busy_pct",
            per_cent(
                after.machine.0 - before.machine.0,
                after.machine.1 - before.machine.1,
            ),
        ),
        (
            "service_runq_us",
            runq_us(after.service_sched, before.service_sched),
        ),
        (
            "quiet_qemu_runq_us",
            runq_us(after.quiet_sched, before.quiet_sched),
        ),
    ] {
        floods.insert(key.to_owned(), value);
    }

    renice(&flooding_qemus, 0)?;
    for i in 1..names.len() {
        viewers.send(i, b"kill $P\n")?;
    }
    viewers.drain_until_quiet(
        Duration::from_secs(1),
        Instant::now() + Duration::from_secs(60),
    );
    drop(viewers);
    drop(service);
    let quiet = quiet.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Ok([floods, quiet])
}

/// Echoes on the quiet console (0) for `window`, 5–15 ms apart while every
/// viewer is read; latencies in ms and losses.
fn paced_echoes(viewers: &mut Viewers, window: Duration) -> (Vec<f64>, usize) {
    let started = Instant::now();
    let mut rng = fastrand::Rng::new();
    let (mut latencies, mut lost) = (Vec::new(), 0);
    let mut k = 0;
    while started.elapsed() < window {
        k += 1;
        match viewers.echo_once(0, k) {
            Some(ms) => latencies.push(ms),
            None => lost += 1,
        }
        viewers.drain_until(Instant::now() + Duration::from_millis(rng.u64(5..15)));
    }
    (latencies, lost)
}

/// Sets the nice value of every thread of `pids` and of their autogroups (as root,
/// also back to 0). A thread's nice counts only within its autogroup, and each QEMU
/// is a session, so an autogroup, of its own (`sched_autogroup_enabled`, on here):
/// the autogroup's nice is what weighs against the other processes.
fn renice(pids: &[u32], nice: i32) -> Result<(), String> {
    for pid in pids {
        let path = format!("/proc/{pid}/autogroup");
        if Path::new(&path).exists() {
            fs::write(&path, nice.to_string()).map_err(|e| format!("{path}: {e}"))?;
        }
    }
    let tids: Vec<String> = pids
        .iter()
        .flat_map(|&pid| tasks(pid))
        .filter_map(|task| Some(task.file_name()?.to_str()?.to_owned()))
        .collect();
    let status = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tids)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("renice: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("renice -n {nice}: {status}"))
}

/// What is read at both ends of the flood phase.
struct Counters {
    at: Instant,
    viewer_bytes: u64,
    log_bytes: u64,
    viewers_cut: f64,
    service: Duration,
    /// The service's voluntary context switches: each is a wait, so one per wake-up.
    wakeups: u64,
    daemon: Duration,
    qemu: Duration,
    /// (busy, total) jiffies of all CPUs.
    machine: (u64, u64),
    /// (runqueue wait ns, times run) over the service's threads, and the quiet
    /// guest's QEMU's.
    service_sched: (u64, u64),
    quiet_sched: (u64, u64),
}

impl Counters {
    fn read(
        service: &Service,
        viewers: &Viewers,
        (qemus, quiet_qemu): (&[u32], &[u32]),
    ) -> Result<Counters, String> {
        let status = service.status().ok_or("no status from virt-consoled")?;
        let log_bytes = status["consoles"]
            .as_array()
            .ok_or("no consoles in the status")?
            .iter()
            .filter_map(|c| c["log"]["bytes"].as_u64())
            .sum();
        Ok(Counters {
            at: Instant::now(),
            viewer_bytes: viewers.bytes,
            log_bytes,
            viewers_cut: status["viewers_cut"].as_f64().unwrap_or(f64::NAN),
            service: cpu_time(&service.pids()),
            wakeups: service.pids().iter().map(|&p| voluntary_switches(p)).sum(),
            daemon: cpu_time(DAEMON_PID.get().map(std::slice::from_ref).unwrap_or(&[])),
            qemu: cpu_time(qemus),
            machine: machine_jiffies(),
            service_sched: sched(&service.pids()),
            quiet_sched: sched(quiet_qemu),
        })
    }
}

/// The `/proc/PID/task/TID` directories of the threads of `pid`.
fn tasks(pid: u32) -> impl Iterator<Item = std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| task.path())
}

/// (runqueue wait ns, times run) summed over every thread of `pids`.
fn sched(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .flat_map(|&pid| tasks(pid))
        .map(|task| task_schedstat(&task.to_string_lossy()))
        .fold((0, 0), |(w, r), (dw, dr)| (w + dw, r + dr))
}

/// Voluntary context switches of every thread of process `pid`.
fn voluntary_switches(pid: u32) -> u64 {
    tasks(pid)
        .filter_map(|task| fs::read_to_string(task.join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The QEMU processes of `guests` (their command line names `guest=NAME,`).
pub(crate) fn qemu_pids(guests: &[String]) -> Vec<u32> {
    let wanted: Vec<String> = guests.iter().map(|g| format!("guest={g},")).collect();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("qemu-system") && wanted.iter().any(|w| cmdline.contains(w)))
                .then_some(pid)
        })
        .collect()
}
