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

pub mod cache;
pub mod encode;
pub mod prefetch;

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
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if threads < 2 || slots.len() < 2 {
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

/// Add one reference to `b`, storing it if it is new.
pub fn add_ref(t: &mut dyn Txn, b: &Prepared) -> Result<(), KvError> {
    let info_key = ks::block_info_key(&b.hash);
    if t.get(Cf::Bidx, &info_key)?.is_none() {
        let info = BlockInfo {
            len: b.len,
            stored: b.encoded.value.len() as u32,
            encoding: b.encoded.info,
        };
        t.put(Cf::Blocks, &ks::block_key(&b.hash), &b.encoded.value)?;
        t.put(Cf::Bidx, &info_key, &info.encode())?;
    }
    t.merge(
        Cf::Bidx,
        &ks::refcount_key(&b.hash, shard()),
        &1i64.to_le_bytes(),
    )
}

/// Drop one reference; the block becomes a garbage candidate.
pub fn drop_ref(t: &mut dyn Txn, h: &Hash) -> Result<(), KvError> {
    let s = shard();
    t.merge(Cf::Bidx, &ks::refcount_key(h, s), &(-1i64).to_le_bytes())?;
    t.put(Cf::Bidx, &ks::block_garbage_key(h, s), &[])
}

/// Read and verify a block's content (`len` bytes expected). A damaged block with parity is
/// rebuilt in memory (and logged; `kvfs audit --repair` rewrites it); without parity it is an
/// error naming the block.
pub fn read(t: &mut dyn Txn, h: &Hash, len: u32) -> Result<Vec<u8>, BlockError> {
    let corrupt = |reason: String| BlockError::Corrupt { hash: *h, reason };
    let v = t
        .get_untracked(Cf::Blocks, &ks::block_key(h))?
        .ok_or_else(|| corrupt("block missing".into()))?;
    let d = encode::decode(&v, h, len).map_err(corrupt)?;
    if let Some((sector, _)) = d.repaired {
        tracing::warn!(
            key = %ks::describe_key(&ks::block_key(h)),
            sector,
            "damaged block rebuilt from parity; run `kvfs audit --repair` to rewrite it"
        );
    }
    Ok(d.content)
}

/// [`read`] through `cache`: a cached block was verified when it was first read or written.
pub fn read_cached(
    t: &mut dyn Txn,
    cache: &cache::BlockCache,
    h: &Hash,
    len: u32,
) -> Result<std::sync::Arc<Vec<u8>>, BlockError> {
    if let Some(d) = cache.get(h) {
        if d.len() == len as usize {
            return Ok(d);
        }
    }
    let d = std::sync::Arc::new(read(t, h, len)?);
    cache.insert(*h, d.clone());
    Ok(d)
}

/// Sum of a block's refcount shards, each read with conflict tracking.
pub fn refcount(t: &mut dyn Txn, h: &Hash) -> Result<i64, KvError> {
    let mut total = 0;
    for s in 0..REF_SHARDS {
        if let Some(v) = t.get(Cf::Bidx, &ks::refcount_key(h, s))? {
            total += decode_i64(&v);
        }
    }
    Ok(total)
}

/// Up to `max` distinct hashes marked `G` (garbage candidates), in key order.
fn garbage_candidates(store: &KvStore, max: usize) -> Result<Vec<Hash>, KvError> {
    let (start, end) = ks::Prefix::BlockGarbage.range();
    let mut hashes: Vec<Hash> = Vec::new();
    store.for_each(Cf::Bidx, &start, &end, |k, _| {
        if let Some(h) = ks::key_hash(k) {
            if hashes.last() != Some(&h) {
                hashes.push(h);
            }
        }
        hashes.len() < max
    })?;
    Ok(hashes)
}

/// How many garbage-candidate blocks [`collect_garbage`] would free now (a dry run).
pub fn count_garbage(store: &KvStore) -> Result<u64, KvError> {
    let mut n = 0;
    for h in garbage_candidates(store, usize::MAX)? {
        let mut total = 0;
        for s in 0..REF_SHARDS {
            if let Some(v) = store.get(Cf::Bidx, &ks::refcount_key(&h, s))? {
                total += decode_i64(&v);
            }
        }
        n += (total <= 0) as u64;
    }
    Ok(n)
}

/// [`collect_garbage`] in rounds until a round frees nothing. Returns blocks freed.
pub fn collect_all_garbage(store: &KvStore) -> Result<u64, KvError> {
    let mut total = 0;
    loop {
        let n = collect_garbage(store, 4096)?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}

/// Free every garbage-candidate block whose references reached zero. Returns blocks freed.
pub fn collect_garbage(store: &KvStore, max: usize) -> Result<u64, KvError> {
    let mut freed = 0;
    for h in garbage_candidates(store, max)? {
        let gone = store.transact(|t| {
            let refs = refcount(t, &h)?;
            for s in 0..REF_SHARDS {
                t.delete(Cf::Bidx, &ks::block_garbage_key(&h, s))?;
            }
            if refs > 0 {
                return Ok(false);
            }
            for s in 0..REF_SHARDS {
                t.delete(Cf::Bidx, &ks::refcount_key(&h, s))?;
            }
            t.get(Cf::Bidx, &ks::block_info_key(&h))?;
            t.delete(Cf::Bidx, &ks::block_info_key(&h))?;
            t.delete(Cf::Blocks, &ks::block_key(&h))?;
            Ok::<_, KvError>(true)
        })?;
        freed += gone as u64;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::OpenOptions;

    fn store() -> (tempfile::TempDir, KvStore) {
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
            s.transact(|t| add_ref(t, &p)).unwrap();
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

    #[test]
    fn corrupt_block_is_reported_not_returned() {
        let (_d, s) = store();
        let p = prepare(&[1u8; 100], &Codec::default()).unwrap();
        s.transact(|t| add_ref(t, &p)).unwrap();
        s.transact(|t| {
            let mut bad = p.encoded.value.clone();
            bad[10] ^= 0x40;
            t.put(Cf::Blocks, &ks::block_key(&p.hash), &bad)
        })
        .unwrap();
        let e = s
            .transact(|t| read(t, &p.hash, 100).map_err(|e| KvError::Other(e.to_string())))
            .unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
    }
}
