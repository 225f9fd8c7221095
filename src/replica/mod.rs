//! Replication: a primary ships what it commits to replicas, blocks first, then the metadata
//! that names them, and a replica applies each shipment as one transaction.
//!
//! The pieces, in the order data flows:
//! - [`Changes`], the change tracker: every transaction that writes shippable keys (inodes,
//!   xattrs, directory entries, block maps) also writes one marker `c seq` listing them
//!   (`kv::ChangeTracker`; installed while the store has replicas).
//! - [`log`]: the logger turns all markers visible in one snapshot into a **group** `L seq`:
//!   the values those keys had in that snapshot. Group `n` takes the replica from the
//!   primary's state at one moment to its state at a later one, so a replica that applies
//!   groups in order only ever holds states the primary had. A group holds a reference on
//!   every block it names until every replica acknowledged it, so a block is never freed
//!   before it is shipped.
//! - [`wire`]: frames and messages. [`ship`]: the primary's side of a connection (handshake,
//!   "which of these do you have", blocks, then the group). [`serve`] and [`apply`]: the
//!   replica's side, which acknowledges blocks once synced and verified by SHA-256 and a group
//!   once applied and synced.
//! - [`transport`]: how a connection is made (`exec:`, `ssh://`, `tcp://` with TLS).
//!
//! What stays local is never marked: process table, open counts, locks, written-ahead
//! markers, garbage marks, refcounts (each store counts its own references).

pub mod apply;
pub mod listen;
pub mod log;
pub mod relay;
pub mod satellite;
pub mod serve;
pub mod ship;
pub mod status;
pub mod thread;
pub mod tls;
pub mod transport;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::keyspace::records::{
    decode_counter, decode_v1, encode_counter, encode_v1, DecodeError, EncodeError,
};
use crate::keyspace::{self as ks, inode_sub, Hash, Prefix};
use crate::kv::{Cf, ChangeTracker, KvError, KvStore};
use crate::util::Timestamp;

/// `c seq` value: the keys one transaction wrote (family index, key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeMarker {
    pub keys: Vec<(u8, Vec<u8>)>,
}

impl ChangeMarker {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("change marker", b)
    }
}

/// One change in a group: the value a key had at the group's moment, or its absence, or
/// (for a replica's first group) "everything of this range is as follows".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Put {
        cf: u8,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        cf: u8,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Delete every shippable key in `[start, end)` first; the puts that follow in the group
    /// give the range's content.
    Clear {
        cf: u8,
        #[serde(with = "serde_bytes")]
        start: Vec<u8>,
        #[serde(with = "serde_bytes")]
        end: Vec<u8>,
    },
}

/// `L seq part` value: one part of a group (parts are at most [`log::PART_BYTES`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPart {
    /// When the group was logged.
    pub at: Timestamp,
    /// The group's chain hash: SHA-256 of the previous group's chain, its seq and every
    /// change of every part in order (see [`chain`]).
    pub chain: Hash,
    pub last: bool,
    pub changes: Vec<Change>,
}

impl LogPart {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("log part", b)
    }
}

/// `M log` value on a primary: the last group logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    pub seq: u64,
    pub chain: Hash,
}

impl LogHead {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("log head", b)
    }
}

/// `R name` value on a primary: one replica and what it acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub url: String,
    /// `SHA256:...` of the replica's certificate (tcp:// only).
    pub fingerprint: Option<String>,
    pub added: Timestamp,
    /// The group that gives this replica the whole filesystem (its first), once logged.
    pub base: Option<u64>,
    /// The last group it acknowledged as applied and synced, and that group's chain hash.
    pub acked: u64,
    pub acked_chain: Hash,
    pub acked_at: Option<Timestamp>,
    /// The last error talking to it, and when; cleared by the next acknowledgement.
    pub error: Option<(Timestamp, String)>,
}

impl ReplicaRecord {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("replica record", b)
    }
}

/// `M replica` value on a replica store: the filesystem it follows and what it applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub applied: u64,
    pub chain: Hash,
    pub applied_at: Option<Timestamp>,
    /// Set by `kvfs promote`: the store became a primary and accepts no more shipments.
    pub promoted: Option<Timestamp>,
}

impl ReplicaState {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("replica state", b)
    }
}

/// `M upstream` value on a satellite store: where it pulls from. A satellite is a replica
/// store (it has `M replica`) whose groups come from this upstream, without blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub url: String,
    /// `SHA256:...` of the upstream's certificate (tcp:// only).
    pub fingerprint: Option<String>,
    pub added: Timestamp,
}

impl Upstream {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("upstream", b)
    }
}

/// A replica record with this URL is a satellite: it connects to the primary's listener
/// (`mount -o listen=ADDR`) and is shipped groups without blocks. It never counts as a copy.
pub const SATELLITE_URL: &str = "satellite:";

impl ReplicaRecord {
    pub fn is_satellite(&self) -> bool {
        self.url == SATELLITE_URL
    }
}

/// The store's upstream, if it is a satellite.
pub fn upstream(store: &KvStore) -> Result<Option<Upstream>, ReplicaError> {
    match store.get(Cf::Meta, ks::META_UPSTREAM)? {
        Some(v) => Ok(Some(Upstream::decode(&v)?)),
        None => Ok(None),
    }
}

/// Whether the store is a satellite ([`upstream`] for callers that speak [`KvError`]).
pub fn is_satellite(store: &KvStore) -> Result<bool, KvError> {
    upstream(store)
        .map(|u| u.is_some())
        .map_err(|e| KvError::Other(e.to_string()))
}

/// Make a store being created a satellite of `up`.
pub fn set_upstream(store: &KvStore, up: &Upstream) -> Result<(), ReplicaError> {
    store.transact(|t| t.put(Cf::Meta, ks::META_UPSTREAM, &up.encode()?))?;
    Ok(())
}

/// `c seq`
pub fn change_key(seq: u64) -> Vec<u8> {
    let mut k = vec![Prefix::Change.byte()];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `L seq part`
pub fn log_key(seq: u64, part: u32) -> Vec<u8> {
    let mut k = vec![Prefix::Log.byte()];
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// Every part of group `seq`.
pub fn log_group_range(seq: u64) -> (Vec<u8>, Vec<u8>) {
    (log_key(seq, 0), log_key(seq + 1, 0))
}

/// `R name`
pub fn replica_key(name: &str) -> Vec<u8> {
    let mut k = vec![Prefix::Replica.byte()];
    k.extend_from_slice(name.as_bytes());
    k
}

/// `H hash`: a block received for a group not yet applied (a replica's own reference).
pub fn hold_key(h: &Hash) -> Vec<u8> {
    let mut k = vec![Prefix::Hold.byte()];
    k.extend_from_slice(h);
    k
}

/// `P hash`: on a replica, the primary's history names this block (its `V` counter is above
/// zero there): one reference, kept until the primary's trimming ships the counter's end.
pub fn primary_past_key(h: &Hash) -> Vec<u8> {
    let mut k = vec![Prefix::PrimaryPast.byte()];
    k.extend_from_slice(h);
    k
}

pub fn cf_from_u8(b: u8) -> Option<Cf> {
    Cf::ALL.get(b as usize).copied()
}

/// Keys per scan page.
pub(crate) const PAGE: usize = 4096;

/// Visit `[start, end)` of `cf` in `t` a page at a time; the visitor gets the transaction
/// back with each page (read whole before it is visited), so it may write as it goes.
pub(crate) fn scan_pages(
    t: &mut dyn crate::kv::Txn,
    cf: Cf,
    start: &[u8],
    end: &[u8],
    mut visit: impl FnMut(&mut dyn crate::kv::Txn, Vec<crate::kv::Pair>) -> Result<(), ReplicaError>,
) -> Result<(), ReplicaError> {
    let mut from = start.to_vec();
    loop {
        let page = t.scan(cf, &from, end, PAGE)?;
        let full = page.len() == PAGE;
        if let Some((k, _)) = page.last() {
            from = k.clone();
            from.push(0);
        }
        visit(t, page)?;
        if !full {
            return Ok(());
        }
    }
}

/// Whether a key is part of the filesystem a replica receives: inode records, xattrs,
/// directory entries and block maps. Everything else is the store's own.
pub fn shippable(cf: Cf, key: &[u8]) -> bool {
    match (cf, key.first().copied().and_then(Prefix::from_byte)) {
        (Cf::Meta, Some(Prefix::Inode)) => {
            key.len() == 9 || (key.len() > 10 && key[9] == inode_sub::XATTR)
        }
        (Cf::Meta, Some(Prefix::Dirent)) | (Cf::Fmap, Some(Prefix::Fmap)) => true,
        _ => false,
    }
}

/// A primary's past-hold counter (`V hash`, keyspace.md "History"): not part of the
/// filesystem, but carried by groups (protocol 4) so that a replica keeps every block the
/// primary's history names, and the primary may evict such blocks like any other.
pub fn ships_past_hold(cf: Cf, key: &[u8]) -> bool {
    cf == Cf::Bidx && key.len() == 33 && key[0] == Prefix::PastHold.byte()
}

/// The block a put in a group names, if any: a map entry's (with its length), or the one a
/// past hold is about. The group holds a reference on each while it is in the log.
pub fn names_block(
    cf: Cf,
    key: &[u8],
    value: &[u8],
) -> Result<Option<(Hash, Option<u32>)>, DecodeError> {
    if cf == Cf::Fmap {
        let e = crate::keyspace::records::FmapEntry::decode(value)?;
        return Ok(Some((e.hash, Some(e.len))));
    }
    if ships_past_hold(cf, key) {
        return Ok(ks::key_hash(key).map(|h| (h, None)));
    }
    Ok(None)
}

/// What a group may carry: the filesystem's keys and the primary's past holds.
pub fn carried(cf: Cf, key: &[u8]) -> bool {
    shippable(cf, key) || ships_past_hold(cf, key)
}

/// The ranges a replica's first group gives whole (the primary's past holds last).
pub fn base_ranges() -> [(Cf, Vec<u8>, Vec<u8>); 4] {
    let r = |p: Prefix| {
        let (a, b) = p.range();
        (p.cf(), a, b)
    };
    [
        r(Prefix::Inode),
        r(Prefix::Dirent),
        r(Prefix::Fmap),
        r(Prefix::PastHold),
    ]
}

/// Chain hash of group `seq` after `prev`.
pub fn chain(prev: &Hash, seq: u64, parts: &[Vec<Change>]) -> Result<Hash, EncodeError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    for changes in parts {
        let b = postcard::to_allocvec(changes).map_err(|e| EncodeError {
            what: "group",
            reason: e.to_string(),
        })?;
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    }
    Ok(h.finalize().into())
}

/// The change tracker of a primary with replicas: one `c seq` marker per transaction.
pub struct Changes {
    next: AtomicU64,
    /// Markers handed out whose transactions have not settled.
    inflight: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl ChangeTracker for Changes {
    fn wants(&self, cf: Cf, key: &[u8]) -> bool {
        // `U` keys are not shipped; listed in the marker, they tell the logger which blocks
        // gained references that its group now carries (see `log`).
        carried(cf, key) || (cf == Cf::Bidx && key.first() == Some(&Prefix::Unlogged.byte()))
    }

    fn marker(&self, keys: &[(Cf, Vec<u8>)]) -> Result<(Cf, Vec<u8>, Vec<u8>), KvError> {
        let seq = {
            let mut inflight = crate::util::lock(&self.inflight);
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            inflight.insert(seq);
            seq
        };
        let m = ChangeMarker {
            keys: keys
                .iter()
                .map(|(c, k)| (c.index() as u8, k.clone()))
                .collect(),
        };
        Ok((Cf::Meta, change_key(seq), m.encode()?))
    }

    fn settled(&self, marker_key: &[u8]) {
        if let Some(seq) = marker_key
            .get(1..9)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
        {
            crate::util::lock(&self.inflight).remove(&u64::from_be_bytes(seq));
        }
    }

    fn low_water(&self) -> Vec<u8> {
        let inflight = crate::util::lock(&self.inflight);
        let low = inflight
            .first()
            .copied()
            .unwrap_or_else(|| self.next.load(Ordering::Relaxed));
        change_key(low)
    }
}

/// The replicas registered in `store`, by name.
pub fn replicas(store: &KvStore) -> Result<Vec<(String, ReplicaRecord)>, KvError> {
    let (a, b) = Prefix::Replica.range();
    let mut out = Vec::new();
    let mut bad = None;
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        match ReplicaRecord::decode(v) {
            Ok(r) => out.push((name, r)),
            Err(e) => bad = Some(format!("{}: {e}", ks::describe_key(k))),
        }
        true
    })?;
    match bad {
        Some(e) => Err(KvError::Corruption(e)),
        None => Ok(out),
    }
}

/// Install the change tracker on `store` if it has replicas (and remove it if not), so that
/// every later commit records what it changed. The marker numbers continue after any left by
/// an earlier process.
pub fn track_if_replicated(store: &KvStore) -> Result<bool, KvError> {
    let want = !replicas(store)?.is_empty();
    if want == store.tracks_changes() {
        return Ok(want);
    }
    if want {
        let (a, b) = Prefix::Change.range();
        let mut last = 0u64;
        store.for_each(Cf::Meta, &a, &b, |k, _| {
            if let Some(s) = k.get(1..9).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                last = u64::from_be_bytes(s);
            }
            true
        })?;
        store.track_changes(Some(Arc::new(Changes {
            next: AtomicU64::new(last + 1),
            inflight: Default::default(),
        })));
    } else {
        store.track_changes(None);
    }
    Ok(want)
}

/// Register replica `name` at `url`. Its first group (the whole filesystem) is logged at the
/// next logger round; until then and from then on every change is tracked.
pub fn add(
    store: &KvStore,
    name: &str,
    url: &str,
    fingerprint: Option<String>,
) -> Result<(), ReplicaError> {
    if name.is_empty() || name.len() > 64 || name.contains(['/', '\n', ' ']) {
        return Err(ReplicaError::BadName(name.into()));
    }
    if let Some(fp) = &fingerprint {
        let hex = fp.strip_prefix("SHA256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReplicaError::BadUrl {
                url: url.into(),
                reason: format!("fingerprint {fp:?} is not SHA256: and 64 hex digits (what `kvfs fingerprint` prints)"),
            });
        }
    }
    if url == SATELLITE_URL {
        if fingerprint.is_none() {
            return Err(ReplicaError::BadUrl {
                url: url.into(),
                reason: "a satellite is known by its certificate: give --fingerprint".into(),
            });
        }
    } else {
        transport::Url::parse(url)?;
    }
    // A replica serves satellites (from its own log of what it applies); a satellite, which
    // holds only what it fetched, has none.
    let follower = apply::is_follower_store(store)?;
    if follower && (url != SATELLITE_URL || upstream(store)?.is_some()) {
        return Err(ReplicaError::Refused {
            peer: name.into(),
            reason: if url == SATELLITE_URL {
                "this store is a satellite: only a primary or a replica has satellites".into()
            } else {
                "this store is a replica: only a primary has replicas (a replica serves satellites: URL satellite:)".into()
            },
        });
    }
    let key = replica_key(name);
    let rec = ReplicaRecord {
        url: url.into(),
        fingerprint,
        added: Timestamp::now(),
        base: None,
        acked: 0,
        acked_chain: [0; 32],
        acked_at: None,
        error: None,
    };
    if follower {
        // Satellites that missed changes start over first: `M logged` then speaks for them.
        rebase_satellites_if_unlogged(store)?;
    }
    let exists = store.transact(|t| {
        if t.get(Cf::Meta, &key)?.is_some() {
            return Ok::<_, ReplicaError>(true);
        }
        t.put(Cf::Meta, &key, &rec.encode()?)?;
        if follower {
            // Logged from here on (the satellite's first group gives it everything before).
            let applied = apply::read_state(t)?.map_or(0, |s| s.applied);
            t.put(Cf::Meta, ks::META_LOGGED, &encode_counter(applied))?;
        }
        Ok(false)
    })?;
    if exists {
        return Err(ReplicaError::Exists(name.into()));
    }
    track_if_replicated(store)?;
    store.sync()?;
    Ok(())
}

/// On a replica with satellites: if groups were applied here without being logged (by a
/// build older than format 5.3, which kept no log on replicas), the satellites missed those
/// changes, and every one of them starts over from a new base group. Returns how many did.
pub fn rebase_satellites_if_unlogged(store: &KvStore) -> Result<usize, ReplicaError> {
    let n = store.transact(|t| {
        let Some(st) = apply::read_state(t)? else {
            return Ok::<_, ReplicaError>(0);
        };
        let logged = match t.get(Cf::Meta, ks::META_LOGGED)? {
            Some(v) => decode_counter(&v)?,
            None => 0,
        };
        if st.promoted.is_some() || logged == st.applied {
            return Ok(0);
        }
        let (a, b) = Prefix::Replica.range();
        let mut n = 0;
        for (k, v) in t.scan(Cf::Meta, &a, &b, usize::MAX)? {
            let mut r = ReplicaRecord::decode(&v)?;
            if r.base.is_some() {
                r.base = None;
                r.acked = 0;
                t.put(Cf::Meta, &k, &r.encode()?)?;
                n += 1;
            }
        }
        // From here on what is applied is logged (or no satellite is there to miss it).
        t.put(Cf::Meta, ks::META_LOGGED, &encode_counter(st.applied))?;
        Ok(n)
    })?;
    if n > 0 {
        tracing::warn!(
            satellites = n,
            "groups were applied here without being logged for the satellites (by an older kvfs): each starts over from a new copy of the whole filesystem"
        );
    }
    Ok(n)
}

/// Forget replica `name`; the groups only it still needed are trimmed at the next round.
pub fn remove(store: &KvStore, name: &str) -> Result<(), ReplicaError> {
    let key = replica_key(name);
    let existed = store.transact(|t| {
        let had = t.get(Cf::Meta, &key)?.is_some();
        t.delete(Cf::Meta, &key)?;
        Ok::<_, KvError>(had)
    })?;
    if !existed {
        return Err(ReplicaError::Unknown(name.into()));
    }
    track_if_replicated(store)?;
    store.sync()?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("replica name {0:?}: 1 to 64 characters, no '/', space or newline")]
    BadName(String),
    #[error("a replica named {0:?} exists already")]
    Exists(String),
    #[error("no replica named {0:?}")]
    Unknown(String),
    #[error("bad replica address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    #[error("replica {peer}: {reason}")]
    Refused { peer: String, reason: String },
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Encode(#[from] EncodeError),
    #[error("{0}")]
    Block(#[from] crate::blocks::BlockError),
    #[error("replica {peer} answered nothing for {secs} s; connection cut")]
    TimedOut { peer: String, secs: u64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl crate::kv::Retryable for ReplicaError {
    fn is_conflict(&self) -> bool {
        matches!(self, ReplicaError::Kv(KvError::Conflict))
    }
}
