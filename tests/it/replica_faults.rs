//! Replication under faults, through real processes: a replica server killed mid-shipment,
//! a flipped bit, a full disk, a stalled link, a primary restored from an old copy. Each ends
//! with nothing acknowledged lost, clean audits and, where shipping can finish, equal trees.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, pattern, Mounted, KVFS};
use crate::replica::{
    add, audit_clean, exec_url, replica_dir, server_pid, status_json, sync, try_sync, wait_equal,
};

#[test]
fn killing_the_replica_mid_shipment_loses_nothing_and_resumes() {
    let Some(mut m) = common::mount() else {
        return;
    };
    let replica = replica_dir(&m);
    // 96 MiB of distinct data, so that shipping takes a while.
    for i in 0..12 {
        std::fs::write(m.path(&format!("f{i}")), pattern(100 + i, 8 << 20)).unwrap();
    }
    add(&m, "home", &exec_url(&replica), &[]);
    // The mount's own thread starts shipping; kill the server as soon as it runs, a few times.
    let mut kills = 0;
    let t0 = Instant::now();
    while kills < 3 && t0.elapsed() < Duration::from_secs(60) {
        if let Some(pid) = server_pid(&replica) {
            std::thread::sleep(Duration::from_millis(150 * (kills + 1)));
            unsafe { libc::kill(pid, libc::SIGKILL) };
            kills += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(kills > 0, "the replica server never ran");
    let out = sync(&m.store);
    assert!(out.contains("home\tin sync"), "{out}");
    m.unmount();
    audit_clean(&m.store);
    audit_clean(&replica);
    let r = Mounted::existing(&replica, "").unwrap();
    m.start();
    wait_equal(&m.mnt, &r.mnt, 10);
}

/// A bit flipped on the way is refused, never applied; the next shipment goes through.
#[test]
fn a_flipped_bit_is_refused_and_the_next_shipment_succeeds() {
    let Some(mut m) = common::mount() else {
        return;
    };
    let replica = replica_dir(&m);
    let proxy = m.tmp.path().join("flip.py");
    let flag = m.tmp.path().join("flipped");
    // Pass the primary's bytes to the server, flipping one bit of the 40,000th byte once.
    std::fs::write(
        &proxy,
        format!(
            r#"import os, subprocess, sys, threading
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=sys.stdout.fileno())
flip = not os.path.exists({flag:?})
seen = 0
while True:
    b = os.read(0, 65536)
    if not b:
        break
    if flip and seen <= 40000 < seen + len(b):
        i = 40000 - seen
        b = b[:i] + bytes([b[i] ^ 0x10]) + b[i+1:]
        open({flag:?}, "w").close()
        flip = False
    seen += len(b)
    p.stdin.write(b); p.stdin.flush()
p.stdin.close(); p.wait()
"#
        ),
    )
    .unwrap();
    std::fs::write(m.path("data"), pattern(5, 1 << 20)).unwrap();
    let url = format!(
        "exec:python3 {} {KVFS} serve --stdio {}",
        proxy.display(),
        replica.display()
    );
    m.unmount();
    add(&m, "home", &url, &[]);
    let first = try_sync(&m.store, 600);
    assert!(!first.status.success(), "a damaged frame was accepted");
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(said.contains("checksum"), "{said}");
    assert!(flag.exists());
    let second = sync(&m.store);
    assert!(second.contains("home\tin sync"), "{second}");
    audit_clean(&m.store);
    audit_clean(&replica);
    m.start();
    let r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);
}

/// A replica whose disk fills up refuses with the reason; the primary keeps writing at once,
/// `status` says what is wrong, and nothing half-applied shows on the replica.
#[test]
fn a_full_replica_disk_leaves_the_primary_unaffected() {
    let Some(mut m) = common::mount() else {
        return;
    };
    let small = m.tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "cannot mount a tmpfs (root needed)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let replica = small.join("replica");
    add(&m, "tiny", &exec_url(&replica), &[]);
    std::fs::write(m.path("first"), b"fits").unwrap();
    let out = sync(&m.store);
    assert!(out.contains("tiny\tin sync"), "{out}");
    for i in 0..4 {
        std::fs::write(m.path(&format!("big{i}")), pattern(300 + i, 10 << 20)).unwrap();
    }
    let out = try_sync(&m.store, 20);
    assert!(
        !out.status.success(),
        "a full replica acknowledged everything"
    );
    // The primary still takes writes and reads them back.
    let t0 = Instant::now();
    std::fs::write(m.path("after"), pattern(9, 4 << 20)).unwrap();
    assert_eq!(std::fs::read(m.path("after")).unwrap(), pattern(9, 4 << 20));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let v = status_json(&m.store);
    let st = v.to_string();
    let r = &v["replication"]["replicas"][0];
    assert_eq!(r["state"], "error", "{st}");
    let err = r["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(err.contains("space"), "{st}");
    m.unmount();
    audit_clean(&m.store);
}

/// A primary restored from an old copy of itself is refused by its replica, which holds a
/// later state; the replica is left as it was.
#[test]
fn a_primary_restored_from_an_old_copy_is_refused() {
    let Some(mut m) = common::mount() else {
        return;
    };
    std::fs::write(m.path("a"), b"first").unwrap();
    let replica = replica_dir(&m);
    m.unmount();
    add(&m, "home", &exec_url(&replica), &[]);
    sync(&m.store);
    let old = m.tmp.path().join("old-copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&m.store)
        .arg(&old)
        .status()
        .unwrap();
    assert!(st.success());
    m.start();
    std::fs::write(m.path("b"), b"later").unwrap();
    m.unmount();
    sync(&m.store);
    let before = status_json(&replica)["replication"]["replica_of"]["applied"].clone();
    let out = try_sync(&old, 10);
    assert!(!out.status.success(), "the old copy shipped");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("older than its replica"), "{said}");
    assert_eq!(
        status_json(&replica)["replication"]["replica_of"]["applied"],
        before
    );
    audit_clean(&replica);
}

/// A link that stops moving bytes mid-shipment (held, not closed) is cut after the replica
/// timeout, the error shows in `status`, and the next attempt ships everything.
#[test]
fn a_stalled_link_is_cut_and_shipping_resumes() {
    let Some(mut m) = common::mount() else {
        return;
    };
    let replica = replica_dir(&m);
    let proxy = m.tmp.path().join("stall.py");
    let flag = m.tmp.path().join("stalled");
    // Pass bytes on until 300,000 have gone to the server, then hold the link, once.
    std::fs::write(
        &proxy,
        format!(
            r#"import os, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=sys.stdout.fileno())
stall = not os.path.exists({flag:?})
seen = 0
while True:
    b = os.read(0, 65536)
    if not b:
        break
    seen += len(b)
    if stall and seen > 300000:
        open({flag:?}, "w").close()
        time.sleep(3600)
    p.stdin.write(b); p.stdin.flush()
p.stdin.close(); p.wait()
"#
        ),
    )
    .unwrap();
    std::fs::write(m.path("data"), pattern(21, 4 << 20)).unwrap();
    m.unmount();
    let url = format!(
        "exec:python3 {} {KVFS} serve --stdio {}",
        proxy.display(),
        replica.display()
    );
    add(&m, "home", &url, &[]);
    let t0 = Instant::now();
    let first = Command::new(KVFS)
        .args([
            OsStr::new("replica"),
            OsStr::new("sync"),
            m.store.as_os_str(),
        ])
        .env("KVFS_REPLICA_TIMEOUT", "2")
        .output()
        .unwrap();
    assert!(!first.status.success(), "a stalled link shipped everything");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the stall was not cut"
    );
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(said.contains("answered nothing"), "{said}");
    assert!(flag.exists());
    let st = status_json(&m.store);
    assert_eq!(st["replication"]["replicas"][0]["state"], "error", "{st}");
    let second = sync(&m.store);
    assert!(second.contains("home\tin sync"), "{second}");
    audit_clean(&replica);
    m.start();
    let r = Mounted::existing(&replica, "").unwrap();
    wait_equal(&m.mnt, &r.mnt, 10);
}
