//! The data path through a real mount: bytes survive remounts and crashes after fsync, blocks
//! are deduplicated, small writes are buffered, and corrupt blocks give EIO without taking the
//! mount down.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use kvfs::keyspace::{self as ks, Prefix};
use kvfs::kv::Cf;

use crate::common::*;

fn count(store: &std::path::Path, p: Prefix) -> usize {
    let (kv, _) = kvfs::store::open(store).unwrap();
    let (s, e) = p.range();
    let mut n = 0;
    kv.for_each(p.cf(), &s, &e, |_, _| {
        n += 1;
        true
    })
    .unwrap();
    n
}

#[test]
fn bytes_survive_remount() {
    let Some(mut m) = mount() else { return };
    let sizes = [0usize, 1, 4095, 65536, 65537, 1 << 20, 3_000_001];
    for (i, n) in sizes.iter().enumerate() {
        fs::write(m.path(&format!("f{i}")), pattern(i as u64, *n)).unwrap();
    }
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::write(m.path("a/b/c/deep"), b"deep").unwrap();
    std::os::unix::fs::symlink("a/b", m.path("ln")).unwrap();
    m.remount();
    for (i, n) in sizes.iter().enumerate() {
        assert_eq!(
            fs::read(m.path(&format!("f{i}"))).unwrap(),
            pattern(i as u64, *n),
            "f{i}"
        );
    }
    assert_eq!(fs::read(m.path("ln/c/deep")).unwrap(), b"deep");
}

#[test]
fn random_overwrites_read_back_like_a_plain_file() {
    let Some(mut m) = mount() else { return };
    let plain = plain_dir(&m).join("ref");
    let kv = m.path("f");
    let (a, b) = (File::create(&plain).unwrap(), File::create(&kv).unwrap());
    let mut x = 12345u64;
    for i in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (3 << 20);
        let len = ((x >> 8) % 20_000) as usize + 1;
        let data = pattern(i, len);
        a.write_all_at(&data, off).unwrap();
        b.write_all_at(&data, off).unwrap();
        if i % 50 == 0 {
            let len = (x >> 30) % (4 << 20);
            a.set_len(len).unwrap();
            b.set_len(len).unwrap();
        }
    }
    drop(b);
    assert_eq!(fs::read(&plain).unwrap(), fs::read(&kv).unwrap());
    m.remount();
    assert_eq!(fs::read(&plain).unwrap(), fs::read(&kv).unwrap());
}

#[test]
fn identical_files_are_stored_once() {
    let Some(mut m) = mount() else { return };
    const N: usize = 256 << 20;
    m.unmount();
    let before = m.store_bytes();
    m.start();
    let data = pattern(77, N);
    for name in ["one", "two", "three"] {
        let mut f = File::create(m.path(name)).unwrap();
        for chunk in data.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    m.unmount();
    let growth = m.store_bytes() - before;
    eprintln!("store grew by {growth} bytes for 3 x {N}");
    if (growth as f64) > N as f64 * 1.02 + 2.0 * 65536.0 {
        let status = std::process::Command::new(KVFS)
            .arg("status")
            .arg(&m.store)
            .output()
            .unwrap();
        let mut files = Vec::new();
        for e in fs::read_dir(m.store.join("db")).unwrap().flatten() {
            files.push(format!(
                "{:?} {}",
                e.file_name(),
                e.metadata().unwrap().len()
            ));
        }
        panic!(
            "store grew by {growth} for three copies of {N} bytes\n{}\n{}",
            String::from_utf8_lossy(&status.stdout),
            files.join("\n")
        );
    }
    m.start();
    let back = fs::read(m.path("three")).unwrap();
    assert!(back == data, "content differs after dedup");
}

#[test]
fn small_sequential_writes_are_buffered_into_whole_blocks() {
    let Some(mut m) = mount() else { return };
    let mut f = File::create(m.path("log")).unwrap();
    let line = b"0123456789abcdef";
    for _ in 0..(64 * 1024 * 4 / line.len()) {
        f.write_all(line).unwrap();
    }
    drop(f);
    m.unmount();
    // 256 KiB of 16-byte writes: 4 blocks (all identical content, so 1 stored block).
    assert_eq!(count(&m.store, Prefix::Fmap), 4);
    assert_eq!(count(&m.store, Prefix::Block), 1);
}

#[test]
fn fsynced_data_survives_a_crash() {
    let Some(mut m) = mount() else { return };
    let mut f = File::create(m.path("durable")).unwrap();
    f.write_all(&pattern(5, 500_000)).unwrap();
    f.sync_all().unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/x"), b"x").unwrap();
    File::open(m.path("dir")).unwrap().sync_all().unwrap();
    m.crash();
    m.start();
    assert_eq!(fs::read(m.path("durable")).unwrap(), pattern(5, 500_000));
    assert_eq!(fs::read(m.path("dir/x")).unwrap(), b"x");
}

#[test]
fn corrupt_block_gives_eio_and_the_rest_keeps_working() {
    let Some(mut m) = mount() else { return };
    fs::write(m.path("bad"), pattern(1, 200_000)).unwrap();
    fs::write(m.path("good"), pattern(2, 200_000)).unwrap();
    m.unmount();
    {
        let (kv, _) = kvfs::store::open(&m.store).unwrap();
        let bad_ino = {
            let v = kv
                .get(Cf::Meta, &ks::dirent_key(1, b"bad"))
                .unwrap()
                .unwrap();
            kvfs::keyspace::records::Dirent::decode(&v).unwrap().ino
        };
        let v = kv
            .get(Cf::Fmap, &ks::fmap_key(bad_ino, 1))
            .unwrap()
            .unwrap();
        let ent = kvfs::keyspace::records::FmapEntry::decode(&v).unwrap();
        let key = ks::block_key(&ent.hash);
        let mut blk = kv.get(Cf::Blocks, &key).unwrap().unwrap();
        blk[100] ^= 0x01;
        kv.transact(|t| t.put(Cf::Blocks, &key, &blk)).unwrap();
    }
    m.start();
    let mut f = File::open(m.path("bad")).unwrap();
    let mut buf = vec![0u8; 1000];
    f.read_exact(&mut buf).unwrap(); // block 0 is fine
    f.seek(SeekFrom::Start(70_000)).unwrap();
    assert_eq!(errno(f.read(&mut buf)), libc::EIO);
    assert_eq!(fs::read(m.path("good")).unwrap(), pattern(2, 200_000));
    fs::write(m.path("new"), b"still writable").unwrap();
    assert_eq!(fs::read(m.path("new")).unwrap(), b"still writable");
}

#[test]
fn concurrent_writers_in_one_directory() {
    let Some(m) = mount() else { return };
    let root = m.mnt.clone();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let p = root.join(format!("t{t}-{i}"));
                    fs::write(&p, pattern(t * 1000 + i, 5000)).unwrap();
                    if i % 3 == 0 {
                        fs::remove_file(&p).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n = fs::read_dir(&root).unwrap().count();
    assert_eq!(n, 4 * (200 - 67));
    for t in 0..4u64 {
        for i in (1..200u64).filter(|i| i % 3 != 0) {
            assert_eq!(
                fs::read(root.join(format!("t{t}-{i}"))).unwrap(),
                pattern(t * 1000 + i, 5000)
            );
        }
    }
}

/// Unmounts a filesystem when dropped (after the kvfs mount on top of it, declared later).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_gives_enospc_and_deleting_makes_room_again() {
    if !root_for("mount a small tmpfs under the store") {
        return;
    }
    let mut disk = None;
    let Some(mut m) = mount_prepared(&["--block-size", "64K"], "", |tmp| {
        let d = tmp.join("store");
        fs::create_dir(&d).unwrap();
        mount_tmpfs(&d, "256M");
        disk = Some(Unmount(d));
    }) else {
        return;
    };
    fs::write(m.path("small"), b"kept").unwrap();
    // 300 MiB of distinct data into a 256 MiB disk: ENOSPC at some write, or at fsync.
    let mut f = File::create(m.path("big")).unwrap();
    let mut failed = None;
    for i in 0..300u64 {
        if let Err(e) = f.write_all(&pattern(1000 + i, 1 << 20)) {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.or_else(|| f.sync_all().err());
    assert_eq!(
        failed.and_then(|e| e.raw_os_error()),
        Some(libc::ENOSPC),
        "filling the disk must end in ENOSPC"
    );
    drop(f);
    // The rest keeps working: reads, stat, and the delete that makes room.
    let small = fs::read(m.path("small"));
    assert!(
        small.as_deref().ok() == Some(&b"kept"[..]),
        "reading a small file on the full disk: {small:?}\n{}",
        m.log()
    );
    fs::remove_file(m.path("big")).unwrap();
    let t0 = std::time::Instant::now();
    while fs::write(m.path("after"), b"room again").is_err() {
        assert!(
            t0.elapsed().as_secs() < 30,
            "no room came back after the delete"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(fs::read(m.path("after")).unwrap(), b"room again");
    m.unmount();
    let out = std::process::Command::new(KVFS)
        .arg("audit")
        .arg(&m.store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The kvfs mount goes before the tmpfs under it (also on a panic: reverse order).
    drop(m);
    drop(disk);
}
