//! The private directory of the service's sockets, and binding them there.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::net::UnixListener;

/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Where the service puts its sockets unless told otherwise, and where
/// `virt-console` looks: `$XDG_RUNTIME_DIR/virt-consoled`, or `/run/virt-consoled`
/// for root.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if !runtime.is_empty() && effective_uid() != 0 => {
            PathBuf::from(runtime).join("virt-consoled")
        }
        _ => PathBuf::from("/run/virt-consoled"),
    }
}

/// The directory of the sockets: made mode 0700, or taken only if it is a real
/// directory of ours with mode 0700. It never changes what it did not create.
#[derive(Debug)]
pub(crate) struct SocketDir {
    path: PathBuf,
    /// This run made it, so it removes it at exit (if empty).
    created: bool,
    /// Per-host subdirectories this run made, removed at exit (if empty).
    subdirs: Vec<PathBuf>,
}

/// A socket file this run bound: removed only if it is still the same file.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) path: PathBuf,
    file_id: (u64, u64),
}

impl SocketDir {
    pub(crate) fn prepare(given: &Path) -> Result<SocketDir, String> {
        // Without a trailing slash, which would make lstat follow a symbolic link.
        let path: PathBuf = given.components().collect();
        let fail = |why: String| format!("--dir {}: {why}", given.display());
        match SocketDir::create(&path) {
            Ok(dir) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = fs::symlink_metadata(&path).map_err(|e| fail(e.to_string()))?;
                if meta.file_type().is_symlink() {
                    return Err(fail("is a symbolic link; give the directory itself".into()));
                }
                if !meta.is_dir() {
                    return Err(fail("exists and is not a directory".into()));
                }
                if meta.uid() != effective_uid() {
                    return Err(fail(format!("owned by uid {}, not by us", meta.uid())));
                }
                let mode = meta.mode() & 0o7777;
                if mode != 0o700 {
                    return Err(fail(format!(
                        "mode {mode:04o}; an existing directory must be private (0700); \
                         give a path that does not exist yet and it is made so"
                    )));
                }
                let path = fs::canonicalize(&path).map_err(|e| fail(e.to_string()))?;
                Ok(SocketDir {
                    path,
                    created: false,
                    subdirs: Vec::new(),
                })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// Creates `path` (not its parents), mode 0700 whatever the umask.
    fn create(path: &Path) -> io::Result<SocketDir> {
        fs::DirBuilder::new().mode(0o700).create(path)?;
        // Owned from here: an error below removes it again.
        let mut dir = SocketDir {
            path: path.to_owned(),
            created: true,
            subdirs: Vec::new(),
        };
        // The umask may have taken bits off; fix them on what we made, not on
        // whatever a link put there since.
        let made = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(path)?;
        if made.metadata()?.mode() & 0o7777 != 0o700 {
            made.set_permissions(fs::Permissions::from_mode(0o700))?;
        }
        dir.path = fs::canonicalize(path)?;
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Binds `DIR/FILE` (e.g. `NAME.sock`, or `LABEL/NAME.sock` in a host's
    /// subdirectory, made mode 0700), mode 0600. It is bound under a temporary
    /// name, made 0600, then renamed, so it never appears with wider permissions.
    /// A stale socket of that name is replaced; a live one, or any other file, is
    /// an error.
    pub(crate) fn bind(&mut self, file: &str) -> io::Result<(UnixListener, BoundSocket)> {
        let path = self.socket_path(file)?;
        if let Some(parent) = path.parent().filter(|p| *p != self.path) {
            self.subdir(parent)?;
        }
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // Another service on the same directory keeps its sockets.
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another process listens on it", path.display()),
                ));
            }
        }
        let staging = self.staging();
        let _ = fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", staging.display())))?;
        let placed = fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::rename(&staging, &path))
            .and_then(|()| fs::symlink_metadata(&path));
        match placed {
            Ok(meta) => Ok((
                listener,
                BoundSocket {
                    path,
                    file_id: (meta.dev(), meta.ino()),
                },
            )),
            Err(e) => {
                let _ = fs::remove_file(&staging);
                Err(e)
            }
        }
    }

    /// Makes the subdirectory `path` of ours (mode 0700) if it is missing. Inside our
    /// private directory nobody else can have put anything there.
    fn subdir(&mut self, path: &Path) -> io::Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {
                self.subdirs.push(path.to_owned());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// `DIR/FILE` or `DIR/SUB/FILE`, for names that make safe file names and fit
    /// `sun_path`.
    fn socket_path(&self, file: &str) -> io::Result<PathBuf> {
        let bad = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{file:?} {why}"),
            ))
        };
        let parts: Vec<&str> = file.split('/').collect();
        let unusable =
            |part: &&str| part.is_empty() || part.starts_with('.') || part.contains('\0');
        if parts.len() > 2 || parts.iter().any(unusable) {
            return bad("is not usable as a file name");
        }
        let path = self.path.join(file);
        if path.as_os_str().len() > SUN_PATH_MAX {
            return bad("makes a socket path too long for a Unix socket; use a shorter --dir");
        }
        Ok(path)
    }

    fn staging(&self) -> PathBuf {
        self.path.join(format!(".bind-{}", std::process::id()))
    }
}

impl BoundSocket {
    /// Removes the socket file if it is still the one this run bound.
    pub(crate) fn remove(&self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        // Our sockets are gone already; a directory this run made goes too, but only
        // if empty: what someone else put there is not ours to delete.
        let _ = fs::remove_file(self.staging());
        for subdir in &self.subdirs {
            if let Err(e) = fs::remove_dir(subdir) {
                log::warn!("cannot remove {}: {e}", subdir.display());
            }
        }
        if self.created {
            if let Err(e) = fs::remove_dir(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Who this process runs as: `/proc/self` belongs to its effective uid.
fn effective_uid() -> u32 {
    fs::metadata("/proc/self").map_or(0, |m| m.uid())
}
