//! The fs layer without FUSE: buffering, dedup refcounts under concurrency, recovery.

use std::sync::Arc;

use kvfs::blocks;
use kvfs::fs::{Caller, Fs, FsOptions, NewNode};
use kvfs::keyspace::records::Kind;
use kvfs::keyspace::{Prefix, ROOT_INO};

use crate::common::pattern;

fn new_fs() -> (tempfile::TempDir, Fs) {
    let d = tempfile::tempdir().unwrap();
    kvfs::store::format(d.path(), 64 << 10).unwrap();
    let (kv, rec) = kvfs::store::open(d.path()).unwrap();
    (d, Fs::new(kv, rec, FsOptions::default()))
}

const ME: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
};

const FILE: NewNode = NewNode {
    kind: Kind::File,
    mode: 0o644,
    umask: 0,
    rdev: 0,
    target: &[],
};

fn file(fs: &Fs, name: &str) -> u64 {
    fs.create_node(ROOT_INO, name.as_bytes(), &FILE, ME)
        .unwrap()
        .ino
}

fn count(fs: &Fs, p: Prefix) -> usize {
    let (s, e) = p.range();
    let mut n = 0;
    fs.store()
        .for_each(p.cf(), &s, &e, |_, _| {
            n += 1;
            true
        })
        .unwrap();
    n
}

#[test]
fn flushes_that_make_room_keep_a_half_written_block_buffered() {
    // Appends of 48 KiB against 64 KiB blocks, with room for only four blocks in the buffer:
    // each flush to make room finds the tail block half written. Committing it would store a
    // version the next append replaces at once; kept, every block is stored once.
    let d = tempfile::tempdir().unwrap();
    kvfs::store::format(d.path(), 64 << 10).unwrap();
    let (kv, rec) = kvfs::store::open(d.path()).unwrap();
    let opts = FsOptions {
        file_buffer_limit: Some(4 << 16),
        ..Default::default()
    };
    let fs = Fs::new(kv, rec, opts);
    let ino = file(&fs, "f");
    let fh = fs.open(ino, true).unwrap();
    let data = pattern(5, 2 << 20);
    for (i, chunk) in data.chunks(48 << 10).enumerate() {
        fs.write(fh, (i * (48 << 10)) as u64, chunk).unwrap();
    }
    assert!(
        count(&fs, Prefix::Fmap) > 0,
        "no flush made room on the way"
    );
    fs.flush(fh).unwrap();
    assert_eq!(count(&fs, Prefix::Fmap), 32);
    assert_eq!(
        count(&fs, Prefix::Block),
        32,
        "a partly written block was stored and then replaced"
    );
    assert_eq!(fs.read(fh, 0, 2 << 20).unwrap(), data);
    fs.release(fh).unwrap();
}

#[test]
fn writes_landing_during_a_flush_outside_the_lock_are_kept() {
    // One thread writes 48 MiB in 1 MiB pieces; a second rewrites each MiB right after the
    // first wrote it, so rewrites land while the flush that took the first version is hashing
    // and writing ahead with the file's lock released. That flush must neither commit the old
    // version over the new one nor drop the new one from the buffer.
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MIB: usize = 1 << 20;
    const N: usize = 48;
    let (_d, fs) = new_fs();
    let fs = Arc::new(fs);
    let ino = file(&fs, "f");
    let fh = fs.open(ino, true).unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (fs, progress) = (fs.clone(), progress.clone());
        std::thread::spawn(move || {
            for i in 0..N {
                fs.write(fh, (i * MIB) as u64, &pattern(1 + i as u64, MIB))
                    .unwrap();
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let mut rewritten = 0;
    while rewritten < N {
        if progress.load(Ordering::SeqCst) > rewritten {
            let data = pattern(1000 + rewritten as u64, MIB);
            fs.write(fh, (rewritten * MIB) as u64, &data).unwrap();
            rewritten += 1;
        } else {
            std::thread::yield_now();
        }
    }
    writer.join().unwrap();
    fs.flush(fh).unwrap();
    for i in 0..N {
        let got = fs.read(fh, (i * MIB) as u64, MIB as u32).unwrap();
        assert!(
            got == pattern(1000 + i as u64, MIB),
            "MiB {i} lost its rewrite"
        );
    }
    assert_eq!(
        count(&fs, Prefix::WrittenAhead),
        0,
        "written-ahead markers left after the commits"
    );
    fs.release(fh).unwrap();
}

#[test]
fn one_byte_writes_commit_nothing_until_flush_then_one_block() {
    let (_d, fs) = new_fs();
    let ino = file(&fs, "f");
    let fh = fs.open(ino, true).unwrap();
    for i in 0..20_000u64 {
        fs.write(fh, i, &[b'a' + (i % 26) as u8]).unwrap();
    }
    assert_eq!(
        count(&fs, Prefix::Fmap),
        0,
        "writes were committed before any flush"
    );
    assert_eq!(
        fs.getattr(ino).unwrap().size,
        20_000,
        "buffered size must show in getattr"
    );
    assert_eq!(fs.read(fh, 19_990, 100).unwrap().len(), 10);
    fs.flush(fh).unwrap();
    assert_eq!(count(&fs, Prefix::Fmap), 1);
    assert_eq!(count(&fs, Prefix::Block), 1);
    fs.release(fh).unwrap();
}

#[test]
fn parallel_writers_of_the_same_block_keep_exact_refcounts() {
    let (_d, fs) = new_fs();
    let fs = Arc::new(fs);
    let data = pattern(42, 64 << 10);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let fs = fs.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let ino = file(&fs, &format!("t{t}-{i}"));
                    let fh = fs.open(ino, true).unwrap();
                    fs.write(fh, 0, &data).unwrap();
                    fs.release(fh).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let h = blocks::hash(&data);
    let refs = fs.store().transact(|t| blocks::refcount(t, &h)).unwrap();
    assert_eq!(refs, 100);
    assert_eq!(count(&fs, Prefix::Block), 1);
    for t in 0..4 {
        for i in 0..25 {
            fs.unlink(ROOT_INO, format!("t{t}-{i}").as_bytes()).unwrap();
        }
    }
    fs.collect_garbage().unwrap();
    assert_eq!(count(&fs, Prefix::Block), 0);
    assert_eq!(count(&fs, Prefix::Refcount), 0);
    assert_eq!(count(&fs, Prefix::BlockGarbage), 0);
}

#[test]
fn unlinked_open_inode_left_by_a_dead_mount_is_freed_at_next_mount() {
    let d = tempfile::tempdir().unwrap();
    kvfs::store::format(d.path(), 64 << 10).unwrap();
    {
        let (kv, rec) = kvfs::store::open(d.path()).unwrap();
        let fs = Fs::new(kv, rec, FsOptions::default());
        let ino = file(&fs, "f");
        let fh = fs.open(ino, true).unwrap();
        fs.write(fh, 0, &pattern(1, 100_000)).unwrap();
        fs.flush(fh).unwrap();
        fs.unlink(ROOT_INO, b"f").unwrap();
        assert_eq!(count(&fs, Prefix::Garbage), 1);
        // no release: the mount "dies" with the file open
    }
    let (kv, rec) = kvfs::store::open(d.path()).unwrap();
    let fs = Fs::new(kv, rec, FsOptions::default());
    kvfs::gc::register(fs.store(), fs.mount_id()).unwrap();
    let o = kvfs::gc::SweepOptions {
        own: Some(fs.mount_id()),
        ..Default::default()
    };
    let r = kvfs::gc::sweep(fs.store(), &o).unwrap();
    // The dead mount never registered: its open count belongs to no live mount, so the
    // sweep drops it and frees the inode and its two blocks.
    assert_eq!(
        (r.open_counts, r.inodes_freed, r.blocks_freed),
        (1, 1, 2),
        "{r:?}"
    );
    assert_eq!(count(&fs, Prefix::Garbage), 0);
    assert_eq!(count(&fs, Prefix::Fmap), 0);
    assert_eq!(count(&fs, Prefix::Block), 0);
    assert_eq!(count(&fs, Prefix::Inode), 1, "only the root remains");
}

#[test]
fn collapse_and_insert_range_move_block_map_entries() {
    let (_d, fs) = new_fs();
    let bs = fs.block_size();
    let ino = file(&fs, "f");
    let fh = fs.open(ino, true).unwrap();
    let data = pattern(3, (8 * bs) as usize);
    fs.write(fh, 0, &data).unwrap();
    let read_all = |fs: &Fs| {
        let size = fs.getattr(ino).unwrap().size;
        fs.read(fh, 0, size as u32).unwrap()
    };
    // Collapse blocks 2 and 3: what followed moves down.
    fs.fallocate(fh, 2 * bs, 2 * bs, libc::FALLOC_FL_COLLAPSE_RANGE)
        .unwrap();
    let mut want = data.clone();
    want.drain((2 * bs) as usize..(4 * bs) as usize);
    assert!(read_all(&fs) == want, "after collapse");
    // Insert a hole of one block at block 1.
    fs.fallocate(fh, bs, bs, libc::FALLOC_FL_INSERT_RANGE)
        .unwrap();
    want.splice(bs as usize..bs as usize, vec![0u8; bs as usize]);
    assert!(read_all(&fs) == want, "after insert");
    assert_eq!(fs.getattr(ino).unwrap().size, 7 * bs);
    // Unaligned, or reaching the end: EINVAL, as ext4.
    for (off, len, mode) in [
        (100, bs, libc::FALLOC_FL_COLLAPSE_RANGE),
        (6 * bs, bs, libc::FALLOC_FL_COLLAPSE_RANGE),
        (7 * bs, bs, libc::FALLOC_FL_INSERT_RANGE),
    ] {
        assert!(matches!(
            fs.fallocate(fh, off, len, mode),
            Err(kvfs::fs::FsError::Errno(libc::EINVAL))
        ));
    }
    fs.release(fh).unwrap();
    let report = kvfs::audit::audit(fs.store(), &Default::default()).unwrap();
    assert!(report.problems.is_empty(), "{report}");
}

#[test]
fn a_close_leaves_a_small_file_to_its_release_but_a_rename_commits_it_first() {
    let (_d, fs) = new_fs();
    // Small: the close commits nothing, the release does.
    let a = file(&fs, "a");
    let fh = fs.open(a, true).unwrap();
    fs.write(fh, 0, &pattern(1, 5000)).unwrap();
    fs.flush_on_close(fh).unwrap();
    assert_eq!(count(&fs, Prefix::Fmap), 0, "committed at close");
    assert_eq!(fs.getattr(a).unwrap().size, 5000, "buffered, and seen");
    fs.release(fh).unwrap();
    assert_eq!(count(&fs, Prefix::Fmap), 1, "committed at release");
    // 1 MiB or more: the close commits it.
    let b = file(&fs, "b");
    let fh = fs.open(b, true).unwrap();
    fs.write(fh, 0, &pattern(2, 1 << 20)).unwrap();
    fs.flush_on_close(fh).unwrap();
    assert_eq!(
        count(&fs, Prefix::Fmap),
        1 + 16,
        "a large file is committed at close"
    );
    fs.release(fh).unwrap();
    // Written, closed, renamed over another name before its release: the rename commits
    // the data first, so no crash can leave the new name without it.
    let t = file(&fs, "t");
    let fh = fs.open(t, true).unwrap();
    fs.write(fh, 0, &pattern(3, 3000)).unwrap();
    fs.flush_on_close(fh).unwrap();
    assert_eq!(count(&fs, Prefix::Fmap), 17);
    fs.rename(ROOT_INO, b"t", ROOT_INO, b"a", 0).unwrap();
    assert_eq!(
        count(&fs, Prefix::Fmap),
        17,
        "t's block committed, a's block dropped with a"
    );
    fs.release(fh).unwrap();
    let fh = fs.open(t, false).unwrap();
    assert!(fs.read(fh, 0, 4000).unwrap() == pattern(3, 3000));
    fs.release(fh).unwrap();
}

#[test]
fn security_capability_set_after_a_none_was_remembered_is_seen() {
    use kvfs::fs::XattrReply;
    let (_d, fs) = new_fs();
    let ino = file(&fs, "bin");
    let caps = b"security.capability";
    let none = |fs: &Fs| {
        matches!(
            fs.getxattr(ino, caps, 64),
            Err(kvfs::fs::FsError::Errno(libc::ENODATA))
        )
    };
    // Twice: the second answer comes from what the first remembered.
    assert!(none(&fs) && none(&fs));
    let v = [
        1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    fs.setxattr(ino, caps, &v, 0, ME).unwrap();
    match fs.getxattr(ino, caps, 64).unwrap() {
        XattrReply::Data(d) => assert_eq!(d, v),
        XattrReply::Size(n) => panic!("a size ({n}) where the value was asked for"),
    }
    fs.removexattr(ino, caps).unwrap();
    assert!(none(&fs));
}

/// This mount's open count of `ino` in the keyspace (0: no key).
fn open_count(fs: &Fs, ino: u64) -> u64 {
    let (s, e) = kvfs::keyspace::open_range(ino);
    let mut n = 0;
    fs.store()
        .for_each(kvfs::kv::Cf::Meta, &s, &e, |_, v| {
            n += kvfs::keyspace::records::decode_counter(v).unwrap();
            true
        })
        .unwrap();
    n
}

#[test]
fn handles_kept_in_memory_reach_the_keyspace_when_their_file_loses_its_last_name() {
    let (_d, fs) = new_fs();
    let data = pattern(3, 100_000);
    let ino = file(&fs, "f");
    let w = fs.open(ino, true).unwrap();
    fs.write(w, 0, &data).unwrap();
    fs.release(w).unwrap();
    // Opens of a mount that alone holds its store are counted in memory only.
    let a = fs.open(ino, false).unwrap();
    let b = fs.open(ino, false).unwrap();
    assert_eq!(open_count(&fs, ino), 0);
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(open_count(&fs, ino), 2, "the unlink wrote both handles");
    assert_eq!(count(&fs, Prefix::Garbage), 1);
    // A handle opened after the unlink (as through /proc/PID/fd) keeps it alive too.
    let c = fs.open(ino, false).unwrap();
    fs.release(a).unwrap();
    fs.release(b).unwrap();
    assert_eq!(open_count(&fs, ino), 1);
    assert_eq!(fs.read(c, 0, 200_000).unwrap(), data);
    fs.release(c).unwrap();
    assert_eq!(open_count(&fs, ino), 0);
    assert_eq!(count(&fs, Prefix::Garbage), 0);
    assert_eq!(count(&fs, Prefix::Fmap), 0, "freed at the last close");

    // create(2)'s handle, and a rename over its name.
    let (attr, g) = fs.create_open(ROOT_INO, b"g", &FILE, ME).unwrap();
    fs.write(g, 0, &data).unwrap();
    fs.flush(g).unwrap();
    assert_eq!(open_count(&fs, attr.ino), 0);
    file(&fs, "h");
    fs.rename(ROOT_INO, b"h", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(open_count(&fs, attr.ino), 1);
    assert_eq!(fs.read(g, 0, 200_000).unwrap(), data);
    fs.release(g).unwrap();
    assert_eq!(open_count(&fs, attr.ino), 0);
    assert_eq!(count(&fs, Prefix::Fmap), 0);
    assert_eq!(count(&fs, Prefix::Garbage), 0);
}

#[test]
fn opens_racing_the_unlink_of_the_last_name_read_their_file_or_find_it_gone() {
    // Readers open, read and close a file in a loop while it loses its last name: an open
    // either finds the file gone (ENOENT) or gets a handle whose reads see all of it until its
    // close, and the last close frees it.
    for round in 0..20 {
        let (_d, fs) = new_fs();
        let data = pattern(round, 150_000);
        let ino = file(&fs, "f");
        let w = fs.open(ino, true).unwrap();
        fs.write(w, 0, &data).unwrap();
        fs.release(w).unwrap();
        let fs = Arc::new(fs);
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (fs, data) = (fs.clone(), data.clone());
                std::thread::spawn(move || {
                    let mut opened = 0;
                    loop {
                        // As the kernel does: the name to an inode number, then the open,
                        // which an unlink may come between.
                        match fs.lookup(ROOT_INO, b"f") {
                            Ok(a) => assert_eq!(a.ino, ino),
                            Err(kvfs::fs::FsError::Errno(libc::ENOENT)) => return opened,
                            Err(e) => panic!("lookup: {e}"),
                        }
                        let fh = match fs.open(ino, false) {
                            Ok(fh) => fh,
                            Err(kvfs::fs::FsError::Errno(libc::ENOENT)) => return opened,
                            Err(e) => panic!("open: {e}"),
                        };
                        opened += 1;
                        std::thread::yield_now();
                        assert_eq!(fs.read(fh, 0, 200_000).unwrap(), data, "round {round}");
                        fs.release(fh).unwrap();
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(2));
        fs.unlink(ROOT_INO, b"f").unwrap();
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(open_count(&fs, ino), 0, "round {round}");
        assert_eq!(count(&fs, Prefix::Garbage), 0, "round {round}");
        assert_eq!(count(&fs, Prefix::Fmap), 0, "round {round}: not freed");
    }
}
