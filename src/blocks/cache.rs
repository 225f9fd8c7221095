//! A small in-memory cache of verified block contents, by hash. A block's content never
//! changes under its name, so entries need no invalidation: a freed block simply ages out.
//! It spares random and repeated reads (and the read half of read-modify-write) the fetch,
//! decode and SHA-256 of a whole block for a few bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::keyspace::Hash;
use crate::util::lock;

pub struct BlockCache {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Hash, (Arc<Vec<u8>>, u64)>,
    /// Last use -> block: the least recently used comes first.
    order: BTreeMap<u64, Hash>,
    bytes: usize,
    tick: u64,
}

impl BlockCache {
    /// A cache holding up to `cap` bytes of content (0 disables it).
    pub fn new(cap: usize) -> BlockCache {
        BlockCache {
            cap,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, h: &Hash) -> Option<Arc<Vec<u8>>> {
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let e = g.map.get_mut(h)?;
        let (data, old) = (e.0.clone(), std::mem::replace(&mut e.1, tick));
        g.order.remove(&old);
        g.order.insert(tick, *h);
        Some(data)
    }

    /// Whether `h` is held (without counting as a use).
    pub fn contains(&self, h: &Hash) -> bool {
        let g = lock(&self.inner);
        g.map.contains_key(h)
    }

    pub fn insert(&self, h: Hash, data: Arc<Vec<u8>>) {
        if data.len() > self.cap {
            return;
        }
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let n = data.len();
        if let Some((old, t)) = g.map.insert(h, (data, tick)) {
            g.bytes -= old.len();
            g.order.remove(&t);
        }
        g.order.insert(tick, h);
        g.bytes += n;
        // Least recently used out, in O(log n) (it scanned every entry per insert: 2.5% of
        // the daemon's time in a cold sequential read).
        while g.bytes > self.cap {
            let Some((_, victim)) = g.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = g.map.remove(&victim) {
                g.bytes -= d.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_recent_blocks_within_its_capacity() {
        let c = BlockCache::new(3000);
        for i in 0..3u8 {
            c.insert([i; 32], Arc::new(vec![i; 1000]));
        }
        assert!(c.get(&[0; 32]).is_some()); // 0 is now the most recent
        c.insert([9; 32], Arc::new(vec![9; 1000]));
        assert!(c.get(&[1; 32]).is_none(), "least recently used goes first");
        assert!(c.get(&[0; 32]).is_some() && c.get(&[9; 32]).is_some());
        c.insert([8; 32], Arc::new(vec![0; 5000]));
        assert!(c.get(&[8; 32]).is_none(), "larger than the cache: not kept");
    }
}
