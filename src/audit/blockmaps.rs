//! Phase 4: block maps lie inside their files, point to blocks of a possible length, agree on
//! each block's length, and add up to each file's `alloc`.

use std::collections::HashMap;

use super::records::Records;
use super::repair::Fix;
use super::{Ctx, Result};
use crate::fs as fsops;
use crate::keyspace::records::{FmapEntry, Kind};
use crate::keyspace::{self as ks, Hash, Ino, Prefix};
use crate::kv::{Cf, KvStore};

/// References counted from the block maps: block -> (references, content length).
pub(super) type Refs = HashMap<Hash, (u64, u32)>;

pub(super) fn check(store: &KvStore, cx: &mut Ctx, r: &Records, bs: u64) -> Result<Refs> {
    let inodes = &r.inodes;
    let mut refs: HashMap<Hash, (u64, u32)> = HashMap::new();
    let mut alloc: HashMap<Ino, u64> = HashMap::new();
    let (s, e) = Prefix::Fmap.range();
    store.for_each(Cf::Fmap, &s, &e, |k, v| {
        let Ok(ent) = FmapEntry::decode(v) else {
            return true;
        };
        cx.report.counts.fmap_entries += 1;
        let key = ks::describe_key(k);
        let (Some(ino), Some(bn)) = (ks::key_ino(k), ks::fmap_blockno(k)) else {
            cx.problem(key, "malformed block-map key");
            return true;
        };
        match inodes.get(&ino) {
            Some(i) if i.kind == Kind::File => {
                if bn.saturating_mul(bs) >= i.size {
                    cx.fixable(
                        key,
                        format!("block lies past the file's size {}", i.size),
                        Fix::DropFmap(k.to_vec(), ent.hash),
                    );
                    return true;
                }
                if ent.len as u64 > bs || ent.len == 0 {
                    cx.problem(
                        key.clone(),
                        format!("content length {} impossible for block size {bs}", ent.len),
                    );
                }
                *alloc.entry(ino).or_default() += fsops::charge(ent.len);
            }
            _ => {
                cx.fixable(
                    key,
                    "block map of a missing or non-file inode",
                    Fix::DropFmap(k.to_vec(), ent.hash),
                );
                return true;
            }
        }
        let r = refs.entry(ent.hash).or_insert((0, ent.len));
        r.0 += 1;
        if r.1 != ent.len {
            cx.problem(
                key,
                format!(
                    "length {} differs from another reference's {}",
                    ent.len, r.1
                ),
            );
        }
        true
    })?;
    for (&ino, i) in inodes {
        if i.kind != Kind::File {
            continue;
        }
        let want = alloc.get(&ino).copied().unwrap_or(0);
        if i.alloc != want {
            cx.fixable(
                ks::describe_key(&ks::inode_key(ino)),
                format!("alloc {} but its blocks add up to {want}", i.alloc),
                Fix::SetAlloc(ino, want),
            );
        }
    }

    Ok(refs)
}
