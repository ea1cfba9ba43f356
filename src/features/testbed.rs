//! The project's tiny guests: a Debian cloud kernel and a busybox initramfs that
//! print a banner on their serial console and then echo what they are sent.
//!
//! `testbed/build.sh` builds the kernel and initramfs into a directory (by default
//! `.testbed/` in the repository); this module renders domain XML for them from the
//! same template the scripts use (`testbed/domain.xml.in`), prepares roots for
//! libvirt's in-process QEMU driver, and destroys every guest it started.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use virt::connect::Connect;

/// The template, shared with `testbed/domain.sh`.
const TEMPLATE: &str = include_str!("../../testbed/domain.xml.in");

/// Guest RAM: 64 MiB never boots the Debian kernel, 72–80 MiB sometimes panics.
const MEMORY_MIB: u32 = 96;

/// The line a guest prints on its console once it is ready.
pub const BANNER: &str = "TESTBED-READY";

/// What a guest serves on its console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// A read/eval loop: no prompt, the tty echoes the line, then its output.
    Plain,
    /// An interactive busybox shell (a prompt and about 20 ms more per command).
    Shell,
}

impl GuestMode {
    fn as_str(self) -> &'static str {
        match self {
            GuestMode::Plain => "plain",
            GuestMode::Shell => "shell",
        }
    }
}

/// A built testbed: the kernel, the initramfs and the accelerator to use.
#[derive(Clone, Debug)]
pub struct Testbed {
    kernel: PathBuf,
    initrd: PathBuf,
    accel: String,
}

impl Testbed {
    /// The testbed built in `dir`, or in `$TESTBED_DIR` when that is set.
    ///
    /// # Errors
    ///
    /// The kernel or initramfs is missing (run `testbed/build.sh`).
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Testbed> {
        let dir = std::env::var_os("TESTBED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.as_ref().to_path_buf());
        let dir = fs::canonicalize(&dir).map_err(|e| missing(&dir, e))?;
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
        for file in [&kernel, &initrd] {
            fs::metadata(file).map_err(|e| missing(file, e))?;
        }
        // testbed/probe-accel.sh boots a KVM guest before it ever writes "kvm".
        let accel = fs::read_to_string(dir.join("accel"))
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|a| a == "kvm")
            .unwrap_or_else(|| "qemu".to_owned());
        Ok(Testbed {
            kernel,
            initrd,
            accel,
        })
    }

    /// The XML of a transient guest called `name`.
    pub fn guest_xml(&self, name: &str, mode: GuestMode) -> String {
        let body = TEMPLATE
            .split_once("-->")
            .map_or(TEMPLATE, |(_, body)| body);
        let cmdline = format!(
            "console=ttyS0,115200 quiet loglevel=0 panic=-1 tb.name={name} tb.mode={}",
            mode.as_str()
        );
        let tcg = if self.accel == "qemu" {
            "<tcg><tb-cache unit='MiB'>16</tb-cache></tcg>"
        } else {
            ""
        };
        body.replace("@DOMAIN_TYPE@", &self.accel)
            .replace("@NAME@", &escape(name))
            .replace("@MEMORY_MIB@", &MEMORY_MIB.to_string())
            .replace("@KERNEL@", &escape(&self.kernel.to_string_lossy()))
            .replace("@INITRD@", &escape(&self.initrd.to_string_lossy()))
            .replace("@CMDLINE@", &escape(&cmdline))
            .replace("@TCG@", tcg)
            .replace("@SERIAL_LOG@", "")
    }
}

/// Prepares `root` for libvirt's in-process QEMU driver and returns its URI,
/// `qemu:///embed?root=ROOT`.
///
/// It writes `ROOT/etc/qemu.conf` (the driver reads that path, not
/// `ROOT/etc/qemu/qemu.conf`): QEMU runs as the calling user, and its output goes
/// to files rather than to a virtlogd. Without that file every create takes about
/// 44 s here.
///
/// # Errors
///
/// The directory cannot be written, or the process runs as root on a machine
/// without the `libvirt-qemu` user: libvirt 9.0's privileged embedded driver looks
/// that user up before it reads qemu.conf, so run unprivileged instead.
pub fn embed_root(root: &Path) -> io::Result<String> {
    let (uid, gid) = current_ids();
    if uid == 0 && !user_exists("libvirt-qemu") {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the embedded QEMU driver cannot run as root without the libvirt-qemu user; \
             run as an unprivileged user",
        ));
    }
    fs::create_dir_all(root.join("etc"))?;
    let conf = format!("user = \"+{uid}\"\ngroup = \"+{gid}\"\nstdio_handler = \"file\"\n");
    fs::write(root.join("etc/qemu.conf"), conf)?;
    let root = fs::canonicalize(root)?;
    Ok(format!("qemu:///embed?root={}", root.display()))
}

/// Destroys the guests `names` on `conn` now; returns how many it was given. Not
/// found is success, as for [`Guests::destroy_all`]. With an in-process driver, call
/// it off the loop thread (e.g. through [`crate::ReactorHandle::spawn_blocking`]): destroy
/// waits on QEMU's monitor, which the loop serves.
pub fn destroy(conn: &Connect, names: &[String]) -> usize {
    let guests = Guests::new();
    for name in names {
        guests.track(conn, name);
    }
    guests.destroy_all();
    names.len()
}

/// Destroys, when dropped, every guest [`Guests::track`] was given, even when a
/// test fails halfway.
#[derive(Default)]
pub struct Guests {
    conn: Mutex<Option<Connect>>,
    names: Mutex<Vec<String>>,
}

impl Guests {
    /// Nothing tracked yet.
    pub fn new() -> Guests {
        Guests::default()
    }

    /// Remembers to destroy `name` on `conn`.
    pub fn track(&self, conn: &Connect, name: &str) {
        let mut tracked = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        tracked.get_or_insert_with(|| conn.clone());
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_owned());
    }

    /// Destroys every tracked guest that still runs. Not found is success: libvirt
    /// may report it for a transient guest it just removed.
    pub fn destroy_all(&self) {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(conn) = conn else { return };
        for name in names {
            if let Ok(domain) = conn.lookup_domain_by_name(&name) {
                if let Err(e) = domain.destroy() {
                    log::debug!("destroy {name}: {e}");
                }
            }
        }
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.destroy_all();
    }
}

impl fmt::Debug for Guests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guests { .. }")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn missing(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "{}: {e} (build the testbed with testbed/build.sh)",
            path.display()
        ),
    )
}

/// Who this process runs as: `/proc/self` belongs to its effective uid and gid.
fn current_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}

fn user_exists(name: &str) -> bool {
    fs::read_to_string("/etc/passwd")
        .map(|passwd| {
            passwd
                .lines()
                .any(|line| line.split(':').next() == Some(name))
        })
        .unwrap_or(false)
}
