//! Readahead: blocks a sequential reader will want next are fetched by a few threads into the
//! verified-block cache, so the reader finds them there instead of waiting for each one in
//! turn. A cold 64 KiB block costs a few hundred microseconds of disk latency; one reader
//! fetching block after block was bound by that latency, not by the disk's bandwidth.
//! Prefetching is best effort: a fetch that fails is dropped (the reader's own read then
//! reports the error), and a full queue drops requests instead of blocking the reader.
//! An evicted block is handed to the fetcher instead (no worker waits on a replica).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};

use super::reader::BlockReader;
use crate::keyspace::{self as ks, Hash};
use crate::util::lock;

/// Blocks asked for together, fetched in turn by one worker: their names and lengths, and
/// whether evicted ones are stored when fetched. One message per run of blocks, not per
/// block: a cold sequential read asked for 16 blocks per MiB, each a wakeup of a worker.
type Wanted = (Vec<(Hash, u32)>, bool);

pub struct Prefetcher {
    tx: Option<Sender<Wanted>>,
    reader: Arc<BlockReader>,
    /// Hashes queued or being fetched, so a block is fetched once however often it is asked.
    pending: Arc<Mutex<HashSet<Hash>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// `threads` fetchers (0: prefetching off) behind a queue of `depth` requests.
    pub fn new(reader: Arc<BlockReader>, threads: usize, depth: usize) -> Prefetcher {
        let pending: Arc<Mutex<HashSet<Hash>>> = Arc::default();
        if threads == 0 {
            return Prefetcher {
                tx: None,
                reader,
                pending,
                workers: Vec::new(),
            };
        }
        let (tx, rx) = bounded::<Wanted>(depth.max(1));
        let workers = (0..threads)
            .filter_map(|i| {
                let (rx, reader, pending) = (rx.clone(), reader.clone(), pending.clone());
                std::thread::Builder::new()
                    .name(format!("kvfs-fetch-{i}"))
                    .spawn(move || {
                        for (run, keep) in rx {
                            for (h, len) in run {
                                if let Err(e) = reader.warm(&h, len, keep) {
                                    tracing::debug!(block = %ks::hex(&h), error = %e, "prefetch failed");
                                }
                                lock(&pending).remove(&h);
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Prefetcher {
            tx: Some(tx),
            reader,
            pending,
            workers,
        }
    }

    /// Fetch block `h` (content length `len`) into the cache soon, unless it is there or on
    /// its way already; an evicted one is stored here again if `keep`.
    pub fn want(&self, h: Hash, len: u32, keep: bool) {
        self.handle().want(h, len, keep)
    }

    /// Fetch a run of blocks (see [`PrefetchHandle::want_run`]).
    pub fn want_run(&self, run: Vec<(Hash, u32)>, keep: bool) {
        self.handle().want_run(run, keep)
    }

    /// A handle to ask for blocks from another thread.
    pub fn handle(&self) -> PrefetchHandle {
        PrefetchHandle {
            tx: self.tx.clone(),
            reader: self.reader.clone(),
            pending: self.pending.clone(),
        }
    }
}

/// [`Prefetcher::want`] for other threads (the prefetcher's own end closes with it: a handle
/// kept longer only finds a closed queue).
#[derive(Clone)]
pub struct PrefetchHandle {
    tx: Option<Sender<Wanted>>,
    reader: Arc<BlockReader>,
    pending: Arc<Mutex<HashSet<Hash>>>,
}

impl PrefetchHandle {
    pub fn want(&self, h: Hash, len: u32, keep: bool) {
        self.want_run(vec![(h, len)], keep)
    }

    /// [`PrefetchHandle::want`] for a run of blocks (those of a file in order), fetched in
    /// turn by one worker.
    pub fn want_run(&self, mut run: Vec<(Hash, u32)>, keep: bool) {
        let Some(tx) = &self.tx else { return };
        {
            let mut pending = lock(&self.pending);
            run.retain(|(h, _)| !self.reader.cached(h) && pending.insert(*h));
        }
        if run.is_empty() {
            return;
        }
        if let Err(TrySendError::Full((run, _)) | TrySendError::Disconnected((run, _))) =
            tx.try_send((run, keep))
        {
            let mut pending = lock(&self.pending);
            for (h, _) in run {
                pending.remove(&h);
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{add_ref, prepare, Codec};
    use crate::kv::{KvStore, OpenOptions};

    fn temp_store() -> (tempfile::TempDir, Arc<KvStore>) {
        let d = tempfile::tempdir().unwrap();
        let o = OpenOptions {
            create: true,
            ..Default::default()
        };
        let store = Arc::new(KvStore::open(d.path(), &o).unwrap());
        (d, store)
    }

    #[test]
    fn wanted_blocks_arrive_in_the_cache_and_missing_ones_are_dropped() {
        let (_d, store) = temp_store();
        let codec = Codec::default();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let p = prepare(&data, &codec).unwrap();
        store.transact(|t| add_ref(t, &p, None)).unwrap();
        let reader = Arc::new(BlockReader::new(store.clone(), 1 << 20));
        let pf = Prefetcher::new(reader.clone(), 2, 8);
        pf.want(p.hash, p.len, true);
        pf.want([7; 32], 100, true); // no such block: fetched, fails, dropped
        let t0 = std::time::Instant::now();
        while !reader.cached(&p.hash) {
            assert!(
                t0.elapsed().as_secs() < 10,
                "prefetched block never arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(&reader.get(&p.hash, p.len).unwrap()[..], &data[..]);
        drop(pf);
        assert!(!reader.cached(&[7; 32]));
    }

    /// A run goes to one worker, which fetches its blocks in turn: a missing one in the middle
    /// does not stop the others, and none stays marked as on its way.
    #[test]
    fn a_run_of_blocks_arrives_whole_around_a_missing_one() {
        let (_d, store) = temp_store();
        let codec = Codec::default();
        let blocks: Vec<_> = (0..4u8)
            .map(|i| prepare(&vec![i + 1; 65536], &codec).unwrap())
            .collect();
        for p in &blocks {
            store.transact(|t| add_ref(t, p, None)).unwrap();
        }
        let reader = Arc::new(BlockReader::new(store.clone(), 1 << 20));
        let pf = Prefetcher::new(reader.clone(), 1, 2);
        let mut run: Vec<_> = blocks.iter().map(|p| (p.hash, p.len)).collect();
        run.insert(2, ([9; 32], 100));
        pf.want_run(run, true);
        let t0 = std::time::Instant::now();
        while !blocks.iter().all(|p| reader.cached(&p.hash)) || !lock(&pf.pending).is_empty() {
            assert!(t0.elapsed().as_secs() < 10, "the run never arrived");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!reader.cached(&[9; 32]));
    }
}
