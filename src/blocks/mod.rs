//! Content blocks: naming, dedup, reference counting and freeing.
//!
//! A block's content is the file's bytes for one block-sized slot with trailing zeros removed;
//! an all-zero slot has no content and is a hole (no map entry). The block is named by the
//! SHA-256 of its content and stored once (`B hash`, with facts in `b hash`). References are
//! counted in [`REF_SHARDS`] merge-counter shards (`r hash shard`), so writers adding the same
//! block in parallel touch different keys. Dropping a reference writes a `G hash shard`
//! candidate; [`collect_garbage`] later frees blocks whose shards sum to zero, reading every
//! shard with conflict tracking so a concurrent new reference makes one side retry.
//! How the content is stored (plain, compressed, with parity) is [`encode`]'s business.
//!
//! Bulk writes store their new blocks' values ahead of the transaction (the token protocol of
//! [`ahead`]): outside it, on disk before the commit that names them; [`add_ref`] names such
//! a block only on proof that its value is the one written ahead.

pub mod cache;
pub mod encode;
pub mod prefetch;
pub mod reader;
pub mod resident;

pub mod ahead;
pub use ahead::{
    drop_written_ahead, forget_written_ahead, recover_written_ahead, settle_flush, write_ahead,
    Ahead, WRITE_AHEAD_MIN,
};

use sha2::{Digest, Sha256};

pub use encode::Codec;

use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, REF_SHARDS};
use crate::kv::{decode_i64, Cf, KvError, KvStore, Txn};

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("corrupt block {}: {reason}", ks::hex(hash))]
    Corrupt { hash: Hash, reason: String },
    /// No value stored under the name (freed since its map entry was read, or lost).
    #[error("block {} missing", ks::hex(hash))]
    Missing { hash: Hash },
    /// Evicted, and no replica gave it back (down, timed out, or without it).
    #[error(
        "block {} is evicted and could not be fetched: {reason}",
        ks::hex(hash)
    )]
    Unavailable { hash: Hash, reason: String },
}

/// A block ready to be referenced: its name, content length and encoded value.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub hash: Hash,
    /// Plain content length.
    pub len: u32,
    pub encoded: encode::Encoded,
}

/// Content of a slot: `buf` without trailing zeros. `None` for a hole.
pub fn content(buf: &[u8]) -> &[u8] {
    let end = buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    &buf[..end]
}

pub fn hash(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// Trim, hash and encode a slot outside any transaction (hashing and compression are the
/// expensive part, so they must not be redone when a transaction retries). `None` means the
/// slot is all zeros.
pub fn prepare(slot: &[u8], codec: &Codec) -> Option<Prepared> {
    let data = content(slot);
    if data.is_empty() {
        return None;
    }
    Some(Prepared {
        hash: hash(data),
        len: data.len() as u32,
        encoded: encode::encode(codec, data),
    })
}

/// [`prepare`] for many slots at once, spread over the machine's cores: hashing and
/// compression are the CPU-heavy part of a flush.
pub fn prepare_all(slots: &[(u64, &[u8])], codec: &Codec) -> Vec<(u64, Option<Prepared>)> {
    if slots.len() < 2 {
        return slots.iter().map(|(n, s)| (*n, prepare(s, codec))).collect();
    }
    // Asked once: available_parallelism reads the cgroup's CPU quota (four statx and several
    // reads each time), and an fsync-heavy writer flushed once per 4 KiB write.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    });
    if threads < 2 {
        return slots.iter().map(|(n, s)| (*n, prepare(s, codec))).collect();
    }
    let per = slots.len().div_ceil(threads);
    std::thread::scope(|sc| {
        let parts: Vec<_> = slots
            .chunks(per)
            .map(|part| {
                sc.spawn(move || {
                    part.iter()
                        .map(|(n, s)| (*n, prepare(s, codec)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn shard() -> u8 {
    (crate::util::rand_u64() % REF_SHARDS as u64) as u8
}

/// Add one reference to `b`, storing it if it is new (or its content back if it was
/// evicted), unless `ahead` is the token [`write_ahead`] stored it with and `W` still holds
/// that token.
pub fn add_ref(t: &mut dyn Txn, b: &Prepared, ahead: Option<u64>) -> Result<(), KvError> {
    let info_key = ks::block_info_key(&b.hash);
    match t.get(Cf::Bidx, &info_key)? {
        None => {
            let mut info = BlockInfo {
                len: b.len,
                stored: b.encoded.value.len() as u32,
                encoding: b.encoded.info,
                ..Default::default()
            };
            let stored = match ahead {
                Some(tok) => {
                    t.get(Cf::Blocks, &ks::written_ahead_key(&b.hash))?
                        .as_deref()
                        == Some(&tok.to_le_bytes()[..])
                }
                None => false,
            };
            if !stored {
                t.put(Cf::Blocks, &ks::block_key(&b.hash), &b.encoded.value)?;
            }
            resident::stored(t, &b.hash, &mut info)?;
            t.put(Cf::Bidx, &info_key, &info.encode()?)?;
        }
        // The writer holds the content: it comes back rather than waiting on a replica
        // (which may drop it once nothing it holds names it).
        Some(raw) if BlockInfo::decode(&raw)?.evicted => {
            resident::restore(t, &b.hash, &b.encoded.value)?;
        }
        Some(_) => {}
    }
    resident::note_unlogged(t, &b.hash)?;
    add_shared_ref(t, &b.hash)
}

/// Add one reference to a block stored already, for a copy that shares it. The caller read,
/// with tracking and in the same transaction, a map entry that names the block: the sweeper
/// frees a block only in a transaction that reads every refcount shard with tracking, so
/// either it sees this reference or one of the two retries.
pub fn add_copy_ref(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    resident::note_unlogged(t, h)?;
    add_shared_ref(t, h)
}

/// Add one reference to a block stored already, not from a file's map (the log's holds and
/// the replica's own bookkeeping).
pub fn add_shared_ref(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    t.merge(Cf::Bidx, &ks::refcount_key(h, shard()), &1i64.to_le_bytes())
}

/// Drop one reference; the block becomes a garbage candidate.
pub fn drop_ref(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    let s = shard();
    t.merge(Cf::Bidx, &ks::refcount_key(h, s), &(-1i64).to_le_bytes())?;
    t.put(Cf::Bidx, &ks::block_garbage_key(h, s), &[])
}

/// Drop one reference that the caller knows is not the last (its transaction adds or reads,
/// with tracking, another one): no garbage mark, so the sweeper has nothing to check.
pub fn drop_ref_kept(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    t.merge(
        Cf::Bidx,
        &ks::refcount_key(h, shard()),
        &(-1i64).to_le_bytes(),
    )
}

/// Read and verify a stored block's content (`len` bytes expected), outside any transaction:
/// a block's content never changes under its name, so no snapshot is needed. A damaged block
/// with parity is rebuilt in memory (and logged; `kvfs audit --repair` rewrites it); without
/// parity it is an error naming the block. Callers go through [`reader::BlockReader`], the
/// one way block content is obtained.
pub fn read_stored(store: &KvStore, h: &Hash, len: u32) -> Result<Vec<u8>, BlockError> {
    let d = store
        .get_with(Cf::Blocks, &ks::block_key(h), |v| encode::decode(v, h, len))?
        .ok_or(BlockError::Missing { hash: *h })?
        .map_err(|reason| BlockError::Corrupt { hash: *h, reason })?;
    if let Some((sector, _)) = d.repaired {
        tracing::warn!(
            key = %ks::describe_key(&ks::block_key(h)),
            sector,
            "damaged block rebuilt from parity; run `kvfs audit --repair` to rewrite it"
        );
    }
    Ok(d.content)
}

/// Sum of a block's refcount shards, each read with conflict tracking.
pub fn refcount(t: &mut dyn Txn, h: &Hash) -> Result<i64, KvError> {
    Ok(refcount_shards(t, h)?.0)
}

/// [`refcount`], and which of the shards exist.
fn refcount_shards(
    t: &mut dyn Txn,
    h: &Hash,
) -> Result<(i64, [bool; REF_SHARDS as usize]), KvError> {
    let mut shards = [false; REF_SHARDS as usize];
    let mut total = 0;
    for s in 0..REF_SHARDS {
        if let Some(v) = t.get(Cf::Bidx, &ks::refcount_key(h, s))? {
            total += decode_i64(&v);
            shards[s as usize] = true;
        }
    }
    Ok((total, shards))
}

/// A garbage candidate: a block and the `G` keys (one per shard that marked it) found for it.
struct Candidate {
    hash: Hash,
    marks: Vec<Vec<u8>>,
}

/// Up to `max` distinct blocks marked `G` (garbage candidates), in key order from `from`
/// (a `G` key or the start of the range), each with every mark found for it.
fn garbage_candidates(store: &KvStore, from: &[u8], max: usize) -> Result<Vec<Candidate>, KvError> {
    let (_, end) = ks::Prefix::BlockGarbage.range();
    let mut found: Vec<Candidate> = Vec::new();
    store.for_each(Cf::Bidx, from, &end, |k, _| {
        let Some(h) = ks::key_hash(k) else {
            return true;
        };
        if let Some(c) = found.last_mut().filter(|c| c.hash == h) {
            c.marks.push(k.to_vec());
        } else if found.len() == max {
            return false;
        } else {
            found.push(Candidate {
                hash: h,
                marks: vec![k.to_vec()],
            });
        }
        true
    })?;
    Ok(found)
}

/// The first key after every `G` key of block `h`.
fn after_marks_of(h: &Hash) -> Vec<u8> {
    let mut k = ks::block_garbage_key(h, u8::MAX);
    k.push(0);
    k
}

/// How many garbage-candidate blocks [`collect_garbage`] would free now (a dry run).
pub fn count_garbage(store: &KvStore) -> Result<u64, KvError> {
    let (start, _) = ks::Prefix::BlockGarbage.range();
    let mut n = 0;
    for c in garbage_candidates(store, &start, usize::MAX)? {
        let mut total = 0;
        for s in 0..REF_SHARDS {
            if let Some(v) = store.get(Cf::Bidx, &ks::refcount_key(&c.hash, s))? {
                total += decode_i64(&v);
            }
        }
        n += (total <= 0) as u64;
    }
    Ok(n)
}

/// One pass of [`collect_garbage`] over every candidate, 4,096 at a time, each batch's scan
/// starting after the last block of the one before: the marks a batch deleted stay behind as
/// tombstones until the next memtable flush, and scanning them again (as a scan from the
/// start of the range would, per batch) cost a mount under constant small overwrites more
/// CPU than the overwrites themselves. Marks made behind the cursor wait for the next pass.
/// Returns blocks freed.
pub fn collect_all_garbage(store: &KvStore) -> Result<u64, KvError> {
    let (mut from, _) = ks::Prefix::BlockGarbage.range();
    let mut total = 0;
    loop {
        let batch = garbage_candidates(store, &from, 4096)?;
        let Some(last) = batch.last() else {
            return Ok(total);
        };
        from = after_marks_of(&last.hash);
        let full = batch.len() == 4096;
        total += free_candidates(store, batch)?;
        if !full {
            return Ok(total);
        }
    }
}

/// Free up to `max` garbage-candidate blocks whose references reached zero (the first in key
/// order). Returns blocks freed.
pub fn collect_garbage(store: &KvStore, max: usize) -> Result<u64, KvError> {
    let (start, _) = ks::Prefix::BlockGarbage.range();
    free_candidates(store, garbage_candidates(store, &start, max)?)
}

/// Candidates per transaction of [`free_candidates`]. One each cost a sweep of 16,384
/// freed blocks 3.1 s of CPU, most of it in what every commit pays once (the validation of
/// the `resident` counter shard it merges into, walking that key's merge operands, and the
/// merge's own look-up); 32 share one commit, and a conflict retries only those 32.
const FREE_BATCH: usize = 32;

/// Candidates [`FREE_BATCH`] to a transaction: each one's marks go (only those found, each one
/// written with the refcount shard it names, which the transaction reads with tracking: a mark
/// made meanwhile makes it retry); its block goes too if its shards sum to zero.
fn free_candidates(store: &KvStore, candidates: Vec<Candidate>) -> Result<u64, KvError> {
    let mut freed = 0;
    for chunk in candidates.chunks(FREE_BATCH) {
        freed += store.transact(|t| {
            let mut gone = 0;
            for c in chunk {
                gone += free_candidate(t, c)? as u64;
            }
            Ok::<_, KvError>(gone)
        })?;
    }
    Ok(freed)
}

/// One candidate of [`free_candidates`]: whether its block was freed.
fn free_candidate(t: &mut dyn Txn, c: &Candidate) -> Result<bool, KvError> {
    let h = c.hash;
    let (refs, shards) = refcount_shards(t, &h)?;
    for k in &c.marks {
        t.delete(Cf::Bidx, k)?;
    }
    if refs > 0 {
        return Ok(false);
    }
    for s in (0..REF_SHARDS).filter(|s| shards[*s as usize]) {
        t.delete(Cf::Bidx, &ks::refcount_key(&h, s))?;
    }
    let info = match t.get(Cf::Bidx, &ks::block_info_key(&h))? {
        Some(raw) => Some(BlockInfo::decode(&raw)?),
        None => None,
    };
    resident::freed(t, &h, info.as_ref())?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kv::OpenOptions;

    /// A RocksDB store in a temporary directory.
    pub(crate) fn store() -> (tempfile::TempDir, KvStore) {
        let d = tempfile::tempdir().unwrap();
        let s = KvStore::open(
            d.path(),
            &OpenOptions {
                create: true,
                ..Default::default()
            },
        )
        .unwrap();
        (d, s)
    }

    #[test]
    fn trailing_zeros_are_not_content_and_zero_slots_are_holes() {
        assert!(prepare(&[0; 4096], &Codec::default()).is_none());
        let p = prepare(b"ab\0\0", &Codec::default()).unwrap();
        assert_eq!(p.len, 2);
        assert_eq!(p.hash, hash(b"ab"));
    }

    #[test]
    fn same_content_is_stored_once_and_freed_after_last_reference() {
        let (_d, s) = store();
        let p = prepare(&[7u8; 1000], &Codec::default()).unwrap();
        for _ in 0..3 {
            s.transact(|t| add_ref(t, &p, None)).unwrap();
        }
        assert_eq!(s.transact(|t| refcount(t, &p.hash)).unwrap(), 3);
        for _ in 0..2 {
            s.transact(|t| drop_ref(t, &p.hash)).unwrap();
        }
        assert_eq!(collect_garbage(&s, 100).unwrap(), 0);
        assert!(s
            .get(Cf::Blocks, &ks::block_key(&p.hash))
            .unwrap()
            .is_some());
        s.transact(|t| drop_ref(t, &p.hash)).unwrap();
        assert_eq!(collect_garbage(&s, 100).unwrap(), 1);
        assert!(s
            .get(Cf::Blocks, &ks::block_key(&p.hash))
            .unwrap()
            .is_none());
        assert!(s
            .get(Cf::Bidx, &ks::block_info_key(&p.hash))
            .unwrap()
            .is_none());
    }

    /// `n` distinct 64 KiB blocks, `seed` apart from other calls.
    fn blocks(n: u32, seed: u32) -> Vec<Prepared> {
        (0..n)
            .map(|i| {
                let mut data = vec![(i % 251) as u8 + 1; 64 << 10];
                data[..8].copy_from_slice(&(u64::from(seed) << 32 | u64::from(i)).to_le_bytes());
                prepare(&data, &Codec::default()).unwrap()
            })
            .collect()
    }

    fn has(s: &KvStore, key: Vec<u8>) -> bool {
        s.get(Cf::Blocks, &key).unwrap().is_some()
    }

    fn name_all(s: &KvStore, bs: &[Prepared], a: Option<&Ahead>) {
        s.transact(|t| {
            for b in bs {
                add_ref(t, b, Ahead::token_for(a, &b.hash))?;
            }
            Ok::<_, KvError>(())
        })
        .unwrap();
    }

    #[test]
    fn written_ahead_blocks_are_named_without_being_stored_again() {
        let (_d, s) = store();
        let small = blocks(8, 0);
        let refs: Vec<&Prepared> = small.iter().collect();
        assert!(
            write_ahead(&s, &refs).unwrap().is_none(),
            "512 KiB is below the bar"
        );
        let bs = blocks(80, 1);
        let refs: Vec<&Prepared> = bs.iter().collect();
        let a = write_ahead(&s, &refs)
            .unwrap()
            .expect("5 MiB of new blocks");
        assert_eq!(a.hashes.len(), 80);
        for b in &bs {
            assert!(has(&s, ks::block_key(&b.hash)) && has(&s, ks::written_ahead_key(&b.hash)));
        }
        name_all(&s, &bs, Some(&a));
        let named: Vec<Hash> = a.hashes.iter().copied().collect();
        forget_written_ahead(&s, &named).unwrap();
        for b in &bs {
            assert!(!has(&s, ks::written_ahead_key(&b.hash)));
            assert_eq!(read_stored(&s, &b.hash, b.len).unwrap().len(), 64 << 10);
        }
        // Blocks stored already are not written ahead again.
        assert!(write_ahead(&s, &refs).unwrap().is_none());
    }

    #[test]
    fn a_value_deleted_after_its_write_ahead_is_stored_by_the_commit() {
        let (_d, s) = store();
        let bs = blocks(80, 2);
        let refs: Vec<&Prepared> = bs.iter().collect();
        let a = write_ahead(&s, &refs).unwrap().unwrap();
        // A recovery (or the sweeper) deletes the values before the commit runs.
        assert_eq!(recover_written_ahead(&s, false).unwrap(), 80);
        assert!(!has(&s, ks::block_key(&bs[0].hash)));
        // The token is gone with them, so the commit stores each value itself.
        name_all(&s, &bs, Some(&a));
        for b in &bs {
            assert!(
                has(&s, ks::block_key(&b.hash)),
                "named block without a value"
            );
        }
    }

    #[test]
    fn recovery_drops_values_no_commit_named_and_keeps_the_named_ones() {
        let (_d, s) = store();
        let named = blocks(80, 3);
        let orphans = blocks(80, 4);
        for set in [&named, &orphans] {
            let refs: Vec<&Prepared> = set.iter().collect();
            let a = write_ahead(&s, &refs).unwrap().unwrap();
            if std::ptr::eq(set, &named) {
                name_all(&s, set, Some(&a));
            }
        }
        // As after a crash: no W key was forgotten.
        assert_eq!(
            recover_written_ahead(&s, true).unwrap(),
            80,
            "dry run counts"
        );
        assert_eq!(recover_written_ahead(&s, false).unwrap(), 80);
        for b in &named {
            assert!(has(&s, ks::block_key(&b.hash)));
            assert!(!has(&s, ks::written_ahead_key(&b.hash)));
        }
        for b in &orphans {
            assert!(!has(&s, ks::block_key(&b.hash)));
            assert!(!has(&s, ks::written_ahead_key(&b.hash)));
        }
        assert_eq!(recover_written_ahead(&s, false).unwrap(), 0);
    }

    #[test]
    fn dropping_a_write_ahead_spares_another_writers_token_and_named_blocks() {
        let (_d, s) = store();
        let bs = blocks(80, 5);
        let refs: Vec<&Prepared> = bs.iter().collect();
        let first = write_ahead(&s, &refs).unwrap().unwrap();
        let second = write_ahead(&s, &refs).unwrap().unwrap();
        let hashes: Vec<Hash> = first.hashes.iter().copied().collect();
        // The first writer gives up: its token is no longer in W, so nothing goes.
        assert_eq!(drop_written_ahead(&s, &hashes, first.token).unwrap(), 0);
        assert!(has(&s, ks::block_key(&bs[0].hash)));
        name_all(&s, &bs[..40], Some(&second));
        // The second drops all: the 40 it named stay.
        assert_eq!(drop_written_ahead(&s, &hashes, second.token).unwrap(), 40);
        for (i, b) in bs.iter().enumerate() {
            assert_eq!(has(&s, ks::block_key(&b.hash)), i < 40);
        }
    }

    #[test]
    fn one_pass_frees_every_candidate_across_batches_and_leaves_no_mark() {
        let (_d, s) = store();
        let bs: Vec<Prepared> = (0u32..5000)
            .map(|i| prepare(&(i + 1).to_le_bytes(), &Codec::default()).unwrap())
            .collect();
        for chunk in bs.chunks(500) {
            name_all(&s, chunk, None);
        }
        // The first 100 have a second reference: their marks go, they stay.
        name_all(&s, &bs[..100], None);
        let drop_all = |bs: &[Prepared]| {
            for chunk in bs.chunks(500) {
                s.transact(|t| {
                    for b in chunk {
                        drop_ref(t, &b.hash)?;
                    }
                    Ok::<_, KvError>(())
                })
                .unwrap();
            }
        };
        drop_all(&bs);
        assert_eq!(count_garbage(&s).unwrap(), 4900);
        assert_eq!(collect_all_garbage(&s).unwrap(), 4900);
        let (start, end) = ks::Prefix::BlockGarbage.range();
        let mut marks = 0;
        s.for_each(Cf::Bidx, &start, &end, |_, _| {
            marks += 1;
            true
        })
        .unwrap();
        assert_eq!(marks, 0, "every mark went, the kept blocks' too");
        for (i, b) in bs.iter().enumerate() {
            assert_eq!(has(&s, ks::block_key(&b.hash)), i < 100);
        }
        drop_all(&bs[..100]);
        assert_eq!(collect_all_garbage(&s).unwrap(), 100);
        assert!(!has(&s, ks::block_key(&bs[0].hash)));
    }

    #[test]
    fn the_sweeper_deletes_a_w_key_with_its_value() {
        let (_d, s) = store();
        let bs = blocks(80, 6);
        let refs: Vec<&Prepared> = bs.iter().collect();
        let a = write_ahead(&s, &refs).unwrap().unwrap();
        name_all(&s, &bs, Some(&a));
        s.transact(|t| {
            for b in &bs {
                drop_ref(t, &b.hash)?;
            }
            Ok::<_, KvError>(())
        })
        .unwrap();
        assert_eq!(collect_all_garbage(&s).unwrap(), 80);
        for b in &bs {
            assert!(!has(&s, ks::written_ahead_key(&b.hash)));
        }
    }

    #[test]
    fn corrupt_block_is_reported_not_returned() {
        let (_d, s) = store();
        let p = prepare(&[1u8; 100], &Codec::default()).unwrap();
        s.transact(|t| add_ref(t, &p, None)).unwrap();
        s.transact(|t| {
            let mut bad = p.encoded.value.clone();
            bad[10] ^= 0x40;
            t.put(Cf::Blocks, &ks::block_key(&p.hash), &bad)
        })
        .unwrap();
        let e = read_stored(&s, &p.hash, 100).unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let e = read_stored(&s, &[3; 32], 100).unwrap_err();
        assert!(matches!(e, BlockError::Missing { .. }), "{e}");
    }
}
