//! Several "hypervisor hosts" on this machine: each a network namespace with a
//! veth pair to the root namespace, and a private libvirtd ([`PrivateDaemon`])
//! running inside it that listens on TCP at the namespace's address only.
//!
//! # Findings (verified on Debian 12, libvirt 9.0.0, QEMU 7.2, tests run as root)
//!
//! * **Session mode serves TCP.** The unprivileged session libvirtd (as `nobody`)
//!   accepts `--listen` with `listen_tls = 0`, `listen_tcp = 1`,
//!   `auth_tcp = "none"`, `listen_addr` and `tcp_port` in its
//!   `$XDG_CONFIG_HOME/libvirt/libvirtd.conf`; port 16509 needs no privilege
//!   inside a namespace of its own. From the root namespace
//!   `qemu+tcp://10.x.y.2:16509/session` works (guests, consoles, a `dir` pool,
//!   volumes); `…/system` is refused ("unexpected qemu URI path '/system', try
//!   qemu:///session"). `test+tcp://ADDR:16509/default` reaches the test driver.
//!   No privileged daemon or mount namespace is needed.
//! * **In the namespace.** `ip netns exec NS setpriv … libvirtd`: both exec, so
//!   the spawned pid is libvirtd's and `--pdeathsig` still applies. QEMU runs in
//!   the namespace too (it is libvirtd's child), survives a SIGKILL of libvirtd
//!   and is found again by the restarted daemon. The daemon's UNIX socket is a
//!   path in the shared filesystem, so `PrivateDaemon::uri` still works from the
//!   root namespace (used here only for set-up).
//! * **Restart on the same address.** A daemon started right after a SIGKILL of
//!   the previous one binds the same address and port (libvirt sets
//!   SO_REUSEADDR) and finds its guests and pool again.
//! * **Addresses.** Host `i` of a test process gets a /30 from 10.213.0.0/16:
//!   `.1` on the root side (`vrh<pid>-<i>`), `.2` inside (`eth0`). The /30s are
//!   chosen under an `flock` on [`LOCK`] and skip every subnet an address or
//!   route of the root namespace overlaps, so parallel test processes (nextest)
//!   and real networks never collide.
//! * **Clean-up.** Dropping a [`Host`] stops its daemon and kills its QEMUs
//!   (`PrivateDaemon`'s drop), then kills whatever still runs in the namespace
//!   and deletes the namespace, which deletes the veth pair. Namespaces of
//!   processes that died without dropping (`vrh-<pid>-<i>` with a dead pid) are
//!   swept the same way by the next [`start`].
#![allow(dead_code)]

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::daemon::{find_program, proc_is_live, send_signal, DaemonConfig, PrivateDaemon};

/// Serialises address allocation between test processes.
pub const LOCK: &str = "/tmp/virt-reactor-hosts.lock";
/// Where the /30s come from: 10.213.0.0/16.
const NET_BASE: u32 = u32::from_be_bytes([10, 213, 0, 0]);
const NET_SLOTS: u32 = 1 << 14;
/// libvirt's TCP port; every host has an address of its own.
pub const PORT: u16 = 16509;
/// Namespaces are `vrh-<pid>-<n>`, root-side veths `vrh<pid>-<n>` (15 bytes at most).
const PREFIX: &str = "vrh";
/// The name of the storage pool every host has.
pub const POOL: &str = "pool";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP_OWN: Once = Once::new();

/// One host: a namespace, its addresses and its daemon. Fields drop in order:
/// the daemon (and its QEMUs) before the namespace.
pub struct Host {
    /// `h1`, `h2`, …: the label a test gives the connection.
    pub label: String,
    /// Kill (`kill`), `restart`, `freeze`/`thaw` go through it.
    pub daemon: PrivateDaemon,
    /// The address the daemon listens on, inside the namespace.
    pub addr: Ipv4Addr,
    net: Netns,
}

impl Host {
    /// `qemu+tcp://ADDR:16509/session`.
    pub fn uri(&self) -> String {
        self.daemon.tcp_uri("qemu").expect("hosts listen on TCP")
    }

    /// `LABEL=URI`, as the programs take it.
    pub fn labelled_uri(&self) -> String {
        format!("{}={}", self.label, self.uri())
    }

    /// The network namespace's name.
    pub fn netns(&self) -> &str {
        &self.net.name
    }

    /// The directory of the host's `dir` pool [`POOL`].
    pub fn pool_dir(&self) -> PathBuf {
        self.daemon.root().join("pools").join(POOL)
    }
}

/// Starts `n` hosts labelled `h1` … `hN`, each with a started, persistent `dir`
/// pool [`POOL`]. Start them on the thread that keeps them (see daemon.rs on
/// `--pdeathsig`).
pub fn start(n: usize) -> io::Result<Vec<Host>> {
    let nets = {
        let lock = File::create(LOCK)?;
        flock(&lock)?;
        SWEEP_OWN.call_once(|| sweep(true));
        sweep(false);
        let mut taken = used_subnets()?;
        let mut nets = Vec::with_capacity(n);
        for _ in 0..n {
            let slot = (0..NET_SLOTS)
                .map(|i| NET_BASE + 4 * i)
                .find(|&net| !taken.iter().any(|&(a, len)| overlaps(net, 30, a, len)))
                .ok_or_else(|| io::Error::other("no free /30 left in 10.213.0.0/16"))?;
            taken.push((slot, 30));
            nets.push(Netns::create(slot)?);
        }
        nets
        // The lock file closes here: our addresses are visible to the next one.
    };
    let mut hosts = Vec::with_capacity(n);
    for (i, net) in nets.into_iter().enumerate() {
        let addr = Ipv4Addr::from(net.subnet + 2);
        let daemon = PrivateDaemon::start_with(DaemonConfig {
            netns: Some(net.name.clone()),
            tcp: Some(SocketAddr::from((addr, PORT))),
            // The test's lifetime bounds it (parent-death signal), not idleness.
            idle_timeout_secs: 0,
            ..DaemonConfig::default()
        })?;
        let host = Host {
            label: format!("h{}", i + 1),
            daemon,
            addr,
            net,
        };
        create_pool(&host)?;
        hosts.push(host);
    }
    Ok(hosts)
}

/// Defines, builds and starts the pool with virsh over the UNIX socket: no
/// connection of this process exists before the test registers its event loop.
fn create_pool(host: &Host) -> io::Result<()> {
    host.daemon.create_dir("pools")?;
    let script = format!(
        "pool-define-as {POOL} dir --target {dir}; pool-build {POOL}; pool-start {POOL}",
        dir = host.pool_dir().display()
    );
    let out = Command::new(find_program("virsh")?)
        .args(["-q", "-c", &host.daemon.uri("qemu"), &script])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "virsh {script} on {}: {}\n{}",
            host.label,
            String::from_utf8_lossy(&out.stderr),
            host.daemon.log_tail(20)
        )))
    }
}

/// A network namespace and its veth pair; deleted on drop.
struct Netns {
    name: String,
    /// The root side of the veth pair.
    link: String,
    /// The /30's network address.
    subnet: u32,
}

impl Netns {
    fn create(subnet: u32) -> io::Result<Netns> {
        let (pid, n) = (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let net = Netns {
            name: format!("{PREFIX}-{pid}-{n}"),
            link: format!("{PREFIX}{pid}-{n}"),
            subnet,
        };
        let outside = format!("{}/30", Ipv4Addr::from(subnet + 1));
        let inside = format!("{}/30", Ipv4Addr::from(subnet + 2));
        ip(&["netns", "add", &net.name])?;
        // From here on, drop removes whatever exists.
        let (ns, link) = (net.name.as_str(), net.link.as_str());
        let steps: [&[&str]; 6] = [
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
            &["addr", "add", &outside, "dev", link],
            &["link", "set", link, "up"],
            &["-n", ns, "addr", "add", &inside, "dev", "eth0"],
            &["-n", ns, "link", "set", "eth0", "up"],
            &["-n", ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step)?;
        }
        Ok(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name, &self.link);
    }
}

/// Kills what still runs in namespace `name`, deletes it and the veth `link`.
fn remove(name: &str, link: &str) {
    let pids = ip_output(&["netns", "pids", name]).unwrap_or_default();
    let pids: Vec<u32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for &pid in &pids {
        send_signal(pid, libc::SIGKILL);
    }
    let until = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| proc_is_live(p)) && Instant::now() < until {
        sleep(Duration::from_millis(10));
    }
    // Deleting the namespace deletes the pair; the link may outlive a namespace
    // some process still held.
    let _ = ip(&["link", "del", link]);
    if let Err(e) = ip(&["netns", "del", name]) {
        eprintln!("hosts: {e}");
    }
}

/// Removes namespaces and veths of test processes that are gone (and, with
/// `own`, those of an earlier process that had this pid).
fn sweep(own: bool) {
    let me = std::process::id();
    let stale = |name: &str, sep: &str| -> Option<u32> {
        let rest = name.strip_prefix(PREFIX)?.strip_prefix(sep)?;
        let (pid, n) = rest.split_once('-')?;
        let pid: u32 = pid.parse().ok()?;
        n.parse::<u32>().ok()?;
        let dead = if pid == me { own } else { !proc_is_live(pid) };
        dead.then_some(pid)
    };
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if stale(&name, "-").is_some() {
            let link = name.replacen(&format!("{PREFIX}-"), PREFIX, 1);
            remove(&name, &link);
        }
    }
    for entry in fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let link = entry.file_name().to_string_lossy().into_owned();
        if stale(&link, "").is_some() {
            let _ = ip(&["link", "del", &link]);
        }
    }
}

/// Every IPv4 subnet in use in the root namespace: addresses and routes.
fn used_subnets() -> io::Result<Vec<(u32, u32)>> {
    let addrs = ip_output(&["-4", "-o", "addr", "show"])?;
    let routes = ip_output(&["-4", "-o", "route", "show", "table", "all"])?;
    let words = addrs
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .chain(routes.lines().filter_map(|l| {
            let mut words = l.split_whitespace();
            let first = words.next()?;
            // "local 10.0.0.1 …", "broadcast …": the prefix follows the type.
            match first {
                "local" | "broadcast" | "unicast" | "multicast" => words.next(),
                _ => Some(first),
            }
        }));
    Ok(words.filter_map(parse_prefix).collect())
}

/// `a.b.c.d[/len]` → (network, len); `default` and other words → None.
fn parse_prefix(word: &str) -> Option<(u32, u32)> {
    let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(addr) & mask(len), len))
}

fn mask(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

/// Whether two prefixes share an address.
fn overlaps(a: u32, a_len: u32, b: u32, b_len: u32) -> bool {
    let len = a_len.min(b_len);
    a & mask(len) == b & mask(len)
}

fn ip(args: &[&str]) -> io::Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> io::Result<String> {
    let out = Command::new(find_program("ip")?).args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Waits for an exclusive lock on `file`, held until it is closed.
#[allow(unsafe_code)]
fn flock(file: &File) -> io::Result<()> {
    // SAFETY: flock(2) only takes the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
