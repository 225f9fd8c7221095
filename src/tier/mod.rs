//! Tiering: a store keeps at most `cache_size` bytes of block content on its own disk. The
//! coldest blocks that enough replicas hold are evicted (their `b` record stays, marked
//! evicted); a read of one fetches it back by hash ([`fetch`]). keyspace.md, "Tiering", has
//! the rule that makes eviction safe; [`evictable`] is that rule.

pub mod config;
pub mod fetch;
pub mod pin;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::blocks::resident;
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::{Cf, KvError, KvStore, Txn};
use crate::replica::{replica_key, ReplicaRecord};
use crate::util::lock;

/// Eviction brings the resident bytes this far under the limit, so that it runs in batches
/// rather than after every flush.
const HEADROOM: u64 = 20;

/// How many replicas hold block `info` by what they acknowledged: those whose first (base)
/// group and the latest group that named the block after a new reference are both applied.
/// A `U` mark (a reference no group carries yet) means none can be counted on. On a
/// satellite (`upstream`), every block it names is its upstream's to hold: no count is short.
pub fn copies(info: &BlockInfo, replicas: &[ReplicaRecord], upstream: bool) -> u32 {
    if upstream {
        return u32::MAX;
    }
    replicas
        .iter()
        .filter(|r| !r.is_satellite() && r.base.is_some_and(|b| r.acked >= b.max(info.logged)))
        .count() as u32
}

/// Whether block `h` (record `info`) may be evicted now, read in `t` with tracking: resident,
/// not pinned, no reference the log does not carry yet, and held by `min_copies` replicas.
/// A block only history names is no exception: the group that ended its last live reference
/// carried the past hold that makes its replicas keep it (keyspace.md, History).
pub fn evictable(
    t: &mut dyn Txn,
    h: &Hash,
    info: &BlockInfo,
    replicas: &[ReplicaRecord],
    upstream: bool,
    min_copies: u32,
) -> Result<bool, KvError> {
    if info.evicted || info.pins > 0 {
        return Ok(false);
    }
    if t.get(Cf::Bidx, &ks::unlogged_key(h))?.is_some() {
        return Ok(false);
    }
    Ok(copies(info, replicas, upstream) >= min_copies.max(1))
}

/// The replica records, each read with tracking (a replica that starts over drops what it
/// acknowledged: an eviction decided on the old record must then retry).
fn replica_records(t: &mut dyn Txn) -> Result<Vec<ReplicaRecord>, KvError> {
    let (a, b) = Prefix::Replica.range();
    let mut out = Vec::new();
    for (k, _) in t.scan(Cf::Meta, &a, &b, usize::MAX)? {
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        if let Some(v) = t.get(Cf::Meta, &replica_key(&name))? {
            out.push(ReplicaRecord::decode(&v)?);
        }
    }
    Ok(out)
}

/// What an eviction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blocks: u64,
    pub bytes: u64,
    /// Candidates looked at and kept (not yet replicated, pinned, or newly referenced).
    pub kept: u64,
}

/// Evict the coldest evictable blocks until `want` stored bytes are gone or the index is
/// exhausted: pages of the last-use index in key order, each page one transaction. Blocks
/// `keep` names stay (those of files open for writing).
pub fn evict(
    store: &KvStore,
    min_copies: u32,
    want: u64,
    keep: &dyn Fn(&Hash) -> bool,
) -> Result<Evicted, KvError> {
    let (start, end) = Prefix::LastUse.range();
    let mut from = start;
    let mut done = Evicted::default();
    while done.bytes < want {
        let page = store.read(|s| s.scan(Cf::Bidx, &from, &end, 256))?;
        let Some((last, _)) = page.last() else { break };
        from = last.clone();
        from.push(0);
        let step = store.transact(|t| {
            let reps = replica_records(t)?;
            let upstream = t.get(Cf::Meta, ks::META_UPSTREAM)?.is_some();
            let mut step = Evicted::default();
            for (k, _) in &page {
                if done.bytes + step.bytes >= want {
                    break;
                }
                let Some((secs, h)) = ks::parse_last_use_key(k) else {
                    continue;
                };
                let ik = ks::block_info_key(&h);
                let Some(raw) = t.get(Cf::Bidx, &ik)? else {
                    continue;
                };
                let mut info = BlockInfo::decode(&raw)?;
                if info.used != secs
                    || keep(&h)
                    || !evictable(t, &h, &info, &reps, upstream, min_copies)?
                {
                    step.kept += 1;
                    continue;
                }
                resident::evict(t, &h, &mut info)?;
                step.blocks += 1;
                step.bytes += info.stored as u64;
            }
            Ok::<_, KvError>(step)
        })?;
        done.blocks += step.blocks;
        done.bytes += step.bytes;
        done.kept += step.kept;
    }
    Ok(done)
}

/// Uses of blocks seen by readers, gathered in memory and written to the last-use index now
/// and then ([`Touches::flush`]): a read costs no write.
#[derive(Default)]
pub struct Touches {
    /// By the hash's first byte, so that readers on several threads rarely wait on one lock
    /// (one map behind one mutex cost random 4 KiB writes, each of which reads a block, a
    /// fifth of their rate in futex wake-ups).
    seen: [Mutex<HashMap<Hash, u32>>; TOUCH_SHARDS],
    /// Block reads seen (cache hits included), for the hit ratio.
    pub reads: AtomicU64,
}

const TOUCH_SHARDS: usize = 16;

/// A use is recorded at this granularity (seconds): a block read again within it is not
/// moved in the index again.
const TOUCH_GRAIN: u32 = 60;

impl Touches {
    pub fn note(&self, h: &Hash) {
        let now = resident::now_secs() / TOUCH_GRAIN * TOUCH_GRAIN;
        self.reads.fetch_add(1, Ordering::Relaxed);
        lock(&self.seen[h[0] as usize % TOUCH_SHARDS]).insert(*h, now);
    }

    /// Move the blocks used since the last flush in the index. Returns how many moved.
    pub fn flush(&self, store: &KvStore) -> Result<u64, KvError> {
        let seen: Vec<(Hash, u32)> = self
            .seen
            .iter()
            .flat_map(|m| std::mem::take(&mut *lock(m)))
            .collect();
        let mut moved = 0;
        for chunk in seen.chunks(512) {
            moved += store.transact(|t| {
                let mut n = 0;
                for (h, secs) in chunk {
                    n += resident::touch(t, h, *secs)? as u64;
                }
                Ok::<_, KvError>(n)
            })?;
        }
        Ok(moved)
    }
}

/// Holds writers back while the resident bytes are over the limit and eviction is making
/// room (replicas taking what was written): a writer then goes at the replicas' pace instead
/// of filling the disk. Between the tiering thread's rounds, the bytes flushed since count
/// too, so a fast writer cannot run far past the limit in the meantime. When no room comes
/// (replicas down or behind), writers go on and the store grows: unreplicated data is never
/// evicted.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    room: Condvar,
}

#[derive(Default)]
struct GateState {
    /// 0: no limit.
    limit: u64,
    /// Resident bytes at the last round, and bytes flushed since.
    base: u64,
    added: u64,
    stalled: bool,
}

impl GateState {
    fn closed(&self) -> bool {
        self.limit > 0 && !self.stalled && self.base + self.added > self.limit
    }
}

impl Gate {
    /// A round's reading: the resident bytes now and whether eviction stalled.
    pub fn update(&self, limit: Option<u64>, resident: u64, stalled: bool) {
        let mut g = lock(&self.state);
        g.limit = limit.unwrap_or(0);
        g.base = resident;
        g.added = 0;
        g.stalled = stalled;
        self.room.notify_all();
    }

    /// A flush stored about this many new bytes.
    pub fn added(&self, bytes: u64) {
        lock(&self.state).added += bytes;
    }

    /// Whether the last round found eviction stalled (writers then do not wait).
    pub fn stalled(&self) -> bool {
        lock(&self.state).stalled
    }

    /// Whether writers are held now.
    pub fn closed(&self) -> bool {
        lock(&self.state).closed()
    }

    /// Whether the cache is at its size (whatever eviction can do about it).
    pub fn full(&self) -> bool {
        let g = lock(&self.state);
        g.limit > 0 && g.base + g.added >= g.limit
    }

    /// Wait while over the limit, at most `max`.
    pub fn wait_room(&self, max: Duration) {
        let t0 = Instant::now();
        let mut g = lock(&self.state);
        while g.closed() {
            let left = max.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return;
            }
            g = self
                .room
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A mount's tiering state: the settings, the uses not yet written, the writers' gate.
pub struct Tier {
    pub settings: Mutex<config::TierSettings>,
    /// The mount's own settings (they override the store's).
    pub mount_settings: Vec<(String, String)>,
    pub touches: Touches,
    pub gate: Gate,
    /// Stored bytes evicted since the mount's maintenance last took them (it gives their
    /// space back with that of freed blocks).
    evicted_bytes: AtomicU64,
    /// The blocks of the files open for writing, kept resident.
    pub writing: Writing,
}

/// The blocks of the files this mount has open for writing (while a cache size is set):
/// eviction leaves them alone, so that a file being rewritten in place does not wait on its
/// replicas for the blocks it changes. Taken when a file's first writer opens it (one scan of
/// its block map) and as its flushes name new blocks, dropped with its last writer; at most
/// half the cache size in all (a file written larger than the cache, a big copy, must not
/// fill the cache with what cannot be evicted: past the budget its blocks age as any other).
#[derive(Default)]
pub struct Writing {
    inner: Mutex<WritingInner>,
}

#[derive(Default)]
struct WritingInner {
    /// Writers and the blocks taken, by file.
    files: HashMap<u64, (u32, Vec<(Hash, u32)>)>,
    /// How many of those lists name each block.
    blocks: HashMap<Hash, u32>,
    /// Content bytes taken (each block counted per list naming it), and the most there may be.
    bytes: u64,
    budget: u64,
}

impl WritingInner {
    fn take(&mut self, ino: u64, blocks: &[(Hash, u32)]) {
        let Some((_, list)) = self.files.get_mut(&ino) else {
            return;
        };
        for (h, len) in blocks {
            if self.bytes + *len as u64 > self.budget {
                return;
            }
            self.bytes += *len as u64;
            list.push((*h, *len));
            *self.blocks.entry(*h).or_default() += 1;
        }
    }
}

impl Writing {
    /// The budget, from the cache size in force.
    pub fn set_cache_size(&self, cache_size: Option<u64>) {
        lock(&self.inner).budget = cache_size.unwrap_or(0) / 2;
    }

    /// A writer opened `ino`; `blocks` lists its blocks and their lengths (called for its
    /// first writer only).
    pub fn opened(&self, ino: u64, blocks: impl FnOnce() -> Vec<(Hash, u32)>) {
        let mut w = lock(&self.inner);
        if let Some((n, _)) = w.files.get_mut(&ino) {
            *n += 1;
            return;
        }
        drop(w);
        let hashes = blocks();
        let mut w = lock(&self.inner);
        // Another writer may have come meanwhile: then its list stands and gains these.
        w.files.entry(ino).or_insert((0, Vec::new())).0 += 1;
        w.take(ino, &hashes);
    }

    /// `ino`'s flush named these blocks.
    pub fn wrote(&self, ino: u64, blocks: &[(Hash, u32)]) {
        lock(&self.inner).take(ino, blocks);
    }

    /// A writer of `ino` closed it.
    pub fn closed(&self, ino: u64) {
        let mut w = lock(&self.inner);
        let Some((n, _)) = w.files.get_mut(&ino) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        let (_, list) = w.files.remove(&ino).expect("present");
        for (h, len) in list {
            w.bytes -= len as u64;
            if let Some(c) = w.blocks.get_mut(&h) {
                *c -= 1;
                if *c == 0 {
                    w.blocks.remove(&h);
                }
            }
        }
    }

    pub fn holds(&self, h: &Hash) -> bool {
        lock(&self.inner).blocks.contains_key(h)
    }

    /// Whether `ino` is tracked (a flush need not list its blocks otherwise).
    pub fn tracks(&self, ino: u64) -> bool {
        lock(&self.inner).files.contains_key(&ino)
    }
}

/// Persisted counters of fetching (`status` reads them; the mount adds what it did).
pub const COUNTER_FETCHED_BLOCKS: &str = "fetched_blocks";
pub const COUNTER_FETCHED_BYTES: &str = "fetched_bytes";
pub const COUNTER_FETCH_FAILURES: &str = "fetch_failures";
pub const COUNTER_BLOCK_READS: &str = "block_reads";

impl Tier {
    pub fn new(settings: config::TierSettings, mount_settings: Vec<(String, String)>) -> Tier {
        Tier {
            settings: Mutex::new(settings),
            mount_settings,
            touches: Touches::default(),
            gate: Gate::default(),
            evicted_bytes: AtomicU64::new(0),
            writing: {
                let w = Writing::default();
                w.set_cache_size(settings.cache_size);
                w
            },
        }
    }

    /// Whether a sequential read of a file of `size` bytes passes through rather than being
    /// stored: the file is larger than the cache. Under LRU, a file larger than the cache read
    /// in order never hits (each block is evicted before the next pass reaches it), and
    /// storing it would evict everything else first: one read of a film would empty the
    /// working set.
    pub fn streams_past(&self, size: u64) -> bool {
        lock(&self.settings).cache_size.is_some_and(|c| size > c)
    }

    /// Stored bytes evicted since the last call.
    pub fn take_evicted_bytes(&self) -> u64 {
        self.evicted_bytes.swap(0, Ordering::Relaxed)
    }

    /// One round of the mount's tiering thread: write the uses seen, and evict when over the
    /// limit. Returns the bytes evicted.
    /// `progress`: when eviction last made room (or was not needed).
    pub fn round(&self, store: &KvStore, progress: &mut Instant) -> Result<u64, KvError> {
        self.touches.flush(store)?;
        let settings = *lock(&self.settings);
        self.writing.set_cache_size(settings.cache_size);
        let Some(cache_size) = settings.cache_size else {
            self.gate.update(None, 0, false);
            return Ok(0);
        };
        let resident = resident::totals(store)?.resident;
        if resident <= cache_size {
            *progress = Instant::now();
            self.gate.update(Some(cache_size), resident, false);
            return Ok(0);
        }
        let target = cache_size - cache_size / HEADROOM;
        let e = evict(store, settings.min_copies, resident - target, &|h| {
            self.writing.holds(h)
        })?;
        self.evicted_bytes.fetch_add(e.bytes, Ordering::Relaxed);
        let now = resident::totals(store)?.resident;
        if e.bytes > 0 {
            *progress = Instant::now();
            tracing::debug!(
                blocks = e.blocks,
                bytes = e.bytes,
                kept = e.kept,
                resident = now,
                "evicted"
            );
        }
        // Ten seconds without anything to evict: the replicas are not taking the data;
        // writers stop waiting for them.
        let stalled = progress.elapsed() >= STALL_AFTER;
        if stalled && !self.gate.stalled() {
            tracing::warn!(
                resident = now,
                cache_size,
                "over the cache size and nothing can be evicted: no replica holds the newest data yet; the store grows until they do"
            );
        }
        self.gate.update(Some(cache_size), now, stalled);
        Ok(e.bytes)
    }
}

/// `kvfs config` on a mounted store: the store's settings change, and this mount's with them
/// (its own `-o` settings still win). Returns the store's settings.
pub fn configure(
    store: &KvStore,
    tier: &Tier,
    changes: &[(String, String)],
) -> Result<config::Settings, KvError> {
    let stored = config::write(store, changes)?;
    let now =
        config::TierSettings::resolve(&stored, &tier.mount_settings.iter().cloned().collect())
            .map_err(KvError::Other)?;
    *lock(&tier.settings) = now;
    Ok(stored)
}

/// Writers stop waiting for room after this long without any eviction.
const STALL_AFTER: Duration = Duration::from_secs(10);

/// The mount's tiering thread: every second, a [`Tier::round`] and the fetch counters into
/// the store; at the end, the last uses. (The space of evicted blocks is given back by the
/// mount's maintenance, with that of freed blocks: [`Tier::take_evicted_bytes`].)
pub fn run(store: &KvStore, tier: &Tier, fetcher: &fetch::Fetcher, stop: &AtomicBool) {
    let mut progress = Instant::now();
    let mut last_err: Option<String> = None;
    let mut reported = (0u64, 0u64, 0u64, 0u64);
    let mut t = Instant::now() - Duration::from_secs(1);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // Every second; five times as often while writers wait for room.
        let every = if tier.gate.closed() {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        };
        if !stopping && t.elapsed() < every {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        t = Instant::now();
        let r = tier.round(store, &mut progress).and_then(|_| {
            let st = fetcher.stats();
            let now = (
                st.blocks.load(Ordering::Relaxed),
                st.bytes.load(Ordering::Relaxed),
                st.failures.load(Ordering::Relaxed),
                tier.touches.reads.load(Ordering::Relaxed),
            );
            if now != reported {
                let d = [
                    (COUNTER_FETCHED_BLOCKS, now.0 - reported.0),
                    (COUNTER_FETCHED_BYTES, now.1 - reported.1),
                    (COUNTER_FETCH_FAILURES, now.2 - reported.2),
                    (COUNTER_BLOCK_READS, now.3 - reported.3),
                ];
                store.transact(|t| {
                    for (name, n) in d {
                        if n > 0 {
                            t.merge(Cf::Bidx, &ks::counter_key(name), &(n as i64).to_le_bytes())?;
                        }
                    }
                    Ok::<_, KvError>(())
                })?;
                reported = now;
            }
            Ok(())
        });
        match r {
            Err(e) if last_err.as_deref() != Some(&e.to_string()) => {
                tracing::error!(error = %e, "tiering round failed");
                last_err = Some(e.to_string());
            }
            Err(_) => {}
            Ok(()) => last_err = None,
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Writing;

    #[test]
    fn the_writing_set_counts_writers_and_keeps_to_its_budget() {
        let w = Writing::default();
        w.set_cache_size(Some(600));
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        w.opened(7, || vec![(a, 100), (b, 100)]);
        w.opened(7, || panic!("listed once, for the first writer"));
        w.opened(8, || vec![(a, 100)]);
        // Over the budget of 300: not taken, left to age as any block.
        w.wrote(7, &[(c, 100)]);
        assert!(w.holds(&a) && w.holds(&b) && !w.holds(&c));
        // Not tracked: nothing taken.
        w.wrote(9, &[(c, 1)]);
        assert!(!w.tracks(9) && !w.holds(&c));
        w.closed(7);
        assert!(w.holds(&b), "one writer of 7 is left");
        w.closed(7);
        assert!(w.holds(&a) && !w.holds(&b), "8 still names a");
        w.wrote(8, &[(c, 100)]);
        assert!(w.holds(&c), "room again once 7 let go");
        w.closed(8);
        assert!(!w.holds(&a) && !w.holds(&c));
    }
}
