//! Phase 2: the process table (which mounts are known, which are dead), and every open count
//! and lock held by a known mount of a live inode.

use std::collections::HashSet;

use super::records::Records;
use super::repair::Fix;
use super::{Ctx, Result};
use crate::gc;
use crate::keyspace::{self as ks, MountId};
use crate::kv::{Cf, KvStore};

/// Mounts in the process table, and the dead ones among them.
pub(super) struct Mounts {
    pub known: HashSet<MountId>,
    pub dead: HashSet<MountId>,
}

pub(super) fn check(store: &KvStore, cx: &mut Ctx, timeout: std::time::Duration) -> Result<Mounts> {
    let table = gc::mounts(store, timeout, None)?;
    let known: HashSet<MountId> = table.iter().map(|m| m.id).collect();
    let dead: HashSet<MountId> = table.iter().filter(|m| !m.alive).map(|m| m.id).collect();
    if !dead.is_empty() {
        cx.report.notes.push(format!(
            "{} dead mount(s) in the process table; `kvfs gc` reaps them with their open counts and locks",
            dead.len()
        ));
    }

    Ok(Mounts { known, dead })
}

/// Open counts, locks and pending writes: of a live inode; open counts and locks held by a
/// mount in the table.
pub(super) fn check_owners(cx: &mut Ctx, r: &Records, m: &Mounts) {
    if r.pending > 0 {
        cx.report.notes.push(format!(
            "{} pending write(s) (`J` keys): bytes an fsync made durable before their blocks \
             were committed; the next mount applies them",
            r.pending
        ));
    }
    let (inodes, known, dead) = (&r.inodes, &m.known, &m.dead);
    let mut pending = 0;
    for (k, ino, mount) in &r.subkeys {
        let key = ks::describe_key(k);
        if !inodes.contains_key(ino) {
            cx.fixable(
                key,
                "belongs to a missing inode",
                Fix::DeleteKey(Cf::Meta, k.clone()),
            );
            continue;
        }
        if let Some(m) = mount {
            if !known.contains(m) {
                cx.fixable(
                    key,
                    format!("held by mount {m:016x}, which is not in the process table"),
                    Fix::DeleteKey(Cf::Meta, k.clone()),
                );
            } else if dead.contains(m) {
                pending += 1;
            }
        }
    }
    if pending > 0 {
        cx.report.notes.push(format!(
            "{pending} open count(s)/lock(s) of dead mounts await the sweeper"
        ));
    }
}
