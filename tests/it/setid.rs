//! Set-user-ID and set-group-ID bits: which writes, truncates and chowns clear them, by
//! whom, on a plain directory (ext4 here) and on kvfs. The kernel leaves the clearing to kvfs
//! (FUSE_HANDLE_KILLPRIV_V2), so every rule is kvfs's own and compared here.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

/// What a case does to the file.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write,
    Truncate,
    OpenTrunc,
    ChownNone,
    ChownGroup,
    TimesOmitted,
    TimesNow,
    Chmod,
    Fallocate,
    LinkUnlink,
    RenameBack,
}

const OPS: [Op; 11] = [
    Op::Write,
    Op::Truncate,
    Op::OpenTrunc,
    Op::ChownNone,
    Op::ChownGroup,
    Op::TimesOmitted,
    Op::TimesNow,
    Op::Chmod,
    Op::Fallocate,
    Op::LinkUnlink,
    Op::RenameBack,
];

/// Run `op` on `p` (0 or the errno); as uid 1000 / gid 1001 in no other group when `user`.
fn run(p: &Path, op: Op, user: bool) -> i32 {
    let c = cstr(p);
    let other = cstr(&p.with_extension("other"));
    // SAFETY: the child makes only raw system calls and leaves with _exit; the parent waits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            if user
                && !(libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(1001) == 0
                    && libc::setuid(1000) == 0)
            {
                libc::_exit(100);
            }
            let r = match op {
                Op::Write | Op::OpenTrunc => {
                    let flags = match op {
                        Op::Write => libc::O_WRONLY,
                        _ => libc::O_WRONLY | libc::O_TRUNC,
                    };
                    let fd = libc::open(c.as_ptr(), flags);
                    if fd < 0 {
                        -1
                    } else {
                        let n = libc::pwrite(fd, b"y".as_ptr().cast(), 1, 0);
                        let f = libc::fsync(fd);
                        libc::close(fd);
                        if n == 1 && f == 0 {
                            0
                        } else {
                            -1
                        }
                    }
                }
                Op::Truncate => libc::truncate(c.as_ptr(), 3),
                Op::ChownNone => libc::chown(c.as_ptr(), u32::MAX, u32::MAX),
                Op::ChownGroup => libc::chown(c.as_ptr(), u32::MAX, 1001),
                Op::TimesOmitted | Op::TimesNow => {
                    let t = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: match op {
                            Op::TimesOmitted => libc::UTIME_OMIT,
                            _ => libc::UTIME_NOW,
                        },
                    };
                    libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0)
                }
                Op::Chmod => libc::chmod(c.as_ptr(), 0o6775),
                Op::LinkUnlink => {
                    let r = libc::link(c.as_ptr(), other.as_ptr());
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    r | libc::unlink(other.as_ptr())
                }
                Op::RenameBack => {
                    libc::rename(c.as_ptr(), other.as_ptr())
                        | libc::rename(other.as_ptr(), c.as_ptr())
                }
                Op::Fallocate => {
                    let fd = libc::open(c.as_ptr(), libc::O_WRONLY);
                    let r = libc::fallocate(fd, 0, 0, 8192);
                    libc::close(fd);
                    r
                }
            };
            let e = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(e.min(99));
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        let code = libc::WEXITSTATUS(st);
        assert_ne!(code, 100, "the child could not become uid 1000");
        code
    }
}

#[test]
fn set_id_bits_are_cleared_as_ext4_clears_them() {
    if !root_for("switch users") {
        return;
    }
    differential("setid", |d, log| {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut n = 0;
        for op in OPS {
            for user in [true, false] {
                // Group-executable or not; the caller's group or one it is not in.
                for (mode, gid) in [
                    (0o6777, 1001),
                    (0o6767, 1001),
                    (0o6767, 2000),
                    (0o2757, 2000),
                ] {
                    n += 1;
                    let f = d.join(format!("f{n}"));
                    std::fs::write(&f, b"data").unwrap();
                    std::os::unix::fs::chown(&f, Some(1000), Some(gid)).unwrap();
                    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
                    let r = run(&f, op, user);
                    let m = std::fs::metadata(&f).unwrap();
                    log.push(format!(
                        "{op:?} user={user} {mode:o} gid={gid}: {r} -> {:o} gid={} size={}",
                        m.mode() & 0o7777,
                        m.gid(),
                        m.size()
                    ));
                }
            }
        }
        // Times the kernel pushes later (its writeback of the inodes) clear nothing.
        // SAFETY: no arguments.
        unsafe { libc::sync() };
        let mut modes: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                format!("{:?} {:o}", e.file_name(), m.mode() & 0o7777)
            })
            .collect();
        modes.sort();
        log.push(modes.join(" "));
        // File capabilities go on a write by anyone (the kernel removes the attribute; it
        // asks us whether there is one after the inode's attributes changed).
        let caps = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for user in [true, false] {
            n += 1;
            let f = d.join(format!("f{n}"));
            std::fs::write(&f, b"data").unwrap();
            std::os::unix::fs::chown(&f, Some(1000), Some(1001)).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
            let set = setxattr(&f, "security.capability", &caps);
            let before = getxattr(&f, "security.capability").map(|v| v.len());
            let r = run(&f, Op::Write, user);
            let after = getxattr(&f, "security.capability").map(|v| v.len());
            log.push(format!(
                "caps user={user}: set {set} {before:?} write {r} -> {after:?}"
            ));
        }
    });
}

fn setxattr(p: &Path, name: &str, v: &[u8]) -> i32 {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and buffer.
    sys(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
}

/// The attribute's value, or the errno.
fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings; the buffer holds its length.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    buf.truncate(r as usize);
    Ok(buf)
}
