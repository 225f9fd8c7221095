//! copy_file_range that shares blocks, and lseek SEEK_DATA/SEEK_HOLE, through a real mount and
//! diffed against a plain directory on the same disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::common::*;

const BS: u64 = 64 << 10;

/// copy_file_range(2) until `len` bytes are copied or it copies nothing; (bytes, errno).
pub(crate) fn copy_range(
    src: &File,
    off_in: u64,
    dst: &File,
    off_out: u64,
    len: u64,
) -> (u64, i32) {
    let (mut i, mut o) = (off_in as i64, off_out as i64);
    let mut done = 0;
    while done < len {
        // SAFETY: valid descriptors and offsets owned by this frame.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                (len - done) as usize,
                0,
            )
        };
        if n < 0 {
            return (
                done,
                std::io::Error::last_os_error().raw_os_error().unwrap(),
            );
        }
        if n == 0 {
            break;
        }
        done += n as u64;
    }
    (done, 0)
}

fn audit_clean(store: &Path) {
    let out = Command::new(KVFS).arg("audit").arg(store).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_copy_of_a_large_file_shares_its_blocks_and_stays_independent() {
    let Some(mut m) = mount() else { return };
    const N: usize = 64 << 20;
    let data = pattern(5, N);
    {
        let mut f = File::create(m.path("orig")).unwrap();
        for c in data.chunks(1 << 20) {
            f.write_all(c).unwrap();
        }
        f.sync_all().unwrap();
    }
    m.unmount();
    let before = m.store_bytes();
    m.start();
    {
        let src = File::open(m.path("orig")).unwrap();
        let dst = File::create(m.path("copy")).unwrap();
        assert_eq!(copy_range(&src, 0, &dst, 0, N as u64), (N as u64, 0));
        dst.sync_all().unwrap();
    }
    // `cp` (coreutils) takes the same path.
    let st = Command::new("cp")
        .arg(m.path("orig"))
        .arg(m.path("cp-copy"))
        .status()
        .unwrap();
    assert!(st.success());
    m.unmount();
    let growth = m.store_bytes().saturating_sub(before);
    assert!(
        growth < (N as u64) / 20,
        "two copies of {N} bytes grew the store by {growth}"
    );
    m.start();
    for name in ["orig", "copy", "cp-copy"] {
        assert!(fs::read(m.path(name)).unwrap() == data, "{name} differs");
    }
    // Independent files: a byte changed in one is in that one only.
    for (name, byte, at) in [("copy", b"X", 12345), ("orig", b"Y", 777)] {
        let f = OpenOptions::new().write(true).open(m.path(name)).unwrap();
        f.write_all_at(byte, at).unwrap();
        f.sync_all().unwrap();
    }
    let (o, c) = (
        fs::read(m.path("orig")).unwrap(),
        fs::read(m.path("copy")).unwrap(),
    );
    assert_eq!((o[777], o[12345]), (b'Y', data[12345]));
    assert_eq!((c[777], c[12345]), (data[777], b'X'));
    assert!(fs::read(m.path("cp-copy")).unwrap() == data);
    m.unmount();
    audit_clean(&m.store);
}

/// Each case: source size, (offset in, offset out, length), same file?, destination size.
const CASES: &[(u64, u64, u64, u64, bool, u64)] = &[
    (10 * BS, 0, 0, 10 * BS, false, 0),                 // whole blocks
    (10 * BS + 100, BS, 3 * BS, 5 * BS + 77, false, 0), // aligned start, unaligned end
    (9 * BS, 100, 100, 6 * BS, false, 2 * BS),          // both unaligned, equally
    (9 * BS, 100, 5000, 6 * BS, false, 20 * BS),        // unequally aligned: bytes
    (4 * BS, 3 * BS, 0, 5 * BS, false, 0),              // past the source's end: short
    (4 * BS, 5 * BS, 0, BS, false, 0),                  // starting past the end: nothing
    (12 * BS, 0, 6 * BS, 6 * BS, true, 0),              // within one file, apart
    (12 * BS, 0, 3 * BS, 6 * BS, true, 0),              // within one file, overlapping
    (12 * BS + 5, 2 * BS + 5, 8 * BS + 5, 3 * BS, true, 0), // within one file, unaligned
    (3 * BS, 0, 40 * BS, 3 * BS, false, BS),            // far past the destination's end
];

/// Run every case in `dir`; per case the bytes copied, errno, and both files' contents.
fn run_cases(dir: &Path) -> Vec<(u64, i32, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, &(size, off_in, off_out, len, same, dst_size)) in CASES.iter().enumerate() {
        let (sp, dp) = (dir.join(format!("s{i}")), dir.join(format!("d{i}")));
        let mut src_data = pattern(i as u64 + 100, size as usize);
        // A hole in the source too.
        if size > 2 * BS {
            src_data[BS as usize..2 * BS as usize].fill(0);
        }
        fs::write(&sp, &src_data).unwrap();
        fs::write(&dp, pattern(i as u64 + 200, dst_size as usize)).unwrap();
        let src = OpenOptions::new().read(true).write(true).open(&sp).unwrap();
        let (copied, err) = if same {
            copy_range(&src, off_in, &src, off_out, len)
        } else {
            let dst = OpenOptions::new().write(true).open(&dp).unwrap();
            copy_range(&src, off_in, &dst, off_out, len)
        };
        out.push((copied, err, fs::read(&sp).unwrap(), fs::read(&dp).unwrap()));
    }
    out
}

#[test]
fn copy_file_range_matches_a_plain_directory() {
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    let want = run_cases(&plain);
    let got = run_cases(&m.mnt);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!((g.0, g.1), (w.0, w.1), "case {i}: bytes copied, errno");
        assert!(g.2 == w.2, "case {i}: source differs");
        assert!(g.3 == w.3, "case {i}: destination differs");
    }
}

/// lseek SEEK_DATA and SEEK_HOLE at every 16 KiB of a file (and past its end).
fn seeks(path: &Path, size: u64) -> Vec<(i64, i64)> {
    let f = File::open(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at <= size + BS {
        for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
            // SAFETY: a valid descriptor.
            let r = unsafe { libc::lseek(f.as_raw_fd(), at as i64, whence) };
            let e = if r < 0 {
                -(std::io::Error::last_os_error().raw_os_error().unwrap() as i64)
            } else {
                r
            };
            out.push((at as i64, e));
        }
        at += 16 << 10;
    }
    out
}

#[test]
fn seek_data_and_hole_match_a_plain_directory() {
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    // (size, data regions in blocks): holes at the start, middle and end; all hole; no hole.
    let files: &[(u64, &[(u64, u64)])] = &[
        (8 * BS, &[(2, 4)]),
        (8 * BS, &[(0, 1), (5, 8)]),
        (6 * BS, &[]),
        (3 * BS + 100, &[(0, 3)]),
        (5 * BS, &[(0, 2), (3, 4)]),
    ];
    for dir in [&plain, &m.mnt] {
        for (i, (size, regions)) in files.iter().enumerate() {
            let f = File::create(dir.join(format!("sparse{i}"))).unwrap();
            f.set_len(*size).unwrap();
            for &(a, b) in *regions {
                let end = (b * BS).min(*size);
                f.write_all_at(&pattern(i as u64, (end - a * BS) as usize), a * BS)
                    .unwrap();
            }
            f.sync_all().unwrap();
        }
    }
    for (i, (size, _)) in files.iter().enumerate() {
        let name = format!("sparse{i}");
        assert_eq!(
            seeks(&m.mnt.join(&name), *size),
            seeks(&plain.join(&name), *size),
            "{name}: (offset, SEEK_DATA / SEEK_HOLE result or -errno)"
        );
    }
}

/// fallocate(2) cases: (mode, offset, length) on a file of 6 blocks + 100 bytes with a hole
/// in its second block.
const FALLOCATE: &[(i32, u64, u64)] = &[
    (0, 6 * BS + 100, 3 * BS),
    (libc::FALLOC_FL_KEEP_SIZE, 5 * BS, 4 * BS),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        BS + 100,
        3 * BS,
    ),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        2 * BS,
        2 * BS,
    ),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5 * BS + 7,
        3 * BS,
    ),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        300,
        500,
    ),
    (libc::FALLOC_FL_PUNCH_HOLE, BS, BS),
    (libc::FALLOC_FL_ZERO_RANGE, 4 * BS + 9, 4 * BS),
    (
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        5 * BS,
        4 * BS,
    ),
    (libc::FALLOC_FL_ZERO_RANGE, 100, 200),
    (libc::FALLOC_FL_COLLAPSE_RANGE, BS, 2 * BS),
    (libc::FALLOC_FL_COLLAPSE_RANGE, 0, BS),
    (libc::FALLOC_FL_COLLAPSE_RANGE, 100, BS),
    (libc::FALLOC_FL_COLLAPSE_RANGE, 4 * BS, 3 * BS),
    (libc::FALLOC_FL_INSERT_RANGE, 2 * BS, BS),
    (libc::FALLOC_FL_INSERT_RANGE, 0, 2 * BS),
    (libc::FALLOC_FL_INSERT_RANGE, 7 * BS, BS),
    (
        libc::FALLOC_FL_INSERT_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        BS,
        BS,
    ),
    (0, 0, 0),
];

fn run_fallocate(dir: &Path) -> Vec<(i32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, &(mode, off, len)) in FALLOCATE.iter().enumerate() {
        let p = dir.join(format!("fa{i}"));
        let mut data = pattern(i as u64 + 300, (6 * BS + 100) as usize);
        data[BS as usize..2 * BS as usize].fill(0);
        fs::write(&p, &data).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        // SAFETY: a valid descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        let err = if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap()
        } else {
            0
        };
        drop(f);
        let md = fs::metadata(&p).unwrap();
        out.push((err, md.len(), fs::read(&p).unwrap()));
    }
    out
}

#[test]
fn fallocate_matches_a_plain_directory_in_every_mode() {
    let Some(mut m) = mount() else { return };
    let plain = plain_dir(&m);
    let want = run_fallocate(&plain);
    let got = run_fallocate(&m.mnt);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let (mode, off, len) = FALLOCATE[i];
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            // The kernel's FUSE client refuses these modes itself (fs/fuse/file.c accepts only
            // KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE); kvfs implements them behind it (fsapi).
            assert_eq!(g.0, libc::EOPNOTSUPP, "case {i}");
            continue;
        }
        assert_eq!(
            (g.0, g.1),
            (w.0, w.1),
            "case {i} (mode {mode:#x} at {off} len {len}): errno, size"
        );
        assert!(
            g.2 == w.2,
            "case {i} (mode {mode:#x} at {off} len {len}): content differs"
        );
    }
    // A punched hole frees its blocks.
    let p = m.path("punch");
    fs::write(&p, pattern(9, (8 * BS) as usize)).unwrap();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.sync_all().unwrap();
    let before = fs::metadata(&p).unwrap().blocks();
    // SAFETY: a valid descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            (6 * BS) as i64,
        )
    };
    assert_eq!(r, 0);
    drop(f);
    let after = fs::metadata(&p).unwrap().blocks();
    assert_eq!(after * 4, before, "st_blocks {before} -> {after}");
    m.unmount();
    audit_clean(&m.store);
}
