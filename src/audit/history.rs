//! Phase 4c: history's keys. Every past value decodes and is listed by its moment, every
//! indexed moment lists only past values that exist, a pending one (its past values inside,
//! not yet indexed) lies after the indexed ones; a past block-map value, indexed or pending,
//! holds one reference on its block (counted for the block index phase) and one in the
//! block's `V` counter.

use std::collections::HashMap;

use super::blockmaps::Refs;
use super::{Ctx, Result};
use crate::history::{decode_moment, decode_past};
use crate::keyspace::past::{parse_moment_key, parse_past_key, past_hold_key, past_key};
use crate::keyspace::records::FmapEntry;
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{decode_i64, Cf, KvStore};

pub(super) fn check(store: &KvStore, cx: &mut Ctx, refs: &mut Refs) -> Result<()> {
    let mut held: HashMap<Hash, (i64, u32)> = HashMap::new();
    let mut pasts = std::collections::HashSet::new();
    let (a, b) = Prefix::Past.range();
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        let Some((cf, key, _)) = parse_past_key(k) else {
            cx.problem(ks::describe_key(k), "malformed past-value key");
            return true;
        };
        pasts.insert(k.to_vec());
        match decode_past(v) {
            Err(e) => cx.problem(ks::describe_key(k), format!("does not decode: {e}")),
            Ok(Some(old)) if cf == Cf::Fmap => match FmapEntry::decode(&old) {
                Ok(e) => {
                    let h = held.entry(e.hash).or_insert((0, e.len));
                    h.0 += 1;
                }
                Err(e) => cx.problem(
                    format!("past of {}", ks::describe_key(&key)),
                    format!("block-map value does not decode: {e}"),
                ),
            },
            Ok(_) => {}
        }
        true
    })?;
    let indexed = crate::history::state(store)?.indexed;
    let (a, b) = Prefix::Moment.range();
    let mut listed = 0usize;
    let mut missing = Vec::new();
    let mut misplaced = Vec::new();
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        let (Some(at), Ok(m)) = (parse_moment_key(k), decode_moment(v)) else {
            cx.problem(ks::describe_key(k), "moment does not decode");
            return true;
        };
        match m.values {
            Some(values) => {
                if at <= indexed {
                    misplaced.push(at);
                }
                for ((cfi, key), old) in m.keys.iter().zip(values) {
                    let (Some(old), true) = (old, *cfi as usize == Cf::Fmap.index()) else {
                        continue;
                    };
                    match FmapEntry::decode(&old) {
                        Ok(e) => held.entry(e.hash).or_insert((0, e.len)).0 += 1,
                        Err(e) => cx.problem(
                            format!("moment {at}: past of {}", ks::describe_key(key)),
                            format!("block-map value does not decode: {e}"),
                        ),
                    }
                }
            }
            None => {
                for (cfi, key) in m.keys {
                    match Cf::ALL.get(cfi as usize) {
                        Some(&cf) if pasts.contains(&past_key(cf, &key, at)) => listed += 1,
                        _ => missing.push((at, key)),
                    }
                }
            }
        }
        true
    })?;
    for at in misplaced {
        cx.problem(
            format!("Z {at}"),
            format!("pending, but at or before the last moment indexed ({indexed})"),
        );
    }
    for (at, key) in missing {
        cx.problem(
            format!("Z {at}"),
            format!(
                "lists {} without its past value (history at that moment is incomplete)",
                ks::describe_key(&key)
            ),
        );
    }
    if listed != pasts.len() {
        cx.problem(
            "Y",
            format!(
                "{} past value(s) no moment lists (trimming would never free them)",
                pasts.len().saturating_sub(listed)
            ),
        );
    }
    let (a, b) = Prefix::PastHold.range();
    let mut counters: HashMap<Hash, i64> = HashMap::new();
    store.for_each(Cf::Bidx, &a, &b, |k, v| {
        if let Some(h) = ks::key_hash(k) {
            counters.insert(h, decode_i64(v));
        }
        true
    })?;
    for (h, (n, len)) in &held {
        refs.entry(*h).or_insert((0, *len)).0 += *n as u64;
        let c = counters.get(h).copied().unwrap_or(0);
        if c != *n {
            cx.problem(
                ks::describe_key(&past_hold_key(h)),
                format!("past references {c} but {n} past value(s) name the block"),
            );
        }
    }
    for (h, c) in counters {
        if c != 0 && !held.contains_key(&h) {
            cx.problem(
                ks::describe_key(&past_hold_key(&h)),
                format!("past references {c} but no past value names the block"),
            );
        }
    }
    Ok(())
}
