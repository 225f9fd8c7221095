//! The operator's tools as a user runs them: `gc` after a crash and on a live mount, `dump` and
//! `status` beside a mount, `audit` finding injected damage and `--repair` fixing it, parity
//! rebuilding a damaged block, and the `mount.kvfs` helper.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use kvfs::keyspace::records::{Dirent, FmapEntry, Inode};
use kvfs::keyspace::{self as ks, ROOT_INO};
use kvfs::kv::{Cf, KvStore};

use crate::common::*;
use crate::locks::run_kvfs;

fn audit_code(store: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(KVFS)
        .arg("audit")
        .args(args)
        .arg(store)
        .output()
        .unwrap();
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), s)
}

fn ino_of(kv: &KvStore, parent: u64, name: &str) -> u64 {
    let v = kv
        .get(Cf::Meta, &ks::dirent_key(parent, name.as_bytes()))
        .unwrap()
        .unwrap();
    Dirent::decode(&v).unwrap().ino
}

#[test]
fn gc_reaps_a_crashed_mount_and_frees_its_unlinked_open_file() {
    let Some(mut m) = mount() else { return };
    fs::write(m.path("stays"), pattern(1, 100_000)).unwrap();
    let held = m.path("held");
    fs::write(&held, pattern(2, 300_000)).unwrap();
    let f = fs::File::open(&held).unwrap();
    fs::remove_file(&held).unwrap();
    m.crash();
    drop(f);
    let (ok, out) = run_kvfs(&["gc", "--dry-run"], &m.store);
    assert!(ok, "{out}");
    assert!(
        out.contains("would remove: 1 dead mount(s), 1 open count(s)")
            && out.contains("1 garbage inode(s)"),
        "{out}"
    );
    let (_, dump) = run_kvfs(&["dump", "--prefix", "g"], &m.store);
    assert_eq!(dump.lines().count(), 1, "dry run changed something: {dump}");
    let (ok, out) = run_kvfs(&["gc"], &m.store);
    assert!(ok, "{out}");
    assert!(
        out.contains("removed: 1 dead mount(s), 1 open count(s)")
            && out.contains("freed: 1 garbage inode(s)"),
        "{out}"
    );
    let (_, dump) = run_kvfs(&["dump"], &m.store);
    assert!(
        !dump
            .lines()
            .any(|l| l.starts_with("p ") || l.starts_with("g ")),
        "{dump}"
    );
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 0, "{out}");
    m.start();
    assert_eq!(fs::read(m.path("stays")).unwrap(), pattern(1, 100_000));
}

#[test]
fn gc_dump_status_and_audit_work_beside_a_live_mount() {
    let Some(m) = mount() else { return };
    let data = pattern(9, 400_000);
    fs::write(m.path("a"), &data).unwrap();
    fs::write(m.path("b"), &data).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    let (ok, out) = run_kvfs(&["gc"], &m.store);
    assert!(ok && out.contains("swept by the mount"), "{out}");
    let (ok, out) = run_kvfs(&["status"], &m.store);
    assert!(ok, "{out}");
    assert!(out.contains("mounted: yes"), "{out}");
    assert!(out.contains("mounts: 1") && out.contains(" live "), "{out}");
    assert!(out.contains("dedup ratio: 2.00"), "{out}");
    assert!(out.contains("logical bytes: 800000"), "{out}");
    let (ok, out) = run_kvfs(&["dump", "--prefix", "d"], &m.store);
    assert!(ok, "{out}");
    assert!(
        out.contains("d 1 \"a\"") && out.contains("kind: Dir"),
        "{out}"
    );
    let (ok, out) = run_kvfs(&["dump", "--prefix", "p"], &m.store);
    assert!(ok && out.contains("heartbeat"), "{out}");
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = audit_code(&m.store, &["--repair"]);
    assert_eq!(code, 2, "repair must refuse a mounted store: {out}");
    assert!(out.contains("mounted"), "{out}");
}

#[test]
fn audit_reports_injected_damage_and_repair_fixes_it() {
    let Some(mut m) = mount() else { return };
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/orphan"), pattern(3, 200_000)).unwrap();
    fs::write(m.path("twice"), pattern(4, 70_000)).unwrap();
    fs::write(m.path("wrong-links"), b"abc").unwrap();
    let held = fs::File::open(m.path("twice")).unwrap();
    m.unmount_lazily_then_close(held);
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 0, "clean store: {out}");
    assert!(
        !out.contains("note:"),
        "a clean unmount leaves nothing to sweep: {out}"
    );
    let (_, dump) = run_kvfs(&["dump"], &m.store);
    assert!(
        !dump
            .lines()
            .any(|l| l.starts_with("p ") || l.contains(" open mount ")),
        "a clean unmount leaves no process entry or open count: {dump}"
    );
    {
        let (kv, _) = kvfs::store::open(&m.store).unwrap();
        let dir = ino_of(&kv, ROOT_INO, "dir");
        let orphan = ino_of(&kv, dir, "orphan");
        let twice = ino_of(&kv, ROOT_INO, "twice");
        let wrong = ino_of(&kv, ROOT_INO, "wrong-links");
        let ent = FmapEntry::decode(&kv.get(Cf::Fmap, &ks::fmap_key(twice, 0)).unwrap().unwrap())
            .unwrap();
        kv.transact(|t| {
            // A name lost (the file becomes an orphan), a refcount off by one, a bad nlink.
            t.delete(Cf::Meta, &ks::dirent_key(dir, b"orphan"))?;
            t.merge(
                Cf::Bidx,
                &ks::refcount_key(&ent.hash, 3),
                &1i64.to_le_bytes(),
            )?;
            let k = ks::inode_key(wrong);
            let mut i = Inode::decode(&t.get(Cf::Meta, &k)?.unwrap()).unwrap();
            i.nlink = 5;
            t.put(Cf::Meta, &k, &i.encode().unwrap())
        })
        .unwrap();
        let _ = orphan;
    }
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no name (orphan)"), "{out}");
    assert!(out.contains("refcount 2 but 1 reference(s)"), "{out}");
    assert!(out.contains("nlink 5 but 1 name(s)"), "{out}");
    assert!(out.contains("3 problem(s)"), "{out}");
    let (code, out) = audit_code(&m.store, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("3 repaired") && out.contains("lost+found"),
        "{out}"
    );
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 0, "{out}");
    m.start();
    let found: Vec<_> = fs::read_dir(m.path("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(found.len(), 1);
    assert_eq!(fs::read(&found[0]).unwrap(), pattern(3, 200_000));
    assert_eq!(fs::metadata(m.path("wrong-links")).unwrap().len(), 3);
}

/// Flip bits in the middle of the stored value of block `bn` of `name`.
fn damage_block(store: &Path, name: &str, bn: u64, at: usize) {
    let (kv, _) = kvfs::store::open(store).unwrap();
    let ino = ino_of(&kv, ROOT_INO, name);
    let ent =
        FmapEntry::decode(&kv.get(Cf::Fmap, &ks::fmap_key(ino, bn)).unwrap().unwrap()).unwrap();
    let key = ks::block_key(&ent.hash);
    let mut v = kv.get(Cf::Blocks, &key).unwrap().unwrap();
    let at = v.len() - at;
    v[at] ^= 0x5a;
    v[at + 1] ^= 0xff;
    kv.transact(|t| t.put(Cf::Blocks, &key, &v)).unwrap();
}

#[test]
fn parity_rebuilds_a_damaged_block_on_read_and_audit_repair_rewrites_it() {
    let Some(mut m) = mount_with_format(&["--parity", "--compression", "zstd"], "") else {
        return;
    };
    let text: Vec<u8> = b"compressible text, "
        .iter()
        .cycle()
        .take(300_000)
        .copied()
        .collect();
    let noise = pattern(6, 300_000);
    fs::write(m.path("text"), &text).unwrap();
    fs::write(m.path("noise"), &noise).unwrap();
    m.unmount();
    damage_block(&m.store, "noise", 2, 1000);
    damage_block(&m.store, "text", 1, 10);
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("parity rebuilds it"), "{out}");
    m.start();
    assert!(
        fs::read(m.path("noise")).unwrap() == noise,
        "noise not rebuilt"
    );
    assert!(
        fs::read(m.path("text")).unwrap() == text,
        "text not rebuilt"
    );
    m.unmount();
    let (code, out) = audit_code(&m.store, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("block rewritten from parity"), "{out}");
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 0, "{out}");
    let (ok, out) = run_kvfs(&["status"], &m.store);
    assert!(ok && out.contains("with parity"), "{out}");
}

#[test]
fn damage_without_parity_is_eio_and_an_audit_problem() {
    let Some(mut m) = mount() else { return };
    fs::write(m.path("f"), pattern(8, 200_000)).unwrap();
    m.unmount();
    damage_block(&m.store, "f", 1, 500);
    let (code, out) = audit_code(&m.store, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("corrupt: content does not match its SHA-256 name"),
        "{out}"
    );
    let (code, _) = audit_code(&m.store, &["--repair"]);
    assert_eq!(code, 1, "an unrepairable block stays a problem");
    m.start();
    let mut f = fs::File::open(m.path("f")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.seek(SeekFrom::Start(70_000)).unwrap();
    assert_eq!(errno(f.read(&mut buf)), libc::EIO);
}

/// Wait (at most 30 s) until no mount's process holds `store`: a daemon ends after the
/// kernel lets go of its mount.
fn wait_let_go(store: &Path) {
    let t0 = std::time::Instant::now();
    while kvfs::store::in_use(store) {
        assert!(t0.elapsed().as_secs() < 30, "daemon did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `kvfs unmount` returns only once the mount's process has synced the store and let go of
/// it (the kernel returns from the unmount itself before that: the process then still holds
/// the store for a fraction of a second).
#[test]
fn kvfs_unmount_returns_once_the_store_is_let_go() {
    let Some(mut m) = mount() else { return };
    m.unmount();
    let mount_bg = |m: &Mounted| {
        let st = Command::new(KVFS)
            .arg("mount")
            .arg(&m.store)
            .arg(&m.mnt)
            .status()
            .unwrap();
        assert!(st.success() && is_mounted(&m.mnt), "kvfs mount failed");
    };
    let unmount = |args: &[&str], m: &Mounted| {
        Command::new(KVFS)
            .arg("unmount")
            .args(args)
            .arg(&m.mnt)
            .output()
            .unwrap()
    };
    let data = vec![7u8; 16 << 20];
    mount_bg(&m);
    fs::write(m.path("f"), &data).unwrap();
    let out = unmount(&[], &m);
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mounted(&m.mnt));
    assert!(
        !kvfs::store::in_use(&m.store),
        "kvfs unmount returned while the mount's process still held the store"
    );
    mount_bg(&m);
    assert!(fs::read(m.path("f")).unwrap() == data);
    // Lazy: detached at once, the process left to end on its own.
    let out = unmount(&["--lazy"], &m);
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mounted(&m.mnt));
    wait_let_go(&m.store);
    let out = unmount(&[], &m);
    assert!(
        !out.status.success(),
        "unmounting what is not mounted must fail"
    );
    // Nor does it unmount what kvfs did not mount.
    let out = Command::new(KVFS)
        .arg("unmount")
        .arg(m.tmp.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a kvfs mount"),
        "{out:?}"
    );
}

#[test]
fn mount_helper_speaks_mount8s_protocol() {
    let Some(mut m) = mount() else { return };
    m.unmount();
    let helper = m.tmp.path().join("mount.kvfs");
    std::os::unix::fs::symlink(KVFS, &helper).unwrap();
    let out = Command::new(&helper)
        .arg(&m.store)
        .arg(&m.mnt)
        .args(["-o", "rw,noatime,defaults"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&m.mnt));
    fs::write(m.path("via-helper"), b"ok").unwrap();
    assert!(Command::new("umount")
        .arg(&m.mnt)
        .status()
        .unwrap()
        .success());
    wait_let_go(&m.store);
    // Through mount(8) itself, when we may install the helper where it looks.
    let sbin = Path::new("/sbin/mount.kvfs");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && !sbin.exists() {
        std::os::unix::fs::symlink(KVFS, sbin).unwrap();
        let st = Command::new("mount")
            .args(["-t", "kvfs", "-o", "noatime"])
            .arg(&m.store)
            .arg(&m.mnt)
            .status()
            .unwrap();
        let _ = fs::remove_file(sbin);
        assert!(st.success(), "mount -t kvfs failed");
        assert_eq!(fs::read(m.path("via-helper")).unwrap(), b"ok");
        assert!(Command::new("umount")
            .arg(&m.mnt)
            .status()
            .unwrap()
            .success());
        wait_let_go(&m.store);
    }
}
