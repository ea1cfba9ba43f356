//! A private, unprivileged `libvirtd` per test.
//!
//! Every [`PrivateDaemon`] is a `libvirtd --timeout N` child process running in
//! *session* mode with all of its state in a fresh temporary directory, so tests
//! never touch `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt` or a system
//! daemon, and two test processes never share anything.
//!
//! # Findings (verified on Debian 12, libvirt 9.0.0, QEMU 7.2, tests run as root)
//!
//! * **Which uid.** `libvirtd` started as root is always the privileged *system*
//!   daemon (system paths), so the daemon must run under another uid. When the
//!   tests run as root we use `nobody:nogroup` (65534:65534): it exists on every
//!   fresh Debian 12 (base-passwd), needs no user creation, owns nothing, has no
//!   supplementary groups (no `kvm`, no `disk`), and has a passwd entry, which
//!   libvirt needs: with a uid that has none (tried 4242) plain RPCs work, but
//!   creating a domain fails with "Failed to find user record for uid '4242'".
//!   Override with `VIRT_REACTOR_DAEMON_UID` / `VIRT_REACTOR_DAEMON_GID`. When the
//!   tests do not run as root, the daemon simply runs as the current user.
//! * **How.** `setpriv --reuid=U --regid=G --clear-groups --pdeathsig KILL --
//!   libvirtd --timeout N` (util-linux). The uid switch drops all capabilities;
//!   `--pdeathsig` is applied after the switch and does survive it (checked), so
//!   the daemon dies with the test process even when the test is SIGKILLed
//!   (nextest timeout) and `Drop` never runs. Caveat: Linux delivers the parent
//!   death signal when the *thread* that spawned the child exits, so start (and
//!   `restart`) a daemon on the thread that keeps it, normally the test's own
//!   thread; do not start one in a short-lived helper thread.
//! * **Dirs.** `HOME`, `XDG_RUNTIME_DIR`, `XDG_CONFIG_HOME`, `XDG_CACHE_HOME`,
//!   `XDG_DATA_HOME` and `TMPDIR` all point into the temp dir (mode 0700, owned by
//!   the daemon uid; root reaches it through `CAP_DAC_OVERRIDE`). The daemon
//!   reads `$XDG_CONFIG_HOME/libvirt/libvirtd.conf` and listens on
//!   `$XDG_RUNTIME_DIR/libvirt/libvirt-sock` (mode 0700). The parent of the temp
//!   dir must be traversable by that uid; `std::env::temp_dir()` is used when it
//!   is, `/tmp` otherwise (and also when the socket path would exceed
//!   `sun_path`).
//! * **virtlogd.** Without configuration the session QEMU driver auto-spawns a
//!   session `virtlogd --timeout=120` on the first domain start, and it outlives
//!   libvirtd. `$XDG_CONFIG_HOME/libvirt/qemu.conf` therefore sets
//!   `stdio_handler = "file"`; then no virtlogd is started (checked with a
//!   running TCG domain). QEMU processes are daemonized by libvirtd and survive
//!   its death (SIGTERM or SIGKILL); a restarted daemon re-attaches to them.
//!   `Drop` therefore SIGKILLs every process of the daemon uid whose command line
//!   or environment mentions this temp dir (QEMU, a stray virtlogd).
//! * **URIs.** Root connects to the unprivileged daemon fine (session socket
//!   mode 0700 and no auth; root passes the permission check):
//!   `qemu+unix:///session?socket=<root>/run/libvirt/libvirt-sock` (driver type
//!   "QEMU"; `virConnectGetURI` returns exactly that string), and the test
//!   driver works **through this daemon** as
//!   `test+unix:///default?socket=<same socket>`: libvirtd carries the test
//!   driver inside libvirt.so. Each new connection to `test:///default` gets a
//!   fresh default state unless another connection to it is still open in the
//!   daemon. With the explicit `socket=` parameter the client never
//!   auto-spawns a daemon, also not as non-root.
//! * **Storage.** A `dir` pool works: define, `build` (creates the directory as
//!   the daemon uid), start, `vol-create-as`, `vol-upload`/`vol-download`
//!   round trip byte-exact (virsh and `virt`). A pool directory the *test*
//!   creates as root is not writable for the daemon; use [`PrivateDaemon::create_dir`]
//!   or `StoragePool::build`.
//! * **Keepalive.** `keepalive_interval`/`keepalive_count` from libvirtd.conf are
//!   honoured. The server only runs keepalive on a connection whose client had
//!   an event implementation registered when it opened the connection (even
//!   without `virConnectSetKeepAlive`); it then closes the connection after
//!   about interval × (count + 1) s without traffic ("connection closed due to
//!   keepalive timeout" in the log). A client without an event implementation
//!   is never pinged. A C client that does not ignore SIGPIPE dies of it on the
//!   next call after such a close; Rust binaries ignore SIGPIPE.
//! * **Readiness.** The listening socket exists before the drivers have
//!   initialised, and it stays on disk after a SIGKILL, so neither "socket exists"
//!   nor "connect() succeeds" means ready. `start` sends a raw keepalive PING
//!   (program 0x6b656570) and waits for the PONG: libvirtd only reads a client
//!   after it has finished driver initialisation and accepted it.
//! * **Restart.** A restarted daemon finds its persistent objects again (same
//!   dirs). Surprise: libvirt 9.0 marks an *inactive* persistent `dir` pool
//!   active on daemon start if its directory exists.
//! * **Cost.** `start` (spawn to PONG) takes about 44 ms here (median of 21;
//!   range 41-93 ms), `Drop` about 45 ms (SIGTERM is honoured in ~40 ms). The
//!   first domain start on a fresh daemon takes about 2.4 s extra, because the
//!   QEMU capabilities cache (`$XDG_CACHE_HOME/libvirt/qemu/capabilities`) is
//!   per daemon and has to be probed.
//! * **Crashes.** If the test process dies without `Drop`, its libvirtd dies of
//!   the parent-death signal, but the temp dir (and any QEMU) stays; the next
//!   `start` removes such dirs once their pid is gone and they are older than
//!   10 minutes (killing processes that still mention them).
//! * **TCP and network namespaces.** With [`DaemonConfig::tcp`] the daemon also
//!   listens on TCP without authentication and readiness is probed there; with
//!   [`DaemonConfig::netns`] it runs inside that namespace. Findings in hosts.rs.
//! * Harmless noise in `libvirtd.log` at the default level (3 = warnings):
//!   D-Bus unavailable, no dnsmasq, `/dev/kvm` permission denied, DMI udev
//!   errors, and one "End of file while reading data" per readiness probe.
//!
//! # Environment knobs
//!
//! `VIRT_REACTOR_LIBVIRTD` (daemon binary), `VIRT_REACTOR_DAEMON_UID`/`_GID`
//! (uid/gid when running as root), `VIRT_REACTOR_DAEMON_LOG` (libvirt log level
//! 1-4 for `libvirtd.log`, default 3), `VIRT_REACTOR_DAEMON_LOG_FILTERS`
//! (`log_filters`), `VIRT_REACTOR_KEEP_TESTBED=1` (keep the temp dir on drop).
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// uid/gid of `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;
/// How long `start`/`restart` wait for the daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll period while waiting for the daemon.
const POLL: Duration = Duration::from_millis(20);
/// How long a graceful stop may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// `sizeof(sockaddr_un.sun_path) - 1` on Linux.
const SUN_PATH_MAX: usize = 107;
/// Socket path relative to the temp dir (`$XDG_RUNTIME_DIR/libvirt/libvirt-sock`).
const SOCKET_REL: &str = "run/libvirt/libvirt-sock";
/// Lines of each log quoted in a startup error.
const TAIL_LINES: usize = 25;
/// Temp dirs are named `virt-reactor-<pid>-<counter>-<nanos hex>`.
const ROOT_PREFIX: &str = "virt-reactor-";
/// Age after which an orphaned temp dir is removed by the next `start`.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// Keepalive program of the libvirt RPC protocol ("keep").
const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
const KEEPALIVE_PROC_PING: u32 = 1;
const KEEPALIVE_PROC_PONG: u32 = 2;
/// `VIR_NET_MESSAGE` (an asynchronous message, no reply expected by protocol).
const MESSAGE_TYPE_MESSAGE: u32 = 2;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How to configure a [`PrivateDaemon`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// `keepalive_interval` in libvirtd.conf (seconds); `None` keeps libvirt's default (5).
    pub keepalive_interval: Option<u32>,
    /// `keepalive_count` in libvirtd.conf; `None` keeps libvirt's default (5).
    pub keepalive_count: Option<u32>,
    /// `libvirtd --timeout`: the daemon exits after this many seconds without
    /// clients (and without running domains). 0 disables the timeout.
    pub idle_timeout_secs: u32,
    /// Run the daemon inside this network namespace (`ip netns exec NS`).
    pub netns: Option<String>,
    /// Also listen on TCP at this address, without authentication
    /// (`libvirtd --listen`, `auth_tcp = "none"`); readiness is then probed there.
    pub tcp: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            keepalive_interval: None,
            keepalive_count: None,
            idle_timeout_secs: 120,
            netns: None,
            tcp: None,
        }
    }
}

/// A private session `libvirtd`, stopped and wiped on drop.
#[derive(Debug)]
pub struct PrivateDaemon {
    root: PathBuf,
    socket: PathBuf,
    cfg: DaemonConfig,
    libvirtd: PathBuf,
    setpriv: PathBuf,
    /// uid/gid the daemon runs as when we switch (we are root); `None` = as ourselves.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    pid: u32,
    keep: bool,
}

impl PrivateDaemon {
    /// Starts a daemon with [`DaemonConfig::default`].
    pub fn start() -> io::Result<PrivateDaemon> {
        Self::start_with(DaemonConfig::default())
    }

    /// Starts a daemon with `cfg` and waits until it answers RPCs.
    pub fn start_with(cfg: DaemonConfig) -> io::Result<PrivateDaemon> {
        let libvirtd = match std::env::var_os("VIRT_REACTOR_LIBVIRTD") {
            Some(p) => PathBuf::from(p),
            None => find_program("libvirtd")?,
        };
        let setpriv = find_program("setpriv")?;
        let run_as = if euid() == 0 {
            Some((
                env_u32("VIRT_REACTOR_DAEMON_UID", NOBODY)?,
                env_u32("VIRT_REACTOR_DAEMON_GID", NOBODY)?,
            ))
        } else {
            None
        };
        let root = make_root(run_as.map(|(uid, _)| uid))?;
        let socket = root.join(SOCKET_REL);
        // From here on, Drop cleans up whatever happens.
        let mut daemon = PrivateDaemon {
            root,
            socket,
            cfg,
            libvirtd,
            setpriv,
            run_as,
            child: None,
            pid: 0,
            keep: std::env::var_os("VIRT_REACTOR_KEEP_TESTBED").is_some_and(|v| v == "1"),
        };
        daemon.populate_root()?;
        daemon.spawn_and_wait()?;
        Ok(daemon)
    }

    /// A URI reaching `driver` through this daemon: `qemu` →
    /// `qemu+unix:///session?socket=…`, `test` → `test+unix:///default?socket=…`,
    /// anything else → `<driver>+unix:///session?socket=…`.
    pub fn uri(&self, driver: &str) -> String {
        let path = driver_path(driver);
        format!("{driver}+unix:///{path}?socket={}", self.socket.display())
    }

    /// As [`uri`](Self::uri) over TCP (`qemu+tcp://ADDR:PORT/session`), when the
    /// daemon listens on TCP.
    pub fn tcp_uri(&self, driver: &str) -> Option<String> {
        let addr = self.cfg.tcp?;
        Some(format!("{driver}+tcp://{addr}/{}", driver_path(driver)))
    }

    /// The daemon's read-write UNIX socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The private temp dir (the daemon's `HOME`), owned by the daemon uid.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pid of the current (or, after [`kill`](Self::kill), the last) daemon process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The uid the daemon runs as.
    pub fn daemon_uid(&self) -> u32 {
        self.run_as.map_or_else(euid, |(uid, _)| uid)
    }

    /// The daemon's own log (`log_outputs`), appended to across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("libvirtd.log")
    }

    /// The daemon's stdout/stderr, appended to across restarts.
    pub fn stderr_path(&self) -> PathBuf {
        self.root.join("libvirtd.stderr")
    }

    /// The last `lines` lines of the daemon log and of its stderr, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {} ---\n{}--- {} ---\n{}",
            self.log_path().display(),
            tail(&self.log_path(), lines),
            self.stderr_path().display(),
            tail(&self.stderr_path(), lines)
        )
    }

    /// Creates `root()/rel` (and parents below root) owned by the daemon uid,
    /// mode 0755, e.g. for a storage pool target. Returns the absolute path.
    pub fn create_dir(&self, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        let rel = rel.as_ref();
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} must be a plain relative path", rel.display()),
            ));
        }
        let path = self.root.join(rel);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)?;
        let mut dir = path.as_path();
        while dir != self.root {
            self.chown_to_daemon(dir)?;
            match dir.parent() {
                Some(parent) => dir = parent,
                None => break,
            }
        }
        Ok(path)
    }

    /// Gives `path` to the daemon uid (no-op when not running as root).
    pub fn chown_to_daemon(&self, path: &Path) -> io::Result<()> {
        match self.run_as {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Whether the daemon process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Freezes the daemon (SIGSTOP) until [`thaw`](Self::thaw): it keeps its sockets
    /// open but reads and answers nothing, like a deadlocked or paused daemon.
    pub fn freeze(&self) {
        assert!(send_signal(self.pid, libc::SIGSTOP), "SIGSTOP the daemon");
    }

    /// Lets a frozen daemon run again (SIGCONT). Idempotent.
    pub fn thaw(&self) {
        send_signal(self.pid, libc::SIGCONT);
    }

    /// SIGKILLs the daemon now and reaps it. Domains (QEMU) keep running; the
    /// stale socket file stays. Idempotent.
    pub fn kill(&mut self) {
        self.stop(false);
    }

    /// Stops the daemon if it runs (SIGTERM, then SIGKILL after ~3 s) and starts
    /// it again with the same directories and configuration, waiting until it
    /// answers RPCs. The pid changes.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop(true);
        self.spawn_and_wait()
    }

    fn populate_root(&self) -> io::Result<()> {
        for dir in ["run", "config/libvirt", "cache", "data", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.root.join(dir))?;
        }
        let mut conf = String::new();
        let level = match std::env::var("VIRT_REACTOR_DAEMON_LOG") {
            Ok(l) if matches!(l.as_str(), "1" | "2" | "3" | "4") => l,
            _ => "3".to_owned(),
        };
        conf.push_str(&format!(
            "log_outputs = \"{level}:file:{}\"\n",
            self.log_path().display()
        ));
        if let Ok(filters) = std::env::var("VIRT_REACTOR_DAEMON_LOG_FILTERS") {
            conf.push_str(&format!("log_filters = \"{filters}\"\n"));
        }
        if let Some(interval) = self.cfg.keepalive_interval {
            conf.push_str(&format!("keepalive_interval = {interval}\n"));
        }
        if let Some(count) = self.cfg.keepalive_count {
            conf.push_str(&format!("keepalive_count = {count}\n"));
        }
        if let Some(addr) = self.cfg.tcp {
            conf.push_str(&format!(
                "listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\n\
                 listen_addr = \"{}\"\ntcp_port = \"{}\"\n",
                addr.ip(),
                addr.port()
            ));
        }
        fs::write(self.root.join("config/libvirt/libvirtd.conf"), conf)?;
        // Without this the session QEMU driver spawns a virtlogd that outlives us.
        fs::write(
            self.root.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )?;
        if self.run_as.is_some() {
            chown_tree(&self.root, self)?;
        }
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())?;
        let err = out.try_clone()?;
        // `ip netns exec` and setpriv exec, so the child's pid is libvirtd's.
        let mut cmd = match &self.cfg.netns {
            Some(netns) => {
                let mut cmd = Command::new(find_program("ip")?);
                cmd.args(["netns", "exec", netns]).arg(&self.setpriv);
                cmd
            }
            None => Command::new(&self.setpriv),
        };
        if let Some((uid, gid)) = self.run_as {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups");
        }
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(&self.libvirtd);
        if self.cfg.tcp.is_some() {
            cmd.arg("--listen");
        }
        if self.cfg.idle_timeout_secs > 0 {
            cmd.arg("--timeout")
                .arg(self.cfg.idle_timeout_secs.to_string());
        }
        let root = &self.root;
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .env("HOME", root)
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_CACHE_HOME", root.join("cache"))
            .env("XDG_DATA_HOME", root.join("data"))
            .env("TMPDIR", root.join("tmp"))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot spawn private libvirtd {cmd:?}: {e}"),
            )
        })?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready(started)
    }

    fn wait_ready(&mut self, started: Instant) -> io::Result<()> {
        let deadline = started + START_TIMEOUT;
        let mut last_probe_error: String;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => return Err(io::Error::other("private libvirtd is not running")),
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(self.startup_error(
                    io::ErrorKind::Other,
                    &format!("exited during startup ({status})"),
                    started,
                ));
            }
            match self.ping(deadline) {
                Ok(()) => return Ok(()),
                Err(e) => last_probe_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                self.stop(false);
                return Err(self.startup_error(
                    io::ErrorKind::TimedOut,
                    &format!(
                        "did not answer on {} within {:?} (last probe: {last_probe_error})",
                        self.probed(),
                        START_TIMEOUT
                    ),
                    started,
                ));
            }
            sleep(POLL);
        }
    }

    /// Sends one keepalive PING where the daemon listens (TCP if it does) and
    /// waits (until `deadline`) for the PONG.
    fn ping(&self, deadline: Instant) -> io::Result<()> {
        let remaining = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        match self.cfg.tcp {
            Some(addr) => {
                let stream = TcpStream::connect_timeout(&addr, remaining())?;
                stream.set_read_timeout(Some(remaining()))?;
                stream.set_write_timeout(Some(remaining()))?;
                exchange_ping(stream)
            }
            None => {
                let stream = UnixStream::connect(&self.socket)?;
                stream.set_read_timeout(Some(remaining()))?;
                stream.set_write_timeout(Some(remaining()))?;
                exchange_ping(stream)
            }
        }
    }

    /// Where readiness is probed, for messages.
    fn probed(&self) -> String {
        match self.cfg.tcp {
            Some(addr) => format!("tcp {addr}"),
            None => self.socket.display().to_string(),
        }
    }

    fn startup_error(&self, kind: io::ErrorKind, what: &str, started: Instant) -> io::Error {
        io::Error::new(
            kind,
            format!(
                "private libvirtd (pid {}, root {}) {what} after {} ms \
                 (VIRT_REACTOR_KEEP_TESTBED=1 keeps the root)\n{}",
                self.pid,
                self.root.display(),
                started.elapsed().as_millis(),
                self.log_tail(TAIL_LINES)
            ),
        )
    }

    /// Stops the daemon process: SIGTERM and up to STOP_GRACE when `graceful`,
    /// then SIGKILL; always reaps. Never panics.
    fn stop(&mut self, graceful: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if graceful && matches!(child.try_wait(), Ok(None)) {
            // The child is not reaped yet, so its pid cannot have been reused. A
            // frozen daemon only acts on SIGTERM once thawed.
            send_signal(child.id(), libc::SIGCONT);
            send_signal(child.id(), libc::SIGTERM);
            let until = Instant::now() + STOP_GRACE;
            while Instant::now() < until {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) => sleep(Duration::from_millis(10)),
                    Err(_) => break,
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        self.stop(true);
        kill_processes_mentioning(&self.root, self.daemon_uid());
        if self.keep {
            eprintln!(
                "VIRT_REACTOR_KEEP_TESTBED=1: keeping {}",
                self.root.display()
            );
            return;
        }
        if fs::remove_dir_all(&self.root).is_err() {
            // A leftover process may still have been writing; try once more.
            sleep(Duration::from_millis(100));
            if let Err(e) = fs::remove_dir_all(&self.root) {
                eprintln!("cannot remove {}: {e}", self.root.display());
            }
        }
    }
}

/// SIGKILLs processes left behind by a testbed (QEMU, virtlogd, a stray daemon):
/// real uid `uid`, and `root` in argv or environment. Waits up to 2 s for them.
fn kill_processes_mentioning(root: &Path, uid: u32) {
    let mut needle = root.as_os_str().as_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id();
    let mut victims = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || pid == 1 || proc_real_uid(pid) != Some(uid) {
            continue;
        }
        let mentions = ["cmdline", "environ"].iter().any(|f| {
            fs::read(format!("/proc/{pid}/{f}"))
                .map(|bytes| contains(&bytes, &needle))
                .unwrap_or(false)
        });
        if mentions && send_signal(pid, libc::SIGKILL) {
            victims.push(pid);
        }
    }
    let until = Instant::now() + Duration::from_secs(2);
    while !victims.is_empty() && Instant::now() < until {
        victims.retain(|&pid| proc_is_live(pid));
        sleep(Duration::from_millis(10));
    }
}

/// Removes testbeds of test processes that died without running `Drop`
/// (SIGKILL, abort): `virt-reactor-<pid>-<n>-<hex>` below `parent` whose pid is
/// gone and that are older than [`STALE_AFTER`]. Their libvirtd already died of
/// its parent-death signal.
fn sweep_stale_roots(parent: &Path, uid: u32) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(ROOT_PREFIX)) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let well_formed = parts.len() == 3
            && parts[0].parse::<u32>().is_ok()
            && parts[1].parse::<u32>().is_ok()
            && u64::from_str_radix(parts[2], 16).is_ok();
        if !well_formed {
            continue;
        }
        let owner: u32 = parts[0].parse().unwrap_or(0);
        let created = u64::from_str_radix(parts[2], 16).unwrap_or(u64::MAX);
        // Only old ones: a live test in another pid namespace sharing this
        // directory would look dead. nextest kills a test after 5 minutes.
        let old = now_nanos().saturating_sub(created) > STALE_AFTER.as_nanos() as u64;
        if !old || owner == std::process::id() || proc_is_live(owner) {
            continue;
        }
        let path = entry.path();
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            kill_processes_mentioning(&path, uid);
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// The path of a `driver`'s URI: `test` → `default`, anything else → `session`.
fn driver_path(driver: &str) -> &'static str {
    match driver {
        "test" => "default",
        _ => "session",
    }
}

/// Sends one keepalive PING on `stream` (timeouts set) and reads the PONG.
fn exchange_ping(mut stream: impl Read + Write) -> io::Result<()> {
    // Length word (including itself), then the header: program, version,
    // procedure, type, serial, status; all big-endian u32.
    let mut msg = Vec::with_capacity(28);
    for word in [
        28,
        KEEPALIVE_PROGRAM,
        1,
        KEEPALIVE_PROC_PING,
        MESSAGE_TYPE_MESSAGE,
        0,
        0,
    ] {
        msg.extend_from_slice(&u32::to_be_bytes(word));
    }
    stream.write_all(&msg)?;
    let mut reply = [0u8; 28];
    stream.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_be_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(4) == KEEPALIVE_PROGRAM && word(12) == KEEPALIVE_PROC_PONG {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply to keepalive PING: {reply:02x?}"),
        ))
    }
}

/// Creates a fresh, unique temp dir (mode 0700) for a daemon running as `uid`.
fn make_root(uid: Option<u32>) -> io::Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{ROOT_PREFIX}{}-{n}-{:x}", std::process::id(), now_nanos());
    let tmp = std::env::temp_dir();
    let parent = if parent_is_usable(&tmp, uid, name.len()) {
        tmp
    } else {
        PathBuf::from("/tmp")
    };
    let parent = fs::canonicalize(&parent)?;
    sweep_stale_roots(&parent, uid.unwrap_or_else(euid));
    let root = parent.join(name);
    fs::DirBuilder::new().mode(0o700).create(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700))?;
    Ok(root)
}

/// Whether a daemon running as `uid` can traverse `parent`, and the socket path fits.
fn parent_is_usable(parent: &Path, uid: Option<u32>, name_len: usize) -> bool {
    let Ok(parent) = fs::canonicalize(parent) else {
        return false;
    };
    let socket_len = parent.as_os_str().len() + 1 + name_len + 1 + SOCKET_REL.len();
    if socket_len > SUN_PATH_MAX {
        return false;
    }
    let Some(uid) = uid else {
        return true;
    };
    parent.ancestors().all(|dir| {
        fs::metadata(dir)
            .map(|m| m.mode() & 0o001 != 0 || (m.uid() == uid && m.mode() & 0o100 != 0))
            .unwrap_or(false)
    })
}

fn chown_tree(path: &Path, daemon: &PrivateDaemon) -> io::Result<()> {
    daemon.chown_to_daemon(path)?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), daemon)?;
        }
    }
    Ok(())
}

pub fn find_program(name: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"]
            .iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if fs::metadata(&candidate).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("`{name}` not found in PATH or /usr/sbin; run scripts/setup-host.sh"),
    ))
}

fn env_u32(var: &str, default: u32) -> io::Result<u32> {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{var}={v:?}: {e}"))),
        Err(_) => Ok(default),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let mut out = all[all.len().saturating_sub(lines)..].join("\n");
            out.push('\n');
            out
        }
        Err(e) => format!("(cannot read: {e})\n"),
    }
}

/// Wall-clock time in nanoseconds since the epoch (0 if the clock is before it).
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Real uid of a process, from `/proc/PID/status`.
pub fn proc_real_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` exists and is not a zombie.
pub fn proc_is_live(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `sig` to `pid`; true if it was delivered.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) only takes integers; a positive pid addresses exactly one process.
    unsafe { libc::kill(pid, sig) == 0 }
}
