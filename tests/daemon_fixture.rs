//! Self-test of the private-daemon fixture (`tests/support/daemon.rs`).
//!
//! Only blocking `virt` calls are used, except in `keepalive_settings_reach_the_daemon`,
//! which registers libvirt's default event implementation (process-wide) and
//! deliberately never runs it. Under nextest every test is its own process.

mod support;

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use support::daemon::{proc_is_live, proc_real_uid, DaemonConfig, PrivateDaemon};
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

fn open(uri: &str, daemon: &PrivateDaemon) -> Connect {
    Connect::open(Some(uri)).unwrap_or_else(|e| panic!("open {uri}: {e}\n{}", daemon.log_tail(30)))
}

/// Any process (other than this one) whose argv or environment mentions `root`.
fn processes_mentioning(root: &Path) -> Vec<u32> {
    let mut needle = root.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if pid == me || !proc_is_live(pid) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            if let Ok(bytes) = fs::read(format!("/proc/{pid}/{file}")) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(pid);
                    break;
                }
            }
        }
    }
    found
}

fn upload(conn: &Connect, vol: &StorageVol, data: &[u8]) {
    let stream = Stream::new(conn, 0).unwrap();
    vol.upload(&stream, 0, data.len() as u64, 0).unwrap();
    let mut sent = 0;
    while sent < data.len() {
        let n = stream.send(&data[sent..]).unwrap();
        assert!(n > 0, "virStreamSend returned {n}");
        sent += n as usize;
    }
    stream.finish().unwrap();
}

fn download(conn: &Connect, vol: &StorageVol, len: usize) -> Vec<u8> {
    let stream = Stream::new(conn, 0).unwrap();
    vol.download(&stream, 0, len as u64, 0).unwrap();
    let mut out = Vec::with_capacity(len);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.recv(&mut buf).unwrap();
        assert!(n >= 0, "virStreamRecv returned {n}");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    stream.finish().unwrap();
    out
}

#[test]
fn qemu_session_and_dir_pool_work_and_drop_cleans_up() {
    let daemon = PrivateDaemon::start().expect("start private libvirtd");
    let pid = daemon.pid();
    let root = daemon.root().to_path_buf();
    assert!(proc_is_live(pid), "daemon pid {pid} not running");
    assert_ne!(daemon.daemon_uid(), 0, "the daemon must not run as root");
    assert_eq!(proc_real_uid(pid), Some(daemon.daemon_uid()));
    assert!(daemon.socket_path().starts_with(&root));
    assert!(root.is_dir());

    let uri = daemon.uri("qemu");
    assert_eq!(
        uri,
        format!(
            "qemu+unix:///session?socket={}",
            daemon.socket_path().display()
        )
    );
    let conn = open(&uri, &daemon);
    assert!(conn.is_alive().unwrap());
    assert_eq!(conn.uri().unwrap(), uri);
    assert_eq!(conn.driver_type().unwrap(), "QEMU");

    // A dir pool below root(); `build` creates the directory as the daemon uid.
    let target = root.join("pool");
    let pool_xml = format!(
        "<pool type='dir'><name>fixture</name><target><path>{}</path></target></pool>",
        target.display()
    );
    let pool = conn.define_storage_pool_xml(&pool_xml, 0).unwrap();
    pool.build(0).unwrap();
    pool.create(0).unwrap();
    assert!(pool.is_active().unwrap());
    assert_eq!(fs::metadata(&target).map(|m| m.is_dir()).ok(), Some(true));

    const LEN: usize = 1024 * 1024 + 13;
    let vol_xml = format!(
        "<volume><name>v1.raw</name><capacity unit='bytes'>{LEN}</capacity>\
         <target><format type='raw'/></target></volume>"
    );
    let vol = StorageVol::create_xml(&pool, &vol_xml, 0).unwrap();
    assert_eq!(
        vol.path().unwrap(),
        target.join("v1.raw").display().to_string()
    );
    assert_eq!(pool.list_volumes().unwrap(), vec!["v1.raw".to_owned()]);

    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 251) as u8).collect();
    upload(&conn, &vol, &data);
    assert_eq!(fs::read(target.join("v1.raw")).unwrap(), data);
    assert_eq!(download(&conn, &vol, LEN), data);

    // A pool dir created by the helper is usable too.
    let dir2 = daemon.create_dir("pools/second").unwrap();
    assert_eq!(
        fs::metadata(&dir2)
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .ok(),
        Some(daemon.daemon_uid())
    );
    let pool2 = conn
        .create_storage_pool_xml(
            &format!(
                "<pool type='dir'><name>second</name><target><path>{}</path></target></pool>",
                dir2.display()
            ),
            0,
        )
        .unwrap();
    let vol2 = StorageVol::create_xml(
        &pool2,
        "<volume><name>small</name><capacity unit='KiB'>4</capacity></volume>",
        0,
    )
    .unwrap();
    assert!(dir2.join("small").is_file());
    drop((vol2, pool2));

    drop((vol, pool, conn));
    drop(daemon);
    assert!(!proc_is_live(pid), "daemon pid {pid} survived drop");
    assert!(!root.exists(), "{} survived drop", root.display());
    assert_eq!(processes_mentioning(&root), Vec::<u32>::new());
}

#[test]
fn test_driver_is_served_through_the_daemon() {
    let mut daemon = PrivateDaemon::start().expect("start private libvirtd");
    let uri = daemon.uri("test");
    assert_eq!(
        uri,
        format!(
            "test+unix:///default?socket={}",
            daemon.socket_path().display()
        )
    );
    let conn = open(&uri, &daemon);
    assert_eq!(conn.uri().unwrap(), uri);
    assert_eq!(conn.driver_type().unwrap(), "TEST");
    let names: Vec<String> = conn
        .list_all_domains(0)
        .unwrap()
        .iter()
        .map(|d| d.name().unwrap())
        .collect();
    assert_eq!(names, vec!["test".to_owned()]);
    drop(conn);

    // Proof that the daemon serves it (rather than the in-process test driver).
    daemon.kill();
    assert!(Connect::open(Some(&uri)).is_err());
}

#[test]
fn kill_then_restart_gives_a_working_daemon() {
    let mut daemon = PrivateDaemon::start().expect("start private libvirtd");
    let root = daemon.root().to_path_buf();
    let uri = daemon.uri("qemu");
    let conn = open(&uri, &daemon);
    let target = daemon.create_dir("persist").unwrap();
    let pool = conn
        .define_storage_pool_xml(
            &format!(
                "<pool type='dir'><name>persist</name><target><path>{}</path></target></pool>",
                target.display()
            ),
            0,
        )
        .unwrap();
    drop(pool);

    let old = daemon.pid();
    daemon.kill();
    assert!(!proc_is_live(old), "SIGKILLed daemon {old} still running");
    assert!(!daemon.is_running());
    assert!(
        conn.num_of_defined_storage_pools().is_err(),
        "an RPC on a connection to a dead daemon succeeded"
    );
    assert!(!conn.is_alive().unwrap_or(false));
    drop(conn);
    // kill() is idempotent.
    daemon.kill();

    daemon.restart().expect("restart");
    assert!(daemon.is_running());
    assert_ne!(daemon.pid(), old);
    assert_eq!(daemon.root(), root);
    let conn = open(&uri, &daemon);
    assert!(conn.is_alive().unwrap());
    // Same directories: the persistent pool defined before the kill is still
    // there. (libvirt 9.0 brings an inactive `dir` pool up by itself on daemon
    // start when its directory exists, so it may be listed as active now.)
    let mut names = conn.list_storage_pools().unwrap();
    names.extend(conn.list_defined_storage_pools().unwrap());
    assert_eq!(names, vec!["persist".to_owned()]);
    let pool = conn.lookup_storage_pool_by_name("persist").unwrap();
    assert!(pool.is_persistent().unwrap());
    if !pool.is_active().unwrap() {
        pool.create(0).unwrap();
    }
    let vol = StorageVol::create_xml(
        &pool,
        "<volume><name>after-restart</name><capacity unit='KiB'>4</capacity></volume>",
        0,
    )
    .unwrap();
    assert!(target.join("after-restart").is_file());
    drop(vol);
    drop((pool, conn));

    // restart() of a running daemon stops it gracefully first.
    let second = daemon.pid();
    daemon.restart().expect("restart of a running daemon");
    assert!(!proc_is_live(second));
    let conn = open(&uri, &daemon);
    assert!(conn.is_alive().unwrap());
    drop(conn);

    let last = daemon.pid();
    drop(daemon);
    assert!(!proc_is_live(last));
    assert!(!root.exists());
}

#[test]
fn domains_and_helpers_do_not_outlive_the_fixture() {
    let daemon = PrivateDaemon::start().expect("start private libvirtd");
    let root = daemon.root().to_path_buf();
    let conn = open(&daemon.uri("qemu"), &daemon);
    // No disk, no kernel: SeaBIOS just idles. TCG, so no /dev/kvm is needed.
    let xml = "<domain type='qemu'><name>idle</name><memory unit='MiB'>32</memory>\
               <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
               <devices><serial type='pty'/><console type='pty'/>\
               <memballoon model='none'/></devices></domain>";
    let dom = conn
        .create_domain_xml(xml, 0)
        .unwrap_or_else(|e| panic!("create domain: {e}\n{}", daemon.log_tail(30)));
    assert!(dom.is_active().unwrap());
    let pidfile = root.join("run/libvirt/qemu/run/idle.pid");
    let qemu: u32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(proc_is_live(qemu));
    assert_eq!(proc_real_uid(qemu), Some(daemon.daemon_uid()));
    // stdio_handler = "file": no virtlogd was spawned for this testbed.
    let others: Vec<u32> = processes_mentioning(&root)
        .into_iter()
        .filter(|&p| p != daemon.pid() && p != qemu)
        .collect();
    assert_eq!(others, Vec::<u32>::new(), "unexpected helper processes");
    drop((dom, conn));

    drop(daemon);
    assert!(!proc_is_live(qemu), "QEMU {qemu} survived the fixture");
    assert!(!root.exists());
    assert_eq!(processes_mentioning(&root), Vec::<u32>::new());
}

#[test]
fn keepalive_settings_reach_the_daemon() {
    // With an event implementation registered at open time the server runs
    // keepalive on the connection; nobody runs the loop, so nobody answers.
    virt::event::event_register_default_impl().unwrap();
    let fast = PrivateDaemon::start_with(DaemonConfig {
        keepalive_interval: Some(1),
        keepalive_count: Some(1),
        ..DaemonConfig::default()
    })
    .expect("start fast-keepalive daemon");
    let normal = PrivateDaemon::start().expect("start default daemon");
    let c_fast = open(&fast.uri("qemu"), &fast);
    let c_normal = open(&normal.uri("qemu"), &normal);
    assert!(c_fast.num_of_storage_pools().is_ok());
    assert!(c_normal.num_of_storage_pools().is_ok());

    // interval × (count + 1) = 2 s for `fast`, 5 × 6 = 30 s for `normal`.
    sleep(Duration::from_secs(4));
    assert!(
        c_fast.num_of_storage_pools().is_err(),
        "keepalive_interval=1/count=1 did not close an unanswered connection\n{}",
        fast.log_tail(30)
    );
    assert!(c_normal.num_of_storage_pools().is_ok());
    let log = fs::read_to_string(fast.log_path()).unwrap();
    assert!(log.contains("keepalive timeout"), "{log}");
    drop((c_fast, c_normal));
}
