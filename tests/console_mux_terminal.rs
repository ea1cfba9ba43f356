//! 7 of issue 12: the `console_mux` example in a terminal, tried in tmux as a new
//! user would: Tab completes `@NAME` and `:use NAME`, Up recalls the last line
//! (instead of printing `^[[A`), Ctrl-] quits at once (without Enter), and closing
//! the terminal (SIGHUP) destroys the guests it booted, as end of input does.
//!
//! The example boots testbed guests on the embedded driver as `nobody`, as
//! `scripts/main.sh` runs it as root; tmux (a private server) gives it the terminal.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::consoles::{
    descendants, example_binary, live_processes_mentioning, repo, testbed_dir, NobodyHome,
    BOOT_TIMEOUT, ECHO_TIMEOUT,
};

/// How long the example may take to finish once it should: destroying the guests.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// What the pane's shell prints, and the example's exit status after it.
const EXITED: &str = "console_mux exited: ";

static SERVERS: AtomicU32 = AtomicU32::new(0);

/// `console_mux` in a session of a tmux server of its own, which is killed on drop.
/// A shell in the pane runs it and then prints its exit status (tmux itself may
/// miss a child's exit: then `#{pane_dead_status}` stays empty).
struct Tmux {
    socket: PathBuf,
    /// The example's pid (setpriv and env exec it), a child of the pane's shell.
    pid: u32,
    /// Its embed root: `/tmp/console-mux-<pid>`.
    root: PathBuf,
    _home: NobodyHome,
}

impl Tmux {
    fn start(args: &[&str]) -> Tmux {
        let binary = example_binary("console_mux");
        let home = NobodyHome::new();
        let socket = std::env::temp_dir().join(format!(
            "console-mux-tmux-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let command = format!(
            "setpriv --reuid=nobody --regid=nogroup --clear-groups env -u TMPDIR -u RUST_LOG HOME={} TESTBED_DIR={} {} {}; echo \"{EXITED}$?\"",
            home.0.display(),
            testbed_dir().display(),
            binary.display(),
            args.join(" ")
        );
        let mut tmux = Tmux {
            socket,
            pid: 0,
            root: PathBuf::new(),
            _home: home,
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "mux",
            "-x",
            "160",
            "-y",
            "50",
            &command,
        ]);
        // The pane stays after its shell exits, so that the status can be read.
        tmux.run(&["set-option", "-t", "mux", "remain-on-exit", "on"]);
        let shell: u32 = tmux.query("#{pane_pid}").parse().expect("the pane's pid");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        tmux.pid = loop {
            let child = descendants(shell)
                .into_iter()
                .find(|p| p.ppid == shell && p.comm == "console_mux");
            if let Some(child) = child {
                break child.pid;
            }
            assert!(
                Instant::now() < deadline,
                "console_mux did not start: {}",
                tmux.screen()
            );
            thread::sleep(Duration::from_millis(20));
        };
        tmux.root = PathBuf::from(format!("/tmp/console-mux-{}", tmux.pid));
        tmux
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("run tmux")
    }

    fn run(&self, args: &[&str]) {
        let output = self.tmux(args);
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn query(&self, format: &str) -> String {
        let output = self.tmux(&["display-message", "-p", "-t", "mux", format]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Types: each item is a key name for `send-keys` (`Tab`, `Up`, `C-]`) or text.
    fn keys(&self, keys: &[&str]) {
        for key in keys {
            self.run(&["send-keys", "-t", "mux", key]);
        }
    }

    /// The whole pane, its history included, lines joined where they wrapped.
    fn screen(&self) -> String {
        let output = self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "mux"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn lines(&self) -> Vec<String> {
        self.screen()
            .lines()
            .map(|l| l.trim_end().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn wait(&self, what: &str, timeout: Duration, check: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if check(&lines) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the screen:\n{}",
                lines.join("\n")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    /// The exit status, once the example has exited.
    fn wait_exit(&self) -> i32 {
        self.wait("the exit status", EXIT_TIMEOUT, |lines| {
            lines.iter().any(|l| l.starts_with(EXITED))
        });
        let lines = self.lines();
        let status = lines.iter().find_map(|l| l.strip_prefix(EXITED));
        status
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exit status: {}", lines.join("\n")))
    }

    fn qemus(&self) -> usize {
        live_processes_mentioning(&format!("{}/", self.root.display()))
            .iter()
            .filter(|p| p.comm.starts_with("qemu"))
            .count()
    }

    /// No process names its root any more, and the root is gone.
    fn assert_cleaned_up(&self) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let root = format!("{}/", self.root.display());
        while !live_processes_mentioning(&root).is_empty() {
            assert!(
                Instant::now() < deadline,
                "processes still name {root}: {:?}",
                live_processes_mentioning(&root)
            );
            thread::sleep(Duration::from_millis(100));
        }
        assert!(!self.root.exists(), "the example removes its embed root");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Closing its terminal ends it; a failed test must not leave guests behind.
        let _ = self.tmux(&["kill-server"]);
        let _ = std::fs::remove_file(&self.socket);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while PathBuf::from(format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let root = format!("{}/", self.root.display());
        if self.root.exists() || !live_processes_mentioning(&root).is_empty() {
            let _ = Command::new("bash")
                .arg(repo().join("testbed/cleanup.sh"))
                .arg("--force")
                .arg(&self.root)
                .output();
        }
    }
}

#[test]
fn in_a_terminal_tab_completes_up_recalls_and_ctrl_bracket_quits_at_once() {
    let tmux = Tmux::start(&["--guests", "2"]);
    tmux.wait("the prompt", BOOT_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|l| l.starts_with("-- 2 console(s) ready: tb-1, tb-2."))
            && lines.last().is_some_and(|l| l == "tb-1>")
    });
    assert_eq!(tmux.qemus(), 2, "{}", tmux.screen());

    // `@t` completes to `@tb-` (both guests), `2` then to `@tb-2 `.
    tmux.keys(&["@t", "Tab", "2", "Tab", "echo hello-tab", "Enter"]);
    tmux.wait("tb-2's reply", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "tb-2| hello-tab")
    });
    assert_eq!(tmux.count("tb-1> @tb-2 echo hello-tab"), 1);

    // Up brings the line back, to edit or send again.
    tmux.keys(&["Up"]);
    tmux.wait("the recalled line", ECHO_TIMEOUT, |lines| {
        lines
            .last()
            .is_some_and(|l| l == "tb-1> @tb-2 echo hello-tab")
    });
    tmux.keys(&["Enter"]);
    tmux.wait("the second reply", ECHO_TIMEOUT, |lines| {
        lines.iter().filter(|l| *l == "tb-2| hello-tab").count() == 2
    });

    // `:u` completes to `:use `.
    tmux.keys(&[":u", "Tab", "tb-2", "Enter"]);
    tmux.wait("the selection", ECHO_TIMEOUT, |lines| {
        lines.iter().any(|l| l == "-- sending to tb-2")
    });
    tmux.wait("tb-2's prompt", ECHO_TIMEOUT, |lines| {
        lines.last().is_some_and(|l| l == "tb-2>")
    });

    // Ctrl-] with a half-typed line and no Enter: it quits at once.
    tmux.keys(&["half-typed", "C-]"]);
    assert_eq!(tmux.wait_exit(), 0, "{}", tmux.screen());
    let screen = tmux.screen();
    assert!(
        !screen.contains("^[[A") && !screen.contains("^]"),
        "{screen}"
    );
    assert_eq!(tmux.count("-- destroyed 2 guest(s)"), 1, "{screen}");
    tmux.assert_cleaned_up();
}

#[test]
fn closing_the_terminal_destroys_the_guests_it_booted() {
    let tmux = Tmux::start(&["--guests", "1"]);
    tmux.wait("the prompt", BOOT_TIMEOUT, |lines| {
        lines.last().is_some_and(|l| l == "tb-1>")
    });
    assert_eq!(tmux.qemus(), 1, "{}", tmux.screen());
    // The terminal goes away: the example gets SIGHUP, and can print nothing more.
    tmux.run(&["kill-session", "-t", "mux"]);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while PathBuf::from(format!("/proc/{}", tmux.pid)).exists() {
        assert!(
            Instant::now() < deadline,
            "console_mux did not exit within {EXIT_TIMEOUT:?} of SIGHUP"
        );
        thread::sleep(Duration::from_millis(100));
    }
    tmux.assert_cleaned_up();
}
