//! Satellites through real processes: a primary mounted with `-o listen=` serves a satellite
//! made by `kvfs clone` over loopback TLS; the satellite's mount follows renames, deletes and
//! rewrites on its upstream, fetches content when read, keeps what it fetched when the
//! upstream is gone, and both audits stay clean.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, errno, pattern, Mounted};
use crate::replica::{
    add, audit_clean, kvfs, ok, replica_dir, status_json, sync, wait_equal, TcpServer,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fingerprint(store: &Path) -> String {
    ok(&[OsStr::new("fingerprint"), store.as_os_str()])
        .trim()
        .to_string()
}

#[test]
fn a_satellite_follows_its_upstream_and_fetches_what_it_reads() {
    let port = free_port();
    let Some(mut m) = common::mount_with("64K", &format!("listen=127.0.0.1:{port}")) else {
        return;
    };
    std::fs::create_dir(m.path("dir")).unwrap();
    std::fs::write(m.path("a"), pattern(1, 1 << 20)).unwrap();
    std::fs::write(m.path("dir/b"), pattern(2, 300_000)).unwrap();
    std::fs::write(m.path("c"), pattern(3, 4 << 20)).unwrap();
    std::fs::write(m.path("offline"), pattern(4, 200_000)).unwrap();
    std::os::unix::fs::symlink("a", m.path("link")).unwrap();

    // The satellite's key pair comes first, so that the upstream can be told of it.
    let sat = m.tmp.path().join("sat");
    let sat_fp = fingerprint(&sat);
    let up_fp = fingerprint(&m.store);
    let url = format!("tcp://127.0.0.1:{port}");

    // Not yet registered: refused, and the error says what to run.
    let out = kvfs(&[
        OsStr::new("clone"),
        OsStr::new(&url),
        sat.as_os_str(),
        OsStr::new("--fingerprint"),
        OsStr::new(&up_fp),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sat_fp) && err.contains("satellite:"), "{err}");

    add(&m, "laptop", "satellite:", &["--fingerprint", &sat_fp]);
    ok(&[
        OsStr::new("clone"),
        OsStr::new(&url),
        sat.as_os_str(),
        OsStr::new("--fingerprint"),
        OsStr::new(&up_fp),
        OsStr::new("--cache-size"),
        OsStr::new("64M"),
    ]);
    let st = status_json(&sat);
    assert_eq!(st["replication"]["role"], "satellite", "{st}");
    // Metadata only: every block is the upstream's until read.
    assert_eq!(st["tiering"]["resident_block_bytes"], 0, "{st}");

    let mut s = Mounted::existing(&sat, "fetch_timeout=3").unwrap();
    wait_equal(&m.mnt, &s.mnt, 20);
    assert_eq!(
        errno(std::fs::write(s.path("new"), b"x")),
        libc::EROFS,
        "a satellite is read-only"
    );

    // Renames, deletes and rewrites upstream show on the satellite.
    std::fs::rename(m.path("a"), m.path("dir/a2")).unwrap();
    std::fs::remove_file(m.path("c")).unwrap();
    std::fs::write(m.path("dir/b"), pattern(5, 500_000)).unwrap();
    std::fs::create_dir(m.path("later")).unwrap();
    std::fs::write(m.path("later/d"), pattern(6, 70_000)).unwrap();
    wait_equal(&m.mnt, &s.mnt, 20);
    assert!(std::fs::read(s.path("dir/b")).unwrap() == pattern(5, 500_000));
    let st = status_json(&m.store);
    let laptop = st["replication"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "laptop")
        .cloned()
        .unwrap();
    assert_eq!(laptop["url"], "satellite:", "{st}");

    // Write a file the satellite will never have read, then lose the upstream: what was
    // fetched still reads, the rest fails with EIO within the timeout.
    std::fs::write(m.path("unread"), pattern(7, 100_000)).unwrap();
    let t0 = Instant::now();
    while !s.path("unread").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "unread never showed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    m.unmount();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert!(std::fs::read(s.path("dir/b")).unwrap() == pattern(5, 500_000));
    assert!(std::fs::read(s.path("offline")).unwrap() == pattern(4, 200_000));
    let t0 = Instant::now();
    assert_eq!(errno(std::fs::read(s.path("unread"))), libc::EIO);
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    s.errors_expected = true;
    s.unmount();
    audit_clean(&sat);
    audit_clean(&m.store);

    // The upstream back: `kvfs pull` catches the unmounted satellite up.
    let applied =
        |st: &serde_json::Value| st["replication"]["replica_of"]["applied"].as_u64().unwrap();
    let before = applied(&status_json(&sat));
    m.start();
    std::fs::write(m.path("after"), pattern(8, 10_000)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ok(&[OsStr::new("pull"), sat.as_os_str()]);
    let after = applied(&status_json(&sat));
    assert!(after > before, "pulled nothing: {before} -> {after}");

    // `kvfs serve` on a satellite keeps it following without a mount.
    let mut follower = std::process::Command::new(common::KVFS)
        .arg("serve")
        .arg(&sat)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(m.path("later/e"), pattern(9, 20_000)).unwrap();
    let t0 = Instant::now();
    while applied(&status_json(&sat)) <= after {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "kvfs serve did not pull"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A mount meanwhile follows what the server applies and fetches what it reads.
    let mut f = Mounted::existing(&sat, "").unwrap();
    assert!(std::fs::read(f.path("unread")).unwrap() == pattern(7, 100_000));
    f.unmount();
    follower.kill().unwrap();
    follower.wait().unwrap();
    let mut s = Mounted::existing(&sat, "").unwrap();
    wait_equal(&m.mnt, &s.mnt, 20);
    s.unmount();
    audit_clean(&sat);
}

/// `kvfs replica add STORE laptop satellite: --fingerprint FP`, retried while a server that
/// just created the store has not opened its control socket yet.
fn add_satellite(store: &Path, name: &str, fp: &str) {
    let args = [
        OsStr::new("replica"),
        OsStr::new("add"),
        store.as_os_str(),
        OsStr::new(name),
        OsStr::new("satellite:"),
        OsStr::new("--fingerprint"),
        OsStr::new(fp),
    ];
    let t0 = Instant::now();
    loop {
        let out = kvfs(&args);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("does not answer") && t0.elapsed() < Duration::from_secs(10),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replica_serves_satellites_from_its_own_log() {
    let Some(mut m) = common::mount() else {
        return;
    };
    std::fs::create_dir(m.path("dir")).unwrap();
    std::fs::write(m.path("a"), pattern(1, 1 << 20)).unwrap();
    std::fs::write(m.path("dir/b"), pattern(2, 300_000)).unwrap();
    std::fs::write(m.path("c"), pattern(3, 2 << 20)).unwrap();
    let replica = replica_dir(&m);
    let server = TcpServer::start(&replica, &m.store, "127.0.0.1:0");
    add(&m, "home", &server.url(), &["--fingerprint", &server.fp]);
    sync(&m.store);

    // A replica has no replicas of its own.
    let out = kvfs(&[
        OsStr::new("replica"),
        OsStr::new("add"),
        replica.as_os_str(),
        OsStr::new("other"),
        OsStr::new("tcp://127.0.0.1:1"),
        OsStr::new("--fingerprint"),
        OsStr::new(&server.fp),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only a primary has replicas"), "{err}");

    // Registered on the replica while it serves (through its control socket), the satellite
    // clones from it: the primary never hears of the satellite.
    let sat = m.tmp.path().join("sat");
    add_satellite(&replica, "laptop", &fingerprint(&sat));
    ok(&[
        OsStr::new("clone"),
        OsStr::new(&server.url()),
        sat.as_os_str(),
        OsStr::new("--fingerprint"),
        OsStr::new(&server.fp),
    ]);
    assert_eq!(status_json(&sat)["replication"]["role"], "satellite");
    let st = status_json(&m.store);
    assert_eq!(
        st["replication"]["replicas"].as_array().unwrap().len(),
        1,
        "{st}"
    );

    let mut s = Mounted::existing(&sat, "fetch_timeout=3").unwrap();
    wait_equal(&m.mnt, &s.mnt, 20);
    // Content comes from the replica, checked by hash.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert!(std::fs::read(s.path("a")).unwrap() == pattern(1, 1 << 20));

    // What the primary changes reaches the satellite through the replica.
    std::fs::rename(m.path("a"), m.path("dir/a2")).unwrap();
    std::fs::remove_file(m.path("c")).unwrap();
    std::fs::write(m.path("dir/b"), pattern(5, 500_000)).unwrap();
    std::fs::create_dir(m.path("later")).unwrap();
    std::fs::write(m.path("later/d"), pattern(6, 70_000)).unwrap();
    sync(&m.store);
    wait_equal(&m.mnt, &s.mnt, 20);
    assert!(std::fs::read(s.path("dir/b")).unwrap() == pattern(5, 500_000));
    assert!(std::fs::read(s.path("later/d")).unwrap() == pattern(6, 70_000));

    // The replica's log keeps each group until the satellite acknowledged it, then trims it.
    let t0 = Instant::now();
    loop {
        let v = status_json(&replica);
        let laptop = &v["replication"]["replicas"][0];
        assert_eq!(laptop["name"], "laptop", "{v}");
        let head = v["replication"]["log_head"].as_u64().unwrap();
        if head > 0 && laptop["acked"] == head && v["replication"]["log_groups"] == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.unmount();
    drop(server);
    m.unmount();
    audit_clean(&sat);
    audit_clean(&replica);
    audit_clean(&m.store);
}
