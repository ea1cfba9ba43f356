//! A directory a run creates for itself (an embedded driver's root), and removes
//! with its contents when dropped: never one that was there before.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// A directory this run created (mode 0700), removed with its contents when dropped.
pub struct OwnedDir(PathBuf);

impl OwnedDir {
    /// Creates `path`; fails if anything is there already.
    pub fn create(path: PathBuf) -> Result<OwnedDir, String> {
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(OwnedDir(path)),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}
