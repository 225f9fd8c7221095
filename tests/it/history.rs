//! History through real processes: a script mutates a tree on a live mount and records, at
//! random moments, a manifest of everything (every attribute, a content hash of every file);
//! then each moment is mounted with `--at` while the live mount is up and its manifest must
//! be equal. Also: the window refuses what it no longer keeps, shrinking it frees space and
//! keeps audit clean, a snapshot outlives the window, a crash keeps history whole, a replica
//! keeps a window of its own, and `kvfs log` tells a file's changes.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{self, pattern, Mounted, Rng};
use crate::replica::{add, audit_clean, config, exec_url, kvfs, ok, status_json, sync};

/// Per path: kind, inode, mode, owner, size, link count, the three times, symlink target,
/// user xattrs and content hash. Taken after the kernel's inode cache was dropped (it may
/// show times of its own for a while; what counts is what the store holds).
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else {
                let data = std::fs::read(&p).unwrap();
                format!("file {:016x}", xxhash_rust::xxh3::xxh3_64(&data))
            };
            let mut xattrs = Vec::new();
            if !ft.is_symlink() {
                for name in xattr_names(&p) {
                    let v = xattr_get(&p, &name);
                    xattrs.push((name, v));
                }
            }
            out.insert(
                rel,
                format!(
                    "{what} ino {} mode {:o} uid {} gid {} size {} nlink {} atime {}.{} mtime {}.{} ctime {}.{} xattrs {:?}",
                    md.ino(),
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.size(),
                    md.nlink(),
                    md.atime(),
                    md.atime_nsec(),
                    md.mtime(),
                    md.mtime_nsec(),
                    md.ctime(),
                    md.ctime_nsec(),
                    xattrs
                ),
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn xattr_names(p: &Path) -> Vec<String> {
    let c = common::cstr(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut names: Vec<String> = buf[..n.max(0) as usize]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

fn xattr_get(p: &Path, name: &str) -> Vec<u8> {
    let c = common::cstr(p);
    let n = std::ffi::CString::new(name).unwrap();
    let mut v = vec![0u8; 65536];
    // SAFETY: the buffers are valid for their lengths.
    let len = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    v.truncate(len.max(0) as usize);
    v
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) {
    let c = common::cstr(p);
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(r, 0, "setxattr {}", p.display());
}

/// Now, as `--at @SECONDS.NANOS` takes it.
pub(crate) fn moment() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("@{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Everything written reaches the store: each file fsynced, then the whole mount.
fn settle(root: &Path) {
    fn walk(dir: &Path) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&e.path());
            } else if ft.is_file() {
                std::fs::File::open(e.path()).unwrap().sync_all().unwrap();
            }
        }
    }
    walk(root);
    // SAFETY: plain sync(2).
    unsafe { libc::sync() };
}

/// Random mutations of every kind in a small namespace, so that names collide.
struct Mutator {
    rng: Rng,
    root: PathBuf,
    /// Files unlinked while open (kept open until the end).
    held: Vec<std::fs::File>,
}

impl Mutator {
    fn path(&mut self) -> PathBuf {
        let dirs = ["", "d1/", "d2/", "d1/sub/"];
        let names = ["a", "b", "c", "d"];
        let d = dirs[self.rng.below(dirs.len() as u64) as usize];
        let n = names[self.rng.below(names.len() as u64) as usize];
        self.root.join(format!("{d}{n}"))
    }

    fn step(&mut self) {
        let p = self.path();
        let q = self.path();
        let r = self.rng.below(15);
        let _ = match r {
            0 | 1 => std::fs::write(
                &p,
                pattern(self.rng.next(), self.rng.below(300_000) as usize),
            ),
            2 | 3 => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| {
                    let off = self.rng.below(200_000);
                    f.write_at(
                        &pattern(self.rng.next(), 1 + self.rng.below(70_000) as usize),
                        off,
                    )
                    .map(drop)
                }),
            4 => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(self.rng.below(250_000))),
            5 | 6 => std::fs::rename(&p, &q),
            7 => std::fs::hard_link(&p, &q),
            8 => std::fs::remove_file(&p),
            9 => std::fs::File::open(&p).and_then(|f| {
                std::fs::remove_file(&p)?;
                self.held.push(f);
                Ok(())
            }),
            10 => {
                if p.is_file() {
                    xattr_set(&p, "user.k", &pattern(self.rng.next(), 20));
                }
                Ok(())
            }
            11 => std::fs::set_permissions(
                &p,
                std::os::unix::fs::PermissionsExt::from_mode(0o600 | self.rng.below(0o100) as u32),
            ),
            12 => std::os::unix::fs::chown(&p, Some(self.rng.below(3) as u32 + 1000), None),
            13 => {
                let t = libc::timespec {
                    tv_sec: 1_600_000_000 + self.rng.below(1000) as i64,
                    tv_nsec: self.rng.below(1_000_000_000) as i64,
                };
                let c = common::cstr(&p);
                // SAFETY: a valid path and two valid timespecs.
                unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
                Ok(())
            }
            _ => std::os::unix::fs::symlink("a", &p),
        };
    }
}

fn mount_at(store: &Path, at: &str) -> Mounted {
    Mounted::existing(store, &format!("at={at}")).unwrap()
}

fn differs(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in a {
        if b.get(k) != Some(v) {
            out.push_str(&format!("then {k}: {v}\npast {k}: {:?}\n", b.get(k)));
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push_str(&format!("only in the past mount: {k}\n"));
    }
    out
}

#[test]
fn every_moment_of_the_window_mounts_exactly_as_it_was() {
    let Some(mut m) = common::mount_with_format(&["--history", "7d"], "noatime") else {
        return;
    };
    for d in ["d1/sub", "d2"] {
        std::fs::create_dir_all(m.path(d)).unwrap();
    }
    let mut mu = Mutator {
        rng: Rng(7),
        root: m.mnt.clone(),
        held: Vec::new(),
    };
    let mut moments = Vec::new();
    for round in 0..8 {
        for _ in 0..25 {
            mu.step();
        }
        // Directories come and go too.
        if round == 3 {
            let _ = std::fs::rename(m.path("d1/sub"), m.path("d2/moved"));
        }
        if round == 5 {
            let _ = std::fs::remove_dir_all(m.path("d2"));
            std::fs::create_dir(m.path("d2")).unwrap();
        }
        settle(&m.mnt);
        let at = moment();
        moments.push((at, manifest(&m.mnt)));
    }
    // Past every moment, the live tree changes on.
    for _ in 0..30 {
        mu.step();
    }
    for (at, want) in &moments {
        let mut p = mount_at(&m.store, at);
        let got = manifest(&p.mnt);
        assert!(got == *want, "state at {at}:\n{}", differs(want, &got));
        // Read-only.
        assert_eq!(
            common::errno(std::fs::write(p.path("new"), b"x")),
            libc::EROFS
        );
        p.unmount();
    }

    // A crash in the middle of mutations: live state and history both whole afterwards.
    for _ in 0..10 {
        mu.step();
    }
    drop(std::mem::take(&mut mu.held));
    m.crash();
    m.start();
    audit_clean_mounted(&m.store);
    for (at, want) in moments.iter().step_by(3) {
        let mut p = mount_at(&m.store, at);
        let got = manifest(&p.mnt);
        assert!(
            got == *want,
            "after a crash, state at {at}:\n{}",
            differs(want, &got)
        );
        p.unmount();
    }
    m.unmount();
    audit_clean(&m.store);
}

/// `kvfs audit` of a mounted store (read-only beside the mount).
fn audit_clean_mounted(store: &Path) {
    let out = kvfs(&[OsStr::new("audit"), store.as_os_str()]);
    assert!(
        out.status.success(),
        "audit: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn history(store: &Path) -> serde_json::Value {
    status_json(store)["history"].clone()
}

fn mount_refused(store: &Path, at: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = kvfs(&[
        OsStr::new("mount"),
        store.as_os_str(),
        tmp.path().as_os_str(),
        OsStr::new("--at"),
        OsStr::new(at),
    ]);
    assert!(!out.status.success(), "mount --at {at} was not refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_window_refuses_what_it_lost_and_shrinking_it_frees_space() {
    let Some(mut m) = common::mount_with_format(&["--history", "7d"], "") else {
        return;
    };
    std::fs::write(m.path("f"), pattern(1, 4 << 20)).unwrap();
    settle(&m.mnt);
    let first = moment();
    std::fs::write(m.path("f"), pattern(2, 4 << 20)).unwrap();
    settle(&m.mnt);
    ok(&[
        OsStr::new("snapshot"),
        m.store.as_os_str(),
        OsStr::new("before"),
    ]);
    std::fs::write(m.path("f"), pattern(3, 4 << 20)).unwrap();
    std::fs::write(m.path("g"), b"after the snapshot").unwrap();
    settle(&m.mnt);
    let h = history(&m.store);
    // Two overwritten generations of 4 MiB are held only by the past.
    assert!(h["past_only_bytes"].as_u64().unwrap() >= 8 << 20, "{h}");
    // (A flush that caught a block half written keeps that state too: one more, now and then.)
    assert!(h["past_only_blocks"].as_u64().unwrap() >= 128, "{h}");

    // Before history began, and in the future: refused, saying why.
    let err = mount_refused(&m.store, "-8d");
    assert!(err.contains("before the oldest moment kept"), "{err}");
    let err = mount_refused(&m.store, "@9999999999");
    assert!(err.contains("future"), "{err}");

    // Shrinking the window: what only the past held is freed, the snapshot stays.
    config(&m.store, "history=1s");
    let t0 = Instant::now();
    loop {
        let h = history(&m.store);
        // The snapshot keeps the second generation (64 blocks); the first goes.
        if h["past_only_blocks"].as_u64().unwrap() <= 64 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "not trimmed: {h}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let err = mount_refused(&m.store, &first);
    assert!(err.contains("before the oldest moment kept"), "{err}");
    let mut p = mount_at(&m.store, "before");
    assert_eq!(std::fs::read(p.path("f")).unwrap(), pattern(2, 4 << 20));
    assert!(!p.path("g").exists());
    p.unmount();
    audit_clean_mounted(&m.store);

    // Without the snapshot and the window, nothing of the past is left.
    ok(&[
        OsStr::new("snapshot"),
        m.store.as_os_str(),
        OsStr::new("--remove"),
        OsStr::new("before"),
    ]);
    config(&m.store, "history=0");
    let t0 = Instant::now();
    while history(&m.store)["records"].as_u64().unwrap() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            history(&m.store)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let err = mount_refused(&m.store, "-1s");
    assert!(err.contains("keeps no history"), "{err}");
    m.unmount();
    audit_clean(&m.store);
    assert_eq!(history(&m.store)["past_only_bytes"], 0);
}

#[test]
fn a_replica_keeps_a_window_of_its_own() {
    // The primary keeps no history; its replica keeps 90 days.
    let Some(mut m) = common::mount() else {
        return;
    };
    let replica = m.tmp.path().join("replica");
    let url = format!("{} --history 90d", exec_url(&replica));
    add(&m, "home", &url, &[]);
    let mut moments = Vec::new();
    let mut mu = Mutator {
        rng: Rng(11),
        root: m.mnt.clone(),
        held: Vec::new(),
    };
    std::fs::create_dir_all(m.path("d1/sub")).unwrap();
    std::fs::create_dir_all(m.path("d2")).unwrap();
    for _ in 0..4 {
        for _ in 0..20 {
            mu.step();
        }
        settle(&m.mnt);
        // The group taken now is what the replica keeps for this moment.
        sync(&m.store);
        moments.push((moment(), manifest(&m.mnt)));
    }
    drop(std::mem::take(&mut mu.held));
    for (at, want) in &moments {
        let mut p = mount_at(&replica, at);
        let got = manifest(&p.mnt);
        assert!(got == *want, "replica at {at}:\n{}", differs(want, &got));
        p.unmount();
    }
    let err = mount_refused(&m.store, &moments[0].0);
    assert!(err.contains("keeps no history"), "{err}");
    m.unmount();
    audit_clean(&replica);
}

#[test]
fn log_tells_when_a_file_changed() {
    let Some(mut m) = common::mount_with_format(&["--history", "1d"], "") else {
        return;
    };
    std::fs::create_dir(m.path("dir")).unwrap();
    // Created empty, then its first write (a create and a flush: two moments). Synced: a
    // close leaves a small file's commit to the kernel's release, which comes after close(2)
    // returns and may find the next open's write buffered too (one moment for both).
    let mut f = std::fs::File::create(m.path("dir/f")).unwrap();
    f.write_all(b"one").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("dir/f"))
        .unwrap();
    f.write_all(b" two").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(m.path("dir/f"), m.path("dir/g")).unwrap();
    std::fs::write(m.path("dir/f"), b"new").unwrap();
    std::fs::remove_file(m.path("dir/f")).unwrap();
    std::fs::rename(m.path("dir/g"), m.path("dir/f")).unwrap();
    settle(&m.mnt);
    let out = ok(&[OsStr::new("log"), m.store.as_os_str(), OsStr::new("/dir/f")]);
    // (The kernel may push a file's times as a change of their own: "attributes", now and
    // then, depending on when its writeback runs.)
    let what: Vec<&str> = out
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap_or(""))
        .filter(|w| *w != "attributes")
        .collect();
    assert_eq!(
        what,
        [
            "created",
            "written",
            "written",
            "deleted or renamed away",
            "created",
            "written",
            "deleted or renamed away",
            "renamed here"
        ],
        "{out}"
    );
    // The renamed-back file has the content it had after the append.
    let last = out.lines().last().unwrap();
    assert!(last.contains("\t7\t"), "{out}");
    m.unmount();
}
