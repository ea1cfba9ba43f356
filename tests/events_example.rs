//! The `events` example watching a real daemon that is killed and restarted: it
//! says the connection was lost, reconnects, and prints the new connection's events.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SIGINT};
use nix::unistd::Pid;
use support::consoles::example_binary;
use support::daemon::PrivateDaemon;
use virt::connect::Connect;

/// How long one expected line may take.
const LINE_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits for a line containing `needle`; returns every line read meanwhile.
fn expect(lines: &Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(e) => panic!(
                "no line with {needle:?} ({e}); it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn define(uri: &str, name: &str) {
    let conn = Connect::open(Some(uri)).expect("connect");
    let xml = format!(
        "<domain type='test'><name>{name}</name><memory>65536</memory>\
         <os><type>hvm</type></os></domain>"
    );
    conn.define_domain_xml(&xml).expect("define a domain");
}

#[test]
fn events_flow_again_after_the_daemon_restarts() {
    virt::error::clear_error_callback();
    let mut daemon = PrivateDaemon::start().expect("start a private libvirtd");
    let uri = daemon.uri("test");
    let mut child = Command::new(example_binary("events"))
        .args(["--uri", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the events example");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    expect(&lines, "watching", &mut seen);
    define(&uri, "ev-before");
    expect(&lines, "ev-before", &mut seen);

    daemon.kill();
    expect(&lines, "connection lost", &mut seen);
    expect(&lines, "attempt 1", &mut seen);
    daemon.restart().expect("restart the daemon");
    expect(&lines, "reconnected after", &mut seen);
    define(&uri, "ev-after");
    expect(&lines, "ev-after", &mut seen);

    kill(Pid::from_raw(child.id() as i32), SIGINT).expect("SIGINT");
    expect(&lines, "interrupted", &mut seen);
    let status = child.wait().expect("wait for the example");
    assert!(
        status.success(),
        "{status}; it printed:\n{}",
        seen.join("\n")
    );
}
