//! Fetch-on-miss: evicted blocks come back from the replicas that hold them, by hash.
//!
//! Requests (a reader waiting, or readahead not waiting) go into one queue; a few workers
//! each take what is queued (up to [`BATCH`] blocks), ask a replica for them in one `Fetch`
//! over a connection kept open between batches, check every value by decoding it and
//! comparing the content's SHA-256 with the name, store the good ones here again in one
//! transaction, and wake the readers. A block asked for twice is fetched once (one flight
//! per hash). A replica that fails (refused, unreachable, cut, wrong content) is tried next
//! after the others and is left alone for [`DOWN_FOR`]; while every replica is down a miss
//! fails at once. A reader waits at most the fetch timeout: then it gets EIO, and the stuck
//! connection is cut. No lock or transaction is held while a worker talks to a replica.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::Tier;
use crate::blocks::cache::BlockCache;
use crate::blocks::encode::{self, Check};
use crate::blocks::reader::Tiering;
use crate::blocks::{resident, BlockError};
use crate::keyspace::records::FormatRecord;
use crate::keyspace::{self as ks, Hash};
use crate::kv::{KvError, KvStore};
use crate::replica::transport::{self, Canceller, Conn};
use crate::replica::wire::{self, Msg, MAX_FETCH, PROTO_FETCH, PROTO_MAX, PROTO_MIN};
use crate::replica::{replicas, ReplicaError};
use crate::util::lock;

/// Blocks per request to a replica.
const BATCH: usize = 32;
/// Stored bytes the keeper commits in one transaction at most.
const KEEP_BYTES: usize = 8 << 20;
/// Workers (each with its own connection per replica): batches in flight at once.
const WORKERS: usize = 4;
/// How long a replica that failed is left alone before it is tried again.
pub const DOWN_FOR: Duration = Duration::from_secs(3);

/// A block a replica gave: its name, the verified `B` value to store, and its content.
type Got = (Hash, Vec<u8>, Vec<u8>);

/// A replica to ask: name, URL, pinned fingerprint.
type Candidate = (String, String, Option<String>);
/// The replicas to ask, or why there is none.
type Candidates = Result<Vec<Candidate>, String>;
/// Fetched `B` values to store, by block.
type Values = Vec<(Hash, Vec<u8>)>;

/// The replicas' records are read again after this long (a replica added, removed or
/// starting over is seen within it).
const CANDIDATES_FOR: Duration = Duration::from_secs(1);

/// One block on its way.
struct Flight {
    len: u32,
    /// Store the block here once fetched: a reader waits for it, or readahead while the cache
    /// has room. Readahead of a stream the full cache cannot hold only passes through the
    /// reader's cache (stored, it would be evicted again before any reuse).
    store: AtomicBool,
    done: Mutex<Option<Result<Arc<Vec<u8>>, String>>>,
    landed: Condvar,
}

/// A replica as the fetcher knows it.
#[derive(Default)]
struct Peer {
    down_until: Option<Instant>,
    last_error: Option<String>,
    /// Greeted connections not in use.
    idle: Vec<Conn>,
}

/// A batch being fetched: when it must be done and how to cut its connection.
struct Busy {
    deadline: Instant,
    cancel: Canceller,
    peer: String,
}

/// Counters for `status`.
#[derive(Default)]
pub struct FetchStats {
    pub blocks: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
}

struct Shared {
    store: Arc<KvStore>,
    fs_id: [u8; 16],
    block_size: u32,
    /// Where the TLS identity lives (`STORE/tls`).
    dir: PathBuf,
    timeout: Duration,
    flights: Mutex<HashMap<Hash, Arc<Flight>>>,
    peers: Mutex<HashMap<String, Peer>>,
    busy: Mutex<Vec<Option<Busy>>>,
    candidates: Mutex<Option<(Instant, Candidates)>>,
    /// To the keeper thread (`None` once stopping).
    keeper: Mutex<Option<Sender<Values>>>,
    stop: AtomicBool,
    stats: FetchStats,
    /// The mount's tiering state (uses, the cache's fill); `None` for a fetcher that only
    /// checks, which stores nothing and keeps no uses.
    tier: Option<Arc<Tier>>,
    /// The block reader's cache: fetched content lands there too.
    sink: std::sync::OnceLock<Arc<BlockCache>>,
}

/// The mount's fetcher: the [`Tiering`] hook of its block reader.
pub struct Fetcher {
    shared: Arc<Shared>,
    tx: Option<Sender<Hash>>,
    workers: Vec<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Fetcher {
    pub fn new(
        store: Arc<KvStore>,
        format: &FormatRecord,
        dir: PathBuf,
        timeout: Duration,
        tier: Arc<Tier>,
    ) -> Fetcher {
        Fetcher::with(store, format, dir, timeout, Some(tier))
    }

    /// A fetcher that only checks: nothing fetched is stored (`audit --fetch`, which may run
    /// on a store opened read-only).
    pub fn checking(
        store: Arc<KvStore>,
        format: &FormatRecord,
        dir: PathBuf,
        timeout: Duration,
    ) -> Fetcher {
        Fetcher::with(store, format, dir, timeout, None)
    }

    fn with(
        store: Arc<KvStore>,
        format: &FormatRecord,
        dir: PathBuf,
        timeout: Duration,
        tier: Option<Arc<Tier>>,
    ) -> Fetcher {
        let shared = Arc::new(Shared {
            store,
            fs_id: format.fs_id,
            block_size: format.block_size,
            dir,
            timeout,
            flights: Mutex::default(),
            peers: Mutex::default(),
            busy: Mutex::new((0..WORKERS).map(|_| None).collect()),
            candidates: Mutex::default(),
            keeper: Mutex::default(),
            stop: AtomicBool::new(false),
            stats: FetchStats::default(),
            tier,
            sink: std::sync::OnceLock::new(),
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Hash>();
        // A checking fetcher stores nothing: no keeper.
        let keeper_thread = shared.tier.is_some().then(|| {
            let (ktx, krx) = crossbeam_channel::bounded::<Values>(WORKERS * 2);
            *lock(&shared.keeper) = Some(ktx);
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kvfs-keep".into())
                .spawn(move || keeper(&shared, &krx))
        });
        let workers = (0..WORKERS)
            .filter_map(|i| {
                let (shared, rx) = (shared.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("kvfs-fetch-{i}"))
                    .spawn(move || worker(&shared, i, &rx))
                    .ok()
            })
            .collect();
        Fetcher {
            shared,
            tx: Some(tx),
            workers,
            keeper: keeper_thread.and_then(Result::ok),
        }
    }

    pub fn stats(&self) -> &FetchStats {
        &self.shared.stats
    }

    /// The flight of `h`, started if none is under way; the reason when no replica can be
    /// asked now. What it brings is stored here if the caller `keep`s it (not a sequential
    /// read of a file larger than the cache) and, for a readahead, if the cache is not full:
    /// a reader catching up with the blocks fetched ahead of it streams a file. A reader's own
    /// miss is stored (it is the most recent use) unless it streams such a file.
    fn launch(&self, h: &Hash, len: u32, ahead: bool, keep: bool) -> Result<Arc<Flight>, String> {
        let full = self.shared.tier.as_ref().is_some_and(|t| t.gate.full());
        let mut f = lock(&self.shared.flights);
        if let Some(x) = f.get(h) {
            if keep && !ahead && !full {
                x.store.store(true, Ordering::Relaxed);
            }
            return Ok(x.clone());
        }
        let store = keep && (!ahead || !full);
        if let Some(why) = self.shared.all_down() {
            return Err(why);
        }
        let x = Arc::new(Flight {
            len,
            store: AtomicBool::new(store),
            done: Mutex::new(None),
            landed: Condvar::new(),
        });
        f.insert(*h, x.clone());
        drop(f);
        match &self.tx {
            Some(tx) if tx.send(*h).is_ok() => Ok(x),
            _ => {
                lock(&self.shared.flights).remove(h);
                Err("the fetcher is stopping".into())
            }
        }
    }
}

impl Tiering for Fetcher {
    fn fetch(&self, h: &Hash, len: u32, keep: bool) -> Result<Vec<u8>, BlockError> {
        let unavailable = |reason: String| BlockError::Unavailable { hash: *h, reason };
        let flight = self.launch(h, len, false, keep).map_err(unavailable)?;
        let deadline = Instant::now() + self.shared.timeout;
        let mut done = lock(&flight.done);
        while done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(done);
                self.shared.cut_overdue();
                self.shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(unavailable(format!(
                    "no replica answered within {} s",
                    self.shared.timeout.as_secs()
                )));
            }
            done = flight
                .landed
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match done.as_ref() {
            Some(Ok(d)) => Ok(d.to_vec()),
            Some(Err(e)) => Err(unavailable(e.clone())),
            None => Err(unavailable("lost".into())),
        }
    }

    fn prefetch(&self, h: &Hash, len: u32, keep: bool) {
        let _ = self.launch(h, len, true, keep);
    }

    fn used(&self, h: &Hash) {
        if let Some(t) = &self.shared.tier {
            t.touches.note(h);
        }
    }

    fn deliver_to(&self, sink: Arc<BlockCache>) {
        let _ = self.shared.sink.set(sink);
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        self.shared.cut_overdue_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        *lock(&self.shared.keeper) = None;
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

impl Shared {
    /// The replicas to ask, best first (those that acknowledged most), with the reason none
    /// can be asked if so.
    fn candidates(&self) -> Candidates {
        let mut cached = lock(&self.candidates);
        if let Some((at, c)) = cached.as_ref() {
            if at.elapsed() < CANDIDATES_FOR {
                return c.clone();
            }
        }
        let c = self.read_candidates();
        *cached = Some((Instant::now(), c.clone()));
        c
    }

    fn read_candidates(&self) -> Candidates {
        // A satellite fetches from its upstream (which serves `Fetch` on its listener).
        if let Some(up) = crate::replica::upstream(&self.store).map_err(|e| e.to_string())? {
            return Ok(vec![("upstream".into(), up.url, up.fingerprint)]);
        }
        let mut reps = replicas(&self.store).map_err(|e| e.to_string())?;
        reps.retain(|(_, r)| r.base.is_some() && !r.is_satellite());
        if reps.is_empty() {
            return Err("the store has no replica".into());
        }
        reps.sort_by_key(|(_, r)| std::cmp::Reverse(r.acked));
        Ok(reps
            .into_iter()
            .map(|(n, r)| (n, r.url, r.fingerprint))
            .collect())
    }

    /// `Some(reason)` when every replica is known down.
    fn all_down(&self) -> Option<String> {
        let names = match self.candidates() {
            Ok(c) => c,
            Err(e) => return Some(e),
        };
        let peers = lock(&self.peers);
        let now = Instant::now();
        let mut why = Vec::new();
        for (name, _, _) in &names {
            match peers.get(name) {
                Some(p) if p.down_until.is_some_and(|t| t > now) => why.push(format!(
                    "{name}: {}",
                    p.last_error.as_deref().unwrap_or("down")
                )),
                _ => return None,
            }
        }
        Some(format!("every replica is down ({})", why.join("; ")))
    }

    fn mark_down(&self, name: &str, error: &str) {
        let mut peers = lock(&self.peers);
        let p = peers.entry(name.to_string()).or_default();
        if p.down_until.is_none_or(|t| t <= Instant::now()) {
            tracing::warn!(
                replica = name,
                error,
                "fetching from the replica failed; trying it again in {} s",
                DOWN_FOR.as_secs()
            );
        }
        p.down_until = Some(Instant::now() + DOWN_FOR);
        p.last_error = Some(error.to_string());
        p.idle.clear();
    }

    /// Cut the connections of batches past their deadline (a replica that stopped answering).
    fn cut_overdue(&self) {
        let now = Instant::now();
        let overdue: Vec<(Canceller, String)> = lock(&self.busy)
            .iter()
            .flatten()
            .filter(|b| b.deadline <= now)
            .map(|b| (b.cancel.clone(), b.peer.clone()))
            .collect();
        for (c, peer) in overdue {
            self.mark_down(&peer, "timed out");
            c.cancel();
        }
    }

    fn cut_overdue_all(&self) {
        for b in lock(&self.busy).iter().flatten() {
            b.cancel.cancel();
        }
    }

    fn connect(&self, url: &str, fingerprint: Option<&str>) -> Result<Conn, ReplicaError> {
        let mut conn = transport::connect(url, fingerprint, &self.dir)?;
        wire::send(
            &mut *conn.io,
            &Msg::Hello {
                proto_min: PROTO_MIN,
                proto_max: PROTO_MAX,
                fs_id: self.fs_id,
                block_size: self.block_size,
            },
        )?;
        match wire::recv(&mut *conn.io)? {
            Msg::Welcome { proto, .. } if proto >= PROTO_FETCH => Ok(conn),
            Msg::Welcome { proto, .. } => Err(ReplicaError::Refused {
                peer: conn.peer.clone(),
                reason: format!(
                    "it speaks protocol {proto}; fetching blocks back needs {PROTO_FETCH} (upgrade kvfs there)"
                ),
            }),
            Msg::Refused { reason } => Err(ReplicaError::Refused {
                peer: conn.peer.clone(),
                reason,
            }),
            m => Err(wire::WireError::Unexpected(wire::name(&m).into()).into()),
        }
    }

    /// Ask replica `name` for `want` on one connection. Returns the verified `B` values and
    /// contents it gave, by hash; the others it did not hold (or sent damaged: logged).
    fn ask(
        &self,
        slot: usize,
        name: &str,
        url: &str,
        fingerprint: Option<&str>,
        want: &[(Hash, u32)],
    ) -> Result<Vec<Got>, ReplicaError> {
        let idle = lock(&self.peers).get_mut(name).and_then(|p| p.idle.pop());
        let reused = idle.is_some();
        let mut conn = match idle {
            Some(c) => c,
            None => self.connect(url, fingerprint)?,
        };
        let mut r = self.exchange_in(slot, &mut conn, name, want);
        let cut = || {
            lock(&self.peers)
                .get(name)
                .is_some_and(|p| p.down_until.is_some_and(|t| t > Instant::now()))
        };
        // Not after a cut for its deadline (the replica stopped answering: that is EIO within
        // the timeout, not a second wait).
        if r.is_err() && reused && !cut() && !self.stop.load(Ordering::Relaxed) {
            // A connection that waited in the pool may have been closed by the other end
            // meanwhile (a server restarted, an idle timeout): one more try on a fresh one
            // before the replica counts as down.
            conn = self.connect(url, fingerprint)?;
            r = self.exchange_in(slot, &mut conn, name, want);
        }
        let got = r?;
        lock(&self.peers)
            .entry(name.to_string())
            .or_default()
            .idle
            .push(conn);
        Ok(got)
    }

    /// [`Shared::exchange`] with its deadline watched (see [`Shared::cut_overdue`]).
    fn exchange_in(
        &self,
        slot: usize,
        conn: &mut Conn,
        name: &str,
        want: &[(Hash, u32)],
    ) -> Result<Vec<Got>, ReplicaError> {
        lock(&self.busy)[slot] = Some(Busy {
            deadline: Instant::now() + self.timeout,
            cancel: conn.canceller(),
            peer: name.to_string(),
        });
        let r = self.exchange(conn, name, want);
        lock(&self.busy)[slot] = None;
        r
    }

    fn exchange(
        &self,
        conn: &mut Conn,
        name: &str,
        want: &[(Hash, u32)],
    ) -> Result<Vec<Got>, ReplicaError> {
        wire::send(
            &mut *conn.io,
            &Msg::Fetch {
                hashes: want.iter().map(|(h, _)| *h).collect(),
            },
        )?;
        let mut got = Vec::new();
        for (h, len) in want {
            match wire::recv(&mut *conn.io)? {
                Msg::Content { hash, value } if hash == *h => {
                    match encode::decode_with(&value, h, *len, Check::Strong) {
                        Ok(d) => {
                            let value = d.repaired.map(|(_, v)| v).unwrap_or(value);
                            got.push((*h, value, d.content));
                        }
                        Err(reason) => tracing::error!(
                            replica = name,
                            block = %ks::hex(h),
                            reason,
                            "the replica sent a block that does not match its name; not used"
                        ),
                    }
                }
                Msg::NotHeld { hash } if hash == *h => {}
                Msg::Refused { reason } => {
                    return Err(ReplicaError::Refused {
                        peer: conn.peer.clone(),
                        reason,
                    })
                }
                m => return Err(wire::WireError::Unexpected(wire::name(&m).into()).into()),
            }
        }
        Ok(got)
    }

    /// Fetch `batch` from the replicas, best first; store what came, land every flight.
    fn run_batch(&self, slot: usize, batch: Vec<Hash>) {
        let mut want: Vec<(Hash, u32)> = {
            let f = lock(&self.flights);
            batch
                .iter()
                .filter_map(|h| f.get(h).map(|x| (*h, x.len)))
                .collect()
        };
        // Fetched meanwhile by another flight that ended (a reader came back after it).
        want.retain(
            |(h, len)| match crate::blocks::read_stored(&self.store, h, *len) {
                Ok(d) => {
                    self.land(h, Ok(Arc::new(d)));
                    false
                }
                Err(_) => true,
            },
        );
        let mut errors: Vec<String> = Vec::new();
        let candidates = match self.candidates() {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        let now = Instant::now();
        let (up, down): (Vec<_>, Vec<_>) = {
            let peers = lock(&self.peers);
            candidates.into_iter().partition(|(n, _, _)| {
                peers
                    .get(n)
                    .is_none_or(|p| p.down_until.is_none_or(|t| t <= now))
            })
        };
        for (name, url, fp) in up.into_iter().chain(down) {
            if want.is_empty() || self.stop.load(Ordering::Relaxed) {
                break;
            }
            match self.ask(slot, &name, &url, fp.as_deref(), &want) {
                Ok(got) => {
                    if let Some(tx) = lock(&self.keeper).as_ref() {
                        let f = lock(&self.flights);
                        let values: Values = got
                            .iter()
                            .filter(|(h, _, _)| {
                                f.get(h).is_none_or(|x| x.store.load(Ordering::Relaxed))
                            })
                            .map(|(h, value, _)| (*h, value.clone()))
                            .collect();
                        drop(f);
                        let _ = tx.send(values);
                    }
                    for (h, value, content) in got {
                        self.stats.blocks.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .bytes
                            .fetch_add(value.len() as u64, Ordering::Relaxed);
                        want.retain(|(w, _)| *w != h);
                        let content = Arc::new(content);
                        if let Some(c) = self.sink.get() {
                            c.insert(h, content.clone());
                        }
                        self.land(&h, Ok(content));
                    }
                    if !want.is_empty() {
                        errors.push(format!("{name} does not hold it"));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    self.mark_down(&name, &e);
                    errors.push(format!("{name}: {e}"));
                }
            }
        }
        for (h, _) in want {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            let why = if errors.is_empty() {
                "no replica to ask".to_string()
            } else {
                errors.join("; ")
            };
            tracing::error!(block = %ks::hex(&h), reason = %why, "an evicted block could not be fetched");
            self.land(&h, Err(why));
        }
    }

    /// Store fetched values here again (one transaction; not synced: a crash loses only
    /// copies the replicas still hold).
    fn keep(&self, got: &[(Hash, Vec<u8>)]) -> Result<(), KvError> {
        let stored = self.store.transact(|t| {
            let mut stored = 0u64;
            for (h, value) in got {
                if resident::restore(t, h, value)? {
                    stored += value.len() as u64;
                }
            }
            Ok::<_, KvError>(stored)
        })?;
        // Counted at once, as a writer's flush is: the cache is full again as soon as these
        // fill the room the last eviction made, not only at the next round.
        if let Some(t) = &self.tier {
            t.gate.added(stored);
        }
        Ok(())
    }

    fn land(&self, h: &Hash, r: Result<Arc<Vec<u8>>, String>) {
        if let Some(f) = lock(&self.flights).remove(h) {
            *lock(&f.done) = Some(r);
            f.landed.notify_all();
        }
    }
}

/// The one thread that stores fetched blocks: the workers go back to the wire at once, and
/// one committer (taking what several batches brought) avoids writers contending for the
/// store's write path.
fn keeper(shared: &Shared, rx: &Receiver<Values>) {
    while let Ok(mut batch) = rx.recv() {
        let mut bytes: usize = batch.iter().map(|(_, v)| v.len()).sum();
        while bytes < KEEP_BYTES {
            match rx.try_recv() {
                Ok(more) => {
                    bytes += more.iter().map(|(_, v)| v.len()).sum::<usize>();
                    batch.extend(more);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = shared.keep(&batch) {
            tracing::error!(error = %e, blocks = batch.len(), "storing fetched blocks failed; they were served but are not kept");
        }
    }
}

fn worker(shared: &Shared, slot: usize, rx: &Receiver<Hash>) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(h) => h,
            Err(RecvTimeoutError::Timeout) if !shared.stop.load(Ordering::Relaxed) => continue,
            Err(_) => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH.min(MAX_FETCH) {
            match rx.try_recv() {
                Ok(h) => batch.push(h),
                Err(_) => break,
            }
        }
        shared.run_batch(slot, batch);
    }
}
