//! The kernel's mount table (/proc/self/mountinfo): finding a FUSE mount, and ending a kvfs
//! mount as `kvfs unmount` does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `MAJ:MIN` device of the newest mount on `mountpoint` (canonical: resolving it would
/// stat the mount, a request to this very process), from /proc/self/mountinfo.
pub(crate) fn mount_device(mountpoint: &Path) -> Option<String> {
    mount_entry(mountpoint).map(|(dev, _, _)| dev)
}

/// [`mountinfo_entry`] of this process's mount table.
fn mount_entry(mountpoint: &Path) -> Option<(String, String, Vec<u8>)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo_entry(&table, mountpoint)
}

/// The device, the type and the source (for kvfs: the store) of the newest FUSE mount on
/// `want`.
fn mountinfo_entry(table: &str, want: &Path) -> Option<(String, String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (dev, point, dash) = (f.get(2)?, f.get(4)?, f.iter().position(|x| *x == "-")?);
            let (fstype, source) = (f.get(dash + 1)?, f.get(dash + 2)?);
            (fstype.starts_with("fuse") && unescape_mountinfo(point) == want.as_os_str().as_bytes())
                .then(|| {
                    (
                        dev.to_string(),
                        fstype.to_string(),
                        unescape_mountinfo(source),
                    )
                })
        })
        .next_back()
}

/// How long [`unmount_and_wait`] waits for a mount's process to let go of its store.
const RELEASE_WAIT: Duration = Duration::from_secs(120);

/// Unmount `mountpoint` (`lazy`: detach now, as `umount -l`), then, unless lazy, wait until
/// the mount's process has let go of its store. The kernel does not wait for a FUSE mount's
/// process: umount returned while it was still syncing the store (0.3 s after a 50 MB
/// write), so a power cut, a copy or a new `kvfs format` of the store right after umount
/// could find it unsynced or still being written. `kvfs unmount`.
pub fn unmount_and_wait(mountpoint: &Path, lazy: bool) -> Result<(), String> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    // Canonical as the mount table has it; a dead mount (its process gone) cannot be
    // resolved, and is named as given.
    let mnt = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let store = match mount_entry(&mnt) {
        Some((_, fstype, src)) if fstype == "fuse.kvfs" => {
            PathBuf::from(std::ffi::OsString::from_vec(src))
        }
        _ => return Err(format!("{}: not a kvfs mount", mnt.display())),
    };
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", mnt.display()))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(format!("{}: {e}", mnt.display()));
        }
        // Not root: a user's FUSE mount is ended by the setuid fusermount3.
        let out = std::process::Command::new("fusermount3")
            .arg(if lazy { "-uz" } else { "-u" })
            .arg(&mnt)
            .output()
            .map_err(|e| format!("{}: not root, and fusermount3: {e}", mnt.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
    }
    if lazy {
        return Ok(());
    }
    let t0 = Instant::now();
    while crate::store::in_use(&store) {
        if t0.elapsed() > RELEASE_WAIT {
            return Err(format!(
                "{}: unmounted, but the mount's process still holds {} after {} s",
                mnt.display(),
                store.display(),
                RELEASE_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        if let Some(c) = octal {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_the_newest_fuse_mount_on_a_path() {
        let table = "\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 22 0:39 / /mnt/my\\040files rw,nosuid - fuse /s rw,user_id=0
41 22 0:40 / /mnt/other rw - fuse.kvfs /t rw
42 40 0:41 / /mnt/my\\040files rw - fuse /u rw
43 22 0:42 / /mnt/tmp rw - tmpfs tmpfs rw
";
        let d = |p: &str| mountinfo_entry(table, Path::new(p)).map(|(dev, _, _)| dev);
        assert_eq!(
            mountinfo_entry(table, Path::new("/mnt/other")),
            Some(("0:40".into(), "fuse.kvfs".into(), b"/t".to_vec()))
        );
        assert_eq!(d("/mnt/my files").as_deref(), Some("0:41"));
        assert_eq!(d("/mnt/other").as_deref(), Some("0:40"));
        assert_eq!(d("/mnt/tmp"), None);
        assert_eq!(d("/mnt/none"), None);
        assert_eq!(unescape_mountinfo("a\\134b\\0"), b"a\\b\\0");
    }
}
