//! Phase 5: the block index. Every referenced block has info of the right length; refcounts
//! equal the references; unreferenced blocks are marked for the sweeper.

use std::collections::{HashMap, HashSet};

use super::blockmaps::Refs;
use super::repair::Fix;
use super::{Ctx, Result};
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{decode_i64, Cf, KvStore};

pub(super) fn check(
    store: &KvStore,
    cx: &mut Ctx,
    refs: &Refs,
) -> Result<HashMap<Hash, BlockInfo>> {
    let mut infos: HashMap<Hash, BlockInfo> = HashMap::new();
    let mut counts: HashMap<Hash, i64> = HashMap::new();
    let mut marked: HashSet<Hash> = HashSet::new();
    let (s, e) = (vec![0u8], vec![0xffu8]);
    store.for_each(Cf::Bidx, &s, &e, |k, v| {
        let Some(h) = ks::key_hash(k) else {
            return true;
        };
        match Prefix::from_byte(k[0]) {
            Some(Prefix::BlockInfo) => {
                if let Ok(i) = BlockInfo::decode(v) {
                    infos.insert(h, i);
                }
            }
            Some(Prefix::Refcount) => *counts.entry(h).or_default() += decode_i64(v),
            Some(Prefix::BlockGarbage) => {
                marked.insert(h);
            }
            _ => {}
        }
        true
    })?;
    for (h, (n, len)) in refs {
        let key = ks::describe_key(&ks::block_info_key(h));
        match infos.get(h) {
            None => cx.problem(
                key.clone(),
                format!("referenced {n} time(s) but not stored (data lost)"),
            ),
            Some(i) if i.len != *len => cx.problem(
                key.clone(),
                format!("stored length {} but referenced as {len}", i.len),
            ),
            _ => {}
        }
        let c = counts.get(h).copied().unwrap_or(0);
        if c != *n as i64 {
            cx.fixable(
                key,
                format!("refcount {c} but {n} reference(s)"),
                Fix::SetRefcount(*h, *n as i64),
            );
        }
    }
    let mut unreferenced = 0;
    for (h, c) in &counts {
        if refs.contains_key(h) {
            continue;
        }
        let key = ks::describe_key(&ks::block_info_key(h));
        if *c != 0 {
            cx.fixable(
                key.clone(),
                format!("refcount {c} but no references"),
                Fix::SetRefcount(*h, 0),
            );
        } else if !marked.contains(h) && infos.contains_key(h) {
            cx.fixable(
                key.clone(),
                "unreferenced block not marked for the sweeper (leaked)",
                Fix::MarkGarbageBlock(*h),
            );
        } else {
            unreferenced += 1;
        }
    }
    for h in infos.keys() {
        if !refs.contains_key(h) && !counts.contains_key(h) {
            if marked.contains(h) {
                unreferenced += 1;
            } else {
                cx.fixable(
                    ks::describe_key(&ks::block_info_key(h)),
                    "unreferenced block not marked for the sweeper (leaked)",
                    Fix::MarkGarbageBlock(*h),
                );
            }
        }
    }
    if unreferenced > 0 {
        cx.report.notes.push(format!(
            "{unreferenced} unreferenced block(s) await the sweeper"
        ));
    }

    Ok(infos)
}
