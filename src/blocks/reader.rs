//! The one way block content is obtained: [`BlockReader::get`]. It answers from the cache of
//! verified blocks, or reads the stored value outside any transaction and lock, verifies it
//! and caches it. Two readers of the same block that is not cached wait on one read
//! (single-flight) instead of reading it twice. A block evicted from this store is fetched
//! back through the [`Tiering`] hook the mount installs: callers never hold a file lock or a
//! transaction while they wait on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::cache::BlockCache;
use super::BlockError;
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash};
use crate::kv::{Cf, KvStore};
use crate::util::lock;

/// What lies below the store: where evicted blocks come back from, and who is told which
/// blocks are used (the last-use index).
pub trait Tiering: Send + Sync {
    /// Block `h` (evicted here) from a replica, verified and stored here again unless `keep`
    /// is false (a sequential read of a file larger than the cache: it passes through).
    fn fetch(&self, h: &Hash, len: u32, keep: bool) -> Result<Vec<u8>, BlockError>;
    /// Start fetching `h` (readahead); it lands in the store (`keep`). Best effort.
    fn prefetch(&self, h: &Hash, len: u32, keep: bool);
    /// Block `h` was read.
    fn used(&self, h: &Hash);
    /// Where fetched content goes besides the store (the reader's cache), so that a block
    /// fetched ahead is read from memory, not looked up, decoded and checked again.
    fn deliver_to(&self, _sink: Arc<BlockCache>) {}
}

/// Where a block not in the cache is: its content read here, or evicted (with the hook that
/// fetches it).
enum Here<'a> {
    Content(Vec<u8>),
    Evicted(&'a dyn Tiering),
}

pub struct BlockReader {
    store: Arc<KvStore>,
    tiering: std::sync::OnceLock<Arc<dyn Tiering>>,
    cache: Arc<BlockCache>,
    /// Reads under way, by block: followers wait on the leader's result.
    flights: Mutex<HashMap<Hash, Arc<Flight>>>,
    /// Blocks read from the store (cache misses that were not followers).
    loads: AtomicU64,
}

/// One read under way. `done` is `Some(Some(content))` when it succeeded, `Some(None)` when
/// it failed (followers then read for themselves, to report their own error).
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Option<Arc<Vec<u8>>>>>,
    landed: Condvar,
}

/// Ends a flight however its leader leaves (an error or a panic included), so that no
/// follower waits forever.
struct Landing<'a> {
    reader: &'a BlockReader,
    hash: Hash,
    flight: Arc<Flight>,
    result: Option<Arc<Vec<u8>>>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        lock(&self.reader.flights).remove(&self.hash);
        *lock(&self.flight.done) = Some(self.result.take());
        self.flight.landed.notify_all();
    }
}

impl BlockReader {
    /// A reader over `store` with a cache of `cache_bytes` of verified content.
    pub fn new(store: Arc<KvStore>, cache_bytes: usize) -> BlockReader {
        BlockReader {
            store,
            tiering: std::sync::OnceLock::new(),
            cache: Arc::new(BlockCache::new(cache_bytes)),
            flights: Mutex::new(HashMap::new()),
            loads: AtomicU64::new(0),
        }
    }

    /// How many blocks were read from the store so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Whether `h` is cached (without counting as a use).
    pub fn cached(&self, h: &Hash) -> bool {
        self.cache.contains(h)
    }

    /// Install the tiering hook (once, before reads start).
    pub fn set_tiering(&self, t: Arc<dyn Tiering>) {
        t.deliver_to(self.cache.clone());
        let _ = self.tiering.set(t);
    }

    /// The tiering hook, if installed.
    pub fn tiering(&self) -> Option<Arc<dyn Tiering>> {
        self.tiering.get().cloned()
    }

    /// Block `h`'s verified content (`len` bytes expected).
    pub fn get(&self, h: &Hash, len: u32) -> Result<Arc<Vec<u8>>, BlockError> {
        self.get_as(h, len, true)
    }

    /// [`BlockReader::get`]; an evicted block fetched back is stored here again only if
    /// `keep` (see [`Tiering::fetch`]).
    pub fn get_as(&self, h: &Hash, len: u32, keep: bool) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some(t) = self.tiering.get() {
            t.used(h);
        }
        if let Some(d) = self.cache.get(h).filter(|d| d.len() == len as usize) {
            return Ok(d);
        }
        let (flight, leader) = {
            let mut f = lock(&self.flights);
            match f.get(h) {
                Some(x) => (x.clone(), false),
                None => {
                    let x = Arc::new(Flight::default());
                    f.insert(*h, x.clone());
                    (x, true)
                }
            }
        };
        if !leader {
            let mut done = lock(&flight.done);
            while done.is_none() {
                done = flight.landed.wait(done).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(Some(d)) = done.as_ref() {
                if d.len() == len as usize {
                    return Ok(d.clone());
                }
            }
            drop(done);
            return self.load(h, len, keep);
        }
        let mut landing = Landing {
            reader: self,
            hash: *h,
            flight,
            result: None,
        };
        let d = self.load(h, len, keep)?;
        landing.result = Some(d.clone());
        Ok(d)
    }

    fn load(&self, h: &Hash, len: u32, keep: bool) -> Result<Arc<Vec<u8>>, BlockError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let d = match self.stored(h, len)? {
            Here::Content(d) => d,
            Here::Evicted(t) => t.fetch(h, len, keep)?,
        };
        let d = Arc::new(d);
        self.cache.insert(*h, d.clone());
        Ok(d)
    }

    /// Block `h`'s stored content, or the hook that brings it back when it is evicted here;
    /// `Missing` when it is neither (freed meanwhile, or lost).
    fn stored(&self, h: &Hash, len: u32) -> Result<Here<'_>, BlockError> {
        match super::read_stored(&self.store, h, len) {
            Err(BlockError::Missing { hash }) => match self.tiering.get() {
                Some(t) if self.evicted(h)? => Ok(Here::Evicted(&**t)),
                _ => Err(BlockError::Missing { hash }),
            },
            r => r.map(Here::Content),
        }
    }

    /// Whether block `h` is evicted here (its record says so).
    fn evicted(&self, h: &Hash) -> Result<bool, BlockError> {
        Ok(match self.store.get(Cf::Bidx, &ks::block_info_key(h))? {
            Some(v) => {
                BlockInfo::decode(&v)
                    .map_err(|e| BlockError::Corrupt {
                        hash: *h,
                        reason: e.to_string(),
                    })?
                    .evicted
            }
            None => false,
        })
    }

    /// Make block `h` quick to read soon: into the cache if it is here, fetched in the
    /// background if it is evicted (stored here again if `keep`). For readahead: never waits
    /// on a replica.
    pub fn warm(&self, h: &Hash, len: u32, keep: bool) -> Result<(), BlockError> {
        if self.cache.contains(h) {
            return Ok(());
        }
        match self.stored(h, len)? {
            Here::Content(d) => self.cache.insert(*h, Arc::new(d)),
            Here::Evicted(t) => t.prefetch(h, len, keep),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{add_ref, prepare, Codec};
    use crate::kv::mem::MemEngine;

    #[test]
    fn concurrent_readers_of_one_block_share_one_read() {
        let e = MemEngine::new();
        let store = Arc::new(KvStore::with_engine(Arc::new(e.clone())));
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let p = prepare(&data, &Codec::default()).unwrap();
        store.transact(|t| add_ref(t, &p, None)).unwrap();
        let r = Arc::new(BlockReader::new(store.clone(), 1 << 20));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                let (h, len) = (p.hash, p.len);
                std::thread::spawn(move || r.get(&h, len).unwrap())
            })
            .collect();
        let got: Vec<Arc<Vec<u8>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(got.iter().all(|d| d[..] == data[..]));
        assert!(r.cached(&p.hash));
        assert_eq!(r.loads(), 1, "eight readers, one read");
        assert!(lock(&r.flights).is_empty(), "every flight landed");
        let missing = r.get(&[5; 32], 10).unwrap_err();
        assert!(matches!(missing, BlockError::Missing { .. }));
        assert!(lock(&r.flights).is_empty(), "a failed flight lands too");
    }
}
