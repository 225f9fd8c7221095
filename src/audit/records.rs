//! Phase 1: every record of the metadata, block-map and block-index families decodes and
//! lies in its family; what later phases need is gathered in the same pass.

use std::collections::{HashMap, HashSet};

use super::{Ctx, Result};
use crate::dump::describe_value;
use crate::keyspace::records::{decode_counter, Dirent, FormatRecord, Inode, Kind};
use crate::keyspace::{self as ks, Ino, InodeKey, MountId, Prefix};
use crate::kv::{Cf, KvStore};

#[derive(Clone, Debug)]
pub(super) struct InodeInfo {
    pub kind: Kind,
    pub nlink: u32,
    pub size: u64,
    pub alloc: u64,
    pub parent: Ino,
}

/// What the metadata holds, as the later phases see it.
#[derive(Default)]
pub(super) struct Records {
    pub format: Option<FormatRecord>,
    pub next_ino: Option<u64>,
    pub inodes: HashMap<Ino, InodeInfo>,
    pub dirents: Vec<(Vec<u8>, Ino, Dirent)>,
    pub garbage: HashSet<Ino>,
    /// Sub-keys of inodes (locks, open counts, xattrs, pseudo-keys) and the mount owning them.
    pub subkeys: Vec<(Vec<u8>, Ino, Option<MountId>)>,
    /// `J` keys: writes an fsync made durable that the next mount applies.
    pub pending: usize,
}

pub(super) fn check(store: &KvStore, cx: &mut Ctx) -> Result<Records> {
    let mut r = Records::default();
    for cf in [Cf::Meta, Cf::Fmap, Cf::Bidx] {
        store.for_each(cf, &[0x00], &[0xff], |k, v| {
            cx.report.counts.keys += 1;
            let key = ks::describe_key(k);
            let wrong_family = Prefix::from_byte(k[0]).is_none_or(|p| p.cf() != cf);
            if wrong_family {
                cx.problem(
                    key,
                    format!("key in the wrong column family ({})", cf.name()),
                );
                return true;
            }
            if let Err(why) = describe_value(k, v) {
                cx.problem(key, format!("does not decode: {why}"));
                return true;
            }
            match Prefix::from_byte(k[0]) {
                Some(Prefix::Meta) if k == ks::META_FORMAT => {
                    r.format = FormatRecord::decode(v).ok()
                }
                Some(Prefix::Meta) if k == ks::META_NEXT_INO => r.next_ino = decode_counter(v).ok(),
                Some(Prefix::Inode) => match ks::parse_inode_key(k) {
                    InodeKey::Record(ino) => {
                        if let Ok(i) = Inode::decode(v) {
                            r.inodes.insert(
                                ino,
                                InodeInfo {
                                    kind: i.kind,
                                    nlink: i.nlink,
                                    size: i.size,
                                    alloc: i.alloc,
                                    parent: i.parent,
                                },
                            );
                        }
                    }
                    InodeKey::Lock(ino, m, _, _) | InodeKey::Open(ino, m) => {
                        r.subkeys.push((k.to_vec(), ino, Some(m)))
                    }
                    InodeKey::Xattr(ino, _) | InodeKey::Pseudo(ino, _) => {
                        r.subkeys.push((k.to_vec(), ino, None))
                    }
                    InodeKey::Unknown => {}
                },
                Some(Prefix::Dirent) => {
                    if let (Some(p), Ok(d)) = (ks::key_ino(k), Dirent::decode(v)) {
                        r.dirents.push((k.to_vec(), p, d));
                    }
                }
                Some(Prefix::Pending) => {
                    if let Some((ino, _, _)) = ks::parse_pending_key(k) {
                        r.subkeys.push((k.to_vec(), ino, None));
                        r.pending += 1;
                    }
                }
                Some(Prefix::Garbage) => {
                    if let Some(i) = ks::key_ino(k) {
                        r.garbage.insert(i);
                    }
                }
                _ => {}
            }
            true
        })?;
    }
    Ok(r)
}
