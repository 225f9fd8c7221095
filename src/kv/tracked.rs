//! [`Tracked`]: the transaction every filesystem operation gets, over an engine's. It notes
//! the keys the change tracker wants (replication) and keeps the value each key the history
//! recorder wants had before the transaction first wrote it.

use super::{Before, Cf, KvError, Pair, Recorder, Tracker, Txn};

/// A transaction that notes the keys its tracker wants, and the past of those its history
/// recorder wants.
pub(super) struct Tracked<'a> {
    pub(super) inner: &'a mut dyn Txn,
    pub(super) tracker: &'a Tracker,
    pub(super) written: Vec<(Cf, Vec<u8>)>,
    /// [`Txn::add_sum`] deltas, written at commit.
    pub(super) sums: Vec<(Cf, Vec<u8>, i64)>,
    pub(super) history: &'a Recorder,
    /// The value each key the recorder wants had before this transaction first wrote it.
    pub(super) befores: Vec<Before>,
    /// Keys of `befores`, for the first-write test once there are many of them (a linear
    /// search of `befores` until then: most transactions write a handful).
    pub(super) seen: std::collections::HashSet<(Cf, Vec<u8>)>,
    /// Values of wanted keys this transaction read with tracking and has not written yet:
    /// the value a first write replaces, without reading it again.
    pub(super) reads: Vec<Before>,
    /// The moment to record under instead of now ([`Txn::record_at`]).
    pub(super) at: Option<u64>,
}

impl<'a> Tracked<'a> {
    pub(super) fn new(inner: &'a mut dyn Txn, tracker: &'a Tracker, history: &'a Recorder) -> Self {
        Tracked {
            inner,
            tracker,
            written: Vec::new(),
            sums: Vec::new(),
            history,
            befores: Vec::new(),
            seen: Default::default(),
            reads: Vec::new(),
            at: None,
        }
    }

    fn note(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError> {
        if let Some(t) = self.tracker {
            if t.wants(cf, key) {
                self.written.push((cf, key.to_vec()));
            }
        }
        if let Some(h) = self.history {
            if h.wants(cf, key) && !self.written_before(cf, key) {
                // Tracked (read so here, or by an earlier `get`): a concurrent change of the
                // key makes this commit retry, so the value kept is the one replaced.
                let old = match self.reads.iter().position(|(c, k, _)| *c == cf && k == key) {
                    Some(i) => self.reads.swap_remove(i).2,
                    None => self.inner.get(cf, key)?,
                };
                self.befores.push((cf, key.to_vec(), old));
                if self.befores.len() > SEEN_LINEAR {
                    if self.seen.is_empty() {
                        self.seen = self
                            .befores
                            .iter()
                            .map(|(c, k, _)| (*c, k.clone()))
                            .collect();
                    } else {
                        self.seen.insert((cf, key.to_vec()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `key` was written in this transaction already (its past is noted).
    fn written_before(&self, cf: Cf, key: &[u8]) -> bool {
        if self.befores.len() > SEEN_LINEAR {
            return self.seen.contains(&(cf, key.to_vec()));
        }
        self.befores.iter().any(|(c, k, _)| *c == cf && k == key)
    }
}

/// Tracked reads of wanted keys kept for a later first write (a scan-like run of reads beyond
/// this reads its values again when it writes them).
const READS_KEPT: usize = 64;

/// Past this many keys noted in one transaction, a hash set answers "written already?".
const SEEN_LINEAR: usize = 16;

impl Txn for Tracked<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let v = self.inner.get(cf, key)?;
        if let Some(h) = self.history {
            if h.wants(cf, key)
                && !self.written_before(cf, key)
                && !self.reads.iter().any(|(c, k, _)| *c == cf && k == key)
                && self.reads.len() < READS_KEPT
            {
                self.reads.push((cf, key.to_vec(), v.clone()));
            }
        }
        Ok(v)
    }
    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get_untracked(cf, key)
    }
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.note(cf, key)?;
        self.inner.put(cf, key, value)
    }
    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError> {
        self.note(cf, key)?;
        self.inner.delete(cf, key)
    }
    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError> {
        self.note(cf, key)?;
        self.inner.merge(cf, key, operand)
    }
    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        self.inner.scan(cf, start, end, limit)
    }
    fn logs_changes(&self) -> bool {
        self.tracker.is_some()
    }
    fn record_at(&mut self, at: u64) {
        self.at = Some(at);
    }
    fn add_sum(&mut self, cf: Cf, key: &[u8], delta: i64) -> Result<(), KvError> {
        match self.sums.iter_mut().find(|(c, k, _)| *c == cf && k == key) {
            Some(s) => s.2 = s.2.wrapping_add(delta),
            None => self.sums.push((cf, key.to_vec(), delta)),
        }
        Ok(())
    }
}
