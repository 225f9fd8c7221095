//! The space reserve: new data is refused with ENOSPC while the disk under the store has less
//! free than a reserve, so that what it takes to free space always fits. RocksDB cannot take
//! back a write it failed for lack of space: it stops writing until it can flush its memtables,
//! and with the disk full even an unlink (a small write) would fail, leaving no way out but a
//! remount. With the reserve, deletes, truncates and renames always go through, and the
//! memtables (at most a few tens of MiB) always have room to flush. As ext4 keeps 5% for root.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{errno, lock, Result};

/// Fixed part of the reserve: the largest memtables, WAL and a flush's blob file.
const RESERVE_FIXED: u64 = 96 << 20;
/// How long a free-space reading is trusted.
const RECHECK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub total: u64,
    pub avail: u64,
}

impl DiskSpace {
    /// The reserve for a disk of this size: 96 MiB plus 2%, at most half the disk.
    pub fn reserve(&self) -> u64 {
        (RESERVE_FIXED + self.total / 50).min(self.total / 2)
    }

    /// Bytes new data may still take.
    pub fn usable(&self) -> u64 {
        self.avail.saturating_sub(self.reserve())
    }
}

/// Free and total bytes of the disk at `path` (for unprivileged users).
pub fn disk_space(path: &Path) -> std::result::Result<DiskSpace, i32> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: c is a valid NUL-terminated path; st is written by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(DiskSpace {
        total: st.f_blocks * st.f_frsize,
        avail: st.f_bavail * st.f_frsize,
    })
}

pub struct SpaceGuard {
    path: Option<PathBuf>,
    last: Mutex<Option<Checked>>,
}

/// The last look at the disk.
struct Checked {
    at: Instant,
    /// Whether it was below the reserve.
    low: bool,
    /// What may still be accepted before looking again: the usable space then, less twice
    /// each write accepted since (its bytes reach the disk twice for a while, in the WAL and
    /// in a blob file, before the WAL goes). Writes can arrive faster than the recheck
    /// interval (400 MB/s is 40 MiB per 100 ms): the interval alone let a small disk fill up.
    budget: u64,
}

impl SpaceGuard {
    /// Watch the disk at `path` (`None`: never refuse, for stores in tests).
    pub fn new(path: Option<PathBuf>) -> SpaceGuard {
        SpaceGuard {
            path,
            last: Mutex::new(None),
        }
    }

    /// ENOSPC unless `bytes` more fit on the disk beside the reserve, without counting them as
    /// taken: what fallocate promises before any data comes.
    pub fn can_hold(&self, bytes: u64) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        match disk_space(path) {
            Ok(d) if d.usable() < bytes => Err(super::FsError::Errno(libc::ENOSPC)),
            _ => Ok(()),
        }
    }

    /// ENOSPC when the disk is below the reserve, or `bytes` of new data would take it
    /// there: call before taking new data (`bytes`) or names (0).
    pub fn check(&self, bytes: u64) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let cost = bytes.saturating_mul(2);
        let mut last = lock(&self.last);
        let low = match last.as_mut() {
            Some(c) if c.at.elapsed() < RECHECK && (c.low || c.budget >= cost) => {
                if !c.low {
                    c.budget -= cost;
                }
                c.low
            }
            prev => {
                let was_low = prev.as_ref().is_some_and(|c| c.low);
                let had_look = prev.is_some();
                let (low, usable) = match disk_space(path) {
                    Ok(d) => (d.usable() == 0 || d.usable() < cost, d.usable()),
                    Err(_) => (false, u64::MAX),
                };
                if low != was_low {
                    if low {
                        tracing::warn!(store = %path.display(), "the store's disk is down to its reserve; new data gets ENOSPC, deletes still work");
                    } else if had_look {
                        tracing::info!(store = %path.display(), "the store's disk has room again");
                    }
                }
                *last = Some(Checked {
                    at: Instant::now(),
                    low,
                    budget: if low { 0 } else { usable - cost },
                });
                low
            }
        };
        if low {
            errno(libc::ENOSPC)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_fixed_plus_two_percent_and_never_most_of_the_disk() {
        let big = DiskSpace {
            total: 1000 << 30,
            avail: 500 << 30,
        };
        assert_eq!(big.reserve(), (96 << 20) + (20 << 30));
        let tiny = DiskSpace {
            total: 100 << 20,
            avail: 60 << 20,
        };
        assert_eq!(tiny.reserve(), 50 << 20);
        assert_eq!(tiny.usable(), 10 << 20);
    }
}
