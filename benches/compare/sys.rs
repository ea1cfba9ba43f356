//! The few libc calls the benchmark needs: CPU time, peak RSS, malloc'd bytes, the
//! fd limit; and a counting allocator for the Rust heap.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

/// The system allocator, counting live Rust heap bytes.
pub(crate) struct Counting;

static RUST_HEAP: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is
// only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        RUST_HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        RUST_HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        RUST_HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        RUST_HEAP.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live bytes allocated by Rust code (virt-reactor, virt, the benchmark).
pub(crate) fn rust_heap() -> i64 {
    RUST_HEAP.load(Ordering::Relaxed) as i64
}

/// Live bytes allocated through malloc by anyone (libvirt and Rust alike).
pub(crate) fn malloc_heap() -> i64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as i64
}

/// What `getrusage(RUSAGE_SELF)` counts for the whole process (every thread), at
/// one moment; subtract two for what happened in between.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    /// User + system CPU time.
    pub(crate) cpu: Duration,
    /// System CPU time alone (the kernel on the process's behalf).
    pub(crate) sys: Duration,
    /// Minor page faults (first touches of fresh memory, mostly).
    pub(crate) minflt: u64,
    /// Voluntary context switches: a thread blocked (waits, wakeups).
    pub(crate) nvcsw: u64,
    /// Involuntary ones: a thread was preempted (mostly the machine's load).
    pub(crate) nivcsw: u64,
}

impl Usage {
    pub(crate) fn now() -> Usage {
        let usage = rusage();
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        Usage {
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            sys: tv(usage.ru_stime),
            minflt: usage.ru_minflt as u64,
            nvcsw: usage.ru_nvcsw as u64,
            nivcsw: usage.ru_nivcsw as u64,
        }
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;

    fn sub(self, earlier: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            sys: self.sys.saturating_sub(earlier.sys),
            minflt: self.minflt.saturating_sub(earlier.minflt),
            nvcsw: self.nvcsw.saturating_sub(earlier.nvcsw),
            nivcsw: self.nivcsw.saturating_sub(earlier.nivcsw),
        }
    }
}

/// User + system CPU time of another process and of the children it has reaped
/// (`/proc/PID/stat` fields 14 to 17), e.g. the daemon and its helpers.
pub(crate) fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its ')' do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The CPU time of `pids` together (see `process_cpu_time`).
pub(crate) fn cpu_time(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| process_cpu_time(p)).sum()
}

/// Peak resident set size of this process, in KiB.
pub(crate) fn max_rss_kib() -> u64 {
    rusage().ru_maxrss as u64
}

fn rusage() -> libc::rusage {
    // SAFETY: an all-zero rusage is a valid value, and getrusage writes only into it.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    }
}

/// Current resident set size, in bytes (from /proc/self/statm).
pub(crate) fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Pins the calling process to the CPU it runs on now: a single-threaded
/// micro-benchmark then measures the loop, not the scheduler moving it between the
/// VM's CPUs (which made single runs of scenario 2 scatter from 1.6 to 2.6 µs).
pub(crate) fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu takes nothing; the cpu_set_t is a plain bit set that
    // CPU_ZERO/CPU_SET initialize and sched_setaffinity only reads.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Raises the soft open-files limit to the hard one (idle watches need fds).
pub(crate) fn raise_fd_limit() {
    // SAFETY: get/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// SIGKILLs a child process of ours that overran its time.
pub(crate) fn kill_child(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Sends `signal` to a process of ours (a child, or one of a service's tree we
/// started).
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers; `pid` is a process we started.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Turns on TCP_QUICKACK on a connected socket: its next ACKs go out at once
/// instead of being delayed (Linux clears it again by itself, so callers set it
/// after every read).
pub(crate) fn quickack(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&one`, which lives
    // across the call; a bad fd only makes it fail.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Counting under `perf stat` (`--perf-stat`): the parent runs the child behind
/// `perf stat -D -1 --control fd:CTL,ACK`, with events disabled, and tells the child
/// the fifos in `COMPARE_PERF_CTL` and `COMPARE_PERF_ACK`; the child enables the
/// counters around its measured part only. Nothing happens without the variables.
pub(crate) fn perf_counting(enable: bool) {
    use std::io::{BufRead, Write};
    let (Some(ctl), Some(ack)) = (
        std::env::var_os("COMPARE_PERF_CTL"),
        std::env::var_os("COMPARE_PERF_ACK"),
    ) else {
        return;
    };
    // Read-write opens of a fifo never block (Linux), unlike read-only ones.
    let open = |path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("perf's control fifo")
    };
    let mut ctl = open(&ctl);
    ctl.write_all(if enable { b"enable\n" } else { b"disable\n" })
        .expect("tell perf");
    // perf answers "ack\n" once it has done it.
    let mut line = String::new();
    std::io::BufReader::new(open(&ack))
        .read_line(&mut line)
        .expect("perf's ack");
}

/// A fifo at `path`, opened read-write (never blocks) and inheritable (no
/// close-on-exec), for perf's `--control fd:..`.
pub(crate) fn inheritable_fifo(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(path);
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a NUL in the path"))?;
    // SAFETY: mkfifo only reads the NUL-terminated path.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    // SAFETY: fcntl on a descriptor we own; only its FD_CLOEXEC flag changes.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// What `wait4` tells of a child that ended: whether it exited with status 0, and
/// its own CPU time and peak RSS (KiB).
pub(crate) struct Ended {
    pub(crate) success: bool,
    pub(crate) cpu: Duration,
    pub(crate) max_rss_kib: u64,
}

/// Waits for our child `pid` (spawned, never waited for by `std`) and returns how it
/// ended and what it used.
pub(crate) fn wait_child(pid: u32) -> std::io::Result<Ended> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 writes only into `status`
    // and `usage`, which live across the call.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let rc = libc::wait4(pid, &mut status, 0, &mut usage);
        (rc, usage)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Ended {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
    })
}
