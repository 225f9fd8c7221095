//! The store as it was at a moment: an [`Engine`] over the live one whose reads of
//! filesystem keys give the value each had at that moment (its first `Y` record after the
//! moment, or its live value if it has none), and which hides what belongs to the live
//! mounts (open counts, locks, garbage inodes). Read-only. The whole `Fs` read path runs on it
//! unchanged: a past mount is an ordinary read-only mount over this engine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::keyspace::past::past_after;
use crate::keyspace::{self as ks, inode_sub, Prefix};
use crate::kv::{Cf, Engine, EngineTxn, KvError, Pair, Txn};
use crate::replica::shippable;

pub struct View {
    inner: Arc<dyn Engine>,
    at: u64,
    /// The moment left the window while mounted (its records may be trimmed): reads fail.
    gone: AtomicBool,
}

impl View {
    pub fn new(inner: Arc<dyn Engine>, at: u64) -> View {
        View {
            inner,
            at,
            gone: AtomicBool::new(false),
        }
    }

    fn snap(&self) -> AtSnapshot<'_> {
        AtSnapshot {
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
            let past = super::pasts_at(&mut *self.s, cf, &from, &bound, self.at)?;
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
        self.inner.catch_up()?;
        let st = match self.inner.get(Cf::Meta, ks::META_HISTORY)? {
            Some(v) => super::HistoryState::decode(&v)?,
            None => super::HistoryState::default(),
        };
        if let Err(why) = st.check(self.at, u64::MAX) {
            if !self.gone.swap(true, Ordering::Relaxed) {
                tracing::error!(reason = %why, "the mounted moment is no longer kept; reads fail from now on");
            }
        }
        Ok(())
    }
}
