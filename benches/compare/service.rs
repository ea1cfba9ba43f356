//! Scenario 6: the console service (`virt-consoled`) against conserver with one
//! `virsh console` per guest, on the same N testbed guests of the bench's daemon.
//!
//! The parent runs both services itself, one after the other, alternating which
//! goes first, and measures them from outside (no child of its own):
//!
//! * **ours**: `virt-consoled --uri URI --dir D --log-dir L --force`, every guest of
//!   the connection, 64 KiB of scrollback per console (the default), a log each;
//!   viewers on its Unix sockets.
//! * **theirs**: `conserver -C CF -P PASSWD -p PORT -M 127.0.0.1 -E` in the
//!   foreground, a private configuration with one console per guest,
//!   `type exec; exec "exec virsh -c URI console NAME --force"` (the shell execs
//!   virsh, so no `sh` per console is charged to it) and a logfile each, which is
//!   also its scrollback (its replay reads the log). Viewers speak conserver's client
//!   protocol over TCP, as `console` does: `login`, `call` at the master for the
//!   group's port, `login`, `call` there, then `^Ec;` to start the output.
//!
//! A run: start the service, attach one viewer per console and warm it up (an echo
//! answered), time echo rounds (each round an `echo mK` to every console, waiting
//! for every answer), an idle window (CPU), a window while every guest prints a
//! 100-byte line every 10 ms (CPU, bytes seen by the viewers; it also fills each
//! scrollback ring), the memory of the whole service (every process of its tree:
//! VmRSS and PSS), then a fresh viewer per console timed from its connect to the
//! first byte of replayed output (ours: after the `[virt-consoled]` greeting;
//! theirs: after `[replay]`, asked for with `^Ecr` right after attaching, as
//! `console -A` does).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::consoles::{echo_figures, Screen};
use crate::report::{figure, Figure, Results};
use crate::setup::Env;
use crate::sys::{process_cpu_time, quickack, signal};
use crate::{Opts, DAEMON_PID};

pub(crate) const SCENARIO: &str = "Scenario 6: console service against conserver";

/// conserver's escape sequence (^Ec) and the commands the bench sends after it.
const ESCAPE: &[u8] = b"\x05c";

/// What the guests print while "every guest prints": a 100-byte line each 10 ms,
/// stopped by `kill $P` (and by itself after 3,000 lines).
const PRINTER: &str = "(n=0; while [ $n -lt 3000 ]; do \
     echo p-0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567; \
     sleep 0.01; n=$((n+1)); done) & P=$!\n";

/// What fills every scrollback ring before the memory is read: 800 lines of 100
/// bytes at once (80,000 bytes, more than the default 64 KiB ring).
const FILL: &str = "n=0; while [ $n -lt 800 ]; do \
     echo f-0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567; \
     n=$((n+1)); done\n";

pub(crate) fn s6_label(n: usize, quickack: bool) -> String {
    if quickack {
        format!("N={n}, conserver's viewers ACK at once")
    } else {
        format!("N={n}")
    }
}

/// The guest count of a case label.
pub(crate) fn guests_of(label: &str) -> usize {
    label
        .trim_start_matches("N=")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The figures of a run, in table order.
pub(crate) const FIGURES: &[Figure] = &[
    figure("rss_mib", "RSS MiB, whole service, rings full"),
    figure("pss_mib", "PSS MiB, whole service, rings full"),
    figure("rss_idle_mib", "RSS MiB after the echo rounds"),
    figure("procs", "processes"),
    figure(
        "rings_full",
        "consoles whose scrollback ring is full (ours)",
    ),
    figure("cpu_idle_pct", "CPU % idle (15 s)"),
    figure("cpu_print_pct", "CPU % while every guest prints (10 s)"),
    figure("print_kib_s", "output KiB/s seen by the viewers, printing"),
    figure("cpu_s_per_mib", "CPU s per MiB of output, printing"),
    figure("daemon_idle_pct", "libvirtd CPU % idle"),
    figure("daemon_print_pct", "libvirtd CPU % printing"),
    figure("p50_ms", "echo median ms"),
    figure("p99_ms", "echo p99 ms"),
    figure("samples", "echoes timed"),
    figure("lost", "echoes lost (5 s)"),
    figure("attach_p50_ms", "attach → first replayed byte, median ms"),
    figure("attach_max_ms", "attach → first replayed byte, slowest ms"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Side {
    Ours,
    Theirs,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "virt-consoled",
            Side::Theirs => "conserver",
        }
    }
}

/// How long each part of a run takes.
struct Plan {
    rounds: usize,
    idle: Duration,
    print: Duration,
}

pub(crate) fn scenario6(opts: &Opts, env: &mut Env, results: &mut Results) {
    let counts = if opts.quick {
        vec![2]
    } else {
        opts.service_guests.clone()
    };
    let plan = if opts.quick {
        Plan {
            rounds: 20,
            idle: Duration::from_secs(3),
            print: Duration::from_secs(3),
        }
    } else {
        Plan {
            rounds: 100,
            idle: Duration::from_secs(15),
            print: Duration::from_secs(10),
        }
    };
    let base = env
        .pool_dir
        .parent()
        .expect("the pool's scratch directory")
        .join("s6");
    fs::create_dir_all(&base).expect("create the scenario 6 directory");
    for &n in &counts {
        let names = env.boot_guests(&opts.testbed, n)[..n].to_vec();
        let label = s6_label(n, opts.quickack);
        let started = Instant::now();
        // The guests boot meanwhile: one untimed pass through ours waits for every
        // console to answer, so that no run shares the CPUs with a boot.
        if let Err(e) = ready(opts, env, &base, &names) {
            eprintln!("compare: {SCENARIO} {label}: the guests never answered: {e}");
            results.note(format!("**Failed:** {SCENARIO}, {label}: {e}"));
            continue;
        }
        eprintln!(
            "compare: {SCENARIO} {label}: {n} consoles answer ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let mut runs: [Vec<HashMap<String, f64>>; 2] = [Vec::new(), Vec::new()];
        for run in 0..opts.runs {
            let order = if run % 2 == 0 {
                [Side::Ours, Side::Theirs]
            } else {
                [Side::Theirs, Side::Ours]
            };
            for side in order {
                match measure(side, opts, env, &base, &names, &plan) {
                    Ok(figures) => {
                        eprintln!(
                            "compare: {label} {} run {run}: rss {:.1} MiB, echo p99 {:.2} ms, \
                             attach max {:.1} ms, cpu idle {:.2} % print {:.1} %",
                            side.name(),
                            figures["rss_mib"],
                            figures["p99_ms"],
                            figures["attach_max_ms"],
                            figures["cpu_idle_pct"],
                            figures["cpu_print_pct"],
                        );
                        runs[side as usize].push(figures);
                    }
                    Err(e) => {
                        results.failed_run(
                            &format!("{SCENARIO} / {label} / {}", side.name()),
                            run,
                            &e,
                        );
                    }
                }
            }
        }
        eprintln!(
            "compare: {SCENARIO} {label}: {} runs per side in {:.1} s",
            opts.runs,
            started.elapsed().as_secs_f64()
        );
        results.add_sides(SCENARIO, &label, FIGURES, &runs);
    }
    let _ = fs::remove_dir_all(&base);
    results.note(format!(
        "Scenario 6: N testbed guests (TCG, plain read/eval console) on the bench's daemon; \
         virt-consoled with its defaults (64 KiB scrollback per console) and --log-dir, \
         --force; conserver {} (-m 16 consoles per group process, its default) with a \
         logfile per console and one `virsh -c URI console NAME --force` each. Each run: \
         {} echo rounds to every console, {} s idle, {} s while every guest prints a \
         100-byte line each 10 ms; RSS and PSS are summed over every process of the \
         service's tree.",
        conserver_version(),
        plan.rounds,
        plan.idle.as_secs(),
        plan.print.as_secs()
    ));
}

fn conserver_version() -> String {
    Command::new("conserver")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .next()
                .and_then(|l| l.split("version ").nth(1))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Waits (through ours) until every console answers an echo.
fn ready(opts: &Opts, env: &Env, base: &Path, names: &[String]) -> Result<(), String> {
    let service = Service::start(Side::Ours, opts, env, base, (names, &[]))?;
    let mut viewers = Viewers::open(&service, names)?;
    viewers.warm_up(180)?;
    Ok(())
}

/// One run of one side.
fn measure(
    side: Side,
    opts: &Opts,
    env: &Env,
    base: &Path,
    names: &[String],
    plan: &Plan,
) -> Result<HashMap<String, f64>, String> {
    let service = Service::start(side, opts, env, base, (names, &[]))?;
    let mut viewers = Viewers::open(&service, names)?;
    viewers.warm_up(30)?;
    let mut figures: HashMap<String, f64> = HashMap::new();

    let (latencies, lost) = viewers.echo_rounds(plan.rounds);
    for (key, value) in echo_figures(latencies, lost, f64::NAN) {
        figures.insert(key.to_owned(), value);
    }
    let (rss, _) = memory(&service.pids());
    figures.insert("rss_idle_mib".to_owned(), rss);

    let (cpu, daemon, _) = window(&service, &mut viewers, plan.idle);
    figures.insert("cpu_idle_pct".to_owned(), cpu);
    figures.insert("daemon_idle_pct".to_owned(), daemon);

    for i in 0..names.len() {
        viewers.send(i, PRINTER.as_bytes())?;
    }
    viewers.drain_until(Instant::now() + Duration::from_secs(2));
    let (cpu, daemon, bytes) = window(&service, &mut viewers, plan.print);
    figures.insert("cpu_print_pct".to_owned(), cpu);
    figures.insert("daemon_print_pct".to_owned(), daemon);
    figures.insert(
        "print_kib_s".to_owned(),
        bytes as f64 / 1024.0 / plan.print.as_secs_f64(),
    );
    figures.insert(
        "cpu_s_per_mib".to_owned(),
        cpu / 100.0 * plan.print.as_secs_f64() / (bytes as f64 / 1048576.0),
    );
    for i in 0..names.len() {
        viewers.send(i, b"kill $P\n")?;
    }
    viewers.drain_until(Instant::now() + Duration::from_secs(2));
    for i in 0..names.len() {
        viewers.send(i, FILL.as_bytes())?;
    }
    viewers.drain_until_quiet(
        Duration::from_secs(1),
        Instant::now() + Duration::from_secs(120),
    );
    if side == Side::Ours {
        figures.insert(
            "rings_full".to_owned(),
            service.full_rings().unwrap_or(f64::NAN),
        );
    }

    let pids = service.pids();
    let (rss, pss) = memory(&pids);
    figures.insert("rss_mib".to_owned(), rss);
    figures.insert("pss_mib".to_owned(), pss);
    figures.insert("procs".to_owned(), pids.len() as f64);

    let mut attach = Vec::with_capacity(names.len());
    for name in names {
        attach.push(service.time_to_replay(name)?);
    }
    attach.sort_by(f64::total_cmp);
    figures.insert("attach_p50_ms".to_owned(), attach[(attach.len() - 1) / 2]);
    figures.insert("attach_max_ms".to_owned(), attach[attach.len() - 1]);
    drop(viewers);
    drop(service);
    Ok(figures)
}

/// CPU % of one CPU of the service's processes and of the daemon over `length`,
/// while the viewers are read; and the bytes they read meanwhile.
fn window(service: &Service, viewers: &mut Viewers, length: Duration) -> (f64, f64, u64) {
    let pids = service.pids();
    let before: Vec<Option<Duration>> = pids.iter().map(|&p| process_cpu_time(p)).collect();
    let daemon_before = DAEMON_PID.get().and_then(|&p| process_cpu_time(p));
    let bytes = viewers.bytes;
    let started = Instant::now();
    viewers.drain_until(started + length);
    let elapsed = started.elapsed().as_secs_f64();
    let used: Duration = pids
        .iter()
        .zip(&before)
        .filter_map(|(&p, b)| Some(process_cpu_time(p)?.saturating_sub((*b)?)))
        .sum();
    let daemon = DAEMON_PID
        .get()
        .and_then(|&p| process_cpu_time(p))
        .zip(daemon_before)
        .map_or(f64::NAN, |(a, b)| a.saturating_sub(b).as_secs_f64());
    let pct = |secs: f64| secs / elapsed * 100.0;
    (pct(used.as_secs_f64()), pct(daemon), viewers.bytes - bytes)
}

/// (VmRSS, PSS) summed over `pids`, in MiB.
fn memory(pids: &[u32]) -> (f64, f64) {
    let field = |path: String, name: &str| -> f64 {
        fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let (mut rss, mut pss) = (0.0, 0.0);
    for pid in pids {
        rss += field(format!("/proc/{pid}/status"), "VmRSS:");
        pss += field(format!("/proc/{pid}/smaps_rollup"), "Pss:");
    }
    (rss / 1024.0, pss / 1024.0)
}

/// `root` and every process below it.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        // Zombies hold no memory and run no more.
        if fields.next() == Some("Z") {
            continue;
        }
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(parents.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    tree
}

/// A running service, stopped (its whole tree) and its directory removed on drop.
pub(crate) struct Service {
    side: Side,
    child: Child,
    dir: PathBuf,
    /// conserver's master port.
    port: u16,
    /// Viewers of conserver acknowledge at once (`--quickack`).
    quickack: bool,
}

impl Service {
    /// Starts `side` on the consoles `names`; ours also takes `extra` arguments.
    pub(crate) fn start(
        side: Side,
        opts: &Opts,
        env: &Env,
        base: &Path,
        (names, extra): (&[String], &[&str]),
    ) -> Result<Service, String> {
        let dir = base.join(format!("{}-{}", side.name(), std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let logs = dir.join("logs");
        fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let output = fs::File::create(dir.join("output.txt")).map_err(|e| e.to_string())?;
        let stderr = output.try_clone().map_err(|e| e.to_string())?;
        let (mut command, port) = match side {
            Side::Ours => {
                // COMPARE_PERF=DIR records ours with `perf record -g` (perf is then
                // part of the measured tree).
                let mut c = match std::env::var_os("COMPARE_PERF") {
                    Some(out) => {
                        let mut c = Command::new("perf");
                        c.args(["record", "-q", "-F", "999", "-g", "-o"])
                            .arg(PathBuf::from(out).join(format!(
                                "s6-ours-n{}-{}.perf",
                                names.len(),
                                std::process::id()
                            )))
                            .arg("--")
                            .arg(&opts.consoled);
                        c
                    }
                    None => Command::new(&opts.consoled),
                };
                c.arg("--uri")
                    .arg(&env.uri)
                    .arg("--dir")
                    .arg(dir.join("sockets"))
                    .arg("--log-dir")
                    .arg(&logs)
                    .arg("--force")
                    .args(extra)
                    .env("RUST_LOG", "warn");
                (c, 0)
            }
            Side::Theirs => {
                let port = free_port()?;
                let config = dir.join("conserver.cf");
                fs::write(&config, conserver_config(&env.uri, &logs, names))
                    .map_err(|e| e.to_string())?;
                let passwd = dir.join("conserver.passwd");
                fs::write(&passwd, "").map_err(|e| e.to_string())?;
                let mut c = Command::new("conserver");
                c.arg("-C")
                    .arg(&config)
                    .arg("-P")
                    .arg(&passwd)
                    .arg("-p")
                    .arg(port.to_string())
                    .arg("-M")
                    .arg("127.0.0.1")
                    .arg("-E");
                (c, port)
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("start {}: {e}", side.name()))?;
        let service = Service {
            side,
            child,
            dir,
            port,
            quickack: opts.quickack,
        };
        service.wait_up(names.len())?;
        Ok(service)
    }

    /// Until every console is attached (ours: its status; theirs: a virsh per
    /// console under the master, and the master answering).
    fn wait_up(&self, n: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = match self.side {
                Side::Ours => self.attached_consoles() == Some(n),
                Side::Theirs => {
                    let virsh = self
                        .pids()
                        .iter()
                        .filter(|&&p| {
                            fs::read_to_string(format!("/proc/{p}/comm"))
                                .is_ok_and(|c| c.trim() == "virsh")
                        })
                        .count();
                    virsh == n && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                }
            };
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: consoles not up within 60 s; its output:\n{}",
                    self.side.name(),
                    fs::read_to_string(self.dir.join("output.txt")).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ours' status, from its control socket.
    pub(crate) fn status(&self) -> Option<serde_json::Value> {
        let mut control = UnixStream::connect(self.dir.join("sockets/control.sock")).ok()?;
        control.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(control), &mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Ours' consoles, from its status.
    fn consoles(&self) -> Option<Vec<serde_json::Value>> {
        self.status()?.get("consoles")?.as_array().cloned()
    }

    /// How many consoles ours reports attached.
    fn attached_consoles(&self) -> Option<usize> {
        let consoles = self.consoles()?;
        Some(
            consoles
                .iter()
                .filter(|c| c.get("state").and_then(|s| s.as_str()) == Some("attached"))
                .count(),
        )
    }

    /// How many of ours' scrollback rings are full.
    fn full_rings(&self) -> Option<f64> {
        let consoles = self.consoles()?;
        let full = consoles.iter().filter(|c| {
            let ring = &c["scrollback"];
            ring["used"].as_u64().is_some() && ring["used"] == ring["capacity"]
        });
        Some(full.count() as f64)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        process_tree(self.child.id())
    }

    /// A viewer of console `name`, past the service's own handshake.
    fn connect(&self, name: &str) -> Result<Conn, String> {
        match self.side {
            Side::Ours => {
                UnixStream::connect(self.dir.join("sockets").join(format!("{name}.sock")))
                    .map(Conn::Unix)
                    .map_err(|e| format!("{name}: {e}"))
            }
            Side::Theirs => {
                conserver_call(self.port, name, self.quickack).map(|s| Conn::Tcp(s, self.quickack))
            }
        }
    }

    /// Milliseconds from a fresh viewer's connect to the first byte of replay.
    fn time_to_replay(&self, name: &str) -> Result<f64, String> {
        let started = Instant::now();
        let mut conn = self.connect(name)?;
        // Ours: a greeting line, then the replay. Theirs: output starts with `^Ec;`,
        // and `^Ecr` asks for the replay, which follows a `[replay]` line.
        let marker: &[u8] = match self.side {
            Side::Ours => b"[virt-consoled]",
            Side::Theirs => {
                conn.write_all(&[ESCAPE, b";", ESCAPE, b"r"].concat())
                    .map_err(|e| e.to_string())?;
                b"[replay]"
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = conn.read(&mut buf).map_err(|e| format!("{name}: {e}"))?;
            if n == 0 {
                return Err(format!("{name}: closed before any replay: {seen:?}"));
            }
            seen.extend_from_slice(&buf[..n]);
            // The line that ends after the marker, and a byte past it.
            if let Some(at) = find(&seen, marker) {
                if let Some(end) = find(&seen[at..], b"\r\n") {
                    if seen.len() > at + end + 2 {
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        conn.shutdown();
                        return Ok(ms);
                    }
                }
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let tree = self.pids();
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            eprintln!("compare: {} ignored SIGTERM; killing it", self.side.name());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever of its tree outlived it (a virsh, a conserver group).
        for pid in tree.into_iter().skip(1) {
            if fs::metadata(format!("/proc/{pid}")).is_ok() {
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("a free port: {e}"))
}

/// conserver's configuration: every console an exec of `virsh console`, logged.
fn conserver_config(uri: &str, logs: &Path, names: &[String]) -> String {
    let mut cf = format!(
        "access * {{ trusted 127.0.0.1; }}\n\
         default * {{ master 127.0.0.1; type exec; rw *; timestamp \"\"; logfile \"{}/&.log\"; }}\n",
        logs.display()
    );
    for name in names {
        cf.push_str(&format!(
            "console {name} {{ exec \"exec virsh -c '{uri}' console {name} --force\"; }}\n"
        ));
    }
    cf
}

/// A line of conserver's line mode, up to its `\n` (read byte by byte: what
/// follows belongs to the console).
fn read_line(stream: &mut TcpStream, quick: bool) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
        if quick {
            quickack(stream.as_raw_fd());
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

fn say(stream: &mut TcpStream, line: &str, quick: bool) -> Result<String, String> {
    stream
        .write_all(format!("{line}\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    read_line(stream, quick)
}

/// Attaches to console `name` as `console` does: the master names the group's
/// port, the group attaches. Returns the group connection in console mode.
fn conserver_call(port: u16, name: &str, quick: bool) -> Result<TcpStream, String> {
    let open = |port: u16| -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        if quick {
            quickack(s.as_raw_fd());
        }
        let hello = read_line(&mut s, quick)?;
        let login = say(&mut s, "login root", quick)?;
        if hello != "ok" || login != "ok" {
            return Err(format!("conserver port {port}: {hello:?}, {login:?}"));
        }
        Ok(s)
    };
    let mut master = open(port)?;
    let answer = say(&mut master, &format!("call {name}"), quick)?;
    let group: u16 = answer
        .parse()
        .map_err(|_| format!("call {name} at the master: {answer:?}"))?;
    let mut conn = open(group)?;
    let attached = say(&mut conn, &format!("call {name}"), quick)?;
    if !attached.starts_with('[') {
        return Err(format!("call {name}: {attached:?}"));
    }
    let _ = master.write_all(b"exit\r\n");
    Ok(conn)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A viewer's connection; a TCP one may acknowledge at once (`--quickack`).
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream, bool),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        match self {
            Conn::Unix(s) => s.try_clone().map(Conn::Unix),
            Conn::Tcp(s, quick) => s.try_clone().map(|s| Conn::Tcp(s, *quick)),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s, _) => s.set_read_timeout(timeout),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s, _) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s, quick) => {
                let n = s.read(buf)?;
                if *quick {
                    quickack(s.as_raw_fd());
                }
                Ok(n)
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s, _) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Output of viewer `.0`, read at `.2`.
type Output = (usize, Vec<u8>, Instant);

/// One viewer per console, each read by a thread of its own that stamps what
/// arrives.
pub(crate) struct Viewers {
    writers: Vec<Conn>,
    output: Receiver<Output>,
    readers: Vec<JoinHandle<()>>,
    screens: Vec<Screen>,
    /// Whose output is kept for `wait_for` (not a flood's).
    kept: Vec<bool>,
    /// Bytes read in all.
    pub(crate) bytes: u64,
}

impl Viewers {
    pub(crate) fn open(service: &Service, names: &[String]) -> Result<Viewers, String> {
        let (tx, output) = crossbeam_channel::unbounded();
        let mut viewers = Viewers {
            writers: Vec::new(),
            output,
            readers: Vec::new(),
            screens: names.iter().map(|_| Screen::default()).collect(),
            kept: vec![true; names.len()],
            bytes: 0,
        };
        for (i, name) in names.iter().enumerate() {
            let mut conn = service.connect(name)?;
            if service.side == Side::Theirs {
                // Console output flows once the client says it is connected.
                conn.write_all(&[ESCAPE, b";"].concat())
                    .map_err(|e| e.to_string())?;
            }
            let reader = conn.try_clone().map_err(|e| e.to_string())?;
            viewers.writers.push(conn);
            viewers.readers.push(spawn_reader(i, reader, tx.clone()));
        }
        Ok(viewers)
    }

    pub(crate) fn send(&mut self, i: usize, bytes: &[u8]) -> Result<(), String> {
        self.writers[i]
            .write_all(bytes)
            .map_err(|e| format!("viewer {i}: {e}"))
    }

    /// Takes one piece of output; false at `deadline`.
    fn pump(&mut self, deadline: Instant, keep: bool) -> bool {
        match self.output.recv_deadline(deadline) {
            Ok((i, bytes, at)) => {
                self.bytes += bytes.len() as u64;
                if keep && self.kept[i] {
                    self.screens[i].push(&bytes, at);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Console `i`'s output is counted but not kept (it floods).
    pub(crate) fn forget(&mut self, i: usize) {
        self.kept[i] = false;
        self.screens[i] = Screen::default();
    }

    /// Reads (and forgets) everything until `deadline`.
    pub(crate) fn drain_until(&mut self, deadline: Instant) {
        while self.pump(deadline, false) {}
        for screen in &mut self.screens {
            *screen = Screen::default();
        }
    }

    /// Reads (and forgets) until nothing came for `quiet`, or `deadline`.
    pub(crate) fn drain_until_quiet(&mut self, quiet: Duration, deadline: Instant) {
        while Instant::now() < deadline && self.pump((Instant::now() + quiet).min(deadline), false)
        {
        }
        self.drain_until(Instant::now());
    }

    fn wait_for(&mut self, i: usize, marker: &str, deadline: Instant) -> Option<Instant> {
        loop {
            if let Some(at) = self.screens[i].take(marker) {
                return Some(at);
            }
            if !self.pump(deadline, true) {
                return None;
            }
        }
    }

    /// Every console answers an echo (trying once a second, `tries` times), then
    /// five more.
    pub(crate) fn warm_up(&mut self, tries: usize) -> Result<(), String> {
        for i in 0..self.writers.len() {
            let answered = (0..tries).any(|k| {
                self.send(i, format!("echo w{k}\n").as_bytes()).is_ok()
                    && self
                        .wait_for(
                            i,
                            &format!("\nw{k}\r"),
                            Instant::now() + Duration::from_secs(1),
                        )
                        .is_some()
            });
            if !answered {
                return Err(format!("console {i} never echoed"));
            }
            for k in 0..5 {
                self.send(i, format!("echo v{k}\n").as_bytes())?;
                self.wait_for(
                    i,
                    &format!("\nv{k}\r"),
                    Instant::now() + Duration::from_secs(5),
                );
            }
        }
        Ok(())
    }

    /// One echo `echo mK` on console `i`: its latency in ms, None if lost (5 s).
    pub(crate) fn echo_once(&mut self, i: usize, k: usize) -> Option<f64> {
        let at = Instant::now();
        self.send(i, format!("echo m{k}\n").as_bytes()).ok()?;
        let arrived = self.wait_for(i, &format!("\nm{k}\r"), at + Duration::from_secs(5))?;
        Some((arrived - at).as_secs_f64() * 1e3)
    }

    /// `rounds` rounds of one echo to every console; latencies in ms and losses.
    fn echo_rounds(&mut self, rounds: usize) -> (Vec<f64>, usize) {
        let mut latencies = Vec::with_capacity(rounds * self.writers.len());
        let mut lost = 0;
        for round in 1..=rounds {
            let line = format!("echo m{round}\n");
            let marker = format!("\nm{round}\r");
            let mut sent = Vec::with_capacity(self.writers.len());
            for i in 0..self.writers.len() {
                let at = Instant::now();
                if self.send(i, line.as_bytes()).is_ok() {
                    sent.push((i, at));
                } else {
                    lost += 1;
                }
            }
            for (i, at) in sent {
                match self.wait_for(i, &marker, at + Duration::from_secs(5)) {
                    Some(arrived) => latencies.push((arrived - at).as_secs_f64() * 1e3),
                    None => lost += 1,
                }
            }
        }
        (latencies, lost)
    }
}

impl Drop for Viewers {
    fn drop(&mut self) {
        for conn in &self.writers {
            conn.shutdown();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

fn spawn_reader(i: usize, mut conn: Conn, tx: Sender<Output>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || tx.send((i, buf[..n].to_vec(), Instant::now())).is_err() {
                break;
            }
        }
    })
}
