//! The `console_mux` example on bad input and lost daemons: each failure is named,
//! and the exit status is 1 (before, these printed a harmless-looking line, or
//! a bare OS error, and exited 0).
//!
//! The example runs as `nobody` (as in `tests/consoles.rs`); its daemon is a private
//! libvirtd, which runs as `nobody` too.

mod support;

use std::time::Duration;

use support::consoles::{testbed, MuxProcess, BOOT_TIMEOUT};
use support::daemon::PrivateDaemon;
use virt::connect::Connect;
use virt_reactor::testbed::GuestMode;

/// How long the example may take to exit once it should.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `--domain nosuch` printed `1 console(s) ready: nosuch`, then failed to attach,
/// and exited 0 at the end of its input. It now fails before it is ready.
#[test]
fn console_mux_names_a_missing_domain_and_exits_non_zero() {
    let daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("qemu");
    let mut mux = MuxProcess::spawn(&["--uri", &uri, "--domain", "nosuch"]);
    mux.close_stdin(); // as from `< /dev/null`
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", mux.describe());
    assert!(
        !mux.lines.iter().any(|l| l.contains("ready")),
        "{}",
        mux.describe()
    );
    let stderr = mux.stderr();
    assert!(
        stderr.starts_with("console_mux: nosuch: ") && stderr.contains("'nosuch'"),
        "the domain is named with libvirt's reason\n{}",
        mux.describe()
    );
}

/// `--log-dir /proc/nope` printed `No such file or directory (os error 2)`; the
/// error now names the directory, and nothing was booted for it.
#[test]
fn console_mux_names_a_log_dir_it_cannot_create() {
    let mut mux = MuxProcess::spawn(&["--log-dir", "/proc/nope"]);
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", mux.describe());
    assert_eq!(
        mux.stderr(),
        "console_mux: log directory /proc/nope: No such file or directory (os error 2)\n",
        "{}",
        mux.describe()
    );
    assert!(
        !mux.root.exists(),
        "no embedded driver was started for a run that cannot log"
    );
}

/// Attached to a running guest of a daemon that then dies, `console_mux` went on
/// and exited 0 at the end of its input. It now quits at once, saying why.
#[test]
fn console_mux_exits_non_zero_after_losing_its_daemon() {
    virt::error::clear_error_callback();
    let testbed = testbed();
    let mut daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("qemu");
    let name = "tb-loss";
    {
        // A plain blocking connection: boot the guest, then let go of it.
        let conn = Connect::open(Some(&uri)).expect("connect");
        conn.create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
            .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", daemon.log_tail(30)));
        drop(conn);
    }
    let mut mux = MuxProcess::spawn(&["--uri", &uri, "--domain", name]);
    mux.wait_lines("the ready line", BOOT_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("-- 1 console(s) ready: tb-loss."))
    });

    daemon.kill(); // the guest's QEMU lives on; the daemon's drop kills it
    let status = mux.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", mux.describe());
    assert!(
        mux.stderr()
            .starts_with("console_mux: lost the connection to libvirt"),
        "{}",
        mux.describe()
    );
}
