//! Tiering in the simulation: after a shipment the primary sometimes evicts every block the
//! eviction rule allows, and reads of evicted blocks come back through an engine-level
//! "remote" that reads the in-memory replica's store, with injected fetch failures and
//! delays. Checked: every block the primary holds evicted is held by the replica, after every
//! shipment, crash and eviction (the rule's promise); reads give the model's bytes or an
//! injected error, never other bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Sim;
use crate::blocks::encode::{self, Check};
use crate::blocks::reader::Tiering;
use crate::blocks::{resident, BlockError};
use crate::keyspace::records::BlockInfo;
use crate::keyspace::{self as ks, Hash, Prefix};
use crate::kv::mem::MemEngine;
use crate::kv::{Cf, KvStore};

/// Reads evicted blocks from the replica's engine.
pub(super) struct SimRemote {
    primary: KvStore,
    replica: KvStore,
    /// Faults on (the simulation turns them off while it checks).
    pub faults: Arc<AtomicBool>,
    rng: Mutex<u64>,
    pub fetched: AtomicU64,
}

impl SimRemote {
    pub(super) fn new(primary: &Arc<MemEngine>, replica: &Arc<MemEngine>, seed: u64) -> SimRemote {
        SimRemote {
            primary: KvStore::with_engine(Arc::new(primary.clone())),
            replica: KvStore::with_engine(Arc::new(replica.clone())),
            faults: Arc::new(AtomicBool::new(false)),
            rng: Mutex::new(seed | 1),
            fetched: AtomicU64::new(0),
        }
    }

    fn roll(&self) -> u64 {
        let mut x = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x % 100
    }
}

impl Tiering for SimRemote {
    fn fetch(&self, h: &Hash, len: u32, keep: bool) -> Result<Vec<u8>, BlockError> {
        let unavailable = |reason: &str| BlockError::Unavailable {
            hash: *h,
            reason: reason.into(),
        };
        if self.faults.load(Ordering::Relaxed) {
            let r = self.roll();
            if r < 10 {
                return Err(unavailable("injected fetch failure"));
            }
            if r < 20 {
                std::thread::sleep(std::time::Duration::from_millis(r % 3));
            }
        }
        let value = self
            .replica
            .get(Cf::Blocks, &ks::block_key(h))
            .map_err(BlockError::Kv)?
            .ok_or_else(|| unavailable("the replica does not hold it"))?;
        let d = encode::decode_with(&value, h, len, Check::Strong)
            .map_err(|reason| BlockError::Corrupt { hash: *h, reason })?;
        if keep {
            self.primary
                .transact(|t| resident::restore(t, h, &value))
                .map_err(BlockError::Kv)?;
        }
        self.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(d.content)
    }

    fn prefetch(&self, _h: &Hash, _len: u32, _keep: bool) {}

    fn used(&self, _h: &Hash) {}
}

impl Sim {
    /// Every block evicted on the primary that a file or the past names is stored on the
    /// replica (an evicted block nothing names any more awaits the sweeper; it may be gone
    /// there).
    pub(super) fn check_evicted_held(&self, when: &str) {
        let Some(r) = &self.replica else { return };
        let replica = KvStore::with_engine(Arc::new(r.engine.clone()));
        let primary = self.fs().store();
        let mut live = std::collections::HashSet::new();
        let (a, b) = Prefix::Fmap.range();
        primary
            .for_each(Cf::Fmap, &a, &b, |_, v| {
                if let Ok(e) = crate::keyspace::records::FmapEntry::decode(v) {
                    live.insert(e.hash);
                }
                true
            })
            .expect("scan");
        // And those only the past names (history): the replica holds them for it.
        let (a, b) = Prefix::PastHold.range();
        primary
            .for_each(Cf::Bidx, &a, &b, |k, v| {
                if crate::kv::decode_i64(v) > 0 {
                    live.extend(ks::key_hash(k));
                }
                true
            })
            .expect("scan");
        let (a, b) = Prefix::BlockInfo.range();
        let mut evicted: Vec<Hash> = Vec::new();
        primary
            .for_each(Cf::Bidx, &a, &b, |k, v| {
                if BlockInfo::decode(v).is_ok_and(|i| i.evicted) {
                    evicted.extend(ks::key_hash(k).filter(|h| live.contains(h)));
                }
                true
            })
            .expect("scan");
        for h in &evicted {
            let held = replica
                .get(Cf::Blocks, &ks::block_key(h))
                .expect("replica get")
                .is_some();
            if !held {
                let info = primary
                    .get(Cf::Bidx, &ks::block_info_key(h))
                    .expect("get")
                    .map(|v| BlockInfo::decode(&v));
                let rinfo = replica.get(Cf::Bidx, &ks::block_info_key(h)).expect("get");
                let mut named = Vec::new();
                let (a, b) = Prefix::Fmap.range();
                primary
                    .for_each(Cf::Fmap, &a, &b, |k, v| {
                        if crate::keyspace::records::FmapEntry::decode(v)
                            .is_ok_and(|e| e.hash == *h)
                        {
                            named.push(ks::describe_key(k));
                        }
                        true
                    })
                    .expect("scan");
                let rec = crate::replica::ship::record(primary, super::replicate::NAME);
                self.fail(format!(
                    "{when}: block {} is evicted on the primary but the replica does not hold it (primary info {info:?}, replica info {}, named by {named:?}, replica record {rec:?}, unlogged mark {:?})",
                    ks::hex(h),
                    rinfo.is_some(),
                    primary.get(Cf::Bidx, &ks::unlogged_key(h)).expect("get"),
                ));
            }
        }
    }

    /// The eviction step: evict everything the rule allows (faults off), then check.
    pub(super) fn evict_all(&mut self) {
        self.faults_off();
        let e = crate::tier::evict(self.fs().store(), 1, u64::MAX, &|_| false)
            .unwrap_or_else(|e| self.fail(format!("evict: {e}")));
        self.stats.evicted += e.blocks;
        self.history
            .push_back(format!("evict -> {} block(s), {} kept", e.blocks, e.kept));
        self.check_evicted_held("after eviction");
        self.faults_on();
    }
}
