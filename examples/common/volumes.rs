//! What `vol` and `tokio_vol` share: which way the bytes go, and the progress bars.

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    Download,
    Upload,
}

/// A bar named `name`, as its prefix: a name inside the template would be parsed.
pub fn bar(name: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    ProgressBar::new(0)
        .with_style(style)
        .with_prefix(name.to_owned())
}
