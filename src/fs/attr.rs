//! Attributes: getattr/setattr, extended attributes, statfs and access.

use super::acl;
use super::{check_xattr_name, errno, load_inode, lock, save_inode, Caller, Fs, FsError, Result};
use crate::keyspace::records::{decode_xattr, encode_xattr, Inode, Kind};
use crate::keyspace::{self as ks, Ino};
use crate::kv::Cf;
use crate::util::Timestamp;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// The attribute the kernel asks for before a write(2) to see whether it must go: before every
/// one where the kernel clears set-id bits itself, else (FUSE_HANDLE_KILLPRIV_V2) before the
/// first after each reply carrying the inode's attributes. The answer, almost always "none",
/// is remembered.
const CAPS: &[u8] = b"security.capability";

/// Files known to have no `security.capability`. A lookup remembers its "none" only if no
/// set or remove of that attribute finished since it began (the generation), so a change
/// committed during the lookup is never hidden. At most this many files; then it starts over.
#[derive(Default)]
pub(super) struct NoCaps(Mutex<(u64, HashSet<Ino>)>);

const NO_CAPS_MAX: usize = 1 << 16;

impl NoCaps {
    fn holds(&self, ino: Ino) -> bool {
        super::lock(&self.0).1.contains(&ino)
    }

    fn generation(&self) -> u64 {
        super::lock(&self.0).0
    }

    fn absent(&self, ino: Ino, since: u64) {
        let mut g = super::lock(&self.0);
        if g.0 == since {
            if g.1.len() >= NO_CAPS_MAX {
                g.1.clear();
            }
            g.1.insert(ino);
        }
    }

    /// After a set or remove of `security.capability` on `ino` (committed or not).
    fn changed(&self, ino: Ino) {
        let mut g = super::lock(&self.0);
        g.0 += 1;
        g.1.remove(&ino);
    }
}

/// What `stat` shows for one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte units.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub btime: Timestamp,
    pub blksize: u32,
}

impl Attr {
    pub(crate) fn new(ino: Ino, i: &Inode, blksize: u64) -> Attr {
        let (size, blocks) = match i.kind {
            Kind::Dir => (4096, 8),
            _ => (i.size, i.alloc / 512),
        };
        Attr {
            ino,
            kind: i.kind,
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            size,
            blocks,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            btime: i.btime,
            blksize: blksize as u32,
        }
    }
}

/// A time to set: a given moment or "now" (UTIME_NOW).
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    At(Timestamp),
    Now,
}

/// The fields of a setattr; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timestamp>,
    /// Which set-id bits the change clears (the caller is in [`KillSetid`]).
    pub kill_setid: KillSetid,
}

/// Clearing set-id bits where the kernel leaves it to the filesystem: the bits a change by
/// the caller clears on ext4 (`dropped_setid`).
#[derive(Clone, Copy, Debug, Default)]
pub enum KillSetid {
    #[default]
    No,
    /// A chown, or a change the kernel made for a write (it checked the caller's CAP_FSETID).
    Always(Caller),
    /// A truncate: not if the caller holds CAP_FSETID.
    UnlessCapable(Caller),
}

impl KillSetid {
    /// The bits to clear from inode `i`.
    fn bits(self, i: &Inode) -> u16 {
        let (who, always) = match self {
            KillSetid::No => return 0,
            KillSetid::Always(who) => (who, true),
            KillSetid::UnlessCapable(who) => (who, false),
        };
        let d = dropped_setid(i, who);
        if d == 0 || always || !acl::capable_fsetid(who.pid, who.uid) {
            d
        } else {
            0
        }
    }
}

/// The set-id bits a write, truncate or chown by `who` clears from a file (the kernel's
/// `should_remove_suid` and `setattr_should_drop_sgid`): set-user-ID; set-group-ID where the
/// group may execute, or where `who` is neither in the file's group nor holds CAP_FSETID
/// (without group execute the bit marks mandatory locking, not privilege). None on
/// directories.
fn dropped_setid(i: &Inode, who: Caller) -> u16 {
    const SUID: u16 = libc::S_ISUID as u16;
    const SGID: u16 = libc::S_ISGID as u16;
    if i.kind == Kind::Dir || i.perm & (SUID | SGID) == 0 {
        return 0;
    }
    let mut d = i.perm & SUID;
    if i.perm & SGID != 0
        && (i.perm & 0o010 != 0 || !acl::in_group_or_capable(who.pid, who.uid, who.gid, i.gid))
    {
        d |= SGID;
    }
    d
}

pub enum XattrReply {
    /// The caller asked for the size only.
    Size(u32),
    Data(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

/// Largest xattr value, as on ext4 with large xattrs / the VFS limit.
const XATTR_SIZE_MAX: usize = 65536;

impl Fs {
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let inode = self.look(|t| load_inode(t, ino))?;
        Ok(self.overlay(ino, Attr::new(ino, &inode, self.bs)))
    }

    /// Attributes as the caller sees them: buffered writes not yet committed count, and so
    /// does an access time a read set that is not written yet.
    pub(crate) fn overlay(&self, ino: Ino, mut a: Attr) -> Attr {
        if a.kind == Kind::File {
            if let Some(s) = self.file_state(ino) {
                s.overlay(&mut a);
            }
        }
        if let Some(at) = lock(&self.atimes).get(&ino) {
            a.atime = *at;
        }
        a
    }

    pub fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        self.writable()?;
        if let Some(a) = self.buffer_times(ino, set)? {
            return Ok(a);
        }
        if let Some(size) = set.size {
            self.truncate(ino, size)?;
        } else if set.mtime.is_some() && !self.kernel_times.load(Ordering::Relaxed) {
            // Buffered writes carry their own mtime; commit them first so ours wins. (Not when
            // the kernel owns write times: then they carry none, and the kernel pushes a
            // file's times after every writeback, which would commit its buffer in pieces
            // too small to be written ahead, the block bytes going through the WAL.)
            self.flush_ino(ino)?;
        }
        if let Some(c) = set.ctime {
            // The kernel's own "now" (it owns a file's times under the writeback cache).
            Timestamp::observe(c);
        }
        if set.atime.is_some() {
            // Set now, it is not overwritten by an earlier read's.
            lock(&self.atimes).remove(&ino);
        }
        let now = Timestamp::now();
        let inode = self.txn(|t| {
            let mut i = load_inode(t, ino)?;
            // Before a chown: the kernel decides on the group the file had.
            i.perm &= !set.kill_setid.bits(&i);
            if let Some(m) = set.mode {
                i.perm = (m & 0o7777) as u16;
                // The access ACL follows the new bits (posix_acl_chmod).
                if let Some(v) = acl::get_xattr(t, ino, acl::ACCESS)? {
                    let mut a = acl::Acl::parse(&v)?;
                    a.chmod(i.perm);
                    let key = ks::xattr_key(ino, acl::ACCESS);
                    t.put(Cf::Meta, &key, &encode_xattr(&a.encode()))?;
                }
            }
            if let Some(u) = set.uid {
                i.uid = u;
            }
            if let Some(g) = set.gid {
                i.gid = g;
            }
            let resolve = |s: SetTime| match s {
                SetTime::At(t) => t,
                SetTime::Now => now,
            };
            if let Some(a) = set.atime {
                i.atime = resolve(a);
            }
            if let Some(m) = set.mtime {
                i.mtime = resolve(m);
            }
            i.ctime = set.ctime.unwrap_or(now);
            save_inode(t, ino, &i)?;
            Ok(i)
        })?;
        Ok(self.overlay(ino, Attr::new(ino, &inode, self.bs)))
    }

    /// The kernel pushing a file's write times (writeback cache: mtime and ctime, equal,
    /// nothing else) while the file has buffered writes: kept with the buffer, committed with
    /// it and carried by its pending records, as a write's own mtime is without the writeback
    /// cache. Its transaction made the fsync after it sync RocksDB's WAL, not the fsync log.
    /// None: not such a change.
    fn buffer_times(&self, ino: Ino, set: &SetAttr) -> Result<Option<Attr>> {
        let only_times = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && set.atime.is_none()
            && matches!(set.kill_setid, KillSetid::No);
        let (Some(SetTime::At(m)), Some(c)) = (set.mtime, set.ctime) else {
            return Ok(None);
        };
        if !only_times || m != c || !self.kernel_times.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(st) = self.file_state(ino) else {
            return Ok(None);
        };
        {
            let mut s = lock(&st.inner);
            if s.dirty_since.is_none() {
                return Ok(None);
            }
            Timestamp::observe(c);
            s.mtime = Some(m);
        }
        let inode = self.look(|t| load_inode(t, ino))?;
        Ok(Some(self.overlay(ino, Attr::new(ino, &inode, self.bs))))
    }

    /// A write by `who` that the kernel says clears set-id bits (it checked CAP_FSETID).
    pub fn kill_setid(&self, ino: Ino, who: Caller) -> Result<()> {
        let kill = KillSetid::Always(who);
        if kill.bits(&self.look(|t| load_inode(t, ino))?) == 0 {
            return Ok(());
        }
        self.txn(|t| {
            let mut i = load_inode(t, ino)?;
            i.perm &= !kill.bits(&i);
            i.ctime = Timestamp::now();
            save_inode(t, ino, &i)
        })
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let i = self.look(|t| load_inode(t, ino))?;
        if i.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(i.target)
    }

    /// The permission check of access(2), as the kernel's generic_permission does it.
    pub fn access(&self, ino: Ino, mask: i32, who: Caller) -> Result<()> {
        let i = self.look(|t| load_inode(t, ino))?;
        if mask == libc::F_OK {
            return Ok(());
        }
        if who.uid == 0 {
            // root may do anything, but execute needs some x bit on non-directories.
            if mask & libc::X_OK != 0 && i.kind != Kind::Dir && i.perm & 0o111 == 0 {
                return errno(libc::EACCES);
            }
            return Ok(());
        }
        let bits = if who.uid == i.uid {
            (i.perm >> 6) & 7
        } else if who.gid == i.gid || in_groups(who.pid, i.gid) {
            (i.perm >> 3) & 7
        } else {
            i.perm & 7
        } as i32;
        if mask & bits == mask & 7 {
            Ok(())
        } else {
            errno(libc::EACCES)
        }
    }

    /// setxattr(2) by `who`. An access ACL sets the mode's permission bits (and clears setgid
    /// when `who` is neither in the file's group nor privileged) and is not stored when the
    /// mode says all of it, as on ext4 ([`acl`]).
    pub fn setxattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
        who: Caller,
    ) -> Result<()> {
        self.writable()?;
        check_xattr_name(name)?;
        self.space.check(0)?;
        if value.len() > XATTR_SIZE_MAX {
            return errno(libc::E2BIG);
        }
        let access = match name {
            acl::ACCESS => Some(acl::Acl::parse(value)?),
            acl::DEFAULT => acl::Acl::parse(value).map(|_| None)?,
            _ => None,
        };
        let key = ks::xattr_key(ino, name);
        let r = self.txn(|t| {
            let mut i = load_inode(t, ino)?;
            let exists = t.get(Cf::Meta, &key)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return errno(libc::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return errno(libc::ENODATA);
            }
            match &access {
                Some(a) => {
                    i.perm = (i.perm & !0o777) | a.mode_bits();
                    if !acl::in_group_or_capable(who.pid, who.uid, who.gid, i.gid) {
                        i.perm &= !(libc::S_ISGID as u16);
                    }
                    if a.is_mode() {
                        t.delete(Cf::Meta, &key)?;
                    } else {
                        t.put(Cf::Meta, &key, &encode_xattr(value))?;
                    }
                }
                None => t.put(Cf::Meta, &key, &encode_xattr(value))?,
            }
            i.ctime = Timestamp::now();
            save_inode(t, ino, &i)
        });
        if name == CAPS {
            self.no_caps.changed(ino);
        }
        r
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<XattrReply> {
        check_xattr_name(name)?;
        let caps = name == CAPS && self.alone();
        if caps && self.no_caps.holds(ino) {
            return errno(libc::ENODATA);
        }
        let since = caps.then(|| self.no_caps.generation());
        let key = ks::xattr_key(ino, name);
        let v = self.look(|t| {
            load_inode(t, ino)?;
            match t.get(Cf::Meta, &key)? {
                None => errno(libc::ENODATA),
                Some(v) => Ok(decode_xattr(&v)
                    .map_err(|e| super::corrupt(&key, e))?
                    .to_vec()),
            }
        });
        if let (Some(since), Err(FsError::Errno(libc::ENODATA))) = (since, &v) {
            self.no_caps.absent(ino, since);
        }
        sized_reply(v?, size)
    }

    pub fn listxattr(&self, ino: Ino, size: u32) -> Result<XattrReply> {
        let (s, e) = ks::xattr_range(ino);
        let names = self.look(|t| {
            load_inode(t, ino)?;
            let mut out = Vec::new();
            for (k, _) in t.scan(Cf::Meta, &s, &e, usize::MAX)? {
                out.extend_from_slice(&k[s.len()..]);
                out.push(0);
            }
            Ok(out)
        })?;
        sized_reply(names, size)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.writable()?;
        check_xattr_name(name)?;
        let key = ks::xattr_key(ino, name);
        let r = self.txn(|t| {
            let mut i = load_inode(t, ino)?;
            if t.get(Cf::Meta, &key)?.is_none() {
                return errno(libc::ENODATA);
            }
            t.delete(Cf::Meta, &key)?;
            i.ctime = Timestamp::now();
            save_inode(t, ino, &i)
        });
        if name == CAPS {
            self.no_caps.changed(ino);
        }
        r
    }

    /// Real figures: what the store occupies plus the free space of the disk under it. As ext4
    /// does with its reserved blocks, `bavail` leaves out the reserve new data may not take.
    pub fn statfs(&self, store_dir: &std::path::Path) -> Result<StatFs> {
        let frsize: u64 = 4096;
        // Of the whole filesystem, as the seed asks: what is here, plus what was evicted to
        // the replicas (its stored bytes); free is what this store can still take.
        let evicted = crate::blocks::resident::totals(&self.store)?.evicted;
        let used = self.store.bytes_on_disk() + evicted;
        let d = super::disk_space(store_dir).map_err(FsError::Errno)?;
        // Inodes are keys: as many as the usable space has room for at ~256 bytes each.
        let free_files = d.usable() / 256;
        let next = self
            .store
            .get(Cf::Meta, ks::META_NEXT_INO)?
            .and_then(|v| crate::keyspace::records::decode_counter(&v).ok())
            .unwrap_or(2);
        let files_used = next.saturating_sub(1);
        Ok(StatFs {
            blocks: (used + d.avail) / frsize,
            bfree: d.avail / frsize,
            bavail: d.usable() / frsize,
            files: files_used + free_files,
            ffree: free_files,
            bsize: self.bs as u32,
            frsize: frsize as u32,
            namelen: super::NAME_MAX as u32,
        })
    }
}

fn sized_reply(v: Vec<u8>, size: u32) -> Result<XattrReply> {
    if size == 0 {
        Ok(XattrReply::Size(v.len() as u32))
    } else if v.len() > size as usize {
        errno(libc::ERANGE)
    } else {
        Ok(XattrReply::Data(v))
    }
}

/// Whether process `pid` has `gid` among its supplementary groups (/proc/PID/status).
fn in_groups(pid: u32, gid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

#[cfg(test)]
mod tests {
    use super::NoCaps;

    #[test]
    fn a_none_found_before_a_change_of_the_attribute_is_not_remembered() {
        let n = NoCaps::default();
        let since = n.generation();
        n.absent(5, since);
        assert!(n.holds(5));
        // A lookup began, then a set of the attribute on another file finished: its "none"
        // is dropped (it may predate a change of this one too).
        let since = n.generation();
        n.changed(9);
        n.absent(6, since);
        assert!(!n.holds(6));
        // A set on a remembered file forgets it.
        n.changed(5);
        assert!(!n.holds(5));
    }
}
