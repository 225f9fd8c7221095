//! Phase 4b: replication's own keys. A primary's log groups each hold one reference per block
//! their map entries and past holds name, and a replica holds one per block received for a
//! group not yet applied and one per block its primary's history names: all count as
//! references for the block index phase. Every replica record
//! decodes; a replica store's state decodes.

use super::blockmaps::Refs;
use super::{Ctx, Result};
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Prefix};
use crate::kv::{Cf, KvStore};
use crate::replica::{cf_from_u8, hold_key, names_block, primary_past_key, Change, LogPart};

/// A key builder of one kind of hold.
type KeyOf = fn(&ks::Hash) -> Vec<u8>;

pub(super) fn check(store: &KvStore, cx: &mut Ctx, refs: &mut Refs) -> Result<()> {
    let (a, b) = Prefix::Log.range();
    let mut named = Vec::new();
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        if let Ok(p) = LogPart::decode(v) {
            for ch in p.changes {
                let Change::Put { cf, key, value } = ch else {
                    continue;
                };
                let Some(cf) = cf_from_u8(cf) else { continue };
                match names_block(cf, &key, &value) {
                    Ok(Some((h, len))) => named.push((h, len)),
                    Ok(None) => {}
                    Err(why) => cx.problem(
                        ks::describe_key(k),
                        format!("a block-map entry in the group does not decode: {why}"),
                    ),
                }
            }
        }
        true
    })?;
    for (h, len) in named {
        let len = match len {
            Some(len) => len,
            None => stored_len(store, &h)?.unwrap_or(0),
        };
        refs.entry(h).or_insert((0, len)).0 += 1;
    }
    // A replica's holds: blocks received for a group not yet applied, and blocks its
    // primary's history names.
    let holds: [(Prefix, KeyOf, &str); 2] = [
        (Prefix::Hold, hold_key, "held for a group"),
        (
            Prefix::PrimaryPast,
            primary_past_key,
            "held for the primary's history",
        ),
    ];
    for (p, key_of, what) in holds {
        let (a, b) = p.range();
        let mut held = Vec::new();
        store.for_each(Cf::Bidx, &a, &b, |k, _| {
            if let Some(h) = ks::key_hash(k) {
                held.push(h);
            }
            true
        })?;
        for h in held {
            match stored_len(store, &h)? {
                Some(len) => refs.entry(h).or_insert((0, len)).0 += 1,
                None => cx.problem(
                    ks::describe_key(&key_of(&h)),
                    format!("{what}, but the block is not stored"),
                ),
            }
        }
    }
    Ok(())
}

/// The length of block `h` by its info, if it has one.
fn stored_len(store: &KvStore, h: &ks::Hash) -> Result<Option<u32>> {
    let info = store.get(Cf::Bidx, &ks::block_info_key(h))?;
    Ok(info.map(|v| BlockInfo::decode(&v).map(|i| i.len).unwrap_or(0)))
}
