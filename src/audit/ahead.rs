//! Phase 6: blocks written ahead by flushes that have not committed (or never will): each
//! `W` key is well formed; they are a note, not a problem (recovery settles them).

use std::collections::HashSet;

use super::{Ctx, Result};
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{Cf, KvStore};

pub(super) fn check(store: &KvStore, cx: &mut Ctx) -> Result<HashSet<Hash>> {
    let (s, e) = Prefix::WrittenAhead.range();
    let mut ahead: HashSet<Hash> = HashSet::new();
    store.for_each(Cf::Blocks, &s, &e, |k, v| {
        cx.report.counts.keys += 1;
        let key = ks::describe_key(k);
        match ks::key_hash(k).filter(|_| k.len() == 33) {
            Some(h) if v.len() == 8 => {
                ahead.insert(h);
            }
            Some(_) => cx.problem(key, format!("token is {} bytes, expected 8", v.len())),
            None => cx.problem(key, "malformed written-ahead key"),
        }
        true
    })?;
    if !ahead.is_empty() {
        cx.report.notes.push(format!(
            "{} block(s) written ahead await their commit or the recovery at the next mount \
             or `kvfs gc`",
            ahead.len()
        ));
    }

    Ok(ahead)
}
