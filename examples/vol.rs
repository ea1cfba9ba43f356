//! Uploads or downloads many storage volumes at once, on one thread.
//!
//! ```text
//! vol download --uri URI --pool POOL VOL FILE [VOL FILE ...] [--sparse] [--offset N] [--length N]
//! vol upload   --uri URI --pool POOL VOL FILE [VOL FILE ...] [--sparse] [--offset N] [--length N]
//! ```
//!
//! Every transfer runs on one reactor; progress shows per transfer and in total. Each
//! failure names its volume and reason, the others carry on, and the exit code is 1
//! if any transfer failed.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::{self, Callbacks, VolumeRange};
use virt_reactor::Reactor;

#[derive(Parser)]
#[command(about = "Upload or download many libvirt storage volumes at once, on one thread")]
struct Args {
    /// download (volume -> file) or upload (file -> volume)
    direction: Direction,
    /// libvirt connection URI
    #[arg(long)]
    uri: String,
    /// storage pool holding the volumes
    #[arg(long)]
    pool: String,
    /// keep holes as holes, both ways
    #[arg(long)]
    sparse: bool,
    /// byte offset in each volume
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// bytes per transfer (0: to the end of the volume, or the whole file)
    #[arg(long, default_value_t = 0)]
    length: u64,
    /// VOL FILE pairs
    #[arg(required = true, num_args = 2.., value_name = "VOL FILE")]
    pairs: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    Download,
    Upload,
}

/// How each transfer ended, by its index.
type Outcomes = Rc<RefCell<Vec<Option<Result<TransferStats, String>>>>>;

fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    let args = Args::parse();
    if args.pairs.len() % 2 != 0 {
        eprintln!("vol: arguments must be VOL FILE pairs");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vol: {e}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether every transfer succeeded.
fn run(args: &Args) -> virt_reactor::Result<bool> {
    let mut reactor = Reactor::register()?;
    let conn = virt_reactor::connect(&args.uri)?;
    let pool = conn.lookup_storage_pool_by_name(&args.pool)?;
    let range = VolumeRange {
        offset: args.offset,
        length: args.length,
        sparse: args.sparse,
    };
    let bars = MultiProgress::new();
    let total = bars.add(ProgressBar::new(0).with_style(style("total")));
    let outcomes: Outcomes = Rc::default();
    let started = Instant::now();

    for (index, pair) in args.pairs.chunks(2).enumerate() {
        let (name, file) = (&pair[0], PathBuf::from(&pair[1]));
        outcomes.borrow_mut().push(None);
        let bar = bars.add(ProgressBar::new(0).with_style(style(name)));
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
                let callbacks = callbacks(index, &bar, &total, &outcomes);
                match args.direction {
                    Direction::Download => {
                        volume::download(&mut reactor, &conn, &vol, &file, range, callbacks)
                    }
                    Direction::Upload => {
                        volume::upload(&mut reactor, &conn, &vol, &file, range, callbacks)
                    }
                }
            });
        if let Err(e) = started {
            bar.abandon_with_message(format!("failed: {e}"));
            outcomes.borrow_mut()[index] = Some(Err(e.to_string()));
        }
    }

    reactor.run_while(|r| !r.is_empty())?;
    total.finish();
    let elapsed = started.elapsed().as_secs_f64();

    let mut ok = true;
    let mut bytes = 0;
    for (pair, outcome) in args.pairs.chunks(2).zip(outcomes.borrow().iter()) {
        match outcome {
            Some(Ok(stats)) => {
                bytes += stats.position();
                println!(
                    "{}: ok, {} data bytes, {} hole(s) of {} bytes",
                    pair[0], stats.data_bytes, stats.holes, stats.hole_bytes
                );
            }
            Some(Err(e)) => {
                ok = false;
                println!("{}: failed: {e}", pair[0]);
            }
            None => {
                ok = false;
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
    drop(pool);
    drop(conn);
    reactor.shutdown(std::time::Duration::from_secs(5))?;
    Ok(ok)
}

fn callbacks(
    index: usize,
    bar: &ProgressBar,
    total: &ProgressBar,
    outcomes: &Outcomes,
) -> Callbacks {
    let (bar, total, done_bar) = (bar.clone(), total.clone(), bar.clone());
    let outcomes = Rc::clone(outcomes);
    let mut last = 0;
    Callbacks {
        progress: Box::new(move |stats: TransferStats| {
            total.inc(stats.position() - last);
            last = stats.position();
            bar.set_position(last);
        }),
        done: Box::new(move |result| {
            match &result {
                Ok(_) => done_bar.finish_with_message("done"),
                Err(e) => done_bar.abandon_with_message(format!("failed: {e}")),
            }
            outcomes.borrow_mut()[index] = Some(result.map_err(|e| e.to_string()));
        }),
    }
}

fn style(name: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{name:>12} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{msg}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}
