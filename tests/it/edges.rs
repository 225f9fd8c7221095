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
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
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
    let Some(m) = mount() else { return };
    let plain = plain_dir(&m);
    // The plain directory's disk is mounted with relatime here, as kvfs is by default.
    let got = atime_case(&m.mnt);
    let plain_got = atime_case(&plain);
    if mount_options_of(&plain).is_some_and(|o| o.split(',').any(|x| x == "relatime")) {
        assert_eq!(got, plain_got, "relatime, against the plain directory");
    }
    assert_eq!(got, (true, false));
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
