//! The replica's side of a shipment: storing received blocks, applying a group.
//!
//! A received block is verified (its SHA-256 is its name) and stored with a **hold**: `H hash`
//! plus one reference, so that it is kept until the group that names it is applied, even
//! across a restart (the primary does not send it again: it asks first). Applying a group is
//! one transaction: every change, the references of the block maps it changes (a map entry
//! naming a block the replica does not hold is refused: blocks come first), the holds of the
//! blocks it names released, and `M replica` moved to the group's seq and chain; then a sync,
//! then the acknowledgement.

use super::wire::{chunk_sums, BlockSums, ByteBuf, CHUNK};
use super::{
    cf_from_u8, hold_key, primary_past_key, scan_pages, shippable, ships_past_hold, Change,
    ReplicaError, ReplicaState,
};
use crate::blocks::ahead::{self, Ahead};
use crate::blocks::{self, encode::Codec, resident, Prepared};
use crate::keyspace::records::{decode_counter, encode_counter, FmapEntry, GarbageRecord, Inode};
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{Cf, KvError, KvStore, Txn};
use crate::util::Timestamp;

/// The replica's state record (a store without one is not a replica).
pub fn state(store: &KvStore) -> Result<Option<ReplicaState>, ReplicaError> {
    store.read(|t| read_state(t))
}

pub(crate) fn read_state(t: &mut dyn Txn) -> Result<Option<ReplicaState>, ReplicaError> {
    match t.get(Cf::Meta, ks::META_REPLICA)? {
        Some(v) => Ok(Some(ReplicaState::decode(&v)?)),
        None => Ok(None),
    }
}

/// Mark a fresh store as a replica that has applied nothing.
pub fn init_state(store: &KvStore) -> Result<ReplicaState, ReplicaError> {
    let s = ReplicaState {
        applied: 0,
        chain: [0; 32],
        applied_at: None,
        promoted: None,
    };
    store.transact(|t| t.put(Cf::Meta, ks::META_REPLICA, &s.encode()?))?;
    store.sync()?;
    Ok(s)
}

/// Which of `hashes` this store holds.
pub fn holding(store: &KvStore, hashes: &[Hash]) -> Result<Vec<bool>, ReplicaError> {
    hashes
        .iter()
        .map(|h| Ok(store.get(Cf::Bidx, &ks::block_info_key(h))?.is_some()))
        .collect()
}

/// Verify a received block against its name and encode it the replica's way.
pub fn prepare_received(
    hash: &Hash,
    data: &[u8],
    block_size: u32,
    codec: &Codec,
) -> Result<Prepared, String> {
    if data.is_empty() || data.len() > block_size as usize {
        return Err(format!(
            "block {} of {} bytes (1 to {block_size} allowed)",
            ks::hex(hash),
            data.len()
        ));
    }
    if blocks::hash(data) != *hash {
        return Err(format!(
            "block {}: content does not match its name (SHA-256)",
            ks::hex(hash)
        ));
    }
    Ok(Prepared {
        hash: *hash,
        len: data.len() as u32,
        encoded: blocks::encode::encode(codec, data),
    })
}

/// Store verified blocks with a hold each, durably. A batch of 4 MiB or more goes past the
/// engine's log (the write-ahead path of a flush: `blocks::ahead`), so received bytes reach
/// the disk once.
pub fn store_held(store: &KvStore, received: &[Prepared]) -> Result<(), ReplicaError> {
    if received.is_empty() {
        return Ok(());
    }
    let refs: Vec<&Prepared> = received.iter().collect();
    let ahead = ahead::write_ahead(store, &refs)?;
    let named = store.transact(|t| {
        let mut named = Vec::new();
        for b in received {
            let hk = hold_key(&b.hash);
            if t.get(Cf::Bidx, &hk)?.is_none() {
                t.put(Cf::Bidx, &hk, &[])?;
                blocks::add_ref(t, b, Ahead::token_for(ahead.as_ref(), &b.hash))?;
                named.push(b.hash);
            }
        }
        Ok::<_, KvError>(named)
    });
    let named = match named {
        Ok(n) => n,
        Err(e) => {
            if let Some(a) = &ahead {
                ahead::settle_flush(store, a, &[]);
            }
            return Err(e.into());
        }
    };
    store.sync()?;
    if let Some(a) = &ahead {
        ahead::settle_flush(store, a, &named);
    }
    Ok(())
}

/// The checksums of the block this replica holds at block-map `key`, if any (what the primary
/// computes a delta against). A block that cannot be read counts as none: it is then sent
/// whole.
pub fn block_sums(store: &KvStore, key: &[u8]) -> Result<Option<BlockSums>, ReplicaError> {
    if key.len() != 17 || key[0] != Prefix::Fmap.byte() {
        return Err(ReplicaError::Refused {
            peer: "primary".into(),
            reason: format!("{} is not a block-map key", ks::describe_key(key)),
        });
    }
    let Some(v) = store.get(Cf::Fmap, key)? else {
        return Ok(None);
    };
    let e = FmapEntry::decode(&v)?;
    Ok(blocks::read_stored(store, &e.hash, e.len)
        .ok()
        .map(|content| BlockSums {
            hash: e.hash,
            len: e.len,
            chunks: chunk_sums(&content),
        }))
}

/// Rebuild a block sent as a delta against `base`, a block this replica holds; the caller
/// checks the result against its name.
pub fn rebuild(
    store: &KvStore,
    base: &Hash,
    chunks: &[Option<ByteBuf>],
    block_size: u32,
) -> Result<Vec<u8>, String> {
    let bad = |why: String| format!("delta against block {}: {why}", ks::hex(base));
    if chunks.len() > (block_size as usize).div_ceil(CHUNK) {
        return Err(bad(format!("{} chunks", chunks.len())));
    }
    let info = store
        .get(Cf::Bidx, &ks::block_info_key(base))
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no such block here".into()))?;
    let len = crate::keyspace::records::BlockInfo::decode(&info)
        .map_err(|e| bad(e.to_string()))?
        .len;
    let old = blocks::read_stored(store, base, len).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(block_size as usize);
    for (i, c) in chunks.iter().enumerate() {
        match c {
            Some(b) if b.0.len() <= CHUNK => out.extend_from_slice(&b.0),
            Some(b) => return Err(bad(format!("a chunk of {} bytes", b.0.len()))),
            None => {
                let from = i * CHUNK;
                let piece = old
                    .get(from..(from + CHUNK).min(old.len()))
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad(format!("chunk {i} is past its end")))?;
                out.extend_from_slice(piece);
            }
        }
        if out.len() > block_size as usize {
            return Err(bad("larger than a block".into()));
        }
    }
    Ok(out)
}

fn fmap_hash(v: &[u8]) -> Result<Hash, ReplicaError> {
    Ok(FmapEntry::decode(v)?.hash)
}

/// Delete one shippable key the way its removal on the primary would: a map entry drops its
/// block reference, an inode its garbage mark.
fn remove_key(t: &mut dyn Txn, cf: Cf, key: &[u8]) -> Result<(), ReplicaError> {
    let Some(old) = t.get(cf, key)? else {
        return Ok(());
    };
    if cf == Cf::Fmap {
        blocks::drop_ref(t, &fmap_hash(&old)?)?;
    }
    if cf == Cf::Meta && key.len() == 9 && key[0] == Prefix::Inode.byte() {
        if let Some(ino) = ks::key_ino(key) {
            t.delete(Cf::Meta, &ks::garbage_key(ino))?;
        }
    }
    t.delete(cf, key)?;
    Ok(())
}

fn put_key(
    t: &mut dyn Txn,
    cf: Cf,
    key: &[u8],
    value: &[u8],
    named: &mut Vec<Hash>,
    satellite: bool,
) -> Result<(), ReplicaError> {
    if cf == Cf::Fmap {
        let entry = FmapEntry::decode(value)?;
        let new = entry.hash;
        let known = t.get(Cf::Bidx, &ks::block_info_key(&new))?.is_some();
        if !known && satellite {
            // Fetched from the upstream when first read.
            if entry.len == 0 || entry.len > blocks::encode::MAX_CONTENT {
                return Err(ReplicaError::Refused {
                    peer: "upstream".into(),
                    reason: format!(
                        "{} names a block of {} bytes",
                        ks::describe_key(key),
                        entry.len
                    ),
                });
            }
            resident::remote(t, &new, entry.len)?;
        } else if !known {
            return Err(ReplicaError::Refused {
                peer: "primary".into(),
                reason: format!(
                    "group names block {} for {}, which was never sent",
                    ks::hex(&new),
                    ks::describe_key(key)
                ),
            });
        }
        blocks::add_shared_ref(t, &new)?;
        if let Some(old) = t.get(Cf::Fmap, key)? {
            blocks::drop_ref(t, &fmap_hash(&old)?)?;
        }
        named.push(new);
    }
    if cf == Cf::Meta && key.len() == 9 && key[0] == Prefix::Inode.byte() {
        // An inode the primary still has open after its last name went: kept, as there, under
        // a garbage mark (the replica's sweeper never runs on it; `serve` owns the store).
        let ino = ks::key_ino(key).unwrap_or(0);
        if Inode::decode(value)?.nlink == 0 {
            let g = GarbageRecord {
                since: Timestamp::now(),
            };
            t.put(Cf::Meta, &ks::garbage_key(ino), &g.encode()?)?;
        } else {
            t.delete(Cf::Meta, &ks::garbage_key(ino))?;
        }
    }
    t.put(cf, key, value)?;
    Ok(())
}

fn apply_change(
    t: &mut dyn Txn,
    ch: &Change,
    named: &mut Vec<Hash>,
    satellite: bool,
) -> Result<(), ReplicaError> {
    let bad = |cf: u8| ReplicaError::Refused {
        peer: "primary".into(),
        reason: format!("change names unknown column family {cf}"),
    };
    match ch {
        Change::Put { cf, key, value } => {
            let c = cf_from_u8(*cf).ok_or_else(|| bad(*cf))?;
            if ships_past_hold(c, key) {
                return hold_for_primary_past(t, key, named, satellite);
            }
            if !shippable(c, key) {
                return Err(refused_key(key));
            }
            put_key(t, c, key, value, named, satellite)
        }
        Change::Delete { cf, key } => {
            let c = cf_from_u8(*cf).ok_or_else(|| bad(*cf))?;
            if ships_past_hold(c, key) {
                return release_primary_past(
                    t,
                    &ks::key_hash(key).ok_or_else(|| refused_key(key))?,
                );
            }
            if !shippable(c, key) {
                return Err(refused_key(key));
            }
            remove_key(t, c, key)
        }
        Change::Clear { cf, start, end } => {
            let c = cf_from_u8(*cf).ok_or_else(|| bad(*cf))?;
            if c == Cf::Bidx && start.first() == Some(&Prefix::PastHold.byte()) {
                // The primary's past holds, all of them given again after this.
                let (a, b) = Prefix::PrimaryPast.range();
                return scan_pages(t, Cf::Bidx, &a, &b, |t, page| {
                    page.iter()
                        .filter_map(|(k, _)| ks::key_hash(k))
                        .try_for_each(|h| release_primary_past(t, &h))
                });
            }
            scan_pages(t, c, start, end, |t, page| {
                page.iter()
                    .filter(|(k, _)| shippable(c, k))
                    .try_for_each(|(k, _)| remove_key(t, c, k))
            })
        }
    }
}

/// The primary's history names the block of past-hold key `key` (`V hash`): this replica holds
/// it (one reference, under `P hash`) until the primary's trimming ends it. A satellite keeps
/// none: it evicts what its upstream holds anyway.
fn hold_for_primary_past(
    t: &mut dyn Txn,
    key: &[u8],
    named: &mut Vec<Hash>,
    satellite: bool,
) -> Result<(), ReplicaError> {
    let h = ks::key_hash(key).ok_or_else(|| refused_key(key))?;
    if satellite {
        return Ok(());
    }
    if t.get(Cf::Bidx, &ks::block_info_key(&h))?.is_none() {
        return Err(ReplicaError::Refused {
            peer: "primary".into(),
            reason: format!(
                "group names block {} for the primary's history, which was never sent",
                ks::hex(&h)
            ),
        });
    }
    let pk = primary_past_key(&h);
    if t.get(Cf::Bidx, &pk)?.is_none() {
        t.put(Cf::Bidx, &pk, &[])?;
        blocks::add_shared_ref(t, &h)?;
    }
    named.push(h);
    Ok(())
}

/// The primary's history no longer names block `h`: the hold goes.
fn release_primary_past(t: &mut dyn Txn, h: &Hash) -> Result<(), ReplicaError> {
    let pk = primary_past_key(h);
    if t.get(Cf::Bidx, &pk)?.is_some() {
        t.delete(Cf::Bidx, &pk)?;
        blocks::drop_ref(t, h)?;
    }
    Ok(())
}

fn refused_key(key: &[u8]) -> ReplicaError {
    ReplicaError::Refused {
        peer: "primary".into(),
        reason: format!(
            "group writes {}, which is not shipped",
            ks::describe_key(key)
        ),
    }
}

/// Apply group `seq` (all its parts' changes, in order) in one transaction and sync it.
/// `prev` must be what this replica applied last, unless it is fresh and this is the group
/// that gives it the whole filesystem. A `satellite` takes map entries naming blocks it does
/// not hold as evicted blocks (its upstream holds them); a replica refuses them. `at` is the
/// moment the primary took the group (nanoseconds), under which history records it.
pub fn apply_group(
    store: &KvStore,
    seq: u64,
    prev: &Hash,
    chain: &Hash,
    changes: &[Change],
    satellite: bool,
    at: Option<u64>,
) -> Result<ReplicaState, ReplicaError> {
    let refuse = |reason: String| ReplicaError::Refused {
        peer: "primary".into(),
        reason,
    };
    let is_base = matches!(changes.first(), Some(Change::Clear { .. }));
    // With satellites, what this transaction changes is logged for them (the tracker's
    // marker); say up to where (`M logged`, see `rebase_satellites_if_unlogged`).
    let logging = store.tracks_changes();
    let st = store.transact(|t| {
        // A replica keeping history keeps this state as of when its primary took it.
        if let Some(at) = at {
            t.record_at(at);
        }
        let mut st = read_state(t)?.ok_or_else(|| refuse("this store is not a replica".into()))?;
        if st.promoted.is_some() {
            return Err(refuse("this replica was promoted to a primary".into()));
        }
        // A base group gives the whole filesystem: a fresh replica starts with it, and one
        // its primary made start over (it lost acknowledged groups; or its satellites missed
        // changes) takes it in place of everything it holds.
        if !(is_base && seq > st.applied) && (seq != st.applied + 1 || *prev != st.chain) {
            return Err(refuse(format!(
                "group {seq} does not follow group {} applied here",
                st.applied
            )));
        }
        let mut named = Vec::new();
        let mut max_ino = 0;
        for ch in changes {
            apply_change(t, ch, &mut named, satellite)?;
            if let Change::Put { key, .. } = ch {
                if key.len() == 9 && key[0] == Prefix::Inode.byte() {
                    max_ino = max_ino.max(ks::key_ino(key).unwrap_or(0));
                }
            }
        }
        // Kept above every inode, as on a primary (a promoted replica allocates from it).
        let next = match t.get(Cf::Meta, ks::META_NEXT_INO)? {
            Some(v) => decode_counter(&v)?,
            None => 0,
        };
        if max_ino >= next {
            t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(max_ino + 1))?;
        }
        named.sort_unstable();
        named.dedup();
        for h in &named {
            let hk = hold_key(h);
            if t.get(Cf::Bidx, &hk)?.is_some() {
                t.delete(Cf::Bidx, &hk)?;
                // The group's map entries added a reference in this transaction.
                blocks::drop_ref_kept(t, h)?;
            }
        }
        if logging {
            t.put(Cf::Meta, ks::META_LOGGED, &encode_counter(seq))?;
        }
        st.applied = seq;
        st.chain = *chain;
        st.applied_at = Some(Timestamp::now());
        t.put(Cf::Meta, ks::META_REPLICA, &st.encode()?)?;
        Ok(st)
    })?;
    store.sync()?;
    Ok(st)
}

/// `kvfs promote`: this replica becomes the primary of its filesystem. It keeps what it
/// applied; inode numbers continue after the highest it holds; blocks held for groups that
/// will never come are released. It refuses shipments from then on.
pub fn promote(store: &KvStore) -> Result<ReplicaState, ReplicaError> {
    let (a, b) = Prefix::Inode.range();
    let mut max_ino = ks::ROOT_INO;
    store.for_each(Cf::Meta, &a, &b, |k, _| {
        if let Some(ino) = ks::key_ino(k) {
            max_ino = max_ino.max(ino);
        }
        true
    })?;
    // Blocks held for groups that will never come, and for the old primary's history (which
    // a promoted replica does not have).
    let mut holds = Vec::new();
    for p in [Prefix::Hold, Prefix::PrimaryPast] {
        let (ha, hb) = p.range();
        store.for_each(Cf::Bidx, &ha, &hb, |k, _| {
            holds.push(k.to_vec());
            true
        })?;
    }
    let st = store.transact(|t| {
        let mut st = read_state(t)?.ok_or_else(|| ReplicaError::Refused {
            peer: "promote".into(),
            reason: "this store is not a replica".into(),
        })?;
        if st.promoted.is_some() {
            return Err(ReplicaError::Refused {
                peer: "promote".into(),
                reason: "this store was promoted already".into(),
            });
        }
        if t.get(Cf::Meta, ks::META_UPSTREAM)?.is_some() {
            return Err(ReplicaError::Refused {
                peer: "promote".into(),
                reason: "a satellite holds only what it fetched: it cannot become a primary (clone from a replica or promote one)".into(),
            });
        }
        st.promoted = Some(Timestamp::now());
        t.put(Cf::Meta, ks::META_REPLICA, &st.encode()?)?;
        let next = match t.get(Cf::Meta, ks::META_NEXT_INO)? {
            Some(v) => decode_counter(&v)?,
            None => 0,
        }
        .max(max_ino + 1);
        t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(next))?;
        for k in &holds {
            if let Some(h) = ks::key_hash(k) {
                t.delete(Cf::Bidx, k)?;
                blocks::drop_ref(t, &h)?;
            }
        }
        Ok(st)
    })?;
    blocks::collect_all_garbage(store)?;
    store.sync()?;
    Ok(st)
}

/// Whether the store is a replica that still follows a primary (not promoted).
pub fn is_follower_store(store: &KvStore) -> Result<bool, ReplicaError> {
    Ok(state(store)?.is_some_and(|s| s.promoted.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_store() -> (tempfile::TempDir, KvStore) {
        let (d, s) = crate::blocks::tests::store();
        init_state(&s).unwrap();
        (d, s)
    }

    fn put_map(ino: u64, h: Hash, len: u32) -> Change {
        Change::Put {
            cf: Cf::Fmap.index() as u8,
            key: ks::fmap_key(ino, 0),
            value: FmapEntry { hash: h, len }.encode().unwrap(),
        }
    }

    fn base(changes: Vec<Change>) -> Vec<Change> {
        let (start, end) = Prefix::Fmap.range();
        let mut all = vec![Change::Clear {
            cf: Cf::Fmap.index() as u8,
            start,
            end,
        }];
        all.extend(changes);
        all
    }

    #[test]
    fn a_satellite_takes_blocks_it_lacks_as_evicted_and_a_replica_refuses_them() {
        let h = [9u8; 32];
        let group = base(vec![put_map(5, h, 1000)]);
        let (_d, replica) = replica_store();
        let e = apply_group(&replica, 1, &[0; 32], &[1; 32], &group, false, None).unwrap_err();
        assert!(e.to_string().contains("never sent"), "{e}");

        let (_d, sat) = replica_store();
        apply_group(&sat, 1, &[0; 32], &[1; 32], &group, true, None).unwrap();
        let info = sat.get(Cf::Bidx, &ks::block_info_key(&h)).unwrap().unwrap();
        let info = crate::keyspace::records::BlockInfo::decode(&info).unwrap();
        assert!(info.evicted && info.len == 1000 && info.stored == 1000);
        assert_eq!(sat.transact(|t| blocks::refcount(t, &h)).unwrap(), 1);
        let evicted = || resident::counter_sum(&sat, ks::COUNTER_EVICTED).unwrap();
        assert_eq!(evicted(), 1000);
        // A map entry of an impossible size is refused, not recorded.
        let bad = vec![put_map(6, [8; 32], 0)];
        assert!(apply_group(&sat, 2, &[1; 32], &[2; 32], &bad, true, None).is_err());

        // The upstream drops the file: the block goes, its bytes leave the counter.
        let del = vec![Change::Delete {
            cf: Cf::Fmap.index() as u8,
            key: ks::fmap_key(5, 0),
        }];
        apply_group(&sat, 2, &[1; 32], &[2; 32], &del, true, None).unwrap();
        blocks::collect_all_garbage(&sat).unwrap();
        assert!(sat
            .get(Cf::Bidx, &ks::block_info_key(&h))
            .unwrap()
            .is_none());
        assert_eq!(evicted(), 0);
    }

    #[test]
    fn satellites_of_a_replica_start_over_when_groups_were_applied_unlogged() {
        let (_d, r) = replica_store();
        let g = |ino: u64| vec![put_map(ino, [ino as u8; 32], 100)];
        apply_group(&r, 1, &[0; 32], &[1; 32], &base(g(5)), true, None).unwrap();
        let fp = Some(format!("SHA256:{}", "ab".repeat(32)));
        crate::replica::add(&r, "laptop", crate::replica::SATELLITE_URL, fp).unwrap();
        assert!(
            r.tracks_changes(),
            "a replica with a satellite logs what it applies"
        );
        crate::replica::log::round(&r).unwrap();
        let rec = || crate::replica::ship::record(&r, "laptop").unwrap().unwrap();
        assert!(rec().base.is_some());
        let rebase = || crate::replica::rebase_satellites_if_unlogged(&r).unwrap();
        apply_group(&r, 2, &[1; 32], &[2; 32], &g(6), true, None).unwrap();
        assert_eq!(rebase(), 0);
        // A build that kept no log for the satellites applies group 3.
        r.track_changes(None);
        apply_group(&r, 3, &[2; 32], &[3; 32], &g(7), true, None).unwrap();
        assert_eq!(rebase(), 1);
        assert!(rec().base.is_none());
        assert_eq!(rebase(), 0);

        // A base group replaces whatever a replica holds; one not past what it applied does not.
        assert!(apply_group(&r, 3, &[9; 32], &[4; 32], &base(g(8)), true, None).is_err());
        let st = apply_group(&r, 9, &[9; 32], &[9; 32], &base(g(8)), true, None).unwrap();
        assert_eq!(st.applied, 9);
        let maps = |ino| r.get(Cf::Fmap, &ks::fmap_key(ino, 0)).unwrap().is_some();
        assert!(!maps(5) && !maps(6) && !maps(7) && maps(8));
    }

    fn past_hold(h: &Hash, n: Option<i64>) -> Change {
        let (cf, key) = (Cf::Bidx.index() as u8, ks::past::past_hold_key(h));
        match n {
            Some(n) => Change::Put {
                cf,
                key,
                value: n.to_le_bytes().to_vec(),
            },
            None => Change::Delete { cf, key },
        }
    }

    #[test]
    fn the_primarys_past_holds_keep_blocks_until_they_end() {
        let data = vec![7u8; 3000];
        let h = blocks::hash(&data);
        let b = prepare_received(&h, &data, 65536, &Codec::default()).unwrap();
        let (_d, r) = replica_store();
        let refs = |r: &KvStore| r.transact(|t| blocks::refcount(t, &h)).unwrap();
        let stored = |r: &KvStore| r.get(Cf::Bidx, &ks::block_info_key(&h)).unwrap().is_some();
        // Named by a past hold before it was sent: refused.
        let e = apply_group(
            &r,
            1,
            &[0; 32],
            &[1; 32],
            &[past_hold(&h, Some(1))],
            false,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("never sent"), "{e}");
        // A base group naming the block by a past hold only: held by `P`, not by `H`.
        store_held(&r, std::slice::from_ref(&b)).unwrap();
        let (start, end) = Prefix::PastHold.range();
        let clear = Change::Clear {
            cf: Cf::Bidx.index() as u8,
            start,
            end,
        };
        let g1 = base(vec![clear.clone(), past_hold(&h, Some(2))]);
        apply_group(&r, 1, &[0; 32], &[1; 32], &g1, false, None).unwrap();
        assert_eq!(refs(&r), 1);
        assert!(r.get(Cf::Bidx, &primary_past_key(&h)).unwrap().is_some());
        // A later count changes nothing; a file naming it adds its own reference.
        let g2 = vec![past_hold(&h, Some(3)), put_map(5, h, 3000)];
        apply_group(&r, 2, &[1; 32], &[2; 32], &g2, false, None).unwrap();
        assert_eq!(refs(&r), 2);
        // The file goes: the past still holds it.
        let del = Change::Delete {
            cf: Cf::Fmap.index() as u8,
            key: ks::fmap_key(5, 0),
        };
        apply_group(&r, 3, &[2; 32], &[3; 32], &[del], false, None).unwrap();
        blocks::collect_all_garbage(&r).unwrap();
        assert!(stored(&r) && refs(&r) == 1);
        // A new base clears the holds and gives them again; then the past lets go of it.
        let g4 = base(vec![clear, past_hold(&h, Some(1))]);
        apply_group(&r, 4, &[3; 32], &[4; 32], &g4, false, None).unwrap();
        assert_eq!(refs(&r), 1);
        apply_group(
            &r,
            5,
            &[4; 32],
            &[5; 32],
            &[past_hold(&h, None)],
            false,
            None,
        )
        .unwrap();
        blocks::collect_all_garbage(&r).unwrap();
        assert!(!stored(&r), "the block outlived the past that held it");

        // A satellite keeps no past hold (its upstream holds what it evicts).
        let (_d, sat) = replica_store();
        store_held(&sat, std::slice::from_ref(&b)).unwrap();
        let g = base(vec![past_hold(&h, Some(1))]);
        apply_group(&sat, 1, &[0; 32], &[1; 32], &g, true, None).unwrap();
        assert!(sat.get(Cf::Bidx, &primary_past_key(&h)).unwrap().is_none());

        // A promoted replica drops them: it has no past of its old primary's.
        let (_d, r) = replica_store();
        store_held(&r, std::slice::from_ref(&b)).unwrap();
        apply_group(&r, 1, &[0; 32], &[1; 32], &g, false, None).unwrap();
        assert_eq!(refs(&r), 1);
        promote(&r).unwrap();
        assert!(!stored(&r));
    }
}
