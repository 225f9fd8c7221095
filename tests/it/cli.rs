//! The `kvfs` command as a user runs it: clear one-line refusals, background mounts that
//! return when ready, clean shutdown on SIGTERM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

fn run(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(KVFS).args(args).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn mount_refuses_missing_store_non_store_and_other_major() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let missing = tmp.path().join("nope");
    let (ok, out) = run(&[os("mount"), missing.as_os_str(), mnt.as_os_str()]);
    assert!(!ok && out.contains("no such directory"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let (ok, out) = run(&[os("mount"), plain.as_os_str(), mnt.as_os_str()]);
    assert!(!ok && out.contains("not a kvfs store"), "{out}");
    assert!(
        std::fs::read_dir(&plain).unwrap().next().is_none(),
        "touched a non-store"
    );

    let store = tmp.path().join("store");
    let (ok, out) = run(&[os("format"), store.as_os_str()]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[os("format"), store.as_os_str()]);
    assert!(!ok && out.contains("already"), "{out}");
    {
        let (kv, mut rec) = kvfs::store::open(&store).unwrap();
        rec.major += 1;
        kv.transact(|t| {
            t.put(
                kvfs::kv::Cf::Meta,
                kvfs::keyspace::META_FORMAT,
                &rec.encode().unwrap(),
            )
        })
        .unwrap();
    }
    let (ok, out) = run(&[os("mount"), store.as_os_str(), mnt.as_os_str()]);
    assert!(
        !ok && out.contains(&format!(
            "format {}.{}.0",
            kvfs::keyspace::records::FORMAT_MAJOR + 1,
            kvfs::keyspace::records::FORMAT_MINOR
        )) && out.contains("not supported"),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
}

#[test]
fn background_mount_returns_ready_refuses_second_mount_and_stops_on_sigterm() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let mnt2 = tmp.path().join("mnt2");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&mnt2).unwrap();
    assert!(run(&[os("format"), store.as_os_str()]).0);
    let (ok, out) = run(&[os("mount"), store.as_os_str(), mnt.as_os_str()]);
    assert!(ok, "{out}");
    assert!(
        is_mounted(&mnt),
        "mount returned before the mount was ready"
    );
    std::fs::write(mnt.join("hello"), b"world").unwrap();
    let (ok, out) = run(&[os("mount"), store.as_os_str(), mnt2.as_os_str()]);
    assert!(!ok && out.contains("in use"), "{out}");
    assert!(!is_mounted(&mnt2));
    // SIGTERM to the daemon unmounts with everything flushed.
    let pid = daemon_pid(&store).expect("daemon pid");
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid, &mnt);
    let (ok, out) = run(&[os("mount"), store.as_os_str(), mnt.as_os_str()]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");
    let pid = daemon_pid(&store).expect("daemon pid");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    wait_gone(pid, &mnt);
}

/// The background daemon serving `store` (found through /proc).
fn daemon_pid(store: &Path) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"--daemon-child"[..])
            && args.contains(&store.as_os_str().as_encoded_bytes())
        {
            return Some(pid);
        }
    }
    None
}

fn wait_gone(pid: i32, mnt: &Path) {
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() || is_mounted(mnt) {
        // Reap if it is our grandchild's zombie: it is not ours, so just poll.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") && !is_mounted(mnt) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
