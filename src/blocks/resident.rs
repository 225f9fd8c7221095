//! Residency: whether a block's content is here, when it was last used, and what the store
//! holds in all (keyspace.md, "Tiering").
//!
//! Every block with content here has one `A used hash` key: the last-use index, ordered by
//! time, from which eviction takes the coldest blocks without scanning the others. Its `b`
//! record says `used` (so the key can be found again) and `evicted`. Two merge counters sum
//! the stored bytes of resident and of evicted blocks (each kept in shards, summed by a short
//! scan), so `status` and the evictor need not add up the blocks. Every transaction that stores, frees, evicts or fetches a block keeps
//! the three in step; `audit` checks them against each other.

use super::encode;
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, COUNTER_EVICTED, COUNTER_RESIDENT};
use crate::kv::{decode_i64, Cf, KvError, KvStore, Txn};

/// Now, in the coarse Unix seconds of [`BlockInfo::used`].
pub fn now_secs() -> u32 {
    crate::util::Timestamp::now().secs.clamp(0, u32::MAX as i64) as u32
}

fn count(t: &mut dyn Txn, name: &str, delta: i64) -> Result<(), KvError> {
    if delta == 0 {
        return Ok(());
    }
    t.add_sum(Cf::Bidx, &ks::counter_key(name), delta)
}

/// A block just stored here (new, or its content back): indexed as used now and counted.
pub fn stored(t: &mut dyn Txn, h: &Hash, info: &mut BlockInfo) -> Result<(), KvError> {
    info.used = now_secs();
    info.evicted = false;
    if info.pins == 0 {
        t.put(Cf::Bidx, &ks::last_use_key(info.used, h), &[])?;
    }
    count(t, COUNTER_RESIDENT, info.stored as i64)
}

/// Delete block `h`'s value here. Whoever deletes a value deletes its `W` key too (see
/// `write_ahead`).
fn drop_value(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    t.delete(Cf::Blocks, &ks::block_key(h))?;
    t.delete(Cf::Blocks, &ks::written_ahead_key(h))
}

/// Free block `h` (nothing references it): its value, `b` record (`info`, if it has one)
/// and index key go, and its bytes leave the counters.
pub fn freed(t: &mut dyn Txn, h: &Hash, info: Option<&BlockInfo>) -> Result<(), KvError> {
    drop_value(t, h)?;
    t.delete(Cf::Bidx, &ks::block_info_key(h))?;
    match info {
        None => Ok(()),
        Some(i) if i.evicted => count(t, COUNTER_EVICTED, -(i.stored as i64)),
        Some(i) => {
            if i.pins == 0 {
                t.delete(Cf::Bidx, &ks::last_use_key(i.used, h))?;
            }
            count(t, COUNTER_RESIDENT, -(i.stored as i64))
        }
    }
}

/// Drop block `h`'s content here: the caller decided replicas hold it. The `b` record stays.
pub fn evict(t: &mut dyn Txn, h: &Hash, info: &mut BlockInfo) -> Result<(), KvError> {
    drop_value(t, h)?;
    t.delete(Cf::Bidx, &ks::last_use_key(info.used, h))?;
    info.evicted = true;
    t.put(Cf::Bidx, &ks::block_info_key(h), &info.encode()?)?;
    count(t, COUNTER_RESIDENT, -(info.stored as i64))?;
    count(t, COUNTER_EVICTED, info.stored as i64)
}

/// A block known only by name (a satellite's group names it; its upstream holds it): its
/// record, evicted from the start. Its stored size is not known until it is fetched: the
/// content length stands for it.
pub fn remote(t: &mut dyn Txn, h: &Hash, len: u32) -> Result<(), KvError> {
    let info = BlockInfo {
        len,
        stored: len,
        evicted: true,
        ..Default::default()
    };
    t.put(Cf::Bidx, &ks::block_info_key(h), &info.encode()?)?;
    count(t, COUNTER_EVICTED, len as i64)
}

/// Put an evicted block's content back (`value` a verified `B` value of it). Returns whether
/// it was stored (false: the block was freed or is back already).
pub fn restore(t: &mut dyn Txn, h: &Hash, value: &[u8]) -> Result<bool, KvError> {
    let key = ks::block_info_key(h);
    let Some(raw) = t.get(Cf::Bidx, &key)? else {
        return Ok(false);
    };
    let mut info = BlockInfo::decode(&raw)?;
    if !info.evicted {
        return Ok(false);
    }
    count(t, COUNTER_EVICTED, -(info.stored as i64))?;
    info.stored = value.len() as u32;
    info.encoding = encode::info_of(value).map_err(KvError::Other)?;
    t.put(Cf::Blocks, &ks::block_key(h), value)?;
    stored(t, h, &mut info)?;
    t.put(Cf::Bidx, &key, &info.encode()?)?;
    Ok(true)
}

/// Move block `h`'s index key to `secs` (a use seen since). Returns false when the block is
/// gone or evicted (nothing to move).
pub fn touch(t: &mut dyn Txn, h: &Hash, secs: u32) -> Result<bool, KvError> {
    let key = ks::block_info_key(h);
    let Some(raw) = t.get(Cf::Bidx, &key)? else {
        return Ok(false);
    };
    let mut info = BlockInfo::decode(&raw)?;
    if info.evicted || info.pins > 0 || info.used >= secs {
        return Ok(false);
    }
    t.delete(Cf::Bidx, &ks::last_use_key(info.used, h))?;
    t.put(Cf::Bidx, &ks::last_use_key(secs, h), &[])?;
    info.used = secs;
    t.put(Cf::Bidx, &key, &info.encode()?)?;
    Ok(true)
}

/// One more pin on block `h` (`up`) or one less. A pinned block leaves the last-use index
/// (eviction never looks at it); the last unpin puts it back. Returns the block's record
/// after the change, `None` if the block is gone.
pub fn pin(t: &mut dyn Txn, h: &Hash, up: bool) -> Result<Option<BlockInfo>, KvError> {
    let key = ks::block_info_key(h);
    let Some(raw) = t.get(Cf::Bidx, &key)? else {
        return Ok(None);
    };
    let mut info = BlockInfo::decode(&raw)?;
    let was = info.pins;
    info.pins = if up {
        was.saturating_add(1)
    } else {
        was.saturating_sub(1)
    };
    if !info.evicted {
        match (was, info.pins) {
            (0, n) if n > 0 => t.delete(Cf::Bidx, &ks::last_use_key(info.used, h))?,
            (w, 0) if w > 0 => t.put(Cf::Bidx, &ks::last_use_key(info.used, h), &[])?,
            _ => {}
        }
    }
    t.put(Cf::Bidx, &key, &info.encode()?)?;
    Ok(Some(info))
}

/// A new reference to `h` that the shipping log does not carry yet (only while the store has
/// replicas): until the logger takes it, the block may not be evicted. The token is unique,
/// so the logger clears only the mark it saw (see `replica::log`).
pub fn note_unlogged(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    if t.logs_changes() {
        t.put(
            Cf::Bidx,
            &ks::unlogged_key(h),
            &crate::util::rand_u64().to_le_bytes(),
        )?;
    }
    Ok(())
}

/// The store's resident and evicted stored bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub resident: u64,
    pub evicted: u64,
}

/// The sum of sharded counter `name`'s shards.
pub fn counter_sum(store: &KvStore, name: &str) -> Result<i64, KvError> {
    let (a, b) = ks::counter_shards(name);
    let mut sum = 0i64;
    store.for_each(Cf::Bidx, &a, &b, |_, v| {
        sum = sum.wrapping_add(decode_i64(v));
        true
    })?;
    Ok(sum)
}

pub fn totals(store: &KvStore) -> Result<Totals, KvError> {
    let get = |name| -> Result<u64, KvError> { Ok(counter_sum(store, name)?.max(0) as u64) };
    Ok(Totals {
        resident: get(COUNTER_RESIDENT)?,
        evicted: get(COUNTER_EVICTED)?,
    })
}

/// Index and count every block of a store made before tiering (format 3 and older): at the
/// upgrade, in bounded transactions. Each block is indexed as used at its upgrade.
pub fn index_existing(store: &KvStore) -> Result<u64, KvError> {
    let (start, end) = ks::Prefix::BlockInfo.range();
    let mut from = start;
    let mut n = 0;
    loop {
        let page = store.read(|s| s.scan(Cf::Bidx, &from, &end, 4096))?;
        let Some((last, _)) = page.last() else {
            return Ok(n);
        };
        from = last.clone();
        from.push(0);
        store.transact(|t| {
            for (k, v) in &page {
                let Some(h) = ks::key_hash(k) else { continue };
                let mut info = BlockInfo::decode(v)?;
                if t.get(Cf::Bidx, &ks::last_use_key(info.used, &h))?.is_some() || info.evicted {
                    continue;
                }
                stored(t, &h, &mut info)?;
                t.put(Cf::Bidx, k, &info.encode()?)?;
            }
            Ok::<_, KvError>(())
        })?;
        n += page.len() as u64;
    }
}
