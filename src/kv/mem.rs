//! An in-memory engine for tests: ordered maps with versions, the same optimistic conflict
//! rule as RocksDB, and faults on a seeded schedule. In the spirit of FoundationDB's
//! simulation: a commit may fail with an I/O error (nothing applied) or be made to conflict,
//! and [`MemEngine::crash`] drops what was never synced, keeping a prefix of the commits as
//! a log-structured engine does after a power loss.
//!
//! Durability model (that of the RocksDB engine): commits go to a log in order; `sync` makes
//! the whole log durable; `store_bulk_durably` syncs the log and then makes its pairs durable
//! at once. A crash keeps every synced commit and a random prefix of the others.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::{sum_counters, Cf, Engine, EngineTxn, KvError, Pair, Txn};
use crate::util::lock;

type Map = BTreeMap<Vec<u8>, Vec<Version>>;

#[derive(Clone, Debug)]
struct Version {
    seq: u64,
    value: Option<Arc<Vec<u8>>>,
}

#[derive(Clone, Debug)]
enum Op {
    Put(Cf, Vec<u8>, Arc<Vec<u8>>),
    Delete(Cf, Vec<u8>),
    Merge(Cf, Vec<u8>, Vec<u8>),
}

#[derive(Default)]
struct State {
    maps: [Map; 4],
    /// Sequence number of the last commit.
    seq: u64,
    /// Every commit since the engine was made, in order: what a crash replays.
    log: Vec<Vec<Op>>,
    /// Commits `..synced` of the log survive a crash.
    synced: usize,
    /// Live snapshots by sequence number (how many at each).
    snapshots: BTreeMap<u64, usize>,
    /// Most writes one commit made since last asked ([`MemEngine::take_largest_commit`]).
    largest: usize,
}

fn latest(versions: &[Version], at: u64) -> Option<&Arc<Vec<u8>>> {
    versions
        .iter()
        .rev()
        .find(|v| v.seq <= at)
        .and_then(|v| v.value.as_ref())
}

impl State {
    fn value(&self, cf: Cf, key: &[u8], at: u64) -> Option<Vec<u8>> {
        self.maps[cf.index()]
            .get(key)
            .and_then(|v| latest(v, at))
            .map(|v| v.to_vec())
    }

    fn last_write(&self, cf: Cf, key: &[u8]) -> u64 {
        self.maps[cf.index()]
            .get(key)
            .and_then(|v| v.last())
            .map_or(0, |v| v.seq)
    }

    fn range(&self, cf: Cf, start: &[u8], end: &[u8], at: u64) -> Vec<Pair> {
        if start >= end {
            return Vec::new();
        }
        self.maps[cf.index()]
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .filter_map(|(k, v)| latest(v, at).map(|v| (k.clone(), v.to_vec())))
            .collect()
    }

    /// Apply one commit's ops as a new sequence number, and log them.
    fn apply(&mut self, ops: Vec<Op>) {
        self.seq += 1;
        self.largest = self.largest.max(ops.len());
        let seq = self.seq;
        let oldest = self.snapshots.keys().next().copied().unwrap_or(seq);
        for op in &ops {
            let (cf, key, value) = match op {
                Op::Put(cf, k, v) => (*cf, k, Some(v.clone())),
                Op::Delete(cf, k) => (*cf, k, None),
                Op::Merge(cf, k, operand) => {
                    let old = self.value(*cf, k, seq);
                    let sum = sum_counters(old.as_deref(), std::iter::once(&operand[..]));
                    (*cf, k, Some(Arc::new(sum)))
                }
            };
            let versions = self.maps[cf.index()].entry(key.clone()).or_default();
            versions.push(Version { seq, value });
            // Versions no snapshot can see any more go (tombstones stay: conflicts need the
            // sequence number of the last write).
            if let Some(keep) = versions.iter().rposition(|v| v.seq <= oldest) {
                versions.drain(..keep);
            }
        }
        self.log.push(ops);
    }
}

/// The schedule of injected faults: per-mille chances drawn from a seeded generator, so a
/// run replays exactly from its seed.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    rng: u64,
    /// Chance (per mille) that a commit fails with an I/O error, nothing applied.
    pub commit_error: u32,
    /// Chance (per mille) that a commit reports a conflict, nothing applied.
    pub conflict: u32,
    /// Chance (per mille) that storing bulk values fails, nothing stored.
    pub bulk_error: u32,
    pub errors_injected: u64,
    pub conflicts_injected: u64,
}

impl Faults {
    pub fn seeded(seed: u64) -> Faults {
        Faults {
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            ..Default::default()
        }
    }

    fn next(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.next() % 1000 < per_mille as u64
    }
}

#[derive(Default)]
pub struct MemEngine {
    state: Mutex<State>,
    faults: Mutex<Faults>,
    /// Several mounts change it at once (tests of what mounts sharing a store see).
    shared: bool,
}

impl MemEngine {
    pub fn new() -> Arc<MemEngine> {
        Arc::new(MemEngine::default())
    }

    /// An engine that does not claim one user ([`Engine::is_exclusive`] is false): for tests
    /// that put several mounts on one store, as a shared engine (FoundationDB) would.
    pub fn shared() -> Arc<MemEngine> {
        Arc::new(MemEngine {
            shared: true,
            ..MemEngine::default()
        })
    }

    pub fn set_faults(&self, f: Faults) {
        *lock(&self.faults) = f;
    }

    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Commits not yet synced (what a crash may lose).
    pub fn unsynced(&self) -> usize {
        let s = lock(&self.state);
        s.log.len() - s.synced
    }

    /// The most writes one commit made since the last call: how big transactions get.
    pub fn take_largest_commit(&self) -> usize {
        std::mem::take(&mut lock(&self.state).largest)
    }

    /// Simulate a power loss and a restart: keep every synced commit and the first `extra`
    /// of the others. Call with no transaction or snapshot alive (the process is gone).
    pub fn crash(&self, extra: usize) {
        let mut s = lock(&self.state);
        assert!(s.snapshots.is_empty(), "crash with a snapshot alive");
        let keep = (s.synced + extra).min(s.log.len());
        let mut log = std::mem::take(&mut s.log);
        log.truncate(keep);
        *s = State::default();
        for ops in log {
            s.apply(ops);
        }
        s.synced = s.log.len();
    }

    fn commit_ops(
        &self,
        tracked: &HashMap<(Cf, Vec<u8>), u64>,
        ops: Vec<Op>,
    ) -> Result<(), KvError> {
        {
            let mut f = lock(&self.faults);
            let (error, conflict) = (f.commit_error, f.conflict);
            if f.chance(error) {
                f.errors_injected += 1;
                return Err(KvError::Other("injected I/O error at commit".into()));
            }
            if f.chance(conflict) {
                f.conflicts_injected += 1;
                return Err(KvError::Conflict);
            }
        }
        let mut s = lock(&self.state);
        for ((cf, key), touched) in tracked {
            if s.last_write(*cf, key) > *touched {
                return Err(KvError::Conflict);
            }
        }
        if !ops.is_empty() {
            s.apply(ops);
        }
        Ok(())
    }
}

impl Engine for Arc<MemEngine> {
    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, KvError> {
        Ok(Box::new(MemTxn {
            engine: self,
            writes: Default::default(),
            tracked: HashMap::new(),
        }))
    }

    fn snapshot(&self) -> Box<dyn Txn + '_> {
        let mut s = lock(&self.state);
        let seq = s.seq;
        *s.snapshots.entry(seq).or_default() += 1;
        Box::new(MemSnap { engine: self, seq })
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(lock(&self.state).value(cf, key, u64::MAX))
    }

    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError> {
        // Collected first: a visitor may call back into the engine.
        let pairs = lock(&self.state).range(cf, start, end, u64::MAX);
        for (k, v) in pairs {
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), KvError> {
        let mut s = lock(&self.state);
        s.synced = s.log.len();
        Ok(())
    }

    fn is_exclusive(&self) -> bool {
        !self.shared
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn store_bulk_durably(&self, cf: Cf, pairs: &[(Vec<u8>, &[u8])]) -> Result<(), KvError> {
        {
            let mut f = lock(&self.faults);
            let error = f.bulk_error;
            if f.chance(error) {
                f.errors_injected += 1;
                return Err(KvError::Other(
                    "injected I/O error storing bulk values".into(),
                ));
            }
        }
        let mut s = lock(&self.state);
        let ops = pairs
            .iter()
            .map(|(k, v)| Op::Put(cf, k.clone(), Arc::new(v.to_vec())))
            .collect();
        s.apply(ops);
        s.synced = s.log.len();
        Ok(())
    }

    fn delete_unsynced(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<(), KvError> {
        let ops = keys.iter().map(|k| Op::Delete(cf, k.clone())).collect();
        lock(&self.state).apply(ops);
        Ok(())
    }

    fn bytes_on_disk(&self) -> u64 {
        let s = lock(&self.state);
        s.maps
            .iter()
            .flat_map(|m| m.iter())
            .filter_map(|(k, v)| latest(v, u64::MAX).map(|v| (k.len() + v.len()) as u64))
            .sum()
    }
}

/// A write not yet committed: a value (put or delete, with later merges folded in) or merge
/// operands on top of whatever is committed at commit time.
#[derive(Clone, Debug)]
enum Pending {
    Value(Option<Vec<u8>>),
    Merges(Vec<Vec<u8>>),
}

struct MemTxn<'a> {
    engine: &'a Arc<MemEngine>,
    writes: [BTreeMap<Vec<u8>, Pending>; 4],
    /// Keys read with tracking or written, with the sequence number when first touched.
    tracked: HashMap<(Cf, Vec<u8>), u64>,
}

impl MemTxn<'_> {
    fn track(&mut self, cf: Cf, key: &[u8]) {
        if !self.tracked.contains_key(&(cf, key.to_vec())) {
            let seq = lock(&self.engine.state).seq;
            self.tracked.insert((cf, key.to_vec()), seq);
        }
    }

    /// What this transaction sees at `key`: its own write over the latest committed value.
    fn see(&self, cf: Cf, key: &[u8], committed: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match self.writes[cf.index()].get(key) {
            None => committed,
            Some(Pending::Value(v)) => v.clone(),
            Some(Pending::Merges(ops)) => Some(sum_counters(
                committed.as_deref(),
                ops.iter().map(|o| &o[..]),
            )),
        }
    }

    fn read(&mut self, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        let committed = lock(&self.engine.state).value(cf, key, u64::MAX);
        self.see(cf, key, committed)
    }
}

impl Txn for MemTxn<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.track(cf, key);
        Ok(self.read(cf, key))
    }

    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.read(cf, key))
    }

    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.track(cf, key);
        self.writes[cf.index()].insert(key.to_vec(), Pending::Value(Some(value.to_vec())));
        Ok(())
    }

    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError> {
        self.track(cf, key);
        self.writes[cf.index()].insert(key.to_vec(), Pending::Value(None));
        Ok(())
    }

    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError> {
        if !cf.sums() {
            return Err(KvError::Other(format!(
                "no merge operator on {}",
                cf.name()
            )));
        }
        self.track(cf, key);
        let w = &mut self.writes[cf.index()];
        match w.get_mut(key) {
            Some(Pending::Value(v)) => {
                *v = Some(sum_counters(v.as_deref(), std::iter::once(operand)));
            }
            Some(Pending::Merges(ops)) => ops.push(operand.to_vec()),
            None => {
                w.insert(key.to_vec(), Pending::Merges(vec![operand.to_vec()]));
            }
        }
        Ok(())
    }

    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let committed: BTreeMap<Vec<u8>, Vec<u8>> = lock(&self.engine.state)
            .range(cf, start, end, u64::MAX)
            .into_iter()
            .collect();
        let mut keys: Vec<&Vec<u8>> = committed.keys().collect();
        keys.extend(
            self.writes[cf.index()]
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
                .map(|(k, _)| k),
        );
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            if out.len() >= limit {
                break;
            }
            if let Some(v) = self.see(cf, k, committed.get(k).cloned()) {
                out.push((k.clone(), v));
            }
        }
        Ok(out)
    }
}

impl EngineTxn for MemTxn<'_> {
    fn as_txn(&mut self) -> &mut dyn Txn {
        self
    }

    fn commit(self: Box<Self>) -> Result<(), KvError> {
        let mut ops = Vec::new();
        for cf in Cf::ALL {
            for (k, p) in &self.writes[cf.index()] {
                ops.push(match p {
                    Pending::Value(Some(v)) => Op::Put(cf, k.clone(), Arc::new(v.clone())),
                    Pending::Value(None) => Op::Delete(cf, k.clone()),
                    Pending::Merges(m) => {
                        Op::Merge(cf, k.clone(), sum_counters(None, m.iter().map(|o| &o[..])))
                    }
                });
            }
        }
        self.engine.commit_ops(&self.tracked, ops)
    }
}

struct MemSnap<'a> {
    engine: &'a Arc<MemEngine>,
    seq: u64,
}

impl Drop for MemSnap<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.engine.state);
        if let Some(n) = s.snapshots.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                s.snapshots.remove(&self.seq);
            }
        }
    }
}

impl Txn for MemSnap<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(lock(&self.engine.state).value(cf, key, self.seq))
    }

    super::snapshot_txn_methods!();

    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        let mut v = lock(&self.engine.state).range(cf, start, end, self.seq);
        v.truncate(limit);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::conformance::{run_all, Subject};
    use crate::kv::KvStore;

    #[test]
    fn the_engine_passes_the_conformance_suite() {
        run_all(&|| {
            let e = MemEngine::new();
            let keep = e.clone();
            Subject::new((), move || {
                // A reopen is a crash that keeps only what was synced.
                keep.crash(0);
                KvStore::with_engine(Arc::new(keep.clone()))
            })
        });
    }

    #[test]
    fn a_crash_keeps_synced_commits_and_a_prefix_of_the_rest() {
        let e = MemEngine::new();
        let s = KvStore::with_engine(Arc::new(e.clone()));
        for i in 0..10u8 {
            s.transact(|t| t.put(Cf::Meta, &[i], &[i])).unwrap();
            if i == 3 {
                s.sync().unwrap();
            }
        }
        drop(s);
        e.crash(2);
        let s = KvStore::with_engine(Arc::new(e.clone()));
        let got: Vec<u8> = (0..10u8)
            .filter(|i| s.get(Cf::Meta, &[*i]).unwrap().is_some())
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn injected_faults_fail_commits_and_apply_nothing() {
        let e = MemEngine::new();
        let mut f = Faults::seeded(1);
        f.commit_error = 1000;
        e.set_faults(f);
        let s = KvStore::with_engine(Arc::new(e.clone()));
        let r = s.transact(|t| t.put(Cf::Meta, b"k", b"v"));
        assert!(matches!(r, Err(KvError::Other(_))), "{r:?}");
        assert_eq!(s.get(Cf::Meta, b"k").unwrap(), None);
        let mut f = Faults::seeded(2);
        f.conflict = 500;
        e.set_faults(f);
        for i in 0..50u8 {
            s.transact(|t| t.put(Cf::Meta, &[i], b"v")).unwrap();
        }
        assert!(e.faults().conflicts_injected > 5, "conflicts are retried");
    }
}
