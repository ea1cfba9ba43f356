//! The `vol` example end to end, as a user runs it, against a private libvirtd:
//! several downloads with one missing volume among them, and a sparse download.
//!
//! The example is run through `cargo run --example vol` (cargo builds it if needed,
//! with the profile of this test build).

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::pool::{allocated, data_extents, file_is, pattern, read_range, Bed, MIB};

/// Runs `vol ARGS...` and returns its output.
fn run_vol(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "vol"]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    command.arg("--").args(args);
    command.output().expect("run the vol example")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The line of the example's report about volume `name`.
fn report_line<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    stdout
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no report line for {name} in:\n{stdout}"))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn vol_downloads_several_volumes_and_names_the_missing_one() {
    let bed = Bed::start("example");
    let first = pattern(5000, 3 * MIB as usize);
    let third = pattern(5002, 2 * MIB as usize + 7);
    let vols = [
        bed.pool.volume_with("first", &first),
        bed.pool.volume_with("third", &third),
    ];
    let (f1, f2, f3) = (bed.out("first"), bed.out("ghost"), bed.out("third"));
    let uri = bed.daemon.uri("qemu");

    let output = run_vol(&[
        "download",
        "--uri",
        &uri,
        "--pool",
        "example",
        "first",
        path(&f1),
        "ghost",
        path(&f2),
        "third",
        path(&f3),
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit code 1 when a transfer failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let ghost = report_line(&stdout, "ghost");
    assert!(
        ghost.starts_with("ghost: failed:") && ghost.contains("Storage volume not found"),
        "the missing volume is named with its reason: {ghost}"
    );
    assert_eq!(
        report_line(&stdout, "first"),
        format!(
            "first: ok, {} data bytes, 0 hole(s) of 0 bytes",
            first.len()
        )
    );
    assert_eq!(
        report_line(&stdout, "third"),
        format!(
            "third: ok, {} data bytes, 0 hole(s) of 0 bytes",
            third.len()
        )
    );
    assert!(file_is(&f1, &first), "first is byte-identical");
    assert!(file_is(&f3, &third), "third is byte-identical");
    assert!(!f2.exists() && !bed.out("ghost.part").exists());

    drop(vols);
    bed.finish();
}

#[test]
fn vol_sparse_download_keeps_holes() {
    let bed = Bed::start("example");
    // A leading hole, two data extents, and a trailing hole: the file's length comes
    // from the final `set_len` of the download.
    const LEN: u64 = 64 * MIB;
    let layout = [(8 * MIB, MIB), (40 * MIB, MIB)];
    let vol = bed.pool.create_volume("holey", LEN);
    let volume_file = bed.pool.path_of("holey");
    for (i, &(offset, len)) in layout.iter().enumerate() {
        support::pool::write_at(
            &volume_file,
            offset,
            &pattern(5100 + i as u64, len as usize),
        );
    }
    assert_eq!(data_extents(&volume_file), layout.to_vec(), "precondition");
    let copy = bed.out("holey");
    let uri = bed.daemon.uri("qemu");

    let output = run_vol(&[
        "download",
        "--uri",
        &uri,
        "--pool",
        "example",
        "--sparse",
        "holey",
        path(&copy),
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "vol --sparse failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let data: u64 = layout.iter().map(|&(_, len)| len).sum();
    assert_eq!(
        report_line(&stdout, "holey"),
        format!(
            "holey: ok, {data} data bytes, 3 hole(s) of {} bytes",
            LEN - data
        )
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), LEN);
    assert_eq!(data_extents(&copy), layout.to_vec(), "holes kept");
    let used = allocated(&copy);
    assert!(
        (data..=data + MIB).contains(&used),
        "the copy occupies its data, {data} bytes, not {LEN}: {used}"
    );
    for &(offset, len) in &layout {
        assert_eq!(
            read_range(&copy, offset, len),
            read_range(&volume_file, offset, len),
            "data at {offset}"
        );
    }

    drop(vol);
    bed.finish();
}
