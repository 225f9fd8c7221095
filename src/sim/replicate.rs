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
/// The replica's own satellite (shipped from the replica's log).
const RELAYED: &str = "relayed";
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
    /// A fresh in-memory replica store of this filesystem, with seeded faults.
    fn follower_engine(&self, seed: u64, upstream: Option<&replica::Upstream>) -> Arc<MemEngine> {
        let engine = MemEngine::new();
        engine.set_faults(Faults::seeded(seed));
        let kv = KvStore::with_engine(Arc::new(engine.clone()));
        store::init(
            &kv,
            &FormatOptions {
                block_size: self.format.block_size,
                fs_id: Some(self.format.fs_id),
                ..Default::default()
            },
        )
        .expect("follower init");
        if let Some(up) = upstream {
            replica::set_upstream(&kv, up).expect("satellite upstream");
        }
        apply::init_state(&kv).expect("follower state");
        engine
    }

    /// Make the replica store and register it with the primary (before the first mount).
    pub(super) fn init_replica(&mut self, seed: u64) {
        let engine = self.follower_engine(seed ^ 0x5eed, None);
        let primary = KvStore::with_engine(Arc::new(self.engine.clone()));
        replica::add(&primary, NAME, "exec:simulated", None).expect("replica add");
        // The satellite: a replica store with an upstream, known to the primary by its
        // certificate.
        let up = replica::Upstream {
            url: "tcp://simulated:1".into(),
            fingerprint: None,
            added: crate::util::Timestamp::now(),
        };
        let sat = self.follower_engine(seed ^ 0x5a7e, Some(&up));
        replica::add(
            &primary,
            SATELLITE,
            replica::SATELLITE_URL,
            Some(SATELLITE_FP.into()),
        )
        .expect("satellite add");
        self.satellite = Some(SimReplica { engine: sat });
        // The replica's satellite: registered on the replica, which logs what it applies.
        let relayed = self.follower_engine(seed ^ 0x7e1a, Some(&up));
        let replica_kv = KvStore::with_engine(Arc::new(engine.clone()));
        replica::add(
            &replica_kv,
            RELAYED,
            replica::SATELLITE_URL,
            Some(SATELLITE_FP.into()),
        )
        .expect("satellite of the replica add");
        self.relayed = Some(SimReplica { engine: relayed });
        self.remote = Some(Arc::new(super::tier::SimRemote::new(
            &self.engine,
            &engine,
            seed ^ 0xfe7c,
        )));
        self.replica = Some(SimReplica { engine });
    }

    fn replica_faults(&self, on: bool) {
        let all = [&self.replica, &self.satellite, &self.relayed];
        for r in all.into_iter().flatten() {
            let mut f = r.engine.faults();
            f.commit_error = if on { self.faults.0 } else { 0 };
            f.conflict = if on { self.faults.1 } else { 0 };
            f.bulk_error = if on { self.faults.0 } else { 0 };
            r.engine.set_faults(f);
        }
    }

    /// One shipment through the real protocol; `Ok(false)` when an injected fault stopped it.
    fn ship(&mut self) -> Result<bool, ReplicaError> {
        let store = Arc::new(self.replica.as_ref().expect("replica").store());
        // Now and then the replica is served by a build before format 5.3, which applies
        // without logging for its satellites: the next server must make them start over.
        let unlogged = self.rng.pct(10);
        if unlogged {
            self.history
                .push_back("  replica served by a build that logs nothing".into());
        }
        self.ship_to(NAME, store, None, unlogged)
    }

    /// One shipment to `name` (its store `to`; a satellite with `upstream`).
    fn ship_to(
        &mut self,
        name: &str,
        to: Arc<KvStore>,
        upstream: Option<replica::Upstream>,
        unlogged: bool,
    ) -> Result<bool, ReplicaError> {
        let mut logger = std::mem::take(&mut self.logger);
        let logged = logger.round(self.fs().store());
        self.logger = logger;
        if let Err(e) = logged {
            return if injected(&e) { Ok(false) } else { Err(e) };
        }
        ship_between(
            self.fs().store(),
            &self.format,
            name,
            to,
            upstream,
            unlogged,
        )
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
        let engine = self.replica.as_ref().expect("replica").engine.clone();
        let primary = self.primary_view();
        let compared = self.check_follower("replica", (&primary, NAME), &engine, shipped);
        self.check_evicted_held("after a shipment");
        if self.rng.pct(50) {
            self.op_satellite();
        }
        if self.rng.pct(50) {
            self.op_relay();
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
    /// Ship to the satellite (groups without blocks) and check it as the replica is checked;
    /// its audit is clean with every block evicted (held by its upstream).
    fn op_satellite(&mut self) {
        let Some(sat) = &self.satellite else { return };
        let (to, engine) = (sat.store(), sat.engine.clone());
        let up = replica::upstream(&to).expect("upstream");
        self.replica_faults(true);
        let shipped = self
            .ship_to(SATELLITE, Arc::new(to), up, false)
            .unwrap_or_else(|e| self.fail(format!("shipping to the satellite: {e}")));
        self.replica_faults(false);
        self.faults_off();
        let primary = self.primary_view();
        let compared = self.check_follower("satellite", (&primary, SATELLITE), &engine, shipped);
        self.stats.satellite_shipments += compared as u64;
    }

    /// Ship from the replica's own log to its satellite, with faults on both, and check the
    /// satellite against the replica as the replica is checked against the primary (equal to
    /// it at its log's head: a state the replica, so the primary, had).
    fn op_relay(&mut self) {
        let (Some(r), Some(sat)) = (&self.replica, &self.relayed) else {
            return;
        };
        let (from, to, engine) = (r.store(), sat.store(), sat.engine.clone());
        let up = replica::upstream(&to).expect("upstream");
        self.replica_faults(true);
        // What a server does when it opens the replica, then a logger round.
        let opened = replica::rebase_satellites_if_unlogged(&from).and_then(|_| log::round(&from));
        let shipped = match opened {
            Err(e) if injected(&e) => Ok(false),
            Err(e) => Err(e),
            Ok(_) => ship_between(&from, &self.format, RELAYED, Arc::new(to), up, false),
        }
        .unwrap_or_else(|e| self.fail(format!("shipping from the replica to its satellite: {e}")));
        self.replica_faults(false);
        let who = "replica's satellite";
        let compared = self.check_follower(who, (&from, RELAYED), &engine, shipped);
        self.stats.relayed_shipments += compared as u64;
    }

    /// A second view of the primary's engine (reads see what the mount committed).
    fn primary_view(&self) -> KvStore {
        KvStore::with_engine(Arc::new(self.engine.clone()))
    }

    /// After a shipment to `who` (`name` on the primary, its store on `engine`): what it
    /// applied covers what the primary recorded as acknowledged, it equals the primary when
    /// the shipment went through to the head (the simulation is quiescent between steps, so
    /// "the state at the last group" is "now"), a crash of it (sometimes) loses nothing
    /// acknowledged, and its audit is clean. Returns whether it was compared.
    fn check_follower(
        &mut self,
        who: &str,
        (from, name): (&KvStore, &str),
        engine: &Arc<MemEngine>,
        shipped: bool,
    ) -> bool {
        let follower = || KvStore::with_engine(Arc::new(engine.clone()));
        let head = log::head(from).expect("head").seq;
        let rec = ship::record(from, name)
            .expect("record")
            .expect("registered");
        let applied = |kv: &KvStore| apply::state(kv).expect("state").expect(who).applied;
        let now = applied(&follower());
        self.history.push_back(format!(
            "  {who}: log head {head}, acked {} (base {:?}), applied {now}",
            rec.acked, rec.base
        ));
        // What it acknowledged: a follower waiting for its (new) base group has acknowledged
        // nothing yet (its record's `acked` is then the group before the base).
        let acked = match rec.base {
            Some(b) if rec.acked >= b => rec.acked,
            _ => 0,
        };
        if now < acked {
            self.fail(format!(
                "the {who} applied {now} but its upstream recorded {} as acknowledged",
                acked
            ));
        }
        let compared = shipped && rec.acked == head;
        if compared {
            let (p, q) = (shippable_state(from), shippable_state(&follower()));
            if p != q {
                let only_p: Vec<_> = p.iter().filter(|x| !q.contains(x)).take(5).collect();
                let only_q: Vec<_> = q.iter().filter(|x| !p.contains(x)).take(5).collect();
                self.fail(format!(
                    "the {who} differs from its upstream after group {head}: upstream has {only_p:?}, {who} has {only_q:?}"
                ));
            }
        }
        if self.rng.pct(20) {
            let extra = self.rng.below(engine.unsynced() as u64 + 1) as usize;
            self.history
                .push_back(format!("{who} crash keeping {extra} unsynced commits"));
            engine.crash(extra);
            let after = applied(&follower());
            if after < acked {
                self.fail(format!(
                    "a {who} crash lost acknowledged group {} (it holds {after})",
                    acked
                ));
            }
        }
        let report = audit(&follower(), &AuditOptions::default())
            .unwrap_or_else(|e| self.fail(format!("{who} audit: {e}")));
        if !report.problems.is_empty() {
            self.fail(format!("{who} audit after a shipment:\n{report}"));
        }
        compared
    }
}

/// One shipment from `from`'s log to follower `name` (its store `to`; a satellite with
/// `upstream`), through the real protocol on a socket pair; `Ok(false)` when an injected
/// fault stopped it. `unlogged`: the follower's server keeps no log for its own satellites,
/// as a build before format 5.3 would.
fn ship_between(
    from: &KvStore,
    format: &crate::keyspace::records::FormatRecord,
    name: &str,
    to: Arc<KvStore>,
    upstream: Option<replica::Upstream>,
    unlogged: bool,
) -> Result<bool, ReplicaError> {
    let Some(rec) = ship::record(from, name)? else {
        return Err(ReplicaError::Unknown(name.into()));
    };
    let Some(base) = rec.base else {
        return Ok(false);
    };
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let server = Server::for_store(to.clone(), format.clone(), upstream);
    if unlogged {
        to.track_changes(None);
    }
    let serving = std::thread::spawn(move || {
        let mut io = theirs;
        server.session(&mut io, "simulated upstream")
    });
    let cancel = Canceller::new(|| {});
    let conn = Conn::duplex(Box::new(mine), "simulated follower".into(), cancel);
    let never = AtomicBool::new(false);
    let res = match Session::handshake(conn, from, format, name, &rec, base) {
        Ok(Some(mut s)) => {
            let r = s.ship_pending(from, &never);
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
