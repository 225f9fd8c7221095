//! The primary's side: greet a replica, agree where it stands, and ship the groups it lacks,
//! each as "which of these blocks do you have?", the missing blocks, a flush, then the
//! group's parts; the acknowledgement is recorded durably in `R name`. Also `kvfs replica
//! sync` ([`sync`]); the mount's replication thread, which opens these sessions, is
//! [`super::thread`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::log::{self, read_head};
use super::transport::{self, Conn};
use super::wire::{
    self, BlockSums, ByteBuf, Msg, WireError, CHUNK, MAX_HAVE, PROTO_MAX, PROTO_MIN,
    PROTO_PAST_HOLDS,
};
use super::{cf_from_u8, names_block, replica_key, Change, ReplicaError, ReplicaRecord};
use crate::blocks::{self, reader::Tiering, BlockError};
use crate::keyspace::records::{BlockInfo, FormatRecord};
use crate::keyspace::{self as ks, Hash};
use crate::kv::{Cf, KvError, KvStore};
use crate::util::Timestamp;

/// Threads reading blocks ahead of the sender, and blocks they may hold ready.
const READERS: usize = 4;
const READ_AHEAD: usize = 32;

/// What a session shipped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shipped {
    pub groups: u64,
    pub blocks: u64,
    pub block_bytes: u64,
    /// Blocks sent as a delta of the block the replica held at the same place.
    pub deltas: u64,
    pub wire_bytes: u64,
}

/// `data` as chunks of the replica's `base` where they agree, if that saves a quarter or more.
fn delta(data: &[u8], base: &BlockSums) -> Option<Vec<Option<ByteBuf>>> {
    let mut literal = 0;
    let chunks = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            let base_len = (base.len as usize).saturating_sub(i * CHUNK).min(CHUNK);
            let same = base_len == c.len()
                && base.chunks.get(i) == Some(&xxhash_rust::xxh3::xxh3_128(c).to_le_bytes());
            if same {
                None
            } else {
                literal += c.len();
                Some(ByteBuf(c.to_vec()))
            }
        })
        .collect();
    (literal * 4 <= data.len() * 3).then_some(chunks)
}

/// A connection to one replica, greeted.
pub struct Session {
    conn: Conn,
    name: String,
    /// A satellite: shipped groups without blocks (it fetches what it reads).
    follower: bool,
    pub shipped: Shipped,
    watch: Arc<Watch>,
    /// Dropped with the session: the watchdog then ends at once.
    watchdog_stop: Option<crossbeam_channel::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// Where blocks evicted here come back from (the mount's fetcher): a replica added after
    /// eviction gets them from the others, through memory.
    fetch: Option<Arc<dyn Tiering>>,
}

/// How long a session waits for its replica to take or answer one message before it cuts
/// the connection (`KVFS_REPLICA_TIMEOUT` seconds, default 60): a replica that hangs (a
/// stalled link, a stopped machine) must not hold a shipper forever, and over pipes there is
/// no other timeout.
pub fn timeout() -> Duration {
    std::env::var("KVFS_REPLICA_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// What a session's watchdog watches.
struct Watch {
    t0: Instant,
    /// Milliseconds since `t0` of the last message that got through.
    last: AtomicU64,
    /// The session is waiting on its replica (not idle between shipments).
    busy: AtomicBool,
    timed_out: AtomicBool,
}

impl Watch {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
}

fn watchdog(
    w: Arc<Watch>,
    cancel: transport::Canceller,
    limit: Duration,
    stop: crossbeam_channel::Receiver<()>,
) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(100))
    {
        let quiet = w.now().saturating_sub(w.last.load(Ordering::Relaxed));
        if w.busy.load(Ordering::Relaxed) && quiet > limit.as_millis() as u64 {
            w.timed_out.store(true, Ordering::Relaxed);
            cancel.cancel();
            return;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.watchdog_stop = None;
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
    }
}

/// A block a group names: its length, and a map key naming it (for a delta), if one does.
type Wanted = (u32, Option<Vec<u8>>);

pub fn record(store: &KvStore, name: &str) -> Result<Option<ReplicaRecord>, ReplicaError> {
    match store.get(Cf::Meta, &replica_key(name))? {
        Some(v) => Ok(Some(ReplicaRecord::decode(&v)?)),
        None => Ok(None),
    }
}

/// Change replica `name`'s record (if it still exists) in one transaction, durably.
fn update(store: &KvStore, name: &str, f: impl Fn(&mut ReplicaRecord)) -> Result<(), ReplicaError> {
    let key = replica_key(name);
    store.transact(|t| {
        if let Some(v) = t.get(Cf::Meta, &key)? {
            let mut r = ReplicaRecord::decode(&v)?;
            f(&mut r);
            t.put(Cf::Meta, &key, &r.encode()?)?;
        }
        Ok::<_, ReplicaError>(())
    })?;
    store.sync()?;
    Ok(())
}

/// Remember the last error talking to replica `name` (for `status`).
pub fn note_error(store: &KvStore, name: &str, e: &ReplicaError) {
    let msg = e.to_string();
    tracing::warn!(replica = name, error = %msg, "replication");
    let _ = update(store, name, |r| {
        r.error = Some((Timestamp::now(), msg.clone()))
    });
}

impl Session {
    /// Fetch blocks evicted here through `f` when the replica lacks them.
    pub(super) fn fetching_through(&mut self, f: Option<Arc<dyn Tiering>>) {
        self.fetch = f;
    }

    /// A wire error, or the watchdog's timeout if it cut the connection.
    fn cut(&self, e: ReplicaError) -> ReplicaError {
        if self.watch.timed_out.load(Ordering::Relaxed) {
            return ReplicaError::TimedOut {
                peer: self.conn.peer.clone(),
                secs: timeout().as_secs(),
            };
        }
        e
    }

    fn progress(&self) {
        self.watch.last.store(self.watch.now(), Ordering::Relaxed);
    }

    /// Between shipments the session waits on nothing; the watchdog rests.
    pub(super) fn idle(&self, idle: bool) {
        self.progress();
        self.watch.busy.store(!idle, Ordering::Relaxed);
    }

    fn send(&mut self, m: &Msg) -> Result<(), ReplicaError> {
        let r = self.send_once(m);
        self.progress();
        r.map_err(|e| self.cut(e))
    }

    fn send_once(&mut self, m: &Msg) -> Result<(), ReplicaError> {
        match wire::send(&mut *self.conn.io, m) {
            Ok(n) => {
                self.shipped.wire_bytes += n as u64;
                Ok(())
            }
            // The replica may have refused and closed: its reason is the better error.
            Err(WireError::Io(e)) => match wire::recv(&mut *self.conn.io) {
                Ok(Msg::Refused { reason }) => Err(ReplicaError::Refused {
                    peer: self.conn.peer.clone(),
                    reason,
                }),
                _ => Err(WireError::Io(e).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn recv(&mut self) -> Result<Msg, ReplicaError> {
        let r = wire::recv(&mut *self.conn.io);
        self.progress();
        match r.map_err(|e| self.cut(e.into()))? {
            Msg::Refused { reason } => Err(ReplicaError::Refused {
                peer: self.conn.peer.clone(),
                reason,
            }),
            // A satellite that was caught up (`kvfs pull`) hangs up whenever it hears so, even
            // with a group it has not seen on the way: not an error.
            Msg::Bye if self.follower => Err(WireError::Closed.into()),
            m => Ok(m),
        }
    }

    fn refuse(&mut self, reason: String) -> ReplicaError {
        let _ = self.send(&Msg::Refused {
            reason: reason.clone(),
        });
        ReplicaError::Refused {
            peer: self.conn.peer.clone(),
            reason,
        }
    }

    /// Connect to replica `name` and agree on where it stands. `Ok(None)`: nothing can be
    /// shipped yet (its first group is not logged, or it must start over from a new one).
    pub fn open(
        store: &KvStore,
        format: &FormatRecord,
        store_dir: &Path,
        name: &str,
    ) -> Result<Option<Session>, ReplicaError> {
        let Some(rec) = record(store, name)? else {
            return Ok(None);
        };
        let Some(base) = rec.base else {
            return Ok(None);
        };
        let conn = transport::connect(&rec.url, rec.fingerprint.as_deref(), store_dir)?;
        Session::handshake(conn, store, format, name, &rec, base)
    }

    /// Greet the replica on `conn` and agree on where it stands (see [`Session::open`]).
    pub fn handshake(
        conn: Conn,
        store: &KvStore,
        format: &FormatRecord,
        name: &str,
        rec: &ReplicaRecord,
        base: u64,
    ) -> Result<Option<Session>, ReplicaError> {
        let watch = Arc::new(Watch {
            t0: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicBool::new(true),
            timed_out: AtomicBool::new(false),
        });
        let (w, cancel, limit) = (watch.clone(), conn.canceller(), timeout());
        let (watchdog_stop, stop) = crossbeam_channel::bounded(0);
        let watchdog = Some(std::thread::spawn(move || watchdog(w, cancel, limit, stop)));
        let mut s = Session {
            conn,
            name: name.into(),
            follower: rec.is_satellite(),
            shipped: Shipped::default(),
            watch,
            watchdog_stop: Some(watchdog_stop),
            watchdog,
            fetch: None,
        };
        s.send(&Msg::Hello {
            proto_min: PROTO_MIN,
            proto_max: PROTO_MAX,
            fs_id: format.fs_id,
            block_size: format.block_size,
        })?;
        let (applied, chain, fresh) = match s.recv()? {
            Msg::Welcome {
                proto,
                applied,
                chain,
                fresh,
            } => {
                if proto < PROTO_PAST_HOLDS && crate::history::keeps_past(store)? {
                    return Err(s.refuse(format!(
                        "this primary keeps history: its groups carry the blocks its past holds (protocol {PROTO_PAST_HOLDS}), and the replica speaks protocol {proto}; upgrade kvfs there"
                    )));
                }
                (applied, chain, fresh)
            }
            m => return Err(WireError::Unexpected(wire::name(&m).into()).into()),
        };
        let rebase = |why: &str| -> Result<Option<Session>, ReplicaError> {
            tracing::warn!(
                replica = name,
                why,
                "the replica starts over from a new copy of the whole filesystem"
            );
            update(store, name, |r| {
                r.base = None;
                r.acked = 0;
            })?;
            Ok(None)
        };
        if fresh {
            if rec.acked >= base {
                return rebase("it is empty but had acknowledged groups (its store was replaced)");
            }
            return Ok(Some(s));
        }
        if applied == rec.acked && chain == rec.acked_chain {
            return Ok(Some(s));
        }
        if applied < base && rec.acked < base {
            // Its base group, not yet applied there, replaces whatever it holds (it was made
            // to start over, or it is a store that followed this filesystem before).
            return Ok(Some(s));
        }
        if applied < rec.acked {
            return rebase("it lost groups it had acknowledged (restored from an older copy?)");
        }
        let head = log::head(store)?;
        if applied > head.seq {
            let reason = format!(
                "the replica has applied group {applied} but this primary's log ends at {}: this primary is older than its replica (restored from an old copy?); refusing to ship",
                head.seq
            );
            return Err(s.refuse(reason));
        }
        match log::read_group(store, applied)? {
            Some(p) if p.first().map(|p| p.chain) == Some(chain) => {
                // It applied groups whose acknowledgement we did not record (a crash between).
                update(store, name, |r| {
                    r.acked = applied;
                    r.acked_chain = chain;
                })?;
                Ok(Some(s))
            }
            _ => {
                let reason = format!(
                    "the replica's group {applied} is not this primary's: it holds another history of this filesystem; refusing"
                );
                Err(s.refuse(reason))
            }
        }
    }

    /// Ship every group after the acknowledged one, up to the head as it is now. Returns the
    /// last acknowledged seq.
    pub fn ship_pending(
        &mut self,
        store: &KvStore,
        stop: &AtomicBool,
    ) -> Result<u64, ReplicaError> {
        // What the replica applies must survive a crash here: a primary that lost a group
        // its replica holds would be refused by it as an older copy.
        store.sync()?;
        let head = store.read(read_head)?;
        loop {
            let Some(rec) = record(store, &self.name)? else {
                return Ok(0);
            };
            if rec.acked >= head.seq || stop.load(Ordering::Relaxed) {
                return Ok(rec.acked);
            }
            self.ship_group(store, rec.acked + 1, &rec.acked_chain)?;
        }
    }

    fn ship_group(&mut self, store: &KvStore, seq: u64, prev: &Hash) -> Result<(), ReplicaError> {
        let parts = log::read_group(store, seq)?.ok_or_else(|| {
            ReplicaError::Kv(KvError::Corruption(format!(
                "group {seq} is missing from the log"
            )))
        })?;
        // Each block the group names, with its length and a map key naming it (none for a
        // block only the primary's past names).
        let mut wanted: BTreeMap<Hash, Wanted> = BTreeMap::new();
        for p in &parts {
            for ch in &p.changes {
                let Change::Put { cf, key, value } = ch else {
                    continue;
                };
                let Some(cf) = cf_from_u8(*cf) else { continue };
                let Some((h, len)) = names_block(cf, key, value)? else {
                    continue;
                };
                let len = match len {
                    Some(len) => len,
                    // A block only the past names: its length is in its info (the group's
                    // reference keeps it).
                    None => match store.get(Cf::Bidx, &ks::block_info_key(&h))? {
                        Some(v) => BlockInfo::decode(&v)?.len,
                        None => {
                            return Err(ReplicaError::Kv(KvError::Corruption(format!(
                                "group {seq} names block {}, which has no {}",
                                ks::hex(&h),
                                ks::describe_key(&ks::block_info_key(&h))
                            ))))
                        }
                    },
                };
                let w = wanted.entry(h).or_insert((len, None));
                if cf == Cf::Fmap && w.1.is_none() {
                    w.1 = Some(key.clone());
                }
            }
        }
        if self.follower {
            wanted.clear();
        }
        let wanted: Vec<(Hash, Wanted)> = wanted.into_iter().collect();
        let mut missing = Vec::new();
        for chunk in wanted.chunks(MAX_HAVE) {
            self.send(&Msg::Have {
                hashes: chunk.iter().map(|(h, _)| *h).collect(),
            })?;
            let have = match self.recv()? {
                Msg::Holding { have } if have.len() == chunk.len() => have,
                m => return Err(WireError::Unexpected(wire::name(&m).into()).into()),
            };
            missing.extend(
                chunk
                    .iter()
                    .zip(have)
                    .filter(|(_, has)| !has)
                    .map(|(b, _)| b.clone()),
            );
        }
        // What the replica holds at those keys now: a changed block goes as a delta of it.
        let mut blocks = Vec::with_capacity(missing.len());
        let (missing, unplaced): (Vec<_>, Vec<_>) =
            missing.into_iter().partition(|(_, (_, k))| k.is_some());
        blocks.extend(unplaced.iter().map(|(h, (len, _))| (*h, *len, None)));
        for chunk in missing.chunks(MAX_HAVE) {
            self.send(&Msg::Sums {
                keys: chunk.iter().filter_map(|(_, (_, k))| k.clone()).collect(),
            })?;
            let sums = match self.recv()? {
                Msg::SumsReply { sums } if sums.len() == chunk.len() => sums,
                m => return Err(WireError::Unexpected(wire::name(&m).into()).into()),
            };
            blocks.extend(
                chunk
                    .iter()
                    .zip(sums)
                    .map(|((h, (len, _)), base)| (*h, *len, base)),
            );
        }
        if !blocks.is_empty() {
            self.send_blocks(store, &blocks)?;
            self.flush()?;
        }
        let n = parts.len();
        let chain = parts[0].chain;
        for (i, p) in parts.into_iter().enumerate() {
            self.send(&Msg::Part {
                seq,
                index: i as u32,
                last: i + 1 == n,
                prev: *prev,
                chain,
                at: p.at,
                changes: p.changes,
            })?;
        }
        match self.recv()? {
            Msg::Applied { seq: s, chain: c } if s == seq && c == chain => {}
            m => return Err(WireError::Unexpected(wire::name(&m).into()).into()),
        }
        update(store, &self.name, |r| {
            r.acked = seq;
            r.acked_chain = chain;
            r.acked_at = Some(Timestamp::now());
            r.error = None;
        })?;
        self.shipped.groups += 1;
        Ok(())
    }

    /// Send the content of `blocks`, read by a few threads ahead of the sender (a cold read
    /// waits on the disk; the order of blocks does not matter to the replica).
    fn send_blocks(
        &mut self,
        store: &KvStore,
        blocks: &[(Hash, u32, Option<BlockSums>)],
    ) -> Result<(), ReplicaError> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD);
        let fetch = self.fetch.clone();
        let fetch = fetch.as_deref();
        std::thread::scope(|sc| {
            for _ in 0..READERS {
                let tx = tx.clone();
                let (next, failed) = (&next, &failed);
                sc.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= blocks.len() || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let (h, len, _) = &blocks[i];
                    let data = match (blocks::read_stored(store, h, *len), fetch) {
                        // Evicted here: from another replica, verified, not stored.
                        (Err(BlockError::Missing { .. }), Some(f)) => f.fetch(h, *len, false),
                        (r, _) => r,
                    };
                    if tx.send((i, data)).is_err() {
                        return;
                    }
                });
            }
            drop(tx);
            let mut res = Ok(());
            for (i, data) in rx.iter() {
                let (hash, _, base) = &blocks[i];
                let sent = data.map_err(ReplicaError::from).and_then(|data| {
                    self.shipped.blocks += 1;
                    self.shipped.block_bytes += data.len() as u64;
                    match base.as_ref().and_then(|b| delta(&data, b)) {
                        Some(chunks) => {
                            self.shipped.deltas += 1;
                            self.send(&Msg::Delta {
                                hash: *hash,
                                base: base.as_ref().expect("delta has a base").hash,
                                chunks,
                            })
                        }
                        None => self.send(&Msg::Block { hash: *hash, data }),
                    }
                });
                if let Err(e) = sent {
                    failed.store(true, Ordering::Relaxed);
                    res = Err(e);
                    break;
                }
            }
            // Readers blocked on a full channel end when it is dropped.
            drop(rx);
            res
        })
    }

    fn flush(&mut self) -> Result<(), ReplicaError> {
        self.send(&Msg::Flush)?;
        match self.recv()? {
            Msg::Flushed { .. } => Ok(()),
            m => Err(WireError::Unexpected(wire::name(&m).into()).into()),
        }
    }

    /// Tell the other end why the session ends (best effort), and close.
    pub(super) fn refuse_now(mut self, reason: String) {
        let _ = self.refuse(reason);
    }

    /// Tell a satellite that every group up to `head` is shipped (also its keepalive).
    pub(super) fn caught_up(&mut self, head: u64) -> Result<(), ReplicaError> {
        self.send(&Msg::CaughtUp { head })
    }

    /// Say goodbye (best effort) and close.
    pub fn close(mut self) {
        let _ = self.send(&Msg::Bye);
    }

    pub fn canceller(&self) -> transport::Canceller {
        self.conn.canceller()
    }
}

/// Ship to replica `name` until it has acknowledged the head as it is now, fetching blocks
/// evicted here through `fetch`. For `kvfs replica sync` on an unmounted store and for tests.
pub fn ship_once(
    store: &KvStore,
    format: &FormatRecord,
    store_dir: &Path,
    name: &str,
    fetch: Option<Arc<dyn Tiering>>,
) -> Result<Shipped, ReplicaError> {
    let never = AtomicBool::new(false);
    // A replica that must start over gets its new first group at the next logger round.
    for _ in 0..3 {
        match Session::open(store, format, store_dir, name)? {
            Some(mut s) => {
                s.fetching_through(fetch.clone());
                s.ship_pending(store, &never)?;
                let total = s.shipped;
                s.close();
                return Ok(total);
            }
            None => {
                log::round(store)?;
            }
        }
    }
    Err(ReplicaError::Refused {
        peer: name.into(),
        reason: "it had to start over from a new first group three times in a row".into(),
    })
}

/// One replica's name and how shipping to it went.
pub type SyncOutcome = (String, Result<Shipped, ReplicaError>);

/// Everything logged now, shipped to every replica; errors per replica.
pub fn sync(
    store: &KvStore,
    format: &FormatRecord,
    store_dir: &Path,
    fetch: Option<Arc<dyn Tiering>>,
) -> Result<Vec<SyncOutcome>, ReplicaError> {
    log::round(store)?;
    let mut out = Vec::new();
    for (name, rec) in super::replicas(store)? {
        if rec.is_satellite() {
            continue;
        }
        let r = ship_once(store, format, store_dir, &name, fetch.clone());
        if let Err(e) = &r {
            note_error(store, &name, e);
        }
        out.push((name, r));
    }
    log::trim(store)?;
    Ok(out)
}

/// Whether every replica has acknowledged group `seq` (replicas waiting for their first group
/// have not). Satellites do not count: they pull when they can.
pub fn all_acked(store: &KvStore, seq: u64) -> Result<bool, ReplicaError> {
    Ok(super::replicas(store)?
        .iter()
        .all(|(_, r)| r.is_satellite() || (r.base.is_some() && r.acked >= seq)))
}
