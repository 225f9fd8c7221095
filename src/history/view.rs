//! The store as it was at a moment: an [`Engine`] over the live one whose reads of
//! filesystem keys give the value each had at that moment (its first record after the
//! moment: an indexed `Y` record, else one of the pending moments, which the view holds in
//! memory; or its live value if it has none), and which hides what belongs to the live
//! mounts (open counts, locks, garbage inodes). Read-only. The whole `Fs` read path runs on it
//! unchanged: a past mount is an ordinary read-only mount over this engine.
//!
//! The engine under it must not change between catch-ups: a follower (a RocksDB secondary,
//! which changes only when it catches up, when the view rebuilds its pending part under the
//! same lock), or a store nothing writes meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::keyspace::past::{moment_key, past_after};
use crate::keyspace::{self as ks, inode_sub, Prefix};
use crate::kv::{Cf, Engine, EngineTxn, KvError, Pair, Txn};
use crate::replica::shippable;

/// The first pending record after the view's moment of each key, by (family index, key),
/// and the last moment looked at. A record indexed since stays (its `Y` twin says the same);
/// one that leaves the window is older than the view's moment, which then fails anyway.
#[derive(Default)]
struct Pending {
    first: BTreeMap<(u8, Vec<u8>), Option<Vec<u8>>>,
    seen: u64,
}

pub struct View {
    inner: Arc<dyn Engine>,
    at: u64,
    /// The moment left the window while mounted (its records may be trimmed): reads fail.
    gone: AtomicBool,
    /// Rebuilt at each catch-up, under the write lock, which reads hold for reading.
    pending: RwLock<Pending>,
}

impl View {
    pub fn new(inner: Arc<dyn Engine>, at: u64) -> Result<View, KvError> {
        let v = View {
            inner,
            at,
            gone: AtomicBool::new(false),
            pending: RwLock::new(Pending::default()),
        };
        v.load_pending(&mut v.pending.write().unwrap_or_else(|e| e.into_inner()))?;
        Ok(v)
    }

    /// Add the pending moments after those looked at, the view's moment and the indexed ones;
    /// the history state they were read with.
    fn load_pending(&self, p: &mut Pending) -> Result<super::HistoryState, KvError> {
        let st = super::HistoryState::from_record(self.inner.get(Cf::Meta, ks::META_HISTORY)?)?;
        let from = self.at.max(st.indexed).max(p.seen).saturating_add(1);
        let (_, end) = Prefix::Moment.range();
        let mut bad = None;
        self.inner
            .for_each(Cf::Meta, &moment_key(from), &end, &mut |k, v| {
                match (
                    crate::keyspace::past::parse_moment_key(k),
                    super::decode_moment(v),
                ) {
                    (Some(at), Ok(m)) => {
                        p.seen = p.seen.max(at);
                        if let Some(values) = m.values {
                            for (key, old) in m.keys.into_iter().zip(values) {
                                p.first.entry(key).or_insert(old);
                            }
                        }
                    }
                    (_, Err(e)) => bad = Some(format!("{}: {e}", ks::describe_key(k))),
                    _ => {}
                }
                bad.is_none()
            })?;
        match bad {
            Some(e) => Err(KvError::Corruption(e)),
            None => Ok(st),
        }
    }

    fn snap(&self) -> AtSnapshot<'_> {
        AtSnapshot {
            pending: self.pending.read().unwrap_or_else(|e| e.into_inner()),
            s: self.inner.snapshot(),
            at: self.at,
            gone: self.gone.load(Ordering::Relaxed),
        }
    }
}

/// Keys of the live store that a past state does not have: open counts, locks and
/// pseudo-keys of inodes, garbage inodes.
fn hidden(cf: Cf, key: &[u8]) -> bool {
    if cf != Cf::Meta {
        return false;
    }
    match key.first().copied().and_then(Prefix::from_byte) {
        Some(Prefix::Inode) => key.len() > 9 && key[9] != inode_sub::XATTR,
        Some(Prefix::Garbage) => true,
        _ => false,
    }
}

/// Whether a range of `cf` may hold filesystem keys (else a plain scan answers).
fn past_matters(cf: Cf, start: &[u8]) -> bool {
    match cf {
        Cf::Fmap => true,
        Cf::Meta => matches!(
            start.first().copied().and_then(Prefix::from_byte),
            Some(Prefix::Inode | Prefix::Dirent) | None
        ),
        _ => false,
    }
}

struct AtSnapshot<'a> {
    /// First: held while the snapshot is used, so a catch-up waits for it.
    pending: RwLockReadGuard<'a, Pending>,
    s: Box<dyn Txn + 'a>,
    at: u64,
    gone: bool,
}

impl AtSnapshot<'_> {
    fn check(&self) -> Result<(), KvError> {
        if self.gone {
            return Err(KvError::Other(
                "this mount's moment has left the store's history window".into(),
            ));
        }
        Ok(())
    }
}

impl Txn for AtSnapshot<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.check()?;
        if hidden(cf, key) {
            return Ok(None);
        }
        if shippable(cf, key) {
            let (start, end) = past_after(cf, key, self.at);
            if let Some((k, v)) = self.s.scan(Cf::Meta, &start, &end, 1)?.pop() {
                return super::decode_past(&v)
                    .map_err(|e| KvError::Corruption(format!("{}: {e}", ks::describe_key(&k))));
            }
            if let Some(old) = self.pending.first.get(&(cf.index() as u8, key.to_vec())) {
                return Ok(old.clone());
            }
        }
        self.s.get(cf, key)
    }

    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        self.check()?;
        if !past_matters(cf, start) {
            return self.s.scan(cf, start, end, limit);
        }
        let page = limit.clamp(16, 1024);
        let mut out = Vec::new();
        let mut from = start.to_vec();
        loop {
            let live = self.s.scan(cf, &from, end, page)?;
            let full = live.len() == page;
            let bound = match live.last() {
                Some((k, _)) if full => {
                    let mut b = k.clone();
                    b.push(0);
                    b
                }
                _ => end.to_vec(),
            };
            let mut past = super::pasts_at(&mut *self.s, cf, &from, &bound, self.at)?;
            let cfi = cf.index() as u8;
            let range = (cfi, from.clone())..(cfi, bound.clone());
            for ((_, k), old) in self.pending.first.range(range) {
                past.entry(k.clone()).or_insert_with(|| old.clone());
            }
            merge(live, past, |k, v| {
                if !hidden(cf, &k) {
                    out.push((k, v));
                }
            });
            if out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if !full {
                return Ok(out);
            }
            from = bound;
        }
    }

    crate::kv::snapshot_txn_methods!();
}

/// The union of `live` (sorted pairs) and `past` (a key's value then, `None`: absent), where
/// `past` wins, in key order.
fn merge(
    live: Vec<Pair>,
    past: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    mut out: impl FnMut(Vec<u8>, Vec<u8>),
) {
    let mut live = live.into_iter().peekable();
    let mut past = past.into_iter().peekable();
    loop {
        let take_past = match (live.peek(), past.peek()) {
            (None, None) => return,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((lk, _)), Some((pk, _))) => {
                if lk == pk {
                    live.next();
                    true
                } else {
                    pk < lk
                }
            }
        };
        if take_past {
            if let Some((k, Some(v))) = past.next() {
                out(k, v);
            }
        } else if let Some((k, v)) = live.next() {
            out(k, v);
        }
    }
}

impl Engine for View {
    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, KvError> {
        Err(KvError::ReadOnly)
    }

    fn snapshot(&self) -> Box<dyn Txn + '_> {
        Box::new(self.snap())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if !shippable(cf, key) && !hidden(cf, key) {
            // Block contents and the store's own records: as they are now.
            return self.inner.get(cf, key);
        }
        self.snap().get(cf, key)
    }

    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError> {
        let mut s = self.snap();
        let mut from = start.to_vec();
        const PAGE: usize = 1024;
        loop {
            let page = s.scan(cf, &from, end, PAGE)?;
            for (k, v) in &page {
                if !visit(k, v) {
                    return Ok(());
                }
            }
            match page.last() {
                Some((k, _)) if page.len() == PAGE => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    fn sync(&self) -> Result<(), KvError> {
        Ok(())
    }

    fn is_exclusive(&self) -> bool {
        false
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn block_storage_bytes(&self) -> Option<u64> {
        self.inner.block_storage_bytes()
    }

    fn bytes_on_disk(&self) -> u64 {
        self.inner.bytes_on_disk()
    }

    /// Follow the writer (its files change under a long-lived mount), and stop answering
    /// if the moment left the window meanwhile.
    fn catch_up(&self) -> Result<(), KvError> {
        let mut pending = self.pending.write().unwrap_or_else(|e| e.into_inner());
        self.inner.catch_up()?;
        let st = self.load_pending(&mut pending)?;
        drop(pending);
        if let Err(why) = st.check(self.at, u64::MAX) {
            if !self.gone.swap(true, Ordering::Relaxed) {
                tracing::error!(reason = %why, "the mounted moment is no longer kept; reads fail from now on");
            }
        }
        Ok(())
    }
}
