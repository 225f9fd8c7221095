//! The write-ahead token protocol, in one place. A flush with enough new blocks stores their
//! values ahead of its transaction ([`write_ahead`]): outside it, past the engine's log, on
//! disk before the commit that names them. Each value goes with a `W hash` key holding a
//! fresh random token; the transaction names the block without storing it again only if it
//! reads its own token there (`add_ref`). Whoever deletes a `B` value deletes its `W` key in
//! the same transaction, so the token proves the value is the one written and synced, and a
//! delete after the read makes the commit retry. After the commit, [`settle_flush`] forgets
//! the `W` keys of the named blocks and drops the values nothing names; a crash in between
//! leaves `W` keys to [`recover_written_ahead`] (mount start and exit, `kvfs gc`).

use std::collections::HashSet;

use super::Prepared;
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash};
use crate::kv::{Cf, KvError, KvStore};

/// New blocks of one flush that add up to this many stored bytes have their values written
/// ahead instead of through the transaction. Each write-ahead flushes the blocks family's
/// memtable (a table file and a blob file, synced), which costs more than logging a small
/// write twice; a bulk write flushes 8 MiB at a time.
pub const WRITE_AHEAD_MIN: usize = 4 << 20;

/// Blocks whose values [`write_ahead`] stored, and the token it wrote in their `W` keys.
#[derive(Debug)]
pub struct Ahead {
    pub token: u64,
    pub hashes: HashSet<Hash>,
}

impl Ahead {
    /// The token to hand `add_ref` for `h`, if `h` was written ahead.
    pub fn token_for(ahead: Option<&Ahead>, h: &Hash) -> Option<u64> {
        ahead.filter(|a| a.hashes.contains(h)).map(|a| a.token)
    }
}

/// Store the values of those of `blocks` that are not stored yet, outside any transaction and
/// on disk when this returns ([`KvStore::store_bulk_durably`]), if they add up to
/// [`WRITE_AHEAD_MIN`] bytes or more, each with a `W hash` key holding a fresh token.
pub fn write_ahead(store: &KvStore, blocks: &[&Prepared]) -> Result<Option<Ahead>, KvError> {
    let mut new: Vec<&Prepared> = Vec::new();
    let mut seen = HashSet::new();
    let mut bytes = 0;
    for b in blocks {
        if seen.insert(b.hash) && store.get(Cf::Bidx, &ks::block_info_key(&b.hash))?.is_none() {
            bytes += b.encoded.value.len();
            new.push(b);
        }
    }
    if bytes < WRITE_AHEAD_MIN {
        return Ok(None);
    }
    let token = crate::util::rand_u64() | 1;
    let tok = token.to_le_bytes();
    let mut pairs = Vec::with_capacity(new.len() * 2);
    for b in &new {
        pairs.push((ks::block_key(&b.hash), &b.encoded.value[..]));
        pairs.push((ks::written_ahead_key(&b.hash), &tok[..]));
    }
    store.store_bulk_durably(Cf::Blocks, &pairs)?;
    Ok(Some(Ahead {
        token,
        hashes: new.iter().map(|b| b.hash).collect(),
    }))
}

/// After the transaction that named them committed: their `W` keys go (logged, not synced; a
/// crash that loses this leaves them to [`recover_written_ahead`]).
pub fn forget_written_ahead(store: &KvStore, hashes: &[Hash]) -> Result<(), KvError> {
    let keys: Vec<Vec<u8>> = hashes.iter().map(ks::written_ahead_key).collect();
    store.delete_unsynced(Cf::Blocks, &keys)
}

/// Settle one written-ahead block: its `W` key goes, and its value too unless a committed `b`
/// key names it. With `token`, only if `W` still holds that token (else another writer's
/// write-ahead of the same content owns it now). Returns whether the value was dropped.
fn settle_written_ahead(store: &KvStore, h: &Hash, token: Option<u64>) -> Result<bool, KvError> {
    store.transact(|t| {
        let w_key = ks::written_ahead_key(h);
        let Some(w) = t.get(Cf::Blocks, &w_key)? else {
            return Ok(false);
        };
        if token.is_some_and(|tok| w != tok.to_le_bytes()) {
            return Ok(false);
        }
        t.delete(Cf::Blocks, &w_key)?;
        // A `b` key names the value, unless it says the block was evicted (its content then
        // lives on replicas, and a value here would be stray).
        if let Some(raw) = t.get(Cf::Bidx, &ks::block_info_key(h))? {
            if !BlockInfo::decode(&raw)?.evicted {
                return Ok(false);
            }
        }
        t.delete(Cf::Blocks, &ks::block_key(h))?;
        Ok(true)
    })
}

/// After a flush that wrote `hashes` ahead with `token` did not name them (its transaction
/// failed, or the data changed meanwhile): drop the values nothing names.
pub fn drop_written_ahead(store: &KvStore, hashes: &[Hash], token: u64) -> Result<u64, KvError> {
    let mut dropped = 0;
    for h in hashes.iter().collect::<HashSet<_>>() {
        dropped += settle_written_ahead(store, h, Some(token))? as u64;
    }
    Ok(dropped)
}

/// Settle every `W` key (a crash between a write-ahead and its commit leaves them): values no
/// `b` key names are deleted. With `dry_run`, only counts them. Returns values dropped.
pub fn recover_written_ahead(store: &KvStore, dry_run: bool) -> Result<u64, KvError> {
    let (s, e) = ks::Prefix::WrittenAhead.range();
    let mut hashes = Vec::new();
    store.for_each(Cf::Blocks, &s, &e, |k, _| {
        hashes.extend(ks::key_hash(k));
        true
    })?;
    let mut n = 0;
    for h in &hashes {
        n += if dry_run {
            store.get(Cf::Bidx, &ks::block_info_key(h))?.is_none() as u64
        } else {
            settle_written_ahead(store, h, None)? as u64
        };
    }
    Ok(n)
}

/// After the commit of a flush that wrote `ahead`: forget the `W` keys of the blocks it named
/// and drop the values of the others unless something else names them. Best effort: what
/// fails here the next mount recovers.
pub fn settle_flush(store: &KvStore, ahead: &Ahead, named: &[Hash]) {
    let unused: Vec<Hash> = ahead
        .hashes
        .iter()
        .filter(|h| !named.contains(h))
        .copied()
        .collect();
    let r = forget_written_ahead(store, named)
        .and_then(|_| drop_written_ahead(store, &unused, ahead.token).map(|_| ()));
    if let Err(e) = r {
        tracing::warn!(error = %e, blocks = ahead.hashes.len(),
            "written-ahead blocks not settled; the next mount recovers them");
    }
}
