//! Uploads or downloads many storage volumes at once, on one thread.
//!
//! ```text
//! vol download --uri URI --pool POOL VOL FILE [VOL FILE ...] [--sparse] [--offset N] [--length N] [--force]
//! vol upload   --uri URI --pool POOL VOL FILE [VOL FILE ...] [--sparse] [--offset N] [--length N]
//! ```
//!
//! Every transfer runs on one reactor; progress shows per transfer and in total. Each
//! failure names its volume and reason, and the others carry on.
//!
//! A download never writes over anything that exists unless `--force` is given; then
//! a regular file is replaced once the download is complete, a device or FIFO is
//! written through (never replaced), and a symbolic link is followed. A directory is
//! always refused. An upload from a pipe or character device needs `--length`, and
//! sends exactly that many bytes. Two pairs with one FILE (download) or one VOL
//! (upload) are refused before anything starts.
//!
//! Exit code: 0 all transfers succeeded; 1 some failed, and no volume was changed;
//! 2 bad arguments or no connection, nothing transferred; 3 an upload failed part
//! way, so its volume is partly written (the summary names each such volume).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar};
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, VolumeRange};
use virt_reactor::Reactor;

#[path = "common/volumes.rs"]
mod volumes;

use volumes::{bar, Direction, Location};

#[derive(Parser)]
#[command(about = "Upload or download many libvirt storage volumes at once, on one thread")]
struct Args {
    /// download (volume -> file) or upload (file -> volume)
    direction: Direction,
    #[command(flatten)]
    at: Location,
    /// keep holes as holes, both ways
    #[arg(long)]
    sparse: bool,
    /// byte offset in each volume
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// bytes per transfer (0: to the end of the volume, or the whole file)
    #[arg(long, default_value_t = 0)]
    length: u64,
    /// download over an existing FILE: replace a regular file, write through a
    /// device or FIFO, follow a symbolic link
    #[arg(long)]
    force: bool,
    /// VOL FILE pairs
    #[arg(required = true, num_args = 2.., value_name = "VOL FILE")]
    pairs: Vec<String>,
}

/// How one transfer ended.
enum Outcome {
    Done(TransferStats),
    /// Failed, after `sent` bytes had gone into the stream (0 if it never started).
    Failed {
        error: String,
        sent: u64,
    },
}

/// One transfer, as the reactor's state holds it.
#[derive(Default)]
struct Progress {
    /// The position of the last progress call: the end of a failure has none.
    sent: u64,
    /// How it ended; `None` while it runs.
    outcome: Option<Outcome>,
}

/// The reactor's state: each transfer by its index.
type Transfers = Vec<Progress>;

/// Exit codes besides 0.
const SOME_FAILED: u8 = 1;
const BAD_INPUT: u8 = 2;
const PARTLY_WRITTEN: u8 = 3;

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    let args = Args::parse();
    if args.pairs.len() % 2 != 0 {
        eprintln!("vol: arguments must be VOL FILE pairs");
        return ExitCode::from(BAD_INPUT);
    }
    if let Err(e) = check_duplicates(&args) {
        eprintln!("vol: {e}");
        return ExitCode::from(BAD_INPUT);
    }
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vol: {e}");
            ExitCode::from(BAD_INPUT)
        }
    }
}

/// Refuses two downloads into one file (they would clobber each other) and two
/// uploads into one volume (they would interleave).
fn check_duplicates(args: &Args) -> Result<(), String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut inodes: HashMap<(u64, u64), &str> = HashMap::new();
    for pair in args.pairs.chunks(2) {
        let (vol, file) = (pair[0].as_str(), pair[1].as_str());
        let (key, inode, what) = match args.direction {
            Direction::Download => {
                let (path, inode) = destination_key(Path::new(file));
                (path.display().to_string(), inode, file)
            }
            Direction::Upload => (vol.to_owned(), None, vol),
        };
        let earlier = inode
            .and_then(|inode| inodes.insert(inode, vol))
            .or_else(|| seen.insert(key, vol));
        if let Some(earlier) = earlier {
            return Err(match args.direction {
                Direction::Download => {
                    format!("{what} is the destination of both {earlier} and {vol}")
                }
                Direction::Upload => format!("volume {what} is given twice"),
            });
        }
    }
    Ok(())
}

/// The destination's directory, resolved, with its name; and the file it names if
/// it exists (through a link, as `--force` would write through it).
fn destination_key(file: &Path) -> (PathBuf, Option<(u64, u64)>) {
    let inode = std::fs::metadata(file).ok().map(|m| (m.dev(), m.ino()));
    let path = match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .join(name)
        }
        _ => file.to_path_buf(),
    };
    (path, inode)
}

/// Returns the exit code: 0, [`SOME_FAILED`] or [`PARTLY_WRITTEN`].
fn run(args: &Args) -> virt_reactor::Result<u8> {
    let mut reactor = Reactor::register()?;
    let conn = virt_reactor::connect(&args.at.uri)?;
    let pool = conn.lookup_storage_pool_by_name(&args.at.pool)?;
    let range = VolumeRange {
        offset: args.offset,
        length: args.length,
        sparse: args.sparse,
        force: args.force,
    };
    let bars = MultiProgress::new();
    let total = bars.add(bar("total"));
    let mut transfers = Transfers::new();
    let started = Instant::now();

    for (index, pair) in args.pairs.chunks(2).enumerate() {
        let (name, file) = (&pair[0], PathBuf::from(&pair[1]));
        transfers.push(Progress::default());
        let bar = bars.add(bar(name));
        let started = pool
            .lookup_storage_vol_by_name(name)
            .map_err(virt_reactor::Error::Libvirt)
            .and_then(|vol| {
                let size = match args.direction {
                    Direction::Download => vol.info().map(|i| i.capacity).unwrap_or(0),
                    Direction::Upload => std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0),
                };
                let size = if args.length > 0 {
                    args.length
                } else {
                    size.saturating_sub(args.offset)
                };
                bar.set_length(size);
                total.inc_length(size);
                let start = match args.direction {
                    Direction::Download => volume::download,
                    Direction::Upload => volume::upload,
                };
                let on_progress = on_progress(index, &bar, &total);
                start(
                    &mut reactor,
                    &vol,
                    &file,
                    range,
                    on_progress,
                    on_end(index, &bar),
                )
            });
        if let Err(e) = started {
            let hint = match e {
                virt_reactor::Error::DestinationExists { kind, .. } if kind != "directory" => {
                    " (--force writes over it)"
                }
                _ => "",
            };
            bar.abandon_with_message(format!("failed: {e}"));
            transfers[index].outcome = Some(Outcome::Failed {
                error: format!("{e}{hint}"),
                sent: 0,
            });
        }
    }

    while !reactor.is_empty() {
        reactor.run_once(None, &mut transfers)?;
    }
    total.finish();
    let elapsed = started.elapsed().as_secs_f64();

    let mut code = 0;
    let mut bytes = 0;
    let mut partly_written = Vec::new();
    for (pair, transfer) in args.pairs.chunks(2).zip(&transfers) {
        match &transfer.outcome {
            Some(Outcome::Done(stats)) => {
                bytes += stats.position();
                println!(
                    "{}: ok, {} data bytes, {} hole(s) of {} bytes",
                    pair[0], stats.data_bytes, stats.holes, stats.hole_bytes
                );
            }
            // Bytes went into the volume's stream: some of them may be on disk.
            Some(Outcome::Failed { error, sent })
                if *sent > 0 && matches!(args.direction, Direction::Upload) =>
            {
                code = PARTLY_WRITTEN;
                partly_written.push(pair[0].as_str());
                println!(
                    "{}: failed: {error}; volume PARTLY WRITTEN: {sent} byte(s) from offset {} were sent",
                    pair[0], args.offset
                );
            }
            Some(Outcome::Failed { error, .. }) => {
                code = code.max(SOME_FAILED);
                println!("{}: failed: {error}", pair[0]);
            }
            None => {
                code = code.max(SOME_FAILED);
                println!("{}: failed: did not finish", pair[0]);
            }
        }
    }
    println!(
        "{} transfer(s), {:.1} MiB in {elapsed:.2} s ({:.1} MiB/s)",
        args.pairs.len() / 2,
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / elapsed
    );
    if !partly_written.is_empty() {
        println!(
            "{} volume(s) partly written: {}",
            partly_written.len(),
            partly_written.join(", ")
        );
    }
    drop(pool);
    drop(conn);
    if let Err(e) = reactor.shutdown(std::time::Duration::from_secs(5), &mut transfers) {
        // The transfers are settled and reported; their code says more than this.
        eprintln!("vol: shutting down: {e}");
        code = code.max(SOME_FAILED);
    }
    Ok(code)
}

/// Moves transfer `index`'s bar and the total along.
fn on_progress(
    index: usize,
    bar: &ProgressBar,
    total: &ProgressBar,
) -> impl FnMut(&mut Transfers, TransferStats) + Send + 'static {
    let (bar, total) = (bar.clone(), total.clone());
    move |transfers, stats| {
        let transfer = &mut transfers[index];
        total.inc(stats.position() - transfer.sent);
        transfer.sent = stats.position();
        bar.set_position(stats.position());
    }
}

/// Records how transfer `index` ended, and shows it on its bar.
fn on_end(
    index: usize,
    bar: &ProgressBar,
) -> impl FnOnce(&mut Transfers, virt_reactor::Result<TransferStats>) + Send + 'static {
    let bar = bar.clone();
    move |transfers, result| {
        match &result {
            Ok(_) => bar.finish_with_message("done"),
            Err(e) => bar.abandon_with_message(format!("failed: {e}")),
        }
        let transfer = &mut transfers[index];
        transfer.outcome = Some(match result {
            Ok(stats) => Outcome::Done(stats),
            Err(e) => Outcome::Failed {
                error: e.to_string(),
                sent: transfer.sent,
            },
        });
    }
}
