//! Running the `vol` example as a user does, through `cargo run --example vol` (cargo
//! builds it if needed, with the profile of this test build; on Unix it then execs
//! it, so the child's pid is vol's).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::daemon::PrivateDaemon;
use super::pool::Bed;

/// `vol VERB ARGS...`, with no connection given.
pub fn bare_command(verb: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "vol"]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    command.args(["--", verb]).args(args);
    command
}

/// The command that runs `vol VERB --uri URI --pool example ARGS...` on the bed's
/// daemon (every test's pool is `example`).
pub fn vol_command(bed: &Bed, verb: &str, args: &[&str]) -> Command {
    let uri = bed.daemon.uri("qemu");
    let mut command = bare_command(verb, &["--uri", &uri, "--pool", "example"]);
    command.args(args);
    command
}

/// Runs `vol VERB --uri URI --pool example ARGS...` to its end.
pub fn run_vol(bed: &Bed, verb: &str, args: &[&str]) -> Run {
    let output = vol_command(bed, verb, args)
        .output()
        .expect("run the vol example");
    Run::new(&output)
}

/// How a run of the example exited and what it printed.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn new(output: &Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Both outputs, for assertion messages.
    pub fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }

    /// Its report line about volume `name`.
    pub fn line(&self, name: &str) -> &str {
        report_line(&self.stdout, name)
    }
}

/// The line of the example's report about volume `name`.
pub fn report_line<'a>(text: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    text.lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no report line for {name} in:\n{text}"))
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `sha256sum FILE`'s digest.
pub fn sha256sum(file: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(file)
        .output()
        .expect("run sha256sum");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_owned()
}

/// A vol process running in the background; its standard error is read line by
/// line as it comes.
pub struct Background {
    child: Child,
    lines: Receiver<String>,
    reader: JoinHandle<Vec<String>>,
    /// Standard output, read as it comes (a pipe left full would stop vol).
    stdout: JoinHandle<Vec<u8>>,
    stdout_len: Arc<AtomicU64>,
}

impl Background {
    pub fn spawn(mut command: Command) -> Background {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the vol example");
        let mut out = child.stdout.take().unwrap();
        let stdout_len = Arc::new(AtomicU64::new(0));
        let stdout = {
            let len = Arc::clone(&stdout_len);
            thread::spawn(move || {
                let (mut all, mut buf) = (Vec::new(), vec![0; 64 * 1024]);
                while let Ok(n @ 1..) = out.read(&mut buf) {
                    all.extend_from_slice(&buf[..n]);
                    len.fetch_add(n as u64, Ordering::Relaxed);
                }
                all
            })
        };
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all
        });
        Background {
            child,
            lines,
            reader,
            stdout,
            stdout_len,
        }
    }

    /// Bytes read from its standard output so far.
    pub fn stdout_len(&self) -> u64 {
        self.stdout_len.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits (up to a minute) for a line of standard error that `pick` picks.
    pub fn wait_line(&self, what: &str, pick: impl Fn(&str) -> bool) {
        self.wait_line_by(what, Instant::now() + Duration::from_secs(60), pick);
    }

    /// Waits until `deadline` for a line of standard error that `pick` picks.
    pub fn wait_line_by(&self, what: &str, deadline: Instant, pick: impl Fn(&str) -> bool) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pick(&line) => return,
                Ok(_) => {}
                Err(_) => panic!("vol printed no {what} by the deadline"),
            }
        }
    }

    /// Waits for its end: how it ended, and its standard output.
    pub fn finish(mut self) -> (Run, Vec<u8>) {
        let status = self.child.wait().expect("wait for vol");
        let stdout = self.stdout.join().expect("the stdout reader");
        let stderr = self.reader.join().expect("the stderr reader");
        let run = Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: stderr.join("\n"),
        };
        (run, stdout)
    }
}

/// Waits (up to a minute) until `moved` says the transfer moved its first bytes,
/// then kills the daemon while vol is stopped, so the kill is surely mid-transfer;
/// vol then goes on and finds its connection gone.
pub fn cut(daemon: &mut PrivateDaemon, vol: &Background, moved: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !moved() {
        assert!(Instant::now() < deadline, "the transfer did not start");
        thread::sleep(Duration::from_millis(5));
    }
    kill(vol.pid(), Signal::SIGSTOP).expect("stop vol");
    daemon.kill();
    kill(vol.pid(), Signal::SIGCONT).expect("continue vol");
}

/// The length of `file`, 0 while it does not exist.
pub fn len_of(file: &Path) -> u64 {
    fs::metadata(file).map_or(0, |m| m.len())
}

/// `FILE.part`.
pub fn part_of(file: &Path) -> PathBuf {
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    part.into()
}

/// The JSON lines of a run: each parses, and is one object.
pub fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stderr}"));
            assert!(value.is_object(), "{line}");
            value
        })
        .collect()
}

/// The states a transfer's JSON lines went through, each once, in order.
pub fn states(lines: &[Value], name: &str) -> Vec<String> {
    let mut states: Vec<String> = Vec::new();
    for line in lines.iter().filter(|l| l["transfer"] == name) {
        let state = line["state"].as_str().unwrap().to_owned();
        if states.last() != Some(&state) {
            states.push(state);
        }
    }
    states
}
