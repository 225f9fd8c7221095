//! The kv layer: the storage engine behind a trait, and the one retry loop.
//!
//! Everything above sees [`KvStore`], the [`Txn`] trait and the [`Cf`] enum, never an engine.
//! An [`Engine`] gives transactions, snapshots, plain reads and a few capabilities named for
//! what they do for the filesystem (store bulk values durably outside a transaction, give the
//! space of freed blocks back, ...), each with a default for an engine that has no such thing.
//! [`rocks`] is the RocksDB engine (the only code in kvfs that knows RocksDB); [`mem`] is an
//! in-memory engine for tests that injects faults and simulates crashes. A FoundationDB or
//! TiKV engine would be a third file beside them: its limits (10 MB and 5 s per transaction,
//! 100 KB per value) are why every operation whose size grows with a file is written as a
//! sequence of bounded transactions where that is correct (freeing an unlinked file's blocks).
//!
//! Every filesystem operation runs through [`KvStore::transact`]: the closure gets a fresh
//! transaction, and when commit reports a conflict the whole closure runs again after a
//! jittered backoff, a bounded number of times. No other error is retried.
//!
//! Conflict rule (optimistic), which every engine keeps: [`Txn::get`] tracks the key it read,
//! and every put, merge and delete is tracked; commit fails with [`KvError::Conflict`] if any
//! tracked key was written by someone else after this transaction first touched it.
//! [`Txn::get_untracked`] and [`Txn::scan`] take no conflict, so callers use them only where a
//! tracked key already covers the decision (a directory scan is covered by the directory's
//! inode, which every dirent change rewrites; an open-count scan by the `\xfe o` pseudo-key).

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod hook_tests;
#[cfg(test)]
pub mod mem;
pub mod rocks;
mod tracked;

use tracked::Tracked;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Column families. The names are part of the on-disk format (keyspace.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Metadata: `M`, `i`, `d`, `g`, `p` keys.
    Meta,
    /// Block maps: `f ino blockno`.
    Fmap,
    /// Block contents: `B hash`, `W hash`.
    Blocks,
    /// Block index: `b hash` info, `r hash shard` refcounts (merge), `G hash shard` garbage.
    Bidx,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Meta, Cf::Fmap, Cf::Blocks, Cf::Bidx];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Fmap => "fmap",
            Cf::Blocks => "blocks",
            Cf::Bidx => "bidx",
        }
    }

    /// Index into [`Cf::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether merges into this family sum little-endian i64 counters ([`sum_counters`]).
    pub fn sums(self) -> bool {
        self == Cf::Bidx
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Another transaction wrote a key this one tracked; the caller may retry.
    #[error("transaction conflict")]
    Conflict,
    /// The disk under the store is full.
    #[error("no space left on the store's disk: {0}")]
    NoSpace(String),
    /// The engine reports corruption of its own files.
    #[error("store corruption: {0}")]
    Corruption(String),
    /// The store is open in another process.
    #[error("store is in use by another process (already mounted?)")]
    Locked,
    /// A write on a store opened read-only (tools inspecting a mounted store).
    #[error("store is open read-only")]
    ReadOnly,
    #[error("store error: {0}")]
    Other(String),
}

/// Errors that [`KvStore::transact`] can inspect to decide on a retry.
pub trait Retryable: From<KvError> {
    fn is_conflict(&self) -> bool;
}

impl Retryable for KvError {
    fn is_conflict(&self) -> bool {
        matches!(self, KvError::Conflict)
    }
}

/// One key/value pair from a scan.
pub type Pair = (Vec<u8>, Vec<u8>);

/// The operations a filesystem transaction may use.
pub trait Txn {
    /// Read a key and track it for conflicts.
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Read a key without tracking it (bulk data whose name already proves its content).
    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError>;
    /// Apply a merge operand (the `Bidx` family sums little-endian i64 counters).
    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError>;
    /// Keys in `[start, end)`, in order, at most `limit`, seeing this transaction's own writes.
    /// Untracked.
    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError>;
    /// Whether a change tracker records this transaction's writes (the store has replicas):
    /// writers then mark what the log must still carry.
    fn logs_changes(&self) -> bool {
        false
    }
    /// Record this transaction's past (history) under the moment `at` (nanoseconds since the
    /// epoch) instead of the commit's: a replica applying a group keeps it at the moment its
    /// primary took it. A moment not above the last one recorded is raised to just above it.
    fn record_at(&mut self, _at: u64) {}
    /// Add `delta` to the sharded counter `key` (in a family that sums): the transaction's
    /// deltas to one key are summed and written as one merge operand to `key` `/` a random
    /// shard below [`SUM_SHARDS`] at commit, so that concurrent transactions rarely write the
    /// same key (a merge is a tracked write: two that do, conflict).
    fn add_sum(&mut self, cf: Cf, key: &[u8], delta: i64) -> Result<(), KvError> {
        self.merge(
            cf,
            &sum_shard_key(key, random_shard()),
            &delta.to_le_bytes(),
        )
    }
}

/// Shards of a counter written with [`Txn::add_sum`].
pub const SUM_SHARDS: u8 = 32;

/// The key of shard `shard` of counter `key`.
pub fn sum_shard_key(key: &[u8], shard: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(key);
    k.push(b'/');
    k.push(shard);
    k
}

fn random_shard() -> u8 {
    (crate::util::rand_u64() % SUM_SHARDS as u64) as u8
}

/// The [`Txn`] methods of a read-only snapshot: untracked reads are its plain reads, and every
/// write is refused with [`KvError::ReadOnly`]. One definition for every engine's snapshot.
macro_rules! snapshot_txn_methods {
    () => {
        fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            self.get(cf, key)
        }

        fn put(&mut self, _: Cf, _: &[u8], _: &[u8]) -> Result<(), KvError> {
            Err(KvError::ReadOnly)
        }

        fn delete(&mut self, _: Cf, _: &[u8]) -> Result<(), KvError> {
            Err(KvError::ReadOnly)
        }

        fn merge(&mut self, _: Cf, _: &[u8], _: &[u8]) -> Result<(), KvError> {
            Err(KvError::ReadOnly)
        }
    };
}
pub(crate) use snapshot_txn_methods;

/// A read-write transaction of an engine: a [`Txn`] that can be committed. Dropping it
/// without commit rolls it back.
pub trait EngineTxn: Txn {
    fn as_txn(&mut self) -> &mut dyn Txn;
    /// Apply every write at once, or fail with [`KvError::Conflict`] (nothing applied) when a
    /// tracked key changed since this transaction touched it.
    fn commit(self: Box<Self>) -> Result<(), KvError>;
}

/// A storage engine. Object safe, so that [`KvStore`] holds any engine.
pub trait Engine: Send + Sync {
    /// A fresh read-write transaction ([`KvError::ReadOnly`] on a read-only open).
    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, KvError>;
    /// A consistent read-only view of the committed state; writes fail with `ReadOnly`.
    fn snapshot(&self) -> Box<dyn Txn + '_>;
    /// Read the latest committed value outside any transaction.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// [`Engine::get`] for a caller that only looks at the value: `visit` sees it where the
    /// engine holds it, without a copy where the engine allows. Returns whether there was one.
    fn get_in_place(
        &self,
        cf: Cf,
        key: &[u8],
        visit: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, KvError> {
        Ok(self.get(cf, key)?.map(|v| visit(&v)).is_some())
    }
    /// Visit committed pairs in `[start, end)` in order until `visit` returns false. Not one
    /// snapshot across the whole range on every engine: for tools and the sweeper.
    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError>;
    /// Make every committed transaction durable.
    fn sync(&self) -> Result<(), KvError>;
    /// Whether every committed transaction is durable already (a sync has nothing to do);
    /// false where the engine cannot tell.
    fn all_synced(&self) -> bool {
        false
    }
    /// Whether this process holds the store alone (no other writer can exist).
    fn is_exclusive(&self) -> bool;
    fn is_read_only(&self) -> bool;

    /// Store `pairs` into `cf` durably now, outside any transaction: on disk when this
    /// returns. Engines with a log for small commits store bulk block values past it (the
    /// caller proves to its transaction that the values arrived: `blocks::write_ahead`).
    /// Default: one transaction, then a sync.
    fn store_bulk_durably(&self, cf: Cf, pairs: &[(Vec<u8>, &[u8])]) -> Result<(), KvError> {
        let mut t = self.begin()?;
        for (k, v) in pairs {
            t.put(cf, k, v)?;
        }
        t.commit()?;
        self.sync()
    }

    /// Delete `keys` outside any transaction, durable at the next sync: bookkeeping whose
    /// loss in a crash recovery repairs, and on which no transaction decides.
    fn delete_unsynced(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<(), KvError> {
        let mut t = self.begin()?;
        for k in keys {
            t.delete(cf, k)?;
        }
        t.commit()
    }

    /// Apply `ops` (a put with a value, a delete without) at once, with no conflict check:
    /// for bookkeeping whose writer excludes every other writer of those keys itself (history's
    /// indexer, which writes keys no transaction writes). Not synced. Default: a transaction.
    fn write_unchecked(&self, ops: &[Write]) -> Result<(), KvError> {
        let mut t = self.begin()?;
        for (cf, k, v) in ops {
            match v {
                Some(v) => t.put(*cf, k, v)?,
                None => t.delete(*cf, k)?,
            }
        }
        t.commit()
    }

    /// Make the whole state durable without needing the engine's log at the next open (the
    /// clean end of a mount). Default: a sync.
    fn checkpoint(&self) -> Result<(), KvError> {
        self.sync()
    }

    /// Give the disk space of freed blocks back. Default: nothing to do (an engine that frees
    /// space as it deletes).
    fn reclaim_freed_space(&self) -> Result<(), KvError> {
        Ok(())
    }

    /// Bytes the engine holds on disk for block values, live and freed but not yet reclaimed;
    /// `None` if it cannot tell.
    fn block_storage_bytes(&self) -> Option<u64> {
        None
    }

    /// Bytes of the whole store on disk (and in memory waiting to be written).
    fn bytes_on_disk(&self) -> u64;

    /// On a read-only open that follows a writer: see what it committed since. Default:
    /// nothing (the view is fixed, or always current).
    fn catch_up(&self) -> Result<(), KvError> {
        Ok(())
    }
}

/// Options chosen at open time.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub create: bool,
    /// Open without taking the store's lock, for reading only: works while another process
    /// has the store open, and sees what that process had committed at this moment.
    pub read_only: bool,
    /// Block cache in bytes shared by all families.
    pub cache_bytes: usize,
    /// With `read_only`: follow the process that has the store open, catching up on what it
    /// commits ([`KvStore::catch_up`]); the engine may keep its own files here.
    pub follow: Option<std::path::PathBuf>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create: false,
            read_only: false,
            cache_bytes: 32 << 20,
            follow: None,
        }
    }
}

/// Records which keys each committed transaction wrote, for shipping them elsewhere
/// (replication). The kv layer knows neither which keys matter nor how the record is encoded:
/// the tracker says. Installed with [`KvStore::track_changes`].
pub trait ChangeTracker: Send + Sync {
    /// Whether a write (put or delete) of `key` in `cf` is to be recorded.
    fn wants(&self, cf: Cf, key: &[u8]) -> bool;
    /// The one extra write (family, key, value) recording that a transaction wrote `keys`.
    /// Its key must be unique to this call, so that it never conflicts.
    fn marker(&self, keys: &[(Cf, Vec<u8>)]) -> Result<(Cf, Vec<u8>, Vec<u8>), KvError>;
    /// The transaction that was given `marker_key` committed or failed.
    fn settled(&self, marker_key: &[u8]);
    /// A key below which every marker handed out has settled (so a reader of a snapshot
    /// taken after this call sees every committed marker below it).
    fn low_water(&self) -> Vec<u8>;
}

type Tracker = Option<Arc<dyn ChangeTracker>>;

/// What a key held before a transaction first wrote it (`None`: absent).
pub type Before = (Cf, Vec<u8>, Option<Vec<u8>>);

/// One write of [`Engine::write_unchecked`]: a put of the value, or a delete without one.
pub type Write = (Cf, Vec<u8>, Option<Vec<u8>>);

/// Keeps the past of some keys (history): for every transaction that writes one, the value
/// each had before, written at commit under one moment. The kv layer knows neither which
/// keys nor how the past is encoded: the recorder says. Installed with
/// [`KvStore::record_history`].
pub trait HistoryRecorder: Send + Sync {
    /// Whether the past of `key` in `cf` is kept.
    fn wants(&self, cf: Cf, key: &[u8]) -> bool;
    /// Write into `t` what keeps `befores` (each key's value before `t`), as the state that
    /// ended at `at` (nanoseconds since the epoch; unique and increasing per store). Keys it
    /// writes that the change tracker wants are noted like the transaction's own.
    fn record(&self, t: &mut dyn Txn, at: u64, befores: &[Before]) -> Result<(), KvError>;
}

type Recorder = Option<Arc<dyn HistoryRecorder>>;

/// The moments of history commits: each gets one above the last, and commits in that order.
struct Clock {
    last: u64,
}

/// The store as the filesystem sees it: an engine plus the transaction loop.
pub struct KvStore {
    engine: Arc<dyn Engine>,
    /// Held for reading across each commit, so that once [`KvStore::track_changes`] returns,
    /// every later commit carries its marker.
    tracker: std::sync::RwLock<Tracker>,
    /// Same for the history recorder.
    history: std::sync::RwLock<Recorder>,
    /// Held across every commit that records history, so that moments follow commit order.
    clock: std::sync::Mutex<Clock>,
}

fn same_recorder(a: &Recorder, b: &Recorder) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// What a commit needs for history: the recorder the transaction began with, the values
/// it replaced, and the moment it asked for.
struct Past<'a> {
    began_with: &'a Recorder,
    befores: &'a [Before],
    at: Option<u64>,
}

/// Now, in nanoseconds since the epoch (the unit of history's moments).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn same_tracker(a: &Tracker, b: &Tracker) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// Most conflicts resolve in a few rounds; past this the caller gets EIO-class `Conflict`
/// rather than spinning forever.
const MAX_ATTEMPTS: u32 = 64;

/// The merge operator of families that [`Cf::sums`]: the sum of little-endian i64 counters.
pub fn sum_counters<'a>(
    existing: Option<&[u8]>,
    operands: impl Iterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut total = existing.map(decode_i64).unwrap_or(0);
    for op in operands {
        total = total.wrapping_add(decode_i64(op));
    }
    total.to_le_bytes().to_vec()
}

/// Decode a counter; malformed bytes count as 0 here and are reported by audit.
pub fn decode_i64(b: &[u8]) -> i64 {
    <[u8; 8]>::try_from(b).map(i64::from_le_bytes).unwrap_or(0)
}

impl KvStore {
    /// Open the RocksDB store at `path`.
    pub fn open(path: &Path, o: &OpenOptions) -> Result<KvStore, KvError> {
        Ok(KvStore::with_engine(Arc::new(rocks::RocksEngine::open(
            path, o,
        )?)))
    }

    pub fn with_engine(engine: Arc<dyn Engine>) -> KvStore {
        KvStore {
            engine,
            tracker: std::sync::RwLock::new(None),
            history: std::sync::RwLock::new(None),
            clock: std::sync::Mutex::new(Clock { last: 0 }),
        }
    }

    /// The engine under this store, for a view over it (a past moment, `history::view`).
    pub fn engine(&self) -> Arc<dyn Engine> {
        self.engine.clone()
    }

    /// Keep, from now on, the past of the keys `recorder` wants (`None`: stop). `last` is the
    /// latest moment already recorded in the store: every new one is above it. When this
    /// returns, every transaction committing later records its past.
    pub fn record_history(&self, recorder: Option<Arc<dyn HistoryRecorder>>, last: u64) {
        // The clock first and released: a commit holds the recorder's read lock while it
        // takes the clock, so holding the clock while waiting for the write lock would
        // deadlock with it.
        {
            let mut c = crate::util::lock(&self.clock);
            c.last = c.last.max(last);
        }
        *self.history.write().unwrap_or_else(|e| e.into_inner()) = recorder;
    }

    /// Whether a history recorder is installed.
    pub fn records_history(&self) -> bool {
        self.current_history().is_some()
    }

    fn current_history(&self) -> Recorder {
        self.history
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A moment for something that is not a commit (a named snapshot): above every moment
    /// recorded so far, so every commit before it is in its state and none after.
    pub fn history_now(&self) -> u64 {
        let mut c = crate::util::lock(&self.clock);
        c.last = c.last.saturating_add(1).max(now_ns());
        c.last
    }

    /// Record, from now on, the keys every transaction writes (`None`: stop). When this
    /// returns, every transaction committing later carries its marker: one that began before
    /// and had not noted its keys is retried as on a conflict.
    pub fn track_changes(&self, tracker: Option<Arc<dyn ChangeTracker>>) {
        *self.tracker.write().unwrap_or_else(|e| e.into_inner()) = tracker;
    }

    /// Whether a change tracker is installed.
    pub fn tracks_changes(&self) -> bool {
        self.current_tracker().is_some()
    }

    fn current_tracker(&self) -> Tracker {
        self.tracker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this process holds the store alone, so that any other mount recorded in it
    /// cannot be alive.
    pub fn is_exclusive(&self) -> bool {
        self.engine.is_exclusive()
    }

    pub fn is_read_only(&self) -> bool {
        self.engine.is_read_only()
    }

    /// Run `f` as one transaction, retrying the whole closure on conflict.
    pub fn transact<T, E: Retryable>(
        &self,
        mut f: impl FnMut(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut attempt = 0;
        loop {
            let mut t = self.engine.begin().map_err(E::from)?;
            let tracker = self.current_tracker();
            let history = self.current_history();
            let mut tracked = Tracked::new(t.as_txn(), &tracker, &history);
            // On error the transaction is dropped, which rolls it back.
            let res = f(&mut tracked).and_then(|v| {
                let shard = random_shard();
                for (cf, key, delta) in std::mem::take(&mut tracked.sums) {
                    if delta != 0 {
                        let k = sum_shard_key(&key, shard);
                        tracked
                            .inner
                            .merge(cf, &k, &delta.to_le_bytes())
                            .map_err(E::from)?;
                    }
                }
                Ok(v)
            });
            let written = std::mem::take(&mut tracked.written);
            let befores = std::mem::take(&mut tracked.befores);
            let at = tracked.at;
            let res = res.and_then(|v| {
                let past = Past {
                    began_with: &history,
                    befores: &befores,
                    at,
                };
                self.commit_tracked(t, &tracker, &written, past)
                    .map(|_| v)
                    .map_err(E::from)
            });
            match res {
                Err(e) if e.is_conflict() && attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    backoff(attempt);
                }
                other => return other,
            }
        }
    }

    /// Commit `t`, adding the tracker's marker for `written`; a conflict if the tracker
    /// changed since `t` began (its writes were noted for another tracker or none).
    fn commit_tracked(
        &self,
        mut t: Box<dyn EngineTxn + '_>,
        began_with: &Tracker,
        written: &[(Cf, Vec<u8>)],
        past: Past<'_>,
    ) -> Result<(), KvError> {
        let now = self.tracker.read().unwrap_or_else(|e| e.into_inner());
        if !same_tracker(&now, began_with) {
            return Err(KvError::Conflict);
        }
        let recorder = self.history.read().unwrap_or_else(|e| e.into_inner());
        if !same_recorder(&recorder, past.began_with) {
            return Err(KvError::Conflict);
        }
        // A moment for this commit, taken and committed under the clock's lock so that the
        // moments of history follow the order of commits.
        let mut clock = None;
        let mut noted = Vec::new();
        if let (Some(rec), false) = (recorder.as_ref(), past.befores.is_empty()) {
            let c = crate::util::lock(&self.clock);
            let at = past.at.unwrap_or_else(now_ns).max(c.last.saturating_add(1));
            // What the recorder writes is noted for the tracker too (replicas hold what the
            // past names).
            let none: Recorder = None;
            let mut noting = Tracked::new(t.as_txn(), &now, &none);
            rec.record(&mut noting, at, past.befores)?;
            noted = noting.written;
            clock = Some((c, at));
        }
        let all;
        let written = match noted.is_empty() {
            true => written,
            false => {
                all = [written, &noted[..]].concat();
                &all[..]
            }
        };
        let r = match (now.as_ref(), written.is_empty()) {
            (Some(tr), false) => {
                let (cf, key, value) = tr.marker(written)?;
                let r = t.put(cf, &key, &value).and_then(|_| t.commit());
                tr.settled(&key);
                r
            }
            _ => t.commit(),
        };
        if let (Ok(()), Some((mut c, at))) = (&r, clock) {
            c.last = at;
        }
        r
    }

    /// See [`ChangeTracker::low_water`]; `None` without a tracker.
    pub fn change_low_water(&self) -> Option<Vec<u8>> {
        self.current_tracker().map(|t| t.low_water())
    }

    /// Run `f` once on a consistent snapshot of the store: reads only (writes fail with
    /// [`KvError::ReadOnly`]), no conflict tracking, no commit, so no retry. For operations
    /// that only look (lookup, getattr, read, readdir): a snapshot cannot see half of a
    /// concurrent transaction, and skipping the tracking keeps them off the commit path.
    pub fn read<T, E: From<KvError>>(
        &self,
        f: impl FnOnce(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut s = self.engine.snapshot();
        f(&mut *s)
    }

    /// Make every committed transaction durable (nothing to do on a read-only open).
    pub fn sync(&self) -> Result<(), KvError> {
        if self.engine.is_read_only() {
            return Ok(());
        }
        self.engine.sync()
    }

    /// See [`Engine::all_synced`].
    pub fn all_synced(&self) -> bool {
        self.engine.all_synced()
    }

    /// See [`Engine::store_bulk_durably`].
    pub fn store_bulk_durably(&self, cf: Cf, pairs: &[(Vec<u8>, &[u8])]) -> Result<(), KvError> {
        self.engine.store_bulk_durably(cf, pairs)
    }

    /// See [`Engine::delete_unsynced`].
    pub fn delete_unsynced(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<(), KvError> {
        self.engine.delete_unsynced(cf, keys)
    }

    /// See [`Engine::write_unchecked`].
    pub fn write_unchecked(&self, ops: &[Write]) -> Result<(), KvError> {
        self.engine.write_unchecked(ops)
    }

    /// See [`Engine::checkpoint`].
    pub fn checkpoint(&self) -> Result<(), KvError> {
        self.engine.checkpoint()
    }

    /// See [`Engine::reclaim_freed_space`].
    pub fn reclaim_freed_space(&self) -> Result<(), KvError> {
        self.engine.reclaim_freed_space()
    }

    /// See [`Engine::block_storage_bytes`]; 0 if unknown.
    pub fn block_storage_bytes(&self) -> u64 {
        self.engine.block_storage_bytes().unwrap_or(0)
    }

    /// Read outside a transaction (tools, statistics).
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.engine.get(cf, key)
    }

    /// `f` of the latest committed value, outside any transaction, without copying the value
    /// out of the engine first (a block read: the decode makes the one copy it keeps).
    pub fn get_with<R>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, KvError> {
        let (mut f, mut out) = (Some(f), None);
        self.engine.get_in_place(cf, key, &mut |v| {
            if let Some(f) = f.take() {
                out = Some(f(v));
            }
        })?;
        Ok(out)
    }

    /// Scan outside a transaction, calling `visit` for each pair in `[start, end)` until it
    /// returns false.
    pub fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError> {
        self.engine.for_each(cf, start, end, &mut visit)
    }

    /// See [`Engine::catch_up`].
    pub fn catch_up(&self) -> Result<(), KvError> {
        self.engine.catch_up()
    }

    /// Total bytes of the store on disk, for statfs and reports.
    pub fn bytes_on_disk(&self) -> u64 {
        self.engine.bytes_on_disk()
    }
}

fn backoff(attempt: u32) {
    // Exponential with full jitter, capped at ~20 ms.
    let cap_us = (50u64 << attempt.min(9)).min(20_000);
    let us = crate::util::rand_u64() % cap_us.max(1);
    std::thread::sleep(Duration::from_micros(us));
}
