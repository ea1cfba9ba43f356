//! The `tokio_vol` example end to end, as a user runs it, against a private
//! libvirtd: concurrent downloads with a missing volume among them, and concurrent
//! uploads, byte-exact.
//!
//! The example is run through `cargo run --example tokio_vol` (cargo builds it if
//! needed, with the profile of this test build).

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::pool::{file_is, pattern, Bed, MIB};

/// Runs `tokio_vol VERB --uri URI --pool example ARGS...`: its exit code and stdout.
fn run_tokio_vol(bed: &Bed, verb: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "run",
        "--quiet",
        "--example",
        "tokio_vol",
    ]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let uri = bed.daemon.uri("qemu");
    let output = command
        .args(["--", verb, "--uri", &uri, "--pool", "example"])
        .args(args)
        .output()
        .expect("run the tokio_vol example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn tokio_vol_downloads_and_uploads_concurrently_byte_exact() {
    let bed = Bed::start("example");
    let names: Vec<String> = (1..=6).map(|i| format!("v{i}")).collect();
    let data: Vec<Vec<u8>> = (0..6)
        .map(|i| pattern(7100 + i, MIB as usize + 4099 * i as usize))
        .collect();
    let vols: Vec<_> = names
        .iter()
        .zip(&data)
        .map(|(name, data)| bed.pool.volume_with(name, data))
        .collect();

    let mut args: Vec<&str> = names.iter().map(String::as_str).collect();
    args.extend(["ghost", "--out", path(&bed.out)]);
    let (code, output) = run_tokio_vol(&bed, "download", &args);
    assert_eq!(code, Some(1), "exit 1: one volume is missing\n{output}");
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("ghost: failed:") && l.contains("not found")),
        "the missing volume is named with its reason\n{output}"
    );
    for (name, data) in names.iter().zip(&data) {
        let line = format!(
            "{name}: ok, {} data bytes, 0 hole(s) of 0 bytes",
            data.len()
        );
        assert!(output.lines().any(|l| l == line), "{line}\n{output}");
        assert!(file_is(&bed.out(name), data), "{name} is byte-identical");
    }
    assert!(
        !bed.out("ghost").exists(),
        "a failed download leaves no file"
    );

    // Uploads: each file into the (empty, same-sized) volume of its name.
    let dir = bed.out.join("up");
    fs::create_dir(&dir).expect("create the upload directory");
    let mut files = Vec::new();
    for i in 0..4u64 {
        let (name, bytes) = (
            format!("u{i}"),
            pattern(7200 + i, MIB as usize + 17 * i as usize),
        );
        bed.pool.create_volume(&name, bytes.len() as u64);
        let file = dir.join(&name);
        fs::write(&file, &bytes).expect("write the upload source");
        files.push((name, file, bytes));
    }
    let args: Vec<&str> = files.iter().map(|(_, file, _)| path(file)).collect();
    let (code, output) = run_tokio_vol(&bed, "upload", &args);
    assert_eq!(code, Some(0), "every upload succeeds\n{output}");
    for (name, _, bytes) in &files {
        assert!(
            file_is(&bed.pool.path_of(name), bytes),
            "volume {name} holds the uploaded bytes"
        );
    }

    // Bad input is refused before anything starts.
    let (code, output) = run_tokio_vol(&bed, "download", &["v1"]);
    assert_eq!(code, Some(2), "a download needs --out\n{output}");
    drop(vols);
    bed.finish();
}
