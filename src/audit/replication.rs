//! Phase 4b: replication's own keys. A primary's log groups each hold one reference per block
//! their map entries name, and a replica's holds one per block received for a group not yet
//! applied: both count as references for the block index phase. Every replica record
//! decodes; a replica store's state decodes.

use super::blockmaps::Refs;
use super::{Ctx, Result};
use crate::keyspace::records::{BlockInfo, FmapEntry};
use crate::keyspace::{self as ks, Prefix};
use crate::kv::{Cf, KvStore};
use crate::replica::{cf_from_u8, Change, LogPart};

pub(super) fn check(store: &KvStore, cx: &mut Ctx, refs: &mut Refs) -> Result<()> {
    let (a, b) = Prefix::Log.range();
    let mut named = Vec::new();
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        if let Ok(p) = LogPart::decode(v) {
            for ch in p.changes {
                if let Change::Put { cf, value, .. } = ch {
                    if cf_from_u8(cf) != Some(Cf::Fmap) {
                        continue;
                    }
                    match FmapEntry::decode(&value) {
                        Ok(e) => named.push((e.hash, e.len)),
                        Err(why) => cx.problem(
                            ks::describe_key(k),
                            format!("a block-map entry in the group does not decode: {why}"),
                        ),
                    }
                }
            }
        }
        true
    })?;
    for (h, len) in named {
        refs.entry(h).or_insert((0, len)).0 += 1;
    }
    let (a, b) = Prefix::Hold.range();
    let mut held = Vec::new();
    store.for_each(Cf::Bidx, &a, &b, |k, _| {
        if let Some(h) = ks::key_hash(k) {
            held.push(h);
        }
        true
    })?;
    for h in held {
        match store.get(Cf::Bidx, &ks::block_info_key(&h))? {
            Some(v) => {
                let len = BlockInfo::decode(&v).map(|i| i.len).unwrap_or(0);
                refs.entry(h).or_insert((0, len)).0 += 1;
            }
            None => cx.problem(
                ks::describe_key(&crate::replica::hold_key(&h)),
                "held for a group, but the block is not stored",
            ),
        }
    }
    Ok(())
}
