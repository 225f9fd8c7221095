//! Replication in the simulation: the simulated primary tracks its changes (every seed), and a
//! `replicate` step logs a group and ships to an in-memory replica through the real protocol
//! (a socket pair, `Server::session` on a thread, `Session` on this side), with faults
//! injected on both engines and crashes of either. After a shipment that went through, the
//! replica's shippable keys equal the primary's exactly: the replica holds a state the primary
//! had (the simulation is quiescent between steps, so "the state at the last round" is "now").
//! After any crash, nothing the primary recorded as acknowledged is missing on the replica.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::Sim;
use crate::audit::{audit, AuditOptions};
use crate::keyspace::Prefix;
use crate::kv::mem::{Faults, MemEngine};
use crate::kv::{Cf, KvStore};
use crate::replica::serve::Server;
use crate::replica::ship::{self, Session};
use crate::replica::transport::{Canceller, Conn};
use crate::replica::{self, apply, log, shippable, ReplicaError};
use crate::store::{self, FormatOptions};

pub(super) const NAME: &str = "sim";
/// The satellite's name on the primary, and a certificate fingerprint of the right shape.
const SATELLITE: &str = "sat";
const SATELLITE_FP: &str =
    "SHA256:0000000000000000000000000000000000000000000000000000000000000000";

/// The replica side of a simulation.
pub(super) struct SimReplica {
    pub engine: Arc<MemEngine>,
}

impl SimReplica {
    fn store(&self) -> KvStore {
        KvStore::with_engine(Arc::new(self.engine.clone()))
    }
}

/// Every shippable key and value of a store.
fn shippable_state(kv: &KvStore) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for p in [Prefix::Inode, Prefix::Dirent, Prefix::Fmap] {
        let (a, b) = p.range();
        kv.for_each(p.cf(), &a, &b, |k, v| {
            if shippable(p.cf(), k) {
                out.push((p.cf(), k.to_vec(), v.to_vec()));
            }
            true
        })
        .expect("scan");
    }
    out
}

fn injected(e: &ReplicaError) -> bool {
    e.to_string().contains("injected")
}

impl Sim {
    /// Make the replica store and register it with the primary (before the first mount).
    pub(super) fn init_replica(&mut self, seed: u64) {
        let engine = MemEngine::new();
        engine.set_faults(Faults::seeded(seed ^ 0x5eed));
        let kv = KvStore::with_engine(Arc::new(engine.clone()));
        store::init(
            &kv,
            &FormatOptions {
                block_size: self.format.block_size,
                fs_id: Some(self.format.fs_id),
                ..Default::default()
            },
        )
        .expect("replica init");
        apply::init_state(&kv).expect("replica state");
        let primary = KvStore::with_engine(Arc::new(self.engine.clone()));
        replica::add(&primary, NAME, "exec:simulated", None).expect("replica add");
        // The satellite: a replica store with an upstream, known to the primary by its
        // certificate.
        let sat = MemEngine::new();
        sat.set_faults(Faults::seeded(seed ^ 0x5a7e));
        let skv = KvStore::with_engine(Arc::new(sat.clone()));
        store::init(
            &skv,
            &FormatOptions {
                block_size: self.format.block_size,
                fs_id: Some(self.format.fs_id),
                ..Default::default()
            },
        )
        .expect("satellite init");
        let up = replica::Upstream {
            url: "tcp://simulated:1".into(),
            fingerprint: None,
            added: crate::util::Timestamp::now(),
        };
        skv.transact(|t| t.put(Cf::Meta, crate::keyspace::META_UPSTREAM, &up.encode()?))
            .expect("satellite upstream");
        apply::init_state(&skv).expect("satellite state");
        replica::add(
            &primary,
            SATELLITE,
            replica::SATELLITE_URL,
            Some(SATELLITE_FP.into()),
        )
        .expect("satellite add");
        self.satellite = Some(SimReplica { engine: sat });
        self.remote = Some(Arc::new(super::tier::SimRemote::new(
            &self.engine,
            &engine,
            seed ^ 0xfe7c,
        )));
        self.replica = Some(SimReplica { engine });
    }

    fn replica_faults(&self, on: bool) {
        for r in self.replica.iter().chain(self.satellite.iter()) {
            let mut f = r.engine.faults();
            f.commit_error = if on { self.faults.0 } else { 0 };
            f.conflict = if on { self.faults.1 } else { 0 };
            f.bulk_error = if on { self.faults.0 } else { 0 };
            r.engine.set_faults(f);
        }
    }

    /// One shipment through the real protocol; `Ok(false)` when an injected fault stopped it.
    fn ship(&mut self) -> Result<bool, ReplicaError> {
        let store = self.replica.as_ref().expect("replica").store();
        self.ship_to(NAME, store, None)
    }

    /// One shipment to `name` (its store `to`; a satellite with `upstream`).
    fn ship_to(
        &mut self,
        name: &str,
        to: KvStore,
        upstream: Option<replica::Upstream>,
    ) -> Result<bool, ReplicaError> {
        let mut logger = std::mem::take(&mut self.logger);
        let logged = logger.round(self.fs().store());
        self.logger = logger;
        if let Err(e) = logged {
            return if injected(&e) { Ok(false) } else { Err(e) };
        }
        let primary = self.fs().store();
        let Some(rec) = ship::record(primary, name)? else {
            return Err(ReplicaError::Unknown(name.into()));
        };
        let Some(base) = rec.base else {
            return Ok(false);
        };
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let server = Server::for_store(Arc::new(to), self.format.clone(), upstream);
        let serving = std::thread::spawn(move || {
            let mut io = theirs;
            server.session(&mut io, "simulated primary")
        });
        let cancel = Canceller::new(|| {});
        let conn = Conn::duplex(Box::new(mine), "simulated replica".into(), cancel);
        let never = AtomicBool::new(false);
        let res = match Session::handshake(conn, primary, &self.format, name, &rec, base) {
            Ok(Some(mut s)) => {
                let r = s.ship_pending(primary, &never);
                s.close();
                r.map(|_| true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        let served = serving.join().expect("server thread");
        match (res, served) {
            (Ok(done), Ok(())) => Ok(done),
            (Err(e), _) | (Ok(_), Err(e)) if injected(&e) => Ok(false),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// The `replicate` step: ship, sometimes crash the replica, and check the guarantees.
    pub(super) fn op_replicate(&mut self) {
        if self.replica.is_none() {
            return;
        }
        let shipped = self
            .ship()
            .unwrap_or_else(|e| self.fail(format!("replication: {e}")));
        self.history
            .push_back(format!("replicate -> shipped whole: {shipped}"));
        self.faults_off();
        self.replica_faults(false);
        let primary = self.fs().store();
        let head = log::head(primary).expect("head").seq;
        let rec = ship::record(primary, NAME)
            .expect("record")
            .expect("registered");
        let applied = apply::state(&self.replica.as_ref().expect("replica").store())
            .expect("state")
            .expect("replica")
            .applied;
        let line = format!(
            "  log head {head}, acked {} (base {:?}), replica applied {applied}",
            rec.acked, rec.base
        );
        self.history.push_back(line);
        let r = self.replica.as_ref().expect("replica");
        let primary = self.fs().store();
        if applied < rec.acked {
            self.fail(format!(
                "the replica applied {applied} but the primary recorded {} as acknowledged",
                rec.acked
            ));
        }
        let compared = shipped && rec.acked == head;
        if compared {
            let (p, q) = (shippable_state(primary), shippable_state(&r.store()));
            if p != q {
                let only_p: Vec<_> = p.iter().filter(|x| !q.contains(x)).take(5).collect();
                let only_q: Vec<_> = q.iter().filter(|x| !p.contains(x)).take(5).collect();
                self.fail(format!(
                    "replica differs from the primary after shipping group {head}: primary has {only_p:?}, replica has {only_q:?}"
                ));
            }
        }
        if self.rng.pct(20) {
            let extra = self.rng.below(r.engine.unsynced() as u64 + 1) as usize;
            self.history
                .push_back(format!("replica crash keeping {extra} unsynced commits"));
            r.engine.crash(extra);
            let after = apply::state(&r.store())
                .expect("state")
                .expect("replica")
                .applied;
            if after < rec.acked {
                self.fail(format!(
                    "a replica crash lost acknowledged group {} (it holds {after})",
                    rec.acked
                ));
            }
        }
        let report = audit(&r.store(), &AuditOptions::default())
            .unwrap_or_else(|e| self.fail(format!("replica audit: {e}")));
        if !report.problems.is_empty() {
            self.fail(format!("replica audit after replicate:\n{report}"));
        }
        self.check_evicted_held("after a shipment");
        if self.rng.pct(50) {
            self.op_satellite();
        }
        self.replica_faults(true);
        self.faults_on();
        self.stats.shipments += compared as u64;
        if self.rng.pct(50) {
            self.evict_all();
        }
    }
}

impl Sim {
    /// Ship to the satellite (groups without blocks) and check it as the replica is checked:
    /// what it applied is a state the primary had, nothing acknowledged is lost to its crash,
    /// and its audit is clean with every block evicted (held by its upstream).
    fn op_satellite(&mut self) {
        let Some(sat) = &self.satellite else { return };
        let to = sat.store();
        let up = replica::upstream(&to).expect("upstream");
        self.replica_faults(true);
        let shipped = self
            .ship_to(SATELLITE, to, up)
            .unwrap_or_else(|e| self.fail(format!("shipping to the satellite: {e}")));
        self.replica_faults(false);
        self.faults_off();
        let head = log::head(self.fs().store()).expect("head").seq;
        let rec = ship::record(self.fs().store(), SATELLITE)
            .expect("record")
            .expect("registered");
        let applied = apply::state(&self.satellite.as_ref().expect("satellite").store())
            .expect("state")
            .expect("satellite")
            .applied;
        self.history.push_back(format!(
            "  satellite: shipped whole {shipped}, acked {} of {head}, applied {applied}",
            rec.acked
        ));
        let primary = self.fs().store();
        let sat = self.satellite.as_ref().expect("satellite");
        if applied < rec.acked {
            self.fail(format!(
                "the satellite applied {applied} but the primary recorded {} as acknowledged",
                rec.acked
            ));
        }
        let compared = shipped && rec.acked == head;
        if compared {
            let (p, q) = (shippable_state(primary), shippable_state(&sat.store()));
            if p != q {
                self.fail(format!(
                    "the satellite differs from the primary after group {head}"
                ));
            }
        }
        if self.rng.pct(20) {
            let extra = self.rng.below(sat.engine.unsynced() as u64 + 1) as usize;
            self.history
                .push_back(format!("satellite crash keeping {extra} unsynced commits"));
            sat.engine.crash(extra);
            let after = apply::state(&sat.store())
                .expect("state")
                .expect("satellite")
                .applied;
            if after < rec.acked {
                self.fail(format!(
                    "a satellite crash lost acknowledged group {} (it holds {after})",
                    rec.acked
                ));
            }
        }
        let report = audit(&sat.store(), &AuditOptions::default())
            .unwrap_or_else(|e| self.fail(format!("satellite audit: {e}")));
        if !report.problems.is_empty() {
            self.fail(format!("satellite audit:\n{report}"));
        }
        self.stats.satellite_shipments += compared as u64;
    }
}
