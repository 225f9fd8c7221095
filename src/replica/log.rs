//! The logger: change markers become groups, and groups every replica acknowledged are
//! trimmed.
//!
//! A round reads one snapshot: every marker in it, and the value each marked key has in it.
//! The group it writes is therefore exactly the difference between the state the previous
//! group described and this snapshot: a replica applying groups in order moves from one state
//! the primary had to a later one. The round's transaction deletes exactly the markers it saw
//! (their keys are unique, so a marker written meanwhile stays for the next round) and adds a
//! reference to every block the group names, which it drops when the group is trimmed: a block
//! is never freed while a group that names it waits to be shipped. If one of those blocks was
//! freed between the snapshot and the transaction (a later write replaced it), the snapshot is
//! stale and the round starts over.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    base_ranges, carried, cf_from_u8, chain, log_group_range, log_key, names_block, replica_key,
    scan_pages, ships_past_hold, Change, ChangeMarker, LogHead, LogPart, ReplicaError,
    ReplicaRecord, PAGE,
};
use crate::blocks;
use crate::keyspace::records::{BlockInfo, FmapEntry};
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{Cf, KvError, KvStore, Txn};
use crate::util::Timestamp;

/// Changes per stored part are cut at about this many encoded bytes.
pub const PART_BYTES: usize = 1 << 20;

/// One round at a time in a process: a group must describe a later snapshot than the group
/// before it.
static ROUND: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What one snapshot holds for the next group.
#[derive(Default)]
struct Collected {
    /// The log head in the snapshot: the group is logged only right after it.
    head: u64,
    markers: Vec<Vec<u8>>,
    changes: Vec<Change>,
    /// Blocks the group's map entries name, with multiplicity.
    hashes: Vec<Hash>,
    /// Blocks whose `U` mark this snapshot holds, with the mark's token: the group carries
    /// their new references.
    unlogged: Vec<(Hash, Vec<u8>)>,
    /// Replicas whose first group this is.
    base_for: Vec<String>,
    replicas: usize,
}

/// Read every key of `[start, end)` in `cf` from `t`, page by page.
fn scan_all(
    t: &mut dyn Txn,
    cf: Cf,
    start: &[u8],
    end: &[u8],
    mut visit: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), ReplicaError>,
) -> Result<(), ReplicaError> {
    scan_pages(t, cf, start, end, |_, page| {
        page.into_iter().try_for_each(|(k, v)| visit(k, v))
    })
}

fn note_put(c: &mut Collected, cf: Cf, key: Vec<u8>, value: Vec<u8>) -> Result<(), ReplicaError> {
    if ships_past_hold(cf, &key) && crate::kv::decode_i64(&value) <= 0 {
        // The primary's past no longer names the block: the replica's hold goes.
        c.changes.push(Change::Delete {
            cf: cf.index() as u8,
            key,
        });
        return Ok(());
    }
    // A past hold's block too: the group ships it (if the replica lacks it), and the replica
    // holds it while the counter stays above zero.
    if let Some((h, _)) = names_block(cf, &key, &value)? {
        c.hashes.push(h);
    }
    c.changes.push(Change::Put {
        cf: cf.index() as u8,
        key,
        value,
    });
    Ok(())
}

fn collect(s: &mut dyn Txn, markers_from: &[u8]) -> Result<Collected, ReplicaError> {
    let mut c = Collected {
        head: read_head(s)?.seq,
        ..Default::default()
    };
    let (ra, rb) = Prefix::Replica.range();
    scan_all(s, Cf::Meta, &ra, &rb, |k, v| {
        c.replicas += 1;
        if ReplicaRecord::decode(&v)?.base.is_none() {
            c.base_for
                .push(String::from_utf8_lossy(&k[1..]).into_owned());
        }
        Ok(())
    })?;
    let mut keys = BTreeSet::new();
    let (ca, cb) = Prefix::Change.range();
    let ca = ca.max(markers_from.to_vec());
    scan_all(s, Cf::Meta, &ca, &cb, |k, v| {
        for (cf, key) in ChangeMarker::decode(&v)?.keys {
            keys.insert((cf, key));
        }
        c.markers.push(k);
        Ok(())
    })?;
    let unlogged = Prefix::Unlogged.byte();
    for (cf, key) in &keys {
        if *cf == Cf::Bidx.index() as u8 && key.first() == Some(&unlogged) {
            if let (Some(h), Some(tok)) = (ks::key_hash(key), s.get(Cf::Bidx, key)?) {
                c.unlogged.push((h, tok));
            }
        }
    }
    if c.replicas == 0 {
        return Ok(c);
    }
    if !c.base_for.is_empty() {
        // The whole filesystem: covers every marked key too (all marked keys are in these
        // ranges), and every replica may take it (it replaces what they hold by the same).
        for (cf, start, end) in base_ranges() {
            c.changes.push(Change::Clear {
                cf: cf.index() as u8,
                start: start.clone(),
                end: end.clone(),
            });
            let mut puts = Vec::new();
            scan_all(s, cf, &start, &end, |k, v| {
                let ended = ships_past_hold(cf, &k) && crate::kv::decode_i64(&v) <= 0;
                if carried(cf, &k) && !ended {
                    puts.push((k, v));
                }
                Ok(())
            })?;
            for (k, v) in puts {
                note_put(&mut c, cf, k, v)?;
            }
        }
        return Ok(c);
    }
    for (cfb, key) in keys {
        let Some(cf) = cf_from_u8(cfb).filter(|cf| carried(*cf, &key)) else {
            continue;
        };
        match s.get(cf, &key)? {
            Some(v) => note_put(&mut c, cf, key, v)?,
            None => c.changes.push(Change::Delete { cf: cfb, key }),
        }
    }
    Ok(c)
}

/// Cut changes into parts of about [`PART_BYTES`].
fn into_parts(changes: Vec<Change>) -> Vec<Vec<Change>> {
    let mut parts = vec![Vec::new()];
    let mut size = 0;
    for ch in changes {
        let n = match &ch {
            Change::Put { key, value, .. } => key.len() + value.len() + 8,
            Change::Delete { key, .. } => key.len() + 4,
            Change::Clear { start, end, .. } => start.len() + end.len() + 4,
        };
        if size + n > PART_BYTES && size > 0 {
            parts.push(Vec::new());
            size = 0;
        }
        size += n;
        parts.last_mut().expect("one part at least").push(ch);
    }
    parts
}

pub fn read_head(t: &mut dyn Txn) -> Result<LogHead, ReplicaError> {
    Ok(match t.get(Cf::Meta, ks::META_LOG_HEAD)? {
        Some(v) => LogHead::decode(&v)?,
        None => LogHead::default(),
    })
}

/// The head outside a transaction.
pub fn head(store: &KvStore) -> Result<LogHead, ReplicaError> {
    store.read(read_head)
}

enum Outcome {
    Logged(u64),
    Stale,
}

fn commit(store: &KvStore, c: &Collected) -> Result<Outcome, ReplicaError> {
    let parts = into_parts(c.changes.clone());
    let mut counts: BTreeMap<Hash, u32> = BTreeMap::new();
    for h in &c.hashes {
        *counts.entry(*h).or_default() += 1;
    }
    let at = Timestamp::now();
    store.transact(|t| {
        let head = read_head(t)?;
        if head.seq != c.head {
            return Ok(Outcome::Stale);
        }
        let seq = head.seq + 1;
        for (h, n) in &counts {
            if t.get(Cf::Bidx, &ks::block_info_key(h))?.is_none() {
                return Ok(Outcome::Stale);
            }
            for _ in 0..*n {
                blocks::add_shared_ref(t, h)?;
            }
        }
        let ch = chain(&head.chain, seq, &parts)?;
        for (i, changes) in parts.iter().enumerate() {
            let p = LogPart {
                at,
                chain: ch,
                last: i + 1 == parts.len(),
                changes: changes.clone(),
            };
            t.put(Cf::Meta, &log_key(seq, i as u32), &p.encode()?)?;
        }
        for m in &c.markers {
            t.delete(Cf::Meta, m)?;
        }
        settle_unlogged(t, &c.unlogged, Some(seq))?;
        for name in &c.base_for {
            let key = replica_key(name);
            let Some(v) = t.get(Cf::Meta, &key)? else {
                continue;
            };
            let mut r = ReplicaRecord::decode(&v)?;
            if r.base.is_none() {
                r.base = Some(seq);
                r.acked = head.seq;
                r.acked_chain = head.chain;
                t.put(Cf::Meta, &key, &r.encode()?)?;
            }
        }
        let new_head = LogHead { seq, chain: ch };
        t.put(Cf::Meta, ks::META_LOG_HEAD, &new_head.encode()?)?;
        Ok(Outcome::Logged(seq))
    })
}

/// The group `seq` carries the new references the marks in `unlogged` stood for: each mark
/// still holding the token seen goes (a later one stays for the next group) and the block
/// records the group, which its replicas must have applied before it may be evicted. Without
/// a group (no replica), the marks just go.
fn settle_unlogged(
    t: &mut dyn Txn,
    unlogged: &[(Hash, Vec<u8>)],
    seq: Option<u64>,
) -> Result<(), ReplicaError> {
    for (h, tok) in unlogged {
        let key = ks::unlogged_key(h);
        if t.get(Cf::Bidx, &key)?.as_ref() == Some(tok) {
            t.delete(Cf::Bidx, &key)?;
        }
        let Some(seq) = seq else { continue };
        let ik = ks::block_info_key(h);
        if let Some(raw) = t.get(Cf::Bidx, &ik)? {
            let mut info = BlockInfo::decode(&raw)?;
            if info.logged < seq {
                info.logged = seq;
                t.put(Cf::Bidx, &ik, &info.encode()?)?;
            }
        }
    }
    Ok(())
}

/// One logger round: turn the markers present now into a group. Returns the group's seq, or
/// `None` when there was nothing to log (or no replica to log for: markers are then dropped).
pub fn round(store: &KvStore) -> Result<Option<u64>, ReplicaError> {
    round_from(store, &[])
}

/// The mount's logger: each round scans only the markers that may not have been logged yet,
/// and trimming only the groups not yet trimmed (deleted keys stay as tombstones in the
/// engine for a while, and rescanning them every 100 ms cost 17% of a metadata-heavy mount's
/// CPU).
#[derive(Default)]
pub struct Logger {
    markers_from: Vec<u8>,
    groups_from: u64,
}

impl Logger {
    pub fn round(&mut self, store: &KvStore) -> Result<Option<u64>, ReplicaError> {
        // Read before the round's snapshot: every marker below it is committed (so seen by
        // this round) or abandoned.
        let low = store.change_low_water();
        let r = round_from(store, &self.markers_from)?;
        if let Some(low) = low {
            self.markers_from = low;
        }
        Ok(r)
    }

    pub fn trim(&mut self, store: &KvStore) -> Result<u64, ReplicaError> {
        trim_from(store, &mut self.groups_from)
    }
}

fn round_from(store: &KvStore, markers_from: &[u8]) -> Result<Option<u64>, ReplicaError> {
    let _one = ROUND.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..16 {
        let c = store.read(|s| collect(s, markers_from))?;
        if c.replicas == 0 {
            for chunk in c.markers.chunks(PAGE) {
                store.transact(|t| {
                    chunk.iter().try_for_each(|m| t.delete(Cf::Meta, m))?;
                    Ok::<_, KvError>(())
                })?;
            }
            for chunk in c.unlogged.chunks(PAGE) {
                store.transact(|t| settle_unlogged(t, chunk, None))?;
            }
            return Ok(None);
        }
        if c.markers.is_empty() && c.base_for.is_empty() {
            return Ok(None);
        }
        match commit(store, &c)? {
            Outcome::Logged(seq) => return Ok(Some(seq)),
            Outcome::Stale => continue,
        }
    }
    Err(KvError::Other("the logger's snapshot kept going stale (16 rounds)".into()).into())
}

/// The parts of group `seq`, in order; `None` if it is not in the log.
pub fn read_group(store: &KvStore, seq: u64) -> Result<Option<Vec<LogPart>>, ReplicaError> {
    let (a, b) = log_group_range(seq);
    let mut raw = Vec::new();
    store.for_each(Cf::Meta, &a, &b, |_, v| {
        raw.push(v.to_vec());
        true
    })?;
    if raw.is_empty() {
        return Ok(None);
    }
    let parts = raw
        .iter()
        .map(|v| LogPart::decode(v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(parts))
}

/// Seqs, stored bytes and log times of the groups in the log, oldest first.
pub fn groups(store: &KvStore) -> Result<Vec<(u64, u64, Timestamp)>, ReplicaError> {
    let (a, b) = Prefix::Log.range();
    let mut out: Vec<(u64, u64, Timestamp)> = Vec::new();
    let mut bad = None;
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        let Some(seq) = k.get(1..9).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
            return true;
        };
        let seq = u64::from_be_bytes(seq);
        match out.last_mut() {
            Some(last) if last.0 == seq => last.1 += v.len() as u64,
            _ => match LogPart::decode(v) {
                Ok(p) => out.push((seq, v.len() as u64, p.at)),
                Err(e) => bad = Some(e),
            },
        }
        true
    })?;
    match bad {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// Drop the groups every replica has acknowledged (all of them when there is no replica),
/// with the block references they held. Returns how many were dropped.
pub fn trim(store: &KvStore) -> Result<u64, ReplicaError> {
    trim_from(store, &mut 0)
}

/// [`trim`] of the groups from `from` on; `from` moves past those trimmed.
fn trim_from(store: &KvStore, from: &mut u64) -> Result<u64, ReplicaError> {
    let reps = super::replicas(store)?;
    let keep_after = reps
        .iter()
        .filter(|(_, r)| r.base.is_some())
        .map(|(_, r)| r.acked)
        .min();
    let keep_after = match (keep_after, reps.is_empty()) {
        (Some(a), _) => a,
        (None, true) => u64::MAX,
        // Every replica still waits for its first group: the groups before it serve nobody.
        (None, false) => head(store)?.seq,
    };
    if keep_after < *from {
        return Ok(0);
    }
    // Only the keys of the groups to drop (a replica that is down leaves many in the log).
    let (_, end) = Prefix::Log.range();
    let mut seqs: Vec<u64> = Vec::new();
    store.for_each(Cf::Meta, &log_key(*from, 0), &end, |k, _| {
        let Some(seq) = k.get(1..9).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
            return true;
        };
        let seq = u64::from_be_bytes(seq);
        if seq > keep_after {
            return false;
        }
        if seqs.last() != Some(&seq) {
            seqs.push(seq);
        }
        true
    })?;
    let mut dropped = 0;
    for &seq in &seqs {
        drop_group(store, seq)?;
        dropped += 1;
        *from = seq + 1;
    }
    // Groups logged from now on come after the head, which is at least `keep_after` unless
    // there is no replica (then the next ones may be anywhere after those just dropped).
    if keep_after != u64::MAX {
        *from = (*from).max(keep_after + 1);
    }
    Ok(dropped)
}

fn drop_group(store: &KvStore, seq: u64) -> Result<(), ReplicaError> {
    let (a, b) = log_group_range(seq);
    store.transact(|t| scan_pages(t, Cf::Meta, &a, &b, |t, parts| drop_parts(t, parts)))
}

/// Drop the references of these parts of a group, and the parts.
fn drop_parts(t: &mut dyn Txn, parts: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), ReplicaError> {
    for (k, v) in parts {
        for ch in LogPart::decode(&v)?.changes {
            let Change::Put { cf, key, value } = ch else {
                continue;
            };
            let Some(cf) = cf_from_u8(cf) else { continue };
            let Some((h, _)) = names_block(cf, &key, &value)? else {
                continue;
            };
            // Still named by the same map entry (read with tracking): not the last
            // reference, and the sweeper need not look at it.
            let named = match cf {
                Cf::Fmap => t.get(Cf::Fmap, &key)?,
                _ => None,
            };
            match named.map(|v| FmapEntry::decode(&v)).transpose()? {
                Some(e) if e.hash == h => blocks::drop_ref_kept(t, &h)?,
                _ => blocks::drop_ref(t, &h)?,
            }
        }
        t.delete(Cf::Meta, &k)?;
    }
    Ok(())
}

/// Markers not yet logged.
pub fn marker_count(store: &KvStore) -> Result<u64, KvError> {
    let (a, b) = Prefix::Change.range();
    let mut n = 0;
    store.for_each(Cf::Meta, &a, &b, |_, _| {
        n += 1;
        true
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::keyspace::records::{Inode, Kind};
    use crate::kv::mem::MemEngine;
    use crate::util::Timestamp;

    /// Writers commit concurrently (markers settle out of order) while the logger rounds with
    /// its watermark; replaying every group in order gives exactly the store's final state.
    #[test]
    fn concurrent_commits_are_all_logged_in_an_order_that_replays() {
        let kv = Arc::new(KvStore::with_engine(Arc::new(MemEngine::new())));
        crate::replica::add(&kv, "r", "exec:x", None).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let mut writers = Vec::new();
            for w in 0..4u64 {
                let kv = kv.clone();
                writers.push(sc.spawn(move || {
                    for i in 0..1000u64 {
                        let ino = 100 + (w * 7 + i * 13) % 50;
                        let mut n = Inode::new_dir(0o755, 0, 0, 1, Timestamp::now());
                        n.kind = Kind::File;
                        n.size = w * 1000 + i;
                        kv.transact(|t| {
                            if i % 9 == 0 {
                                t.delete(Cf::Meta, &ks::inode_key(ino))
                            } else {
                                t.put(Cf::Meta, &ks::inode_key(ino), &n.encode()?)
                            }
                        })
                        .unwrap();
                    }
                }));
            }
            let kv = kv.clone();
            let stop = &stop;
            let logging = sc.spawn(move || {
                let mut logger = Logger::default();
                while !stop.load(Ordering::Relaxed) {
                    logger.round(&kv).unwrap();
                }
                // The last round with the same logger (a full scan would hide a lost marker).
                logger.round(&kv).unwrap();
            });
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            logging.join().unwrap();
        });
        let mut replayed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (seq, _, _) in groups(&kv).unwrap() {
            for p in read_group(&kv, seq).unwrap().unwrap() {
                for ch in p.changes {
                    match ch {
                        Change::Put { key, value, .. } => {
                            replayed.insert(key, value);
                        }
                        Change::Delete { key, .. } => {
                            replayed.remove(&key);
                        }
                        Change::Clear { start, end, .. } => {
                            replayed.retain(|k, _| !(start <= *k && *k < end));
                        }
                    }
                }
            }
        }
        let mut now = BTreeMap::new();
        let (a, b) = Prefix::Inode.range();
        kv.for_each(Cf::Meta, &a, &b, |k, v| {
            if crate::replica::shippable(Cf::Meta, k) {
                now.insert(k.to_vec(), v.to_vec());
            }
            true
        })
        .unwrap();
        assert_eq!(marker_count(&kv).unwrap(), 0, "every marker logged");
        assert_eq!(replayed, now);
    }
}
