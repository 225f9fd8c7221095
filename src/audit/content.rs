//! Phase 7: every stored block's content matches its SHA-256 name, its size its info, and its
//! parity is intact; every referenced block is stored.

use std::collections::{HashMap, HashSet};

use super::blockmaps::Refs;
use super::repair::Fix;
use super::{bar, AuditOptions};
use super::{Ctx, Result};
use crate::blocks::{self, encode};
use crate::keyspace::records::{BlockInfo, FormatRecord};
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{Cf, KvStore};

pub(super) fn check(
    store: &KvStore,
    cx: &mut Ctx,
    o: &AuditOptions,
    format: &FormatRecord,
    infos: &HashMap<Hash, BlockInfo>,
    refs: &Refs,
    ahead: &HashSet<Hash>,
) -> Result<()> {
    let total: u64 = infos
        .values()
        .filter(|i| !i.evicted)
        .map(|i| i.stored as u64)
        .sum();
    let pb = bar(o.progress, total, "blocks");
    let (s, e) = Prefix::Block.range();
    let mut seen: HashSet<Hash> = HashSet::new();
    store.for_each(Cf::Blocks, &s, &e, |k, v| {
        cx.report.counts.keys += 1;
        cx.report.counts.blocks += 1;
        cx.report.counts.block_bytes += v.len() as u64;
        pb.inc(v.len() as u64);
        let key = ks::describe_key(k);
        let Some(h) = ks::key_hash(k).filter(|_| k.len() == 33) else {
            cx.problem(key, "malformed block key");
            return true;
        };
        seen.insert(h);
        let Some(info) = infos.get(&h) else {
            if ahead.contains(&h) {
                // Named by no commit yet: the recovery drops it (or a commit names it).
                return true;
            }
            cx.fixable(
                key,
                "stored block without block info",
                Fix::MarkGarbageBlock(h),
            );
            return true;
        };
        if info.evicted {
            cx.problem(
                key.clone(),
                "a value is stored but the block info says it was evicted",
            );
        }
        if info.stored as usize != v.len() {
            cx.problem(
                key.clone(),
                format!(
                    "{} bytes stored but block info says {}",
                    v.len(),
                    info.stored
                ),
            );
        }
        match encode::decode_with(v, &h, info.len, encode::Check::Strong) {
            Ok(d) => {
                if let Some((sector, healed)) = d.repaired {
                    cx.fixable(
                        key,
                        format!("damaged in sector {sector}; parity rebuilds it"),
                        Fix::RewriteBlock(h, healed),
                    );
                } else if let Err(why) = encode::check_parity(v) {
                    // Content is right; rebuild the parity from it.
                    let healed = encode::encode(
                        &blocks::Codec {
                            compression: info.encoding & !encode::INFO_PARITY,
                            level: format.level.max(1),
                            parity: true,
                        },
                        &d.content,
                    );
                    cx.fixable(
                        key,
                        format!("content fine but {why}"),
                        Fix::RewriteBlock(h, healed.value),
                    );
                }
            }
            Err(why) => cx.problem(key, format!("corrupt: {why}")),
        }
        true
    })?;
    pb.finish_and_clear();
    for h in infos.keys() {
        if !seen.contains(h) && refs.contains_key(h) && !infos[h].evicted {
            cx.problem(
                ks::describe_key(&ks::block_key(h)),
                "block info present but the block is missing (data lost)",
            );
        }
    }
    Ok(())
}
