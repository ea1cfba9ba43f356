//! The parent's fixtures: a private libvirtd, a storage pool on a tmpfs with the
//! volumes every case uses, and the testbed guests. All removed on drop.
//!
//! The parent opens its connection without any event implementation: it only makes
//! blocking calls (pool, volumes, guests); the children do the streaming.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt_reactor::testbed::{GuestMode, Guests, Testbed};

use crate::daemon::{DaemonConfig, PrivateDaemon};
use crate::{data, Opts, MIB};

pub(crate) const POOL: &str = "bench";
/// The volume every download reads: `data::fill(0, ..)` throughout.
pub(crate) const SOURCE: &str = "source";

pub(crate) struct Env {
    pub(crate) uri: String,
    pub(crate) conn: Connect,
    pub(crate) pool_dir: PathBuf,
    pub(crate) source_size: u64,
    guests: Option<Guests>,
    pub(crate) guest_names: Vec<String>,
    pool: StoragePool,
    /// Ours to remove (not given with --scratch).
    scratch: Option<PathBuf>,
    daemon: PrivateDaemon,
}

impl Env {
    pub(crate) fn start(opts: &Opts) -> Env {
        let started = Instant::now();
        let daemon = PrivateDaemon::start_with(DaemonConfig {
            idle_timeout_secs: 0,
            ..DaemonConfig::default()
        })
        .expect("start a private libvirtd");
        let uri = daemon.uri("qemu");
        let conn = Connect::open(Some(&uri)).expect("connect to the private libvirtd");
        let (scratch, base) = match &opts.scratch {
            Some(dir) => (None, dir.clone()),
            None => {
                let dir = PathBuf::from(format!(
                    "/dev/shm/virt-reactor-bench-{}",
                    std::process::id()
                ));
                (Some(dir.clone()), dir)
            }
        };
        let pool_dir = base.join("pool");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&pool_dir)
            .expect("create the pool directory");
        daemon.chown_to_daemon(&base).expect("chown");
        daemon.chown_to_daemon(&pool_dir).expect("chown");
        let xml = format!(
            "<pool type='dir'><name>{POOL}</name><target><path>{}</path></target></pool>",
            pool_dir.display()
        );
        let pool = conn
            .create_storage_pool_xml(&xml, 0)
            .expect("create the pool");
        let source_size = if opts.quick { 64 * MIB } else { 512 * MIB };
        let env = Env {
            uri,
            conn,
            pool_dir,
            source_size,
            guests: None,
            guest_names: Vec::new(),
            pool,
            scratch,
            daemon,
        };
        let _ = crate::DAEMON_PID.set(env.daemon.pid());
        env.create_volume(SOURCE, source_size);
        env.fill_volume(SOURCE, 0, source_size);
        env.create_volume("idle", MIB);
        eprintln!(
            "compare: daemon {}, pool {} ready in {:.1} s",
            env.daemon.pid(),
            env.pool_dir.display(),
            started.elapsed().as_secs_f64()
        );
        env
    }

    /// A sparse volume of `size` bytes (nothing allocated until written).
    pub(crate) fn create_volume(&self, name: &str, size: u64) {
        let xml = format!(
            "<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>\
             <allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
        );
        StorageVol::create_xml(&self.pool, &xml, 0)
            .unwrap_or_else(|e| panic!("create volume {name}: {e}"));
    }

    pub(crate) fn volume_path(&self, name: &str) -> PathBuf {
        self.pool_dir.join(name)
    }

    /// Writes `data::fill(base, ..)` into the first `len` bytes of volume `name`.
    pub(crate) fn fill_volume(&self, name: &str, base: u64, len: u64) {
        // Written by root into the daemon's file: it keeps its owner.
        let file = OpenOptions::new()
            .write(true)
            .open(self.volume_path(name))
            .unwrap_or_else(|e| panic!("open volume {name}: {e}"));
        data::write_file(&file, base, len).unwrap_or_else(|e| panic!("write volume {name}: {e}"));
    }

    /// Empties a volume's file (keeping its size): a failed upload cannot pass the
    /// check on what an earlier run wrote.
    pub(crate) fn clear_volume(&self, name: &str) {
        let path = self.volume_path(name);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open volume");
        let size = file.metadata().expect("stat").len();
        file.set_len(0).expect("truncate");
        file.set_len(size).expect("extend");
    }

    /// Checks that volume `name` holds `data::fill(base, ..)` for `len` bytes.
    pub(crate) fn check_volume(&self, name: &str, base: u64, len: u64) -> Result<(), String> {
        data::check_file(&self.volume_path(name), base, len)
    }

    /// Boots testbed guests until `count` run (those booted before stay), and
    /// returns all of their names; the guests may still be booting.
    pub(crate) fn boot_guests(&mut self, testbed: &Path, count: usize) -> Vec<String> {
        if self.guest_names.len() >= count {
            return self.guest_names.clone();
        }
        let testbed = Testbed::open(testbed).expect("the testbed (bash testbed/build.sh)");
        let guests = self.guests.get_or_insert_with(Guests::new);
        let started = Instant::now();
        let first = self.guest_names.len() + 1;
        for i in first..=count {
            let name = format!("bench-{i}");
            let xml = testbed.guest_xml(&name, GuestMode::Plain);
            guests.track(&self.conn, &name);
            self.conn
                .create_domain_xml(&xml, 0)
                .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", self.daemon.log_tail(20)));
            self.guest_names.push(name);
        }
        eprintln!(
            "compare: booted {} guest(s) in {:.1} s",
            count + 1 - first,
            started.elapsed().as_secs_f64()
        );
        self.guest_names.clone()
    }

    /// Boots again every guest of ours that is gone (a TCG guest may die booting
    /// under load: testbed/README.md).
    pub(crate) fn reboot_missing(&self, testbed: &Path) {
        let testbed = Testbed::open(testbed).expect("the testbed (bash testbed/build.sh)");
        for name in &self.guest_names {
            if self.conn.lookup_domain_by_name(name).is_err() {
                eprintln!("compare: {name} is gone; booting it again");
                self.conn
                    .create_domain_xml(&testbed.guest_xml(name, GuestMode::Plain), 0)
                    .unwrap_or_else(|e| panic!("boot {name}: {e}\n{}", self.daemon.log_tail(20)));
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(guests) = self.guests.take() {
            guests.destroy_all();
        }
        if let Some(dir) = &self.scratch {
            let _ = fs::remove_dir_all(dir);
        } else {
            let _ = fs::remove_dir_all(&self.pool_dir);
        }
        // The daemon (and anything it left) goes with `self.daemon`.
        let _ = std::io::stderr().flush();
        std::thread::sleep(Duration::from_millis(10));
    }
}
