//! Running the `vol` example as a user does, through `cargo run --example vol` (cargo
//! builds it if needed, with the profile of this test build; on Unix it then execs
//! it, so the child's pid is vol's).

use std::path::Path;
use std::process::{Command, Output};

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
