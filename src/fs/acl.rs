//! POSIX ACLs, as the kernel hands them over with FUSE_POSIX_ACL: it enforces them and caches
//! them, and leaves to the filesystem what ext4 does in `posix_acl_update_mode`,
//! `posix_acl_chmod` and `posix_acl_create`: an access ACL decides the mode's permission bits
//! (and is not stored when the mode says all of it), a chmod rewrites the access ACL, and a
//! new node inherits its directory's default ACL (which then replaces the umask).
//!
//! The ACLs are the xattrs `system.posix_acl_access` and `system.posix_acl_default` in the
//! kernel's format: a little-endian u32 version (2), then entries of (tag u16, perm u16,
//! id u32).

use super::{corrupt, errno, Result};
use crate::keyspace::records::decode_xattr;
use crate::keyspace::{self as ks, Ino};
use crate::kv::{Cf, Txn};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
/// linux/capability.h
const CAP_FSETID: u32 = 4;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed ACL; `EINVAL` for a value that is not one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    pub fn parse(v: &[u8]) -> Result<Acl> {
        if v.len() < 4 || (v.len() - 4) % 8 != 0 {
            return errno(libc::EINVAL);
        }
        if u32::from_le_bytes([v[0], v[1], v[2], v[3]]) != VERSION {
            return errno(libc::EOPNOTSUPP);
        }
        let entries: Vec<Entry> = v[4..]
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let count = |t: u16| entries.iter().filter(|e| e.tag == t).count();
        let named = count(USER) + count(GROUP);
        let valid = entries.iter().all(|e| {
            e.perm & !7 == 0 && [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.tag)
        }) && count(USER_OBJ) == 1
            && count(GROUP_OBJ) == 1
            && count(OTHER) == 1
            && count(MASK) <= 1
            && (named == 0 || count(MASK) == 1);
        if !valid {
            return errno(libc::EINVAL);
        }
        Ok(Acl(entries))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            v.extend_from_slice(&e.tag.to_le_bytes());
            v.extend_from_slice(&e.perm.to_le_bytes());
            v.extend_from_slice(&e.id.to_le_bytes());
        }
        v
    }

    fn perm(&self, tag: u16) -> Option<u16> {
        self.0.iter().find(|e| e.tag == tag).map(|e| e.perm)
    }

    fn set(&mut self, tag: u16, f: impl Fn(u16) -> u16) {
        for e in self.0.iter_mut().filter(|e| e.tag == tag) {
            e.perm = f(e.perm);
        }
    }

    /// The permission bits (0o777) the ACL gives the mode: the owner's, the mask's (or the
    /// owning group's without a mask), the others'.
    pub fn mode_bits(&self) -> u16 {
        let group = self.perm(MASK).or(self.perm(GROUP_OBJ)).unwrap_or(0);
        self.perm(USER_OBJ).unwrap_or(0) << 6 | group << 3 | self.perm(OTHER).unwrap_or(0)
    }

    /// Whether the mode says all of it (no named entries, no mask): then it is not stored.
    pub fn is_mode(&self) -> bool {
        self.0
            .iter()
            .all(|e| [USER_OBJ, GROUP_OBJ, OTHER].contains(&e.tag))
    }

    /// chmod: the owner, mask (or owning group) and other entries take the new bits.
    pub fn chmod(&mut self, perm: u16) {
        self.set(USER_OBJ, |_| (perm >> 6) & 7);
        let group = if self.perm(MASK).is_some() {
            MASK
        } else {
            GROUP_OBJ
        };
        self.set(group, |_| (perm >> 3) & 7);
        self.set(OTHER, |_| perm & 7);
    }

    /// A new node's access ACL from its directory's default ACL (`self`) and the mode asked
    /// for (no umask): each of owner, mask (or owning group) and other keeps only what both
    /// allow. Returns the node's permission bits.
    pub fn create_masq(&mut self, mode: u16) -> u16 {
        self.set(USER_OBJ, |p| p & (mode >> 6) & 7);
        let group = if self.perm(MASK).is_some() {
            MASK
        } else {
            GROUP_OBJ
        };
        self.set(group, |p| p & (mode >> 3) & 7);
        self.set(OTHER, |p| p & mode & 7);
        (mode & !0o777) | self.mode_bits()
    }
}

/// The value of `ino`'s xattr `name`, if it has one (read with tracking).
pub fn get_xattr(t: &mut dyn Txn, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
    let key = ks::xattr_key(ino, name);
    match t.get(Cf::Meta, &key)? {
        None => Ok(None),
        Some(v) => Ok(Some(
            decode_xattr(&v).map_err(|e| corrupt(&key, e))?.to_vec(),
        )),
    }
}

/// Whether the process `pid` (uid `uid`, gid `gid`) may keep a setgid bit on a file of group
/// `file_gid`: it is in that group, or holds CAP_FSETID (the kernel's `in_group_or_capable`;
/// FUSE requests carry no supplementary groups, so they come from /proc).
pub fn in_group_or_capable(pid: u32, uid: u32, gid: u32, file_gid: u32) -> bool {
    if gid == file_gid {
        return true;
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return uid == 0;
    };
    let in_group = status_field(&s, "Groups:")
        .split_whitespace()
        .any(|x| x.parse() == Ok(file_gid));
    in_group || fsetid_in(&s)
}

/// Whether the process `pid` (uid `uid`) holds CAP_FSETID (the kernel's `capable`).
pub fn capable_fsetid(pid: u32, uid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => fsetid_in(&s),
        Err(_) => uid == 0,
    }
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or("")
}

fn fsetid_in(status: &str) -> bool {
    let caps = u64::from_str_radix(status_field(status, "CapEff:").trim(), 16).unwrap_or(0);
    caps & (1 << CAP_FSETID) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries
            .iter()
            .map(|&(tag, perm, id)| Entry { tag, perm, id })
            .collect())
    }

    #[test]
    fn acls_round_trip_and_bad_ones_are_refused() {
        let a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(Acl::parse(&a.encode()).unwrap(), a);
        assert_eq!(a.mode_bits(), 0o770);
        assert!(!a.is_mode());
        // A named entry without a mask, a missing owner, a short value, a bad perm.
        for bad in [
            acl(&[
                (USER_OBJ, 7, 0),
                (USER, 5, 1),
                (GROUP_OBJ, 5, 0),
                (OTHER, 0, 0),
            ])
            .encode(),
            acl(&[(GROUP_OBJ, 5, 0), (OTHER, 0, 0)]).encode(),
            vec![2, 0, 0, 0, 1, 0],
            acl(&[(USER_OBJ, 8, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]).encode(),
        ] {
            assert!(Acl::parse(&bad).is_err());
        }
    }

    #[test]
    fn chmod_and_inheritance_follow_the_kernels_rules() {
        let mut a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        a.chmod(0o640);
        assert_eq!(a.perm(USER_OBJ), Some(6));
        assert_eq!(a.perm(MASK), Some(4));
        assert_eq!(
            a.perm(GROUP_OBJ),
            Some(5),
            "the owning group stays behind a mask"
        );
        assert_eq!(a.perm(USER), Some(7), "named entries stay");
        let mut d = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 7, 0), (OTHER, 5, 0)]);
        assert_eq!(d.create_masq(0o100666), 0o100664);
        assert!(d.is_mode());
    }
}
