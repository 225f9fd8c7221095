//! Phase 6b: residency. Every resident, unpinned block has its one last-use key and every
//! last-use key names such a block at its recorded use; the resident and evicted counters
//! are the sums of the blocks' stored bytes; every evicted block is held, by what they
//! acknowledged, by at least one replica (with `--fetch`: each one is fetched from a replica
//! and checked by hash).

use std::collections::{HashMap, HashSet};

use super::repair::Fix;
use super::{Ctx, Result};
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, Prefix, COUNTER_EVICTED, COUNTER_RESIDENT};
use crate::kv::{Cf, KvStore};

pub(super) fn check(
    store: &KvStore,
    cx: &mut Ctx,
    infos: &HashMap<Hash, BlockInfo>,
    fetch: Option<&super::Fetch>,
) -> Result<()> {
    let mut indexed: HashSet<(u32, Hash)> = HashSet::new();
    let (a, b) = Prefix::LastUse.range();
    store.for_each(Cf::Bidx, &a, &b, |k, _| {
        cx.report.counts.keys += 1;
        match ks::parse_last_use_key(k) {
            Some(e) => {
                indexed.insert(e);
            }
            None => cx.fixable(
                ks::describe_key(k),
                "malformed last-use key",
                Fix::DeleteKey(Cf::Bidx, k.to_vec()),
            ),
        }
        true
    })?;
    for (secs, h) in &indexed {
        let ok = infos
            .get(h)
            .is_some_and(|i| !i.evicted && i.pins == 0 && i.used == *secs);
        if !ok {
            cx.fixable(
                ks::describe_key(&ks::last_use_key(*secs, h)),
                "last-use key of no resident unpinned block used then",
                Fix::DeleteKey(Cf::Bidx, ks::last_use_key(*secs, h)),
            );
        }
    }
    let (mut resident, mut evicted) = (0i64, 0i64);
    let replicas: Vec<_> = crate::replica::replicas(store)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let upstream = crate::replica::is_satellite(store)?;
    let mut unheld = 0u64;
    for (h, i) in infos {
        if i.evicted {
            evicted += i.stored as i64;
            if crate::tier::copies(i, &replicas, upstream) == 0 {
                unheld += 1;
                cx.problem(
                    ks::describe_key(&ks::block_info_key(h)),
                    "evicted, but no replica has acknowledged holding it (data may be lost)",
                );
            }
            continue;
        }
        resident += i.stored as i64;
        if i.pins == 0 && !indexed.contains(&(i.used, *h)) {
            cx.fixable(
                ks::describe_key(&ks::block_info_key(h)),
                "resident block missing from the last-use index (never evicted)",
                Fix::PutKey(Cf::Bidx, ks::last_use_key(i.used, h), Vec::new()),
            );
        }
    }
    for (name, want) in [(COUNTER_RESIDENT, resident), (COUNTER_EVICTED, evicted)] {
        let have = crate::blocks::resident::counter_sum(store, name)?;
        if have != want {
            cx.fixable(
                format!("s {name}"),
                format!("counter says {have} bytes, the blocks add up to {want}"),
                Fix::SetCounter(name, want),
            );
        }
    }
    if let Some(f) = fetch {
        let evicted: Vec<(&Hash, &BlockInfo)> = infos.iter().filter(|(_, i)| i.evicted).collect();
        for (h, i) in &evicted {
            f.0.prefetch(h, i.len, true);
        }
        let mut fetched = 0u64;
        for (h, i) in &evicted {
            // The fetcher decodes what a replica sends and checks its SHA-256 before it
            // answers: an answer is a verified copy.
            match f.0.fetch(h, i.len, true) {
                Ok(_) => fetched += 1,
                Err(e) => cx.problem(
                    ks::describe_key(&ks::block_info_key(h)),
                    format!("evicted, and no replica gave it back: {e}"),
                ),
            }
        }
        cx.report.notes.push(format!(
            "{fetched} of {} evicted block(s) fetched from the {} and verified",
            evicted.len(),
            if upstream { "upstream" } else { "replicas" }
        ));
    }
    let n = infos.values().filter(|i| i.evicted).count();
    if n > 0 {
        cx.report.notes.push(format!(
            "{n} evicted block(s) ({evicted} bytes) held by {}{}",
            if upstream { "the upstream" } else { "replicas" },
            if unheld > 0 {
                format!(", {unheld} by none")
            } else {
                String::new()
            }
        ));
    }
    Ok(())
}
