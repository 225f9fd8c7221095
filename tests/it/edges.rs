//! POSIX edges a third-party suite found, each diffed against a plain directory: rewinddir
//! sees names added meanwhile; file handles (name_to_handle_at / open_by_handle_at) resolve
//! files and directories and go stale with them.

use std::ffi::CStr;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::common::*;

/// Names read from a directory stream until its end.
unsafe fn drain(d: *mut libc::DIR) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = libc::readdir(d);
        if e.is_null() {
            break;
        }
        out.push(
            CStr::from_ptr((*e).d_name.as_ptr())
                .to_string_lossy()
                .into_owned(),
        );
    }
    out.sort();
    out
}

/// Names before and after a rewinddir with a file created in between.
fn rewind_case(dir: &Path) -> (Vec<String>, Vec<String>) {
    fs::create_dir(dir.join("rd")).unwrap();
    fs::write(dir.join("rd/one"), b"1").unwrap();
    // SAFETY: a valid C path; the stream is closed below.
    unsafe {
        let d = libc::opendir(cstr(&dir.join("rd")).as_ptr());
        assert!(!d.is_null());
        let before = drain(d);
        fs::write(dir.join("rd/two"), b"2").unwrap();
        libc::rewinddir(d);
        let after = drain(d);
        libc::closedir(d);
        (before, after)
    }
}

#[test]
fn rewinddir_shows_names_added_meanwhile() {
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    let want = rewind_case(&plain);
    assert!(want.1.contains(&"two".to_string()), "ext4: {want:?}");
    assert_eq!(rewind_case(&m.mnt), want);
}

/// A handle for `p`, or the errno.
fn handle(p: &Path) -> Result<Vec<u8>, i32> {
    const MAX: usize = 128;
    let mut buf = vec![0u8; std::mem::size_of::<libc::file_handle>() + MAX];
    let mut mount_id = 0;
    // SAFETY: buf holds a file_handle header with MAX bytes of room after it.
    let r = unsafe {
        let fh = buf.as_mut_ptr() as *mut libc::file_handle;
        (*fh).handle_bytes = MAX as u32;
        libc::name_to_handle_at(libc::AT_FDCWD, cstr(p).as_ptr(), fh, &mut mount_id, 0)
    };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(buf)
    }
}

/// Open a handle on the filesystem of `mount_dir`: the fd, or the errno.
fn open_handle(mount_dir: &Path, mut h: Vec<u8>, flags: i32) -> Result<File, i32> {
    let m = File::open(mount_dir).unwrap();
    // SAFETY: h came from name_to_handle_at.
    let fd = unsafe {
        libc::open_by_handle_at(
            m.as_raw_fd(),
            h.as_mut_ptr() as *mut libc::file_handle,
            flags,
        )
    };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}

fn drop_caches() {
    // Dentries and inodes, so that a handle must be resolved by the filesystem.
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}

/// (read through a file's handle, a directory's handle opens, a deleted file's handle errno).
fn handle_case(dir: &Path) -> (Result<String, i32>, Result<bool, i32>, i32) {
    fs::create_dir_all(dir.join("hd/sub")).unwrap();
    fs::write(dir.join("hd/sub/f"), b"by handle").unwrap();
    fs::write(dir.join("hd/gone"), b"x").unwrap();
    let hf = handle(&dir.join("hd/sub/f"));
    let hd = handle(&dir.join("hd/sub"));
    let hg = handle(&dir.join("hd/gone")).unwrap();
    fs::remove_file(dir.join("hd/gone")).unwrap();
    drop_caches();
    let file = hf
        .and_then(|h| open_handle(dir, h, libc::O_RDONLY))
        .map(|f| std::io::read_to_string(f).unwrap());
    let d = hd
        .and_then(|h| open_handle(dir, h, libc::O_RDONLY | libc::O_DIRECTORY))
        .map(|f| f.metadata().unwrap().is_dir());
    let gone = open_handle(dir, hg, libc::O_RDONLY).err().unwrap_or(0);
    (file, d, gone)
}

#[test]
fn file_handles_resolve_files_and_directories_and_go_stale_with_them() {
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    let want = handle_case(&plain);
    assert_eq!(want.0, Ok("by handle".to_string()), "ext4");
    assert_eq!(handle_case(&m.mnt), want);
}

/// Whether a character device made with mknod (/dev/null's numbers) opens for writing.
fn device_opens(dir: &Path) -> i32 {
    let p = dir.join("null");
    // SAFETY: a valid C path.
    let r = unsafe {
        libc::mknod(
            cstr(&p).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(sys(r), 0, "mknod");
    errno(fs::OpenOptions::new().write(true).open(&p))
}

#[test]
fn device_nodes_open_with_dev_and_are_refused_without() {
    if !root_for("open device nodes") {
        return;
    }
    let Some(m) = mount_with("64K", "dev,suid") else {
        return;
    };
    assert_eq!(device_opens(&m.mnt), 0, "-o dev");
    let Some(m) = mount() else { return };
    assert_eq!(device_opens(&m.mnt), libc::EACCES, "default nodev");
}

fn atime(p: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).unwrap().atime()
}

/// Set `p`'s atime to `secs` (mtime untouched).
fn set_atime(p: &Path, secs: i64) {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: a valid C path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(p).as_ptr(), ts.as_ptr(), 0) };
    assert_eq!(sys(r), 0);
}

/// (a listed directory's atime moved, a read file's newer-than-mtime atime moved), the
/// caches dropped and the attribute cache expired before each look.
fn atime_case(dir: &Path) -> (bool, bool) {
    fs::create_dir(dir.join("ad")).unwrap();
    fs::write(dir.join("ad/f"), b"data").unwrap();
    set_atime(&dir.join("ad"), 1000);
    fs::read_dir(dir.join("ad")).unwrap().for_each(drop);
    // A file read again after its atime was set past its mtime (relatime: no update).
    let f = dir.join("ad/f");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    set_atime(&f, now + 5);
    let _ = fs::write("/proc/sys/vm/drop_caches", "1");
    fs::read(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    (atime(&dir.join("ad")) != 1000, atime(&f) != now + 5)
}

#[test]
fn access_times_follow_relatime_strictatime_and_nodiratime() {
    let Some(mut m) = mount() else { return };
    let plain = plain_dir(&m);
    // The plain directory's disk is mounted with relatime here, as kvfs is by default.
    let got = atime_case(&m.mnt);
    let plain_got = atime_case(&plain);
    if mount_options_of(&plain).is_some_and(|o| o.split(',').any(|x| x == "relatime")) {
        assert_eq!(got, plain_got, "relatime, against the plain directory");
    }
    assert_eq!(got, (true, false));
    // An access time a read set shows at once and is the store's by the unmount (kvfs
    // writes them in batches, within a second).
    let listed = m.mnt.join("ad");
    set_atime(&listed, 1000);
    fs::read_dir(&listed).unwrap().for_each(drop);
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
    let seen = atime(&listed);
    assert_ne!(seen, 1000, "a listing moves an old access time");
    m.unmount();
    m.start();
    assert_eq!(
        atime(&listed),
        seen,
        "the listing's access time after a remount"
    );
    let Some(m) = mount_with("64K", "strictatime") else {
        return;
    };
    assert_eq!(atime_case(&m.mnt), (true, true), "strictatime");
    let Some(m) = mount_with("64K", "nodiratime") else {
        return;
    };
    assert_eq!(atime_case(&m.mnt), (false, false), "nodiratime");
}

/// fstat through a descriptor of a directory removed while open, by rename over it and by
/// rmdir: (kind is a directory, nlink) or the errno.
fn removed_open_dir_case(dir: &Path) -> Vec<Result<(bool, u64), i32>> {
    use std::os::unix::fs::MetadataExt;
    fs::create_dir_all(dir.join("rod/victim")).unwrap();
    fs::create_dir_all(dir.join("rod/other")).unwrap();
    fs::create_dir_all(dir.join("rod/gone")).unwrap();
    let held = File::open(dir.join("rod/victim")).unwrap();
    let held2 = File::open(dir.join("rod/gone")).unwrap();
    fs::rename(dir.join("rod/other"), dir.join("rod/victim")).unwrap();
    fs::remove_dir(dir.join("rod/gone")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    [held, held2]
        .iter()
        .map(|f| {
            f.metadata()
                .map(|m| (m.is_dir(), m.nlink()))
                .map_err(|e| e.raw_os_error().unwrap_or(-1))
        })
        .collect()
}

#[test]
fn a_directory_removed_while_open_still_stats_with_no_links() {
    let Some(mut m) = mount() else { return };
    let plain = plain_dir(&m);
    let want = removed_open_dir_case(&plain);
    assert_eq!(want, vec![Ok((true, 0)), Ok((true, 0))], "ext4");
    assert_eq!(removed_open_dir_case(&m.mnt), want);
    // Closed, they are freed: nothing left for audit to find.
    m.unmount();
    let out = std::process::Command::new(KVFS)
        .arg("audit")
        .arg(&m.store)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("wait for"), "{text}");
}

/// The per-mount options (mountinfo's sixth field) of the mount holding `p`.
fn mount_options_of(p: &Path) -> Option<String> {
    let p = fs::canonicalize(p).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((*f.get(4)?, *f.get(5)?))
        })
        .filter(|(point, _)| p.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .map(|(_, opts)| opts.to_string())
}

/// `mount -o remount,OPTS dir`.
fn remount(dir: &Path, opts: &str) -> bool {
    let out = std::process::Command::new("mount")
        .args(["-o", &format!("remount,{opts}")])
        .arg(dir)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("remount,{opts}: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

/// Read-only and back: (remount ro with a file open for writing, remount ro, the errno of a
/// create, the content read, remount rw, a write after it).
fn remount_case(dir: &Path) -> (bool, bool, i32, Vec<u8>, bool, bool) {
    fs::write(dir.join("f"), b"kept").unwrap();
    let held = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("f"))
        .unwrap();
    let busy = remount(dir, "ro");
    drop(held);
    let ro = remount(dir, "ro");
    let create = errno(fs::write(dir.join("g"), b"x"));
    let read = fs::read(dir.join("f")).unwrap();
    let rw = remount(dir, "rw");
    let write = fs::write(dir.join("g"), b"x").is_ok();
    (busy, ro, create, read, rw, write)
}

#[test]
fn remount_switches_read_only_and_access_times_as_tmpfs_does() {
    if !root_for("remount") {
        return;
    }
    let Some(mut m) = mount() else { return };
    // mount(8) runs /sbin/mount.fuse.kvfs for a remount of type fuse.kvfs (tools/install
    // links it); installed for this test when it is not there.
    struct Helper(Option<&'static Path>);
    impl Drop for Helper {
        fn drop(&mut self) {
            if let Some(p) = self.0 {
                let _ = fs::remove_file(p);
            }
        }
    }
    let sbin = Path::new("/sbin/mount.fuse.kvfs");
    let _helper = Helper((!sbin.exists()).then(|| {
        std::os::unix::fs::symlink(KVFS, sbin).unwrap();
        sbin
    }));
    let info = fs::read_to_string("/proc/self/mounts").unwrap();
    let mnt = fs::canonicalize(&m.mnt).unwrap();
    assert!(
        info.lines().any(
            |l| l.split(' ').nth(1) == mnt.to_str() && l.split(' ').nth(2) == Some("fuse.kvfs")
        ),
        "the mount's type is fuse.kvfs:\n{info}"
    );
    let reference = m.tmp.path().join("tmpfs");
    fs::create_dir(&reference).unwrap();
    mount_tmpfs(&reference, "16m");
    let want = remount_case(&reference);
    let _ = std::process::Command::new("umount")
        .arg(&reference)
        .status();
    assert_eq!(
        want,
        (false, true, libc::EROFS, b"kept".to_vec(), true, true)
    );
    assert_eq!(remount_case(&m.mnt), want, "kvfs against tmpfs");
    // The access-time options change with a remount too (mount(8) keeps what a remount does
    // not name: `diratime` undoes the `nodiratime` before it).
    for (i, (opts, expect)) in [
        ("strictatime", (true, true)),
        ("noatime", (false, false)),
        ("relatime,nodiratime", (false, false)),
        ("relatime,diratime", (true, false)),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(remount(&m.mnt, opts), "remount,{opts}");
        let d = m.mnt.join(format!("at{i}"));
        fs::create_dir(&d).unwrap();
        assert_eq!(atime_case(&d), expect, "after remount,{opts}");
    }
    // A mount made read-only (its process opened the store read-only, without a control
    // socket) changes its flags but does not become writable.
    m.unmount();
    let st = std::process::Command::new(KVFS)
        .arg("mount")
        .arg(&m.store)
        .arg(&m.mnt)
        .args(["-o", "ro"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        remount(&m.mnt, "ro,noatime"),
        "remount of a read-only mount"
    );
    assert!(
        !remount(&m.mnt, "rw"),
        "a read-only mount does not become writable"
    );
    let opts = mount_options_of(&m.mnt).unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro") && opts.contains("noatime"),
        "{opts}"
    );
    let _ = std::process::Command::new("umount").arg(&m.mnt).status();
}

fn mtime_ns(p: &Path) -> i128 {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).unwrap();
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn ctime_ns(p: &Path) -> i128 {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p).unwrap();
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// Write `p` by `how` (write(2), O_DIRECT, a shared mapping), fsync, close.
fn write_by(p: &Path, how: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.read(true).write(true);
    if how == "direct" {
        o.custom_flags(libc::O_DIRECT);
    }
    let mut f = o.open(p).unwrap();
    match how {
        "bulk" => {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..96 {
                f.write_all(&chunk).unwrap();
            }
            return;
        }
        "mmap" => {
            // SAFETY: a shared mapping of the file's first 4 KiB, written and unmapped here.
            unsafe {
                let a = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                );
                assert_ne!(a, libc::MAP_FAILED);
                *(a as *mut u8).add(100) = b'm';
                assert_eq!(libc::msync(a, 4096, libc::MS_SYNC), 0);
                libc::munmap(a, 4096);
            }
        }
        _ => {
            // 4 KiB aligned, for O_DIRECT.
            let mut buf = vec![0u8; 8192];
            let off = buf.as_ptr().align_offset(4096);
            buf[off..off + 4096].fill(b'w');
            f.write_all(&buf[off..off + 4096]).unwrap();
        }
    }
    f.sync_all().unwrap();
}

#[test]
fn write_times_are_the_kernels_and_stay_after_a_remount() {
    let Some(mut m) = mount() else { return };
    let mut seen = Vec::new();
    for how in ["write", "direct", "mmap", "bulk"] {
        let p = m.path(how);
        fs::write(&p, vec![0u8; 8192]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let before = wall_ns();
        write_by(&p, how);
        let t = mtime_ns(&p);
        // The kernel's clock is coarse: a tick (at most 10 ms) behind the precise one.
        assert!(
            t >= before - 10_000_000,
            "{how}: mtime {t} before the write {before}"
        );
        assert!(t <= wall_ns(), "{how}");
        seen.push((how, t, ctime_ns(&p)));
    }
    // What the kernel wrote back on its own, and the timed flush, have landed.
    std::thread::sleep(std::time::Duration::from_secs(3));
    m.unmount();
    m.start();
    for (how, t, c) in seen {
        assert_eq!(mtime_ns(&m.path(how)), t, "{how}: mtime after remount");
        assert_eq!(ctime_ns(&m.path(how)), c, "{how}: ctime after remount");
    }
}

#[test]
fn times_never_go_backwards_between_kernel_and_daemon_stamps() {
    let Some(m) = mount() else { return };
    for i in 0..40 {
        let f = m.path(&format!("f{i}"));
        fs::write(&f, b"x").unwrap();
        let sock = m.path(&format!("s{i}"));
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        fs::hard_link(&f, m.path(&format!("l{i}"))).unwrap();
        let d = m.path(&format!("d{i}"));
        fs::create_dir(&d).unwrap();
        let (cs, cf, cd) = (ctime_ns(&sock), ctime_ns(&f), ctime_ns(&d));
        assert!(
            cs <= cf,
            "round {i}: the socket's ctime {cs} after the later link's {cf}"
        );
        assert!(
            cf <= cd,
            "round {i}: the link's ctime {cf} after the later mkdir's {cd}"
        );
    }
}
