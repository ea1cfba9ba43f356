//! Downloads or uploads many storage volumes at once from a tokio runtime: one task
//! per volume in a `JoinSet`, a progress bar each. The async counterpart of `vol`.
//!
//! ```text
//! tokio_vol download --uri URI --pool POOL VOL... --out DIR [--sparse] [--force]
//! tokio_vol upload   --uri URI --pool POOL FILE... [--sparse]
//! ```
//!
//! A download writes volume `VOL` to `DIR/VOL`, and never over anything that exists
//! unless `--force` is given. An upload writes `FILE` into the volume named as the
//! file (its last path component), which must exist and be large enough.
//!
//! Every transfer runs inside the one driver task; the lookups, which wait for the
//! daemon, run on tokio's blocking pool. A failure names its volume and reason, and
//! the others carry on. Exit code: 0 all succeeded, 1 some failed, 2 bad arguments or
//! no connection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar};
use tokio::task::JoinSet;
use virt::storage_pool::StoragePool;
use virt_reactor::tokio::Handle;
use virt_reactor::transfer::TransferStats;
use virt_reactor::volume::VolumeRange;

#[path = "common/volumes.rs"]
mod volumes;

use volumes::{bar, Direction};

#[derive(Parser)]
#[command(about = "Download or upload many libvirt storage volumes at once, from tokio")]
struct Args {
    /// download (volumes -> DIR/VOL) or upload (FILE -> the volume of its name)
    direction: Direction,
    #[command(flatten)]
    at: Location,
    /// download: the directory the files go to
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// download: replace files that exist
    #[arg(long)]
    force: bool,
    /// keep holes as holes, both ways
    #[arg(long)]
    sparse: bool,
    /// download: the volumes; upload: the files
    #[arg(required = true, value_name = "VOL|FILE")]
    items: Vec<String>,
}

/// Where the volumes are: the connection and the pool.
#[derive(clap::Args)]
struct Location {
    /// libvirt connection URI
    #[arg(long)]
    uri: String,
    /// storage pool holding the volumes
    #[arg(long)]
    pool: String,
}

/// One transfer: the volume, the file, and which way.
struct Job {
    vol: String,
    file: PathBuf,
    download: bool,
}

const SOME_FAILED: u8 = 1;
const BAD_INPUT: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    env_logger::init();
    virt::error::clear_error_callback();
    let args = Args::parse();
    let (jobs, range) = match jobs(&args) {
        Ok(jobs) => jobs,
        Err(e) => {
            eprintln!("tokio_vol: {e}");
            return ExitCode::from(BAD_INPUT);
        }
    };
    match run(&args, jobs, range).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tokio_vol: {e}");
            ExitCode::from(BAD_INPUT)
        }
    }
}

/// The transfers the arguments ask for; refuses one volume or file given twice.
fn jobs(args: &Args) -> Result<(Vec<Job>, VolumeRange), String> {
    let mut range = VolumeRange {
        sparse: args.sparse,
        ..VolumeRange::default()
    };
    let jobs: Vec<Job> = match (args.direction, &args.out) {
        (Direction::Download, None) => return Err("download needs --out DIR".to_owned()),
        (Direction::Download, Some(out)) => {
            range.force = args.force;
            if !out.is_dir() {
                return Err(format!("{}: not a directory", out.display()));
            }
            args.items
                .iter()
                .map(|vol| {
                    if vol.contains('/') || vol == ".." || vol == "." {
                        return Err(format!("{vol}: not a plain volume name"));
                    }
                    Ok(Job {
                        vol: vol.clone(),
                        file: out.join(vol),
                        download: true,
                    })
                })
                .collect::<Result<_, _>>()?
        }
        (Direction::Upload, Some(_)) => return Err("--out is for downloads".to_owned()),
        (Direction::Upload, None) => args
            .items
            .iter()
            .map(|file| {
                let file = PathBuf::from(file);
                let vol = file
                    .file_name()
                    .ok_or_else(|| format!("{}: names no file", file.display()))?
                    .to_string_lossy()
                    .into_owned();
                Ok(Job {
                    vol,
                    file,
                    download: false,
                })
            })
            .collect::<Result<_, String>>()?,
    };
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = jobs.iter().find(|job| !seen.insert(&job.vol)) {
        return Err(format!("volume {} is given twice", twice.vol));
    }
    Ok((jobs, range))
}

async fn run(args: &Args, jobs: Vec<Job>, range: VolumeRange) -> virt_reactor::Result<u8> {
    let (handle, driver) = virt_reactor::tokio::register()?;
    let driver = tokio::spawn(driver.run());
    let result = transfer_all(&handle, args, jobs, range).await;
    handle.stop();
    let drained = driver
        .await
        .map_err(|e| virt_reactor::Error::Io(std::io::Error::other(e)))?;
    let code = result?;
    if let Err(e) = drained {
        // The transfers are settled and reported; their code says more than this.
        eprintln!("tokio_vol: shutting down: {e}");
        return Ok(code.max(SOME_FAILED));
    }
    Ok(code)
}

async fn transfer_all(
    handle: &Handle,
    args: &Args,
    jobs: Vec<Job>,
    range: VolumeRange,
) -> virt_reactor::Result<u8> {
    let (uri, pool) = (args.at.uri.clone(), args.at.pool.clone());
    let pool: StoragePool = handle
        .blocking(move || {
            let conn = virt_reactor::connect(&uri)?;
            conn.lookup_storage_pool_by_name(&pool)
                .map_err(virt_reactor::Error::Libvirt)
        })
        .await??;

    let bars = MultiProgress::new();
    let total = bars.add(bar("total"));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let count = jobs.len();
    for (index, job) in jobs.into_iter().enumerate() {
        let bar = bars.add(bar(&job.vol));
        let (handle, pool, total) = (handle.clone(), pool.clone(), total.clone());
        tasks.spawn(async move {
            let outcome = transfer(&handle, &pool, &job, range, &bar, &total).await;
            match &outcome {
                Ok(_) => bar.finish_with_message("done"),
                Err(e) => bar.abandon_with_message(format!("failed: {e}")),
            }
            (index, job.vol, outcome)
        });
    }

    // In the order they end; reported in the order given.
    let mut outcomes = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.map_err(|e| virt_reactor::Error::Io(std::io::Error::other(e)))?);
    }
    total.finish();
    outcomes.sort_by_key(|(index, _, _)| *index);
    let elapsed = started.elapsed().as_secs_f64();
    let mut code = 0;
    let mut bytes = 0;
    for (_, vol, outcome) in outcomes {
        match outcome {
            Ok(stats) => {
                bytes += stats.position();
                println!(
                    "{vol}: ok, {} data bytes, {} hole(s) of {} bytes",
                    stats.data_bytes, stats.holes, stats.hole_bytes
                );
            }
            Err(e) => {
                code = SOME_FAILED;
                println!("{vol}: failed: {e}");
            }
        }
    }
    println!(
        "{count} transfer(s), {:.1} MiB in {elapsed:.2} s ({:.1} MiB/s)",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / elapsed
    );
    // Closing the connection waits for the daemon's answer: on the blocking pool.
    handle.blocking(move || drop(pool)).await?;
    Ok(code)
}

/// One transfer: looks its volume up, sizes its bar, and moves the bytes.
async fn transfer(
    handle: &Handle,
    pool: &StoragePool,
    job: &Job,
    range: VolumeRange,
    bar: &ProgressBar,
    total: &ProgressBar,
) -> virt_reactor::Result<TransferStats> {
    let (pool, name, file, download) = (
        pool.clone(),
        job.vol.clone(),
        job.file.clone(),
        job.download,
    );
    let (vol, size) = handle
        .blocking(move || -> virt_reactor::Result<_> {
            let vol = pool.lookup_storage_vol_by_name(&name)?;
            let size = match download {
                true => vol.info()?.capacity,
                false => std::fs::metadata(&file)?.len(),
            };
            Ok((vol, size))
        })
        .await??;
    bar.set_length(size);
    total.inc_length(size);
    // Called on the driver after each step; bars are cheap to update from anywhere.
    let progress = {
        let (bar, total) = (bar.clone(), total.clone());
        let mut sent = 0;
        move |stats: TransferStats| {
            total.inc(stats.position() - sent);
            sent = stats.position();
            bar.set_position(sent);
        }
    };
    let file = job.file.clone();
    match job.download {
        true => handle.download(vol, file, range, progress).await,
        false => handle.upload(vol, file, range, progress).await,
    }
}
