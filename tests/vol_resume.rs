//! `vol` transfers that survive, against private libvirtds: standard input and
//! output with checksums, transfers cut by `kill -9` of the daemon and resumed by a
//! new process or by the same one once the daemon is back, an upload verified by
//! reading it back, machine-readable progress, several connections (one of them
//! lost and back), and an exit code for each kind of failure.
//!
//! A cut lands mid-transfer without relying on timing: once the transfer has moved
//! its first MiB, vol is stopped (SIGSTOP), the daemon killed, and vol continued;
//! each test checks that the transfer was indeed incomplete.

mod support;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::thread;

use support::daemon::PrivateDaemon;
use support::pool::{file_is, pattern, read_range, same_content, Bed, DirPool, KIB, MIB};
use support::vol::{
    bare_command, cut, json_lines, len_of, part_of, path, report_line, run_vol, sha256sum, states,
    vol_command, Background, Run,
};

/// Big enough that the first MiB is seen long before the end.
const LEN: usize = 64 * MIB as usize;

/// The `HEX  NAME` line vol printed for `name`, sha256sum-style.
fn printed_checksum<'a>(stderr: &'a str, name: &str) -> &'a str {
    let suffix = format!("  {name}");
    let line = stderr
        .lines()
        .find(|line| line.ends_with(&suffix) && !line.starts_with('{'))
        .unwrap_or_else(|| panic!("no checksum line for {name} in:\n{stderr}"));
    line.strip_suffix(&suffix).unwrap()
}

/// Starts the daemon again, and its pool.
fn restart(bed: &mut Bed) {
    bed.daemon.restart().expect("restart the daemon");
    bed.conn = support::pool::connect(&bed.daemon);
    bed.pool = DirPool::lookup(&bed.conn, "example", &bed.pool.dir);
}

/// Whether the first MiB of the volume file holds the first MiB of `data`.
fn first_mib_uploaded(volume_file: &Path, data: &[u8]) -> bool {
    read_range(volume_file, 0, MIB) == data[..MIB as usize]
}

/// The resumed run's report says where it resumed, past the start.
fn resumed_from(line: &str) -> u64 {
    let (_, rest) = line
        .split_once("resumed from byte ")
        .unwrap_or_else(|| panic!("not resumed: {line}"));
    rest.split(',').next().unwrap().parse().unwrap()
}

#[test]
fn vol_streams_through_stdout_and_stdin_with_checksums() {
    let bed = Bed::start("example");
    let data = pattern(7000, 3 * MIB as usize + 5);
    let source = bed.out("source");
    fs::write(&source, &data).unwrap();
    let vol = bed.pool.volume_with("src", &data);
    let expected = sha256sum(&source);

    // Download to standard output: the data alone, messages on standard error.
    let output = vol_command(&bed, "download", &["--checksum", "sha256", "src", "-"])
        .output()
        .expect("run vol");
    let run = Run::new(&output);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        output.stdout == data,
        "standard output is the volume, byte for byte"
    );
    assert_eq!(printed_checksum(&run.stderr, "src"), expected);
    let line = report_line(&run.stderr, "src");
    assert!(line.ends_with(&format!(", sha256 {expected}")), "{line}");

    // Upload from standard input, a pipe: it needs --length.
    let dst = bed.pool.create_volume("dst", data.len() as u64);
    let length = data.len().to_string();
    let mut child = vol_command(
        &bed,
        "upload",
        &[
            "--checksum",
            "sha256",
            "--verify",
            "--length",
            &length,
            "dst",
            "-",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start vol");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = {
        let data = data.clone();
        thread::spawn(move || std::io::Write::write_all(&mut stdin, &data))
    };
    let run = Run::new(&child.wait_with_output().unwrap());
    feeder.join().unwrap().expect("feed vol");
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        file_is(&bed.pool.path_of("dst"), &data),
        "the volume is the input"
    );
    assert_eq!(printed_checksum(&run.stderr, "dst"), expected);
    assert_eq!(
        run.line("dst"),
        format!(
            "dst: ok, {} data bytes, 0 hole(s) of 0 bytes, sha256 {expected}, verified",
            data.len()
        )
    );

    // blake3 too: the digest of the same bytes, whichever way they went.
    let copy = bed.out("copy");
    let run = run_vol(
        &bed,
        "download",
        &["--checksum", "blake3", "dst", path(&copy)],
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(same_content(&copy, &source));
    let blake = blake3::hash(&data).to_hex().to_string();
    assert_eq!(printed_checksum(&run.stderr, "dst"), blake);

    drop((vol, dst));
    bed.finish();
}

#[test]
fn vol_resumes_a_download_a_killed_daemon_cut() {
    let mut bed = Bed::start("example");
    let data = pattern(7100, LEN);
    let vol = bed.pool.volume_with("big", &data);
    let expected = sha256sum(&bed.pool.path_of("big"));
    let file = bed.out("big");
    let part = part_of(&file);

    let first = Background::spawn(vol_command(&bed, "download", &["big", path(&file)]));
    cut(&mut bed.daemon, &first, || len_of(&part) >= MIB);
    let (run, _) = first.finish();
    assert_eq!(run.code, Some(4), "connection lost: {}", run.all());
    assert!(
        run.line("big").contains("its .part is kept for --resume"),
        "{}",
        run.all()
    );
    let kept = len_of(&part);
    assert!(
        kept > 0 && kept < LEN as u64,
        "precondition: cut mid-transfer ({kept})"
    );
    assert!(!file.exists(), "no file that looks complete");

    restart(&mut bed);
    let run = run_vol(
        &bed,
        "download",
        &["--resume", "--checksum", "sha256", "big", path(&file)],
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let from = resumed_from(run.line("big"));
    assert!(
        from > 0 && from <= kept,
        "resumed from {from}, {kept} on disk"
    );
    assert!(file_is(&file, &data), "byte-exact");
    assert!(!part.exists(), "the .part became the file");
    assert_eq!(printed_checksum(&run.stderr, "big"), expected);

    drop(vol);
    drop(bed);
}

#[test]
fn vol_resumes_an_upload_a_killed_daemon_cut() {
    let mut bed = Bed::start("example");
    let data = pattern(7200, LEN);
    let source = bed.out("source");
    fs::write(&source, &data).unwrap();
    let expected = sha256sum(&source);
    let vol = bed.pool.create_volume("big", LEN as u64);
    let volume_file = bed.pool.path_of("big");

    let first = Background::spawn(vol_command(&bed, "upload", &["big", path(&source)]));
    cut(&mut bed.daemon, &first, || {
        first_mib_uploaded(&volume_file, &data)
    });
    let (run, _) = first.finish();
    assert_eq!(run.code, Some(3), "partly written: {}", run.all());
    assert!(
        !file_is(&volume_file, &data),
        "precondition: cut mid-transfer"
    );

    restart(&mut bed);
    let run = run_vol(
        &bed,
        "upload",
        &[
            "--resume",
            "--verify",
            "--checksum",
            "sha256",
            "big",
            path(&source),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let line = run.line("big");
    let from = resumed_from(line);
    assert!(from >= MIB && from < LEN as u64, "resumed from {from}");
    assert!(
        line.ends_with(&format!("sha256 {expected}, verified")),
        "{line}"
    );
    assert!(file_is(&volume_file, &data), "byte-exact");
    assert_eq!(printed_checksum(&run.stderr, "big"), expected);

    drop(vol);
    drop(bed);
}

/// Which transfer a test cuts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Download,
    /// A download to standard output.
    Stdout,
    Upload,
}

/// Kills the daemon mid-transfer and starts it again: the same vol process
/// reconnects, resumes from where it was and passes its checksum.
fn survives_in_process(way: Way) {
    let mut bed = Bed::start("example");
    // The daemon starts the pool itself when it comes back.
    bed.pool
        .pool
        .set_autostart(true)
        .expect("autostart the pool");
    let data = pattern(7300, LEN);
    let source = bed.out("source");
    fs::write(&source, &data).unwrap();
    let expected = sha256sum(&source);
    let file = bed.out("big");
    let vol = match way {
        Way::Upload => bed.pool.create_volume("big", LEN as u64),
        _ => bed.pool.volume_with("big", &data),
    };
    let volume_file = bed.pool.path_of("big");
    let (verb, local) = match way {
        Way::Download => ("download", path(&file)),
        Way::Stdout => ("download", "-"),
        Way::Upload => ("upload", path(&source)),
    };
    let mut args = vec!["--retry-for", "60s", "--progress", "json"];
    args.extend(["--checksum", "sha256"]);
    if way == Way::Upload {
        args.push("--verify");
    }
    args.extend(["big", local]);

    let process = Background::spawn(vol_command(&bed, verb, &args));
    let part = part_of(&file);
    let moved = || match way {
        Way::Download => len_of(&part) >= MIB,
        Way::Stdout => process.stdout_len() >= MIB,
        Way::Upload => first_mib_uploaded(&volume_file, &data),
    };
    cut(&mut bed.daemon, &process, moved);
    process.wait_line("waiting state", |line| {
        line.contains(r#""state":"waiting""#)
    });
    let incomplete = match way {
        Way::Download => !file.exists(),
        Way::Stdout => process.stdout_len() < LEN as u64,
        Way::Upload => !file_is(&volume_file, &data),
    };
    assert!(incomplete, "precondition: cut mid-transfer");
    restart(&mut bed);
    let (run, stdout) = process.finish();
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let lines = json_lines(&run.stderr);
    let mut through = vec!["running", "waiting", "resumed", "running"];
    if way == Way::Upload {
        through.insert(2, "comparing");
        through.push("verifying");
    }
    through.push("ended");
    assert_eq!(states(&lines, "big"), through, "{}", run.stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["outcome"], "ok", "{last}");
    assert_eq!(last["checksum"], expected.as_str(), "{last}");
    assert_eq!(last["algorithm"], "sha256");
    assert_eq!(last["done"], LEN as u64);
    assert_eq!(last["total"], LEN as u64);
    let from = last["resumed_from"].as_u64().unwrap();
    assert!(from > 0 && from < LEN as u64, "{last}");
    let copied = match way {
        Way::Download => file_is(&file, &data),
        Way::Stdout => stdout == data,
        Way::Upload => file_is(&volume_file, &data),
    };
    assert!(copied, "byte-exact");

    drop(vol);
    drop(bed);
}

#[test]
fn vol_download_survives_a_daemon_restart_in_process() {
    survives_in_process(Way::Download);
}

#[test]
fn vol_download_to_stdout_survives_a_daemon_restart_in_process() {
    survives_in_process(Way::Stdout);
}

#[test]
fn vol_upload_survives_a_daemon_restart_in_process() {
    survives_in_process(Way::Upload);
}

#[test]
fn vol_exit_codes_name_each_kind_of_failure() {
    let mut bed = Bed::start("example");
    let vol = bed.pool.volume_with("v", &pattern(7400, 64 * KIB as usize));
    let file = bed.out("v");
    let nowhere = bed.out.join("missing-dir").join("v");
    let socket = bed.out("no-daemon.sock");
    let dead_uri = format!("qemu+unix:///session?socket={}", socket.display());
    let uri = bed.daemon.uri("qemu");

    let cases: [(&str, Vec<&str>, i32); 5] = [
        (
            "bad arguments",
            vec!["--uri", &uri, "--pool", "example", "v"],
            2,
        ),
        (
            "no daemon",
            vec!["--uri", &dead_uri, "--pool", "example", "v", path(&file)],
            4,
        ),
        (
            "missing pool",
            vec!["--uri", &uri, "--pool", "ghost", "v", path(&file)],
            5,
        ),
        (
            "missing volume",
            vec!["--uri", &uri, "--pool", "example", "ghost", path(&file)],
            5,
        ),
        (
            "unwritable destination",
            vec!["--uri", &uri, "--pool", "example", "v", path(&nowhere)],
            6,
        ),
    ];
    for (what, args, code) in cases {
        let run = Run::new(&bare_command("download", &args).output().unwrap());
        assert_eq!(run.code, Some(code), "{what}: {}", run.all());
    }
    assert!(!file.exists());

    // Lost, and not back within --retry-for.
    let data = pattern(7401, LEN);
    let big = bed.pool.volume_with("big", &data);
    let file = bed.out("big");
    let part = part_of(&file);
    let process = Background::spawn(vol_command(
        &bed,
        "download",
        &[
            "--retry-for",
            "1s",
            "--progress",
            "json",
            "big",
            path(&file),
        ],
    ));
    cut(&mut bed.daemon, &process, || len_of(&part) >= MIB);
    let (run, _) = process.finish();
    assert_eq!(run.code, Some(4), "{}", run.all());
    let lines = json_lines(&run.stderr);
    assert_eq!(states(&lines, "big"), ["running", "waiting", "ended"]);
    let last = lines.last().unwrap();
    assert_eq!(last["outcome"], "failed");
    assert_eq!(last["error_kind"], "connection");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .starts_with("not back within 1s"),
        "{last}"
    );

    drop((vol, big));
    drop(bed);
}

/// Two connections (here to one daemon, under two labels) and a third to no daemon:
/// volumes are named `LABEL/VOL`, and only the dead host's transfer fails.
#[test]
fn vol_works_through_several_connections() {
    let bed = Bed::start("example");
    let (a, b) = (pattern(7500, MIB as usize), pattern(7501, MIB as usize + 3));
    let vols = [bed.pool.volume_with("a", &a), bed.pool.volume_with("b", &b)];
    let uri = bed.daemon.uri("qemu");
    let socket = bed.out("no-daemon.sock");
    let (one, two) = (format!("one={uri}"), format!("two={uri}"));
    let dead = format!("dead=qemu+unix:///session?socket={}", socket.display());
    let (fa, fb, fc) = (bed.out("a"), bed.out("b"), bed.out("c"));

    let run = Run::new(
        &bare_command(
            "download",
            &[
                "--uri",
                &one,
                "--uri",
                &two,
                "--uri",
                &dead,
                "--pool",
                "example",
                "one/a",
                path(&fa),
                "two/b",
                path(&fb),
                "dead/a",
                path(&fc),
            ],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(run.code, Some(4), "{}", run.all());
    assert!(
        run.line("one/a").starts_with("one/a: ok, "),
        "{}",
        run.all()
    );
    assert!(
        run.line("two/b").starts_with("two/b: ok, "),
        "{}",
        run.all()
    );
    assert!(
        run.line("dead/a").starts_with("dead/a: failed: "),
        "{}",
        run.all()
    );
    assert!(file_is(&fa, &a) && file_is(&fb, &b) && !fc.exists());

    // A name without its label, and two connections with one label, are refused.
    for args in [
        vec![
            "--uri",
            &one,
            "--uri",
            &two,
            "--pool",
            "example",
            "a",
            path(&fc),
        ],
        vec![
            "--uri",
            &one,
            "--uri",
            &one,
            "--pool",
            "example",
            "one/a",
            path(&fc),
        ],
    ] {
        let run = Run::new(&bare_command("download", &args).output().unwrap());
        assert_eq!(run.code, Some(2), "{}", run.all());
    }

    drop(vols);
    bed.finish();
}

/// A sparse upload over a volume that held data: libvirt's `dir` backend passes
/// over a hole without clearing what was there, so the volume read back is not
/// what was sent, and `--verify` says so with its own code.
#[test]
fn vol_verify_catches_a_volume_that_is_not_what_was_sent() {
    let bed = Bed::start("example");
    let old = pattern(7600, 4 * MIB as usize);
    let vol = bed.pool.volume_with("v", &old);
    let source = bed.out("sparse");
    let data = pattern(7601, MIB as usize);
    support::pool::sparse_file(&source, 4 * MIB, &[(0, &data)]);

    let run = run_vol(
        &bed,
        "upload",
        &["--sparse", "--verify", "v", path(&source)],
    );
    assert_eq!(run.code, Some(7), "{}", run.all());
    let line = run.line("v");
    assert!(
        line.starts_with("v: failed: read back, the volume's sha256 is "),
        "{line}"
    );
    let (at, len) = (2 * MIB, 64 * KIB);
    assert_eq!(
        read_range(&bed.pool.path_of("v"), at, len),
        old[at as usize..(at + len) as usize],
        "the old data is still where the source has a hole"
    );

    drop(vol);
    bed.finish();
}

/// Two hosts (two daemons), a transfer from each; one host's daemon is killed and
/// restarted mid-transfer: only its transfer waits and resumes, the other's goes on
/// untouched, and both arrive whole.
#[test]
fn vol_a_lost_host_touches_only_its_own_transfers() {
    let bed = Bed::start("example");
    let mut other = PrivateDaemon::start().expect("start a second libvirtd");
    let other_conn = support::pool::connect(&other);
    let other_pool = DirPool::create(&other, &other_conn, "example");
    other_pool
        .pool
        .set_autostart(true)
        .expect("autostart the pool");
    let (a, b) = (pattern(7700, LEN), pattern(7701, LEN));
    let vol_a = bed.pool.volume_with("big", &a);
    let vol_b = other_pool.volume_with("big", &b);
    let (file_a, file_b) = (bed.out("a"), bed.out("b"));
    let (uri_a, uri_b) = (
        format!("a={}", bed.daemon.uri("qemu")),
        format!("b={}", other.uri("qemu")),
    );
    let args = [
        "--uri",
        &uri_a,
        "--uri",
        &uri_b,
        "--pool",
        "example",
        "--retry-for",
        "60s",
        "--progress",
        "json",
        "--checksum",
        "sha256",
        "a/big",
        path(&file_a),
        "b/big",
        path(&file_b),
    ];

    let process = Background::spawn(bare_command("download", &args));
    let part_b = part_of(&file_b);
    cut(&mut other, &process, || len_of(&part_b) >= MIB);
    process.wait_line("b/big waiting", |line| {
        line.contains(r#""state":"waiting""#) && line.contains(r#""transfer":"b/big""#)
    });
    other.restart().expect("restart the second daemon");
    let (run, _) = process.finish();
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let lines = json_lines(&run.stderr);
    assert_eq!(
        states(&lines, "a/big"),
        ["running", "ended"],
        "{}",
        run.stderr
    );
    assert_eq!(
        states(&lines, "b/big"),
        ["running", "waiting", "resumed", "running", "ended"],
        "{}",
        run.stderr
    );
    let ended = |name: &str| {
        lines
            .iter()
            .find(|l| l["transfer"] == name && l["state"] == "ended")
            .unwrap()
            .clone()
    };
    assert_eq!(
        ended("a/big")["checksum"],
        sha256sum(&bed.pool.path_of("big")).as_str()
    );
    assert_eq!(
        ended("b/big")["checksum"],
        sha256sum(&other_pool.path_of("big")).as_str()
    );
    assert!(file_is(&file_a, &a) && file_is(&file_b, &b), "byte-exact");

    drop((vol_a, vol_b, other_pool, other_conn));
    drop(bed);
}
