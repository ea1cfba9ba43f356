//! Guest consoles from a tokio `current_thread` runtime: 8 testbed guests booted on
//! libvirt's in-process QEMU driver (`qemu:///embed`, no daemon) through the tokio
//! [`Handle`], each console an `AsyncStream`, all 8 echoing concurrently on the one
//! runtime thread that also drives libvirt's loop.
//!
//! libvirt 9.0's embedded driver refuses to run as root without the `libvirt-qemu`
//! user. Then the test runs itself again as `nobody` (as `scripts/main.sh` runs
//! `console_mux`), in a child process with a private home, and checks that child;
//! `testbed/cleanup.sh` tears down its embed root whatever happened.
//!
//! Every guest is destroyed at the end, also when a check fails: the checks run in a
//! task of their own, and the guests are destroyed on the blocking pool while the
//! driver still runs (destroy waits on QEMU's monitor, which the driver serves).
//! The test registers the event loop itself, so run it in a process of its own
//! (cargo-nextest).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::consoles::{
    banner, contains, echo_command, live_processes_mentioning, names, repo, tail_text, testbed_dir,
    NobodyHome, BOOT_TIMEOUT, ECHO_TIMEOUT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virt::connect::Connect;
use virt_reactor::console::ConsoleOptions;
use virt_reactor::testbed::{self, GuestMode, Testbed};
use virt_reactor::tokio::{AsyncStream, Handle};

/// Set in the child that runs the test as `nobody`: the embed root to use.
const CHILD_ROOT: &str = "VIRT_REACTOR_TOKIO_CONSOLES_ROOT";
/// The child's whole run: booting, echoing, destroying.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a destroyed guest's QEMU may take to disappear from /proc.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);
/// Echo rounds on every console.
const ROUNDS: usize = 2;

/// Whether this process can run the embedded QEMU driver itself.
fn can_embed() -> bool {
    let root = std::fs::metadata("/proc/self").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    }) == 0;
    !root
        || std::fs::read_to_string("/etc/passwd").is_ok_and(|passwd| {
            passwd
                .lines()
                .any(|l| l.split(':').next() == Some("libvirt-qemu"))
        })
}

#[test]
fn eight_consoles_echo_on_a_current_thread_runtime() {
    const NAME: &str = "eight_consoles_echo_on_a_current_thread_runtime";
    if let Some(root) = std::env::var_os(CHILD_ROOT) {
        return in_runtime(PathBuf::from(root));
    }
    let root = PathBuf::from(format!("/tmp/tokio-consoles-test-{}", std::process::id()));
    let _cleanup = RootCleanup(root.clone());
    if can_embed() {
        in_runtime(root.clone());
    } else {
        as_nobody(NAME, &root);
    }
    // The guests' QEMU processes are gone.
    let needle = format!("{}/", root.display());
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let left = live_processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes naming {needle} outlive the test: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs this test again as `nobody` with `root` as its embed root, and checks that
/// it passed.
fn as_nobody(name: &str, root: &Path) {
    let home = NobodyHome::new();
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "env"])
        .arg(format!("HOME={}", home.0.display()))
        .arg(format!("TESTBED_DIR={}", testbed_dir().display()))
        .arg(format!("{CHILD_ROOT}={}", root.display()))
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env_remove("TMPDIR")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("run {} as nobody: {e}", exe.display()));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the test run as nobody did not end within {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the test run as nobody failed ({status}); its output is above"
    );
}

/// Tears the embed root down when the test ends, however it ends: destroys what
/// its driver still knows, kills QEMU processes naming it, removes it.
struct RootCleanup(PathBuf);

impl Drop for RootCleanup {
    fn drop(&mut self) {
        let needle = format!("{}/", self.0.display());
        if self.0.exists() || !live_processes_mentioning(&needle).is_empty() {
            let _ = Command::new("bash")
                .arg(repo().join("testbed/cleanup.sh"))
                .arg("--force")
                .arg(&self.0)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// The test proper, on a `current_thread` runtime, with the embedded driver in
/// `root`.
fn in_runtime(root: PathBuf) {
    virt::error::clear_error_callback();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current_thread runtime")
        .block_on(eight_consoles(root));
}

async fn eight_consoles(root: PathBuf) {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread
    );
    let (handle, driver) = virt_reactor::tokio::register().expect("register the loop");
    let driver = tokio::spawn(driver.run());
    let uri = testbed::embed_root(&root)
        .unwrap_or_else(|e| panic!("embedded driver in {}: {e}", root.display()));
    let conn = {
        let uri = uri.clone();
        handle.blocking(move || virt_reactor::connect(&uri))
    }
    .await
    .expect("blocking pool")
    .unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let all = names("tt", 8);

    // The checks run in a task of their own: if one fails, the guests are still
    // destroyed below, while the driver runs.
    let checks = tokio::spawn(boot_and_echo(handle.clone(), conn.clone(), all.clone()));
    let checked = checks.await;

    let destroyed = handle
        .blocking(move || {
            let n = testbed::destroy(&conn, &all);
            drop(conn);
            n
        })
        .await;
    handle.stop();
    let drained = tokio::time::timeout(Duration::from_secs(30), driver).await;
    if let Err(failed) = checked {
        std::panic::resume_unwind(failed.into_panic());
    }
    assert_eq!(destroyed.expect("destroy the guests"), 8);
    let drained = drained
        .expect("the driver ends")
        .expect("the driver task")
        .expect("the driver drains");
    eprintln!("drained: {drained:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Boots the guests `names`, waits for every banner, then runs echo rounds on all
/// consoles at once.
async fn boot_and_echo(handle: Handle, conn: Connect, names: Vec<String>) {
    let testbed = Testbed::open(testbed_dir()).expect("open the testbed");
    let started = Instant::now();
    let boots = names.iter().map(|name| {
        let xml = testbed.guest_xml(name, GuestMode::Plain);
        boot(&handle, &conn, name, xml)
    });
    let consoles = futures_util::future::join_all(boots).await;
    eprintln!(
        "8 guests created, consoles open, after {:.1?}",
        started.elapsed()
    );

    let mut consoles: Vec<Console> = names
        .iter()
        .zip(consoles)
        .map(|(name, stream)| Console {
            name: name.clone(),
            stream,
            output: Vec::new(),
        })
        .collect();
    let banners = consoles.iter_mut().map(|console| {
        let wanted = banner(&console.name);
        console.read_until(wanted, 0, BOOT_TIMEOUT)
    });
    futures_util::future::join_all(banners).await;
    eprintln!("8 banners after {:.1?}", started.elapsed());

    for round in 1..=ROUNDS {
        let started = Instant::now();
        let marks: Vec<usize> = consoles.iter().map(|c| c.output.len()).collect();
        // Every command is written before any reply is read.
        for console in &mut consoles {
            let (command, _) = echo_command(&console.name, round);
            console
                .stream
                .write_all(command.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("send echo round {round} to {}: {e}", console.name));
        }
        let replies = consoles.iter_mut().zip(&marks).map(|(console, mark)| {
            let (_, reply) = echo_command(&console.name, round);
            console.read_until(reply, *mark, ECHO_TIMEOUT)
        });
        futures_util::future::join_all(replies).await;
        eprintln!(
            "echo round {round} on 8 consoles: {:.1?}",
            started.elapsed()
        );
    }
    // No cross-talk: each console carries its own commands and replies only.
    for console in &consoles {
        for other in names.iter().filter(|o| **o != console.name) {
            let (_, reply) = echo_command(other, 1);
            assert!(
                !contains(&console.output, reply.trim_start().as_bytes()),
                "{}'s console shows {other}'s reply",
                console.name
            );
        }
    }
    // Finishing a console is libvirt's `virStreamFinish`; then the guests go.
    for console in &mut consoles {
        console
            .stream
            .shutdown()
            .await
            .unwrap_or_else(|e| panic!("finish {}'s console: {e}", console.name));
    }
}

/// Creates guest `name` paused, opens its console, then lets it run: its early
/// output (the banner) cannot be lost.
async fn boot(handle: &Handle, conn: &Connect, name: &str, xml: String) -> AsyncStream {
    let conn = conn.clone();
    let domain = handle
        .blocking(move || conn.create_domain_xml(&xml, virt::sys::VIR_DOMAIN_START_PAUSED))
        .await
        .expect("blocking pool")
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    let console = handle
        .open_console(domain.clone(), ConsoleOptions::default())
        .await
        .unwrap_or_else(|e| panic!("open {name}'s console: {e}"));
    handle
        .blocking(move || domain.resume())
        .await
        .expect("blocking pool")
        .unwrap_or_else(|e| panic!("resume {name}: {e}"));
    console
}

/// One guest's console and everything it printed.
struct Console {
    name: String,
    stream: AsyncStream,
    output: Vec<u8>,
}

impl Console {
    /// Reads until the output after `mark` contains `wanted`; panics after
    /// `timeout` or if the console ends first.
    async fn read_until(&mut self, wanted: String, mark: usize, timeout: Duration) {
        let mut buf = [0u8; 4096];
        let reading = async {
            while !contains(&self.output[mark..], wanted.as_bytes()) {
                match self.stream.read(&mut buf).await {
                    Ok(0) => return Err("the console ended".to_owned()),
                    Ok(n) => self.output.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("the console failed: {e}")),
                }
            }
            Ok(())
        };
        let outcome = tokio::time::timeout(timeout, reading).await;
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(_) => format!("timed out after {timeout:?}"),
        };
        panic!(
            "{}: waiting for {wanted:?}: {why}; last output: {}",
            self.name,
            tail_text(&self.output, 300)
        );
    }
}
