//! History (format 5): every state of the filesystem within a retention window, and named
//! moments (snapshots) kept past it.
//!
//! How: while history is kept, every transaction that writes a filesystem key (inode
//! records, xattrs, directory entries, block maps: what a replica receives) also writes, at
//! commit, one record under its moment (`Z at`: `at` in nanoseconds, increasing in commit
//! order; `kv` assigns it) listing those keys with the value each had before. A block-map
//! value kept that way holds a reference on its block (`r` +1, and `V` +1 so that tiering
//! keeps it resident). In the background ([`index`], every second) each such pending moment
//! is indexed: one `Y` record per key (key, moment → old value), and the moment keeps only
//! its keys. One write per commit keeps the write path cheap (each key a transaction writes
//! is a key its commit validates). The state at moment `T` is, key by key, the value of the
//! key's first record after `T` (indexed `Y`, else a pending moment), or its live value if it
//! has none ([`view`]). Trimming ([`trim`]) walks indexed moments from the oldest and deletes
//! the records of those that left the window, except those a named snapshot still needs: for
//! a snapshot at `S`, the first record after `S` of each key.
//!
//! Engine-neutral: keys and values only (keyspace.md, "History").

pub mod log;
pub mod mount;
pub mod view;
pub mod when;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blocks;
use crate::keyspace::past::{
    moment_key, parse_moment_key, past_after, past_hold_key, past_key, past_range,
};
use crate::keyspace::records::{decode_v1, encode_v1, DecodeError, EncodeError, FmapEntry};
use crate::keyspace::{self as ks, Prefix};
use crate::kv::{Before, Cf, HistoryRecorder, KvError, KvStore, Txn};

/// `M history`: `01` + postcard of this.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryState {
    /// The moment from which every state is kept (history switched on); `None`: off.
    pub since: Option<u64>,
    /// Every record of a moment at or before this was trimmed: only named snapshots are
    /// whole before it.
    pub horizon: u64,
    /// Trimming goes on from this moment (a snapshot's removal sets it back).
    pub cursor: u64,
    /// The latest moment recorded, as of the last trim (the next process starts above it).
    pub latest: u64,
    /// Every moment at or before this is indexed (its `Y` records written).
    pub indexed: u64,
    /// Named moments, kept until removed.
    pub snapshots: Vec<(String, u64)>,
}

impl HistoryState {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("history state", b)
    }

    /// The state the `M history` record holds (none: history never kept).
    pub fn from_record(v: Option<Vec<u8>>) -> Result<Self, KvError> {
        match v {
            Some(v) => Ok(Self::decode(&v)?),
            None => Ok(Self::default()),
        }
    }

    /// The oldest moment whose state is whole (snapshots aside).
    pub fn oldest(&self) -> Option<u64> {
        self.since.map(|s| s.max(self.horizon.saturating_add(1)))
    }

    /// Whether the state at `at` can be shown, or why not.
    pub fn check(&self, at: u64, now: u64) -> Result<(), String> {
        if at > now {
            return Err(format!("{} is in the future", when::show(at)));
        }
        if self.snapshots.iter().any(|(_, s)| *s == at) {
            return Ok(());
        }
        match self.oldest() {
            None => {
                Err("this store keeps no history (`kvfs config STORE history=7d` starts it)".into())
            }
            Some(o) if at < o => Err(format!(
                "{} is before the oldest moment kept, {}{}",
                when::show(at),
                when::show(o),
                if self.snapshots.is_empty() {
                    String::new()
                } else {
                    " (or mount a snapshot by name: `kvfs snapshot STORE --list`)".into()
                }
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn snapshot(&self, name: &str) -> Option<u64> {
        self.snapshots
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, at)| *at)
    }
}

/// `Y` value: `01` + postcard `Option<bytes>`, what the key held (none: absent).
fn encode_past(v: &Option<Vec<u8>>) -> Result<Vec<u8>, EncodeError> {
    encode_v1(v)
}

pub fn decode_past(b: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
    decode_v1("past value", b)
}

/// `Z` value: `01` + postcard of this.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moment {
    /// The keys the moment's commit changed: (family index, key).
    pub keys: Vec<(u8, Vec<u8>)>,
    /// Until indexed: the value each key had before (none: absent), in the order of `keys`.
    pub values: Option<Vec<Option<Vec<u8>>>>,
}

fn encode_moment(m: &Moment) -> Result<Vec<u8>, EncodeError> {
    encode_v1(m)
}

pub fn decode_moment(b: &[u8]) -> Result<Moment, DecodeError> {
    let m: Moment = decode_v1("moment", b)?;
    if m.values.as_ref().is_some_and(|v| v.len() != m.keys.len()) {
        return Err(DecodeError {
            what: "moment",
            reason: "values and keys differ in number".into(),
        });
    }
    Ok(m)
}

pub fn state(store: &KvStore) -> Result<HistoryState, KvError> {
    HistoryState::from_record(store.get(Cf::Meta, ks::META_HISTORY)?)
}

fn state_in(t: &mut dyn Txn) -> Result<HistoryState, KvError> {
    HistoryState::from_record(t.get(Cf::Meta, ks::META_HISTORY)?)
}

/// The latest moment recorded: `from` or that of a `Z` key after it.
fn latest_moment(store: &KvStore, from: u64) -> Result<u64, KvError> {
    let mut latest = from;
    let (_, end) = Prefix::Moment.range();
    store.for_each(Cf::Meta, &moment_key(from), &end, |k, _| {
        latest = parse_moment_key(k).unwrap_or(0).max(latest);
        true
    })?;
    Ok(latest)
}

/// The window setting (`history=7d` in `kvfs config`), if any and not 0.
pub fn window(store: &KvStore) -> Result<Option<Duration>, KvError> {
    let s = crate::tier::config::read(store)?;
    match s.get("history") {
        None => Ok(None),
        Some(v) => {
            let d = when::parse_span(v).map_err(KvError::Other)?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

/// The recorder: the past of every filesystem key (those a replica receives).
pub struct Recorder;

impl HistoryRecorder for Recorder {
    fn wants(&self, cf: Cf, key: &[u8]) -> bool {
        crate::replica::shippable(cf, key)
    }

    fn record(&self, t: &mut dyn Txn, at: u64, befores: &[Before]) -> Result<(), KvError> {
        let mut m = Moment {
            keys: Vec::with_capacity(befores.len()),
            values: Some(Vec::with_capacity(befores.len())),
        };
        for (cf, key, old) in befores {
            if let (Cf::Fmap, Some(v)) = (cf, old) {
                hold(t, &FmapEntry::decode(v)?.hash, 1)?;
            }
            m.keys.push((cf.index() as u8, key.clone()));
            m.values.get_or_insert_with(Vec::new).push(old.clone());
        }
        t.put(Cf::Meta, &moment_key(at), &encode_moment(&m)?)
    }
}

/// A reference history takes (`n` 1) or gives back (-1) on block `h`.
fn hold(t: &mut dyn Txn, h: &ks::Hash, n: i64) -> Result<(), KvError> {
    t.merge(Cf::Bidx, &past_hold_key(h), &n.to_le_bytes())?;
    if n > 0 {
        blocks::add_shared_ref(t, h)
    } else {
        blocks::drop_ref(t, h)
    }
}

/// Whether `store` records history or its past still holds blocks (its replication groups
/// may then carry past holds).
pub fn keeps_past(store: &KvStore) -> Result<bool, KvError> {
    if store.records_history() {
        return Ok(true);
    }
    let (a, b) = Prefix::PastHold.range();
    Ok(!store.read(|t| t.scan(Cf::Bidx, &a, &b, 1))?.is_empty())
}

/// Start or stop recording on `store` as its settings say: on while a window is set or a
/// snapshot is named. Switching on records `since`. Returns whether it records.
pub fn install(store: &KvStore) -> Result<bool, KvError> {
    if store.is_read_only() {
        return Ok(false);
    }
    let _w = crate::util::lock(&WRITERS);
    let st = state(store)?;
    let window = window(store)?;
    if window.is_none() && st.since.is_some() {
        // No window: only named moments stay mountable.
        store.transact(|t| {
            let mut s = state_in(t)?;
            s.since = None;
            t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)
        })?;
    }
    if window.is_none() && st.snapshots.is_empty() {
        store.record_history(None, 0);
        return Ok(false);
    }
    if !store.records_history() {
        // Moments recorded after the last save of `latest` (a crash) are above it.
        let last = latest_moment(store, st.latest)?;
        store.record_history(Some(Arc::new(Recorder)), last);
    }
    if st.since.is_none() && window.is_some() {
        // After the recorder is in: every commit after `since` is recorded.
        let since = store.history_now();
        store.transact(|t| {
            let mut s = state_in(t)?;
            s.since.get_or_insert(since);
            t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)
        })?;
        tracing::info!(since = %when::show(since), "history: every state from now on is kept");
    }
    Ok(true)
}

/// Name the current moment `name` (recording starts if it was off).
pub fn snapshot(store: &KvStore, name: &str) -> Result<u64, KvError> {
    if name.is_empty() || name.len() > 200 || name.contains(['/', '\n', ' ']) {
        return Err(KvError::Other(format!(
            "snapshot name {name:?}: 1 to 200 characters, no '/', space or newline"
        )));
    }
    if !store.records_history() {
        store.record_history(Some(Arc::new(Recorder)), state(store)?.latest);
    }
    let at = store.history_now();
    let _w = crate::util::lock(&WRITERS);
    store.transact(|t| {
        let mut s = state_in(t)?;
        if s.snapshot(name).is_some() {
            return Err(KvError::Other(format!("a snapshot named {name:?} exists")));
        }
        s.snapshots.push((name.to_string(), at));
        s.latest = s.latest.max(at);
        t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)
    })?;
    store.sync()?;
    Ok(at)
}

/// Forget snapshot `name`: what only it kept is freed by the next trims.
pub fn remove_snapshot(store: &KvStore, name: &str) -> Result<u64, KvError> {
    let w = crate::util::lock(&WRITERS);
    let at = store.transact(|t| {
        let mut s = state_in(t)?;
        let Some(at) = s.snapshot(name) else {
            return Err(KvError::Other(format!("no snapshot named {name:?}")));
        };
        s.snapshots.retain(|(n, _)| n != name);
        // The records it kept are looked at again.
        s.cursor = 0;
        t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)?;
        Ok(at)
    })?;
    drop(w);
    store.sync()?;
    install(store)?;
    Ok(at)
}

/// What a trim did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    pub moments: u64,
    pub records: u64,
    /// Records kept past the window for a snapshot.
    pub kept: u64,
}

/// Moments per trim or index transaction.
const TRIM_BATCH: usize = 128;

/// Index the pending moments: a `Y` record per key each lists, the moment keeping only its
/// keys, `indexed` moved to the last. In batches of [`TRIM_BATCH`] moments, each one write
/// without conflict checks (no transaction writes `Y` keys or an existing `Z` key, and every
/// writer of `M history` in this process holds [`WRITERS`]; another process cannot have the
/// store open for writing). Returns the moments indexed.
pub fn index(store: &KvStore) -> Result<u64, KvError> {
    let mut done = 0;
    if store.is_read_only() {
        return Ok(0);
    }
    let _w = crate::util::lock(&WRITERS);
    loop {
        let mut st = state(store)?;
        let mut batch = Vec::new();
        let (_, end) = Prefix::Moment.range();
        let mut bad = None;
        store.for_each(
            Cf::Meta,
            &moment_key(st.indexed.saturating_add(1)),
            &end,
            |k, v| {
                match (parse_moment_key(k), decode_moment(v)) {
                    (Some(at), Ok(m)) => batch.push((at, m)),
                    (_, Err(e)) => bad = Some(format!("{}: {e}", ks::describe_key(k))),
                    _ => {}
                }
                batch.len() < TRIM_BATCH && bad.is_none()
            },
        )?;
        if let Some(e) = bad {
            return Err(KvError::Corruption(e));
        }
        let Some(&(last, _)) = batch.last() else {
            return Ok(done);
        };
        let mut ops = Vec::new();
        for (at, m) in batch.iter_mut() {
            let Some(values) = m.values.take() else {
                continue;
            };
            for ((cfi, key), old) in m.keys.iter().zip(values) {
                let cf = Cf::ALL
                    .get(*cfi as usize)
                    .copied()
                    .ok_or_else(|| KvError::Corruption(format!("moment {at}: family {cfi}")))?;
                ops.push((Cf::Meta, past_key(cf, key, *at), Some(encode_past(&old)?)));
            }
            ops.push((Cf::Meta, moment_key(*at), Some(encode_moment(m)?)));
        }
        st.indexed = last;
        ops.push((Cf::Meta, ks::META_HISTORY.to_vec(), Some(st.encode()?)));
        store.write_unchecked(&ops)?;
        done += batch.len() as u64;
    }
}

/// Held by every writer of `M history` (and of existing `Z` and `Y` keys) in this process.
static WRITERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Delete the records of the moments before the window (all of them with history off),
/// but what a named snapshot needs. Only indexed moments ([`index`] first to reach them all).
/// Bounded transactions; returns when it reached the window.
pub fn trim(store: &KvStore) -> Result<Trimmed, KvError> {
    let mut done = Trimmed::default();
    if store.is_read_only() {
        return Ok(done);
    }
    let _w = crate::util::lock(&WRITERS);
    let now = crate::kv::now_ns();
    let cutoff = match window(store)? {
        Some(w) => now.saturating_sub(w.as_nanos() as u64),
        None => now,
    };
    loop {
        let st = state(store)?;
        // Only indexed moments: a pending one's values are not in `Y` yet.
        let cutoff = cutoff.min(st.indexed.saturating_add(1));
        let mut batch = Vec::new();
        store.for_each(
            Cf::Meta,
            &moment_key(st.cursor),
            &moment_key(cutoff),
            |k, _| {
                if let Some(at) = parse_moment_key(k) {
                    batch.push(at);
                }
                batch.len() < TRIM_BATCH
            },
        )?;
        let Some(&last) = batch.last() else {
            break;
        };
        let r = store.transact(|t| {
            let mut s = state_in(t)?;
            let mut r = Trimmed::default();
            for at in &batch {
                let Some(raw) = t.get(Cf::Meta, &moment_key(*at))? else {
                    continue;
                };
                let keys = decode_moment(&raw)
                    .map_err(|e| {
                        KvError::Corruption(format!("{}: {e}", ks::describe_key(&moment_key(*at))))
                    })?
                    .keys;
                let mut kept = Vec::new();
                for (cfi, key) in keys {
                    let Some(&cf) = Cf::ALL.get(cfi as usize) else {
                        continue;
                    };
                    if needed(t, &s.snapshots, cf, &key, *at)? {
                        kept.push((cfi, key));
                        continue;
                    }
                    drop_record(t, cf, &key, *at)?;
                    r.records += 1;
                }
                r.kept += kept.len() as u64;
                if kept.is_empty() {
                    t.delete(Cf::Meta, &moment_key(*at))?;
                } else {
                    let m = Moment {
                        keys: kept,
                        values: None,
                    };
                    t.put(Cf::Meta, &moment_key(*at), &encode_moment(&m)?)?;
                }
                r.moments += 1;
            }
            s.cursor = s.cursor.max(last.saturating_add(1));
            s.horizon = s.horizon.max(last);
            t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)?;
            Ok::<_, KvError>(r)
        })?;
        done.moments += r.moments;
        done.records += r.records;
        done.kept += r.kept;
    }
    // The latest moment, so that a later process starts above it.
    let saved = state(store)?.latest;
    let latest = latest_moment(store, saved)?;
    if latest > saved {
        store.transact(|t| {
            let mut s = state_in(t)?;
            if latest > s.latest {
                s.latest = latest;
                t.put(Cf::Meta, ks::META_HISTORY, &s.encode()?)?;
            }
            Ok::<_, KvError>(())
        })?;
    }
    Ok(done)
}

/// Whether the record of `key` at `at` is what a snapshot's state needs: the snapshot
/// before `at` nearest to it has no other record of the key between them.
fn needed(
    t: &mut dyn Txn,
    snapshots: &[(String, u64)],
    cf: Cf,
    key: &[u8],
    at: u64,
) -> Result<bool, KvError> {
    let Some(s) = snapshots.iter().map(|(_, s)| *s).filter(|s| *s < at).max() else {
        return Ok(false);
    };
    let (start, _) = past_after(cf, key, s);
    let end = past_key(cf, key, at);
    Ok(t.scan(Cf::Meta, &start, &end, 1)?.is_empty())
}

/// Delete the record of `key` at `at` and the reference it held.
fn drop_record(t: &mut dyn Txn, cf: Cf, key: &[u8], at: u64) -> Result<(), KvError> {
    let k = past_key(cf, key, at);
    if let Some(v) = t.get(Cf::Meta, &k)? {
        if let (Cf::Fmap, Ok(Some(old))) = (cf, decode_past(&v)) {
            hold(t, &FmapEntry::decode(&old)?.hash, -1)?;
        }
        t.delete(Cf::Meta, &k)?;
    }
    Ok(())
}

/// What history costs, for `kvfs status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Cost {
    pub records: u64,
    pub moments: u64,
    /// Blocks (and their stored bytes) referenced only by the past (a block a replication
    /// group still carries counts once the group is shipped and trimmed).
    pub past_only_blocks: u64,
    pub past_only_bytes: u64,
}

pub fn cost(store: &KvStore) -> Result<Cost, KvError> {
    let mut c = Cost::default();
    let (a, b) = Prefix::Past.range();
    store.for_each(Cf::Meta, &a, &b, |_, _| {
        c.records += 1;
        true
    })?;
    let (a, b) = Prefix::Moment.range();
    store.for_each(Cf::Meta, &a, &b, |_, _| {
        c.moments += 1;
        true
    })?;
    let (a, b) = Prefix::PastHold.range();
    let mut held = Vec::new();
    store.for_each(Cf::Bidx, &a, &b, |k, v| {
        let n = crate::kv::decode_i64(v);
        if let (Some(h), true) = (ks::key_hash(k), n > 0) {
            held.push((h, n));
        }
        true
    })?;
    for (h, n) in held {
        let refs = store.read(|t| blocks::refcount(t, &h))?;
        if refs <= n {
            c.past_only_blocks += 1;
            if let Some(v) = store.get(Cf::Bidx, &ks::block_info_key(&h))? {
                if let Ok(i) = crate::keyspace::records::BlockInfo::decode(&v) {
                    c.past_only_bytes += i.stored as u64;
                }
            }
        }
    }
    Ok(c)
}

/// The records of keys in `[start, end)` of `cf`, for the view: for each key with a record
/// after `at`, the value of the first one.
pub(crate) fn pasts_at(
    t: &mut dyn Txn,
    cf: Cf,
    start: &[u8],
    end: &[u8],
    at: u64,
) -> Result<std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>, KvError> {
    let mut out = std::collections::BTreeMap::new();
    let (mut from, to) = past_range(cf, start, end);
    const PAGE: usize = 1024;
    loop {
        let page = t.scan(Cf::Meta, &from, &to, PAGE)?;
        for (k, v) in &page {
            let Some((_, key, rat)) = crate::keyspace::past::parse_past_key(k) else {
                continue;
            };
            if rat > at && !out.contains_key(&key) {
                let old = decode_past(v)
                    .map_err(|e| KvError::Corruption(format!("{}: {e}", ks::describe_key(k))))?;
                out.insert(key, old);
            }
        }
        if page.len() < PAGE {
            return Ok(out);
        }
        if let Some((k, _)) = page.last() {
            from = k.clone();
            from.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::fs::{Caller, Fs, FsOptions, NewNode};
    use crate::keyspace::records::Kind;
    use crate::keyspace::ROOT_INO;

    /// What recording costs the daemon per operation, without FUSE: mkdir, rmdir, create
    /// and unlink on RocksDB, history off and on. `cargo test --release --lib
    /// history::tests::cost_per_operation -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn cost_per_operation() {
        let who = Caller {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        // KVFS_HISTORY_COST=on|off: that case only (for a profiler).
        let only = std::env::var("KVFS_HISTORY_COST").ok();
        for round in 0..4 {
            let on = round % 2 == 1;
            if only.as_deref().is_some_and(|o| (o == "on") != on) {
                continue;
            }
            let d = tempfile::tempdir().unwrap();
            crate::store::format(d.path(), 65536).unwrap();
            let (kv, format) = crate::store::open(d.path()).unwrap();
            if on {
                crate::tier::config::write(&kv, &[("history".into(), "7d".into())]).unwrap();
                super::install(&kv).unwrap();
            }
            let fs = Fs::new(kv, format, FsOptions::default());
            let n = 20_000;
            let node = |kind| NewNode {
                kind,
                mode: 0o755,
                umask: 0,
                rdev: 0,
                target: b"",
            };
            let name = |i: usize| format!("n{i}").into_bytes();
            let t = std::time::Instant::now();
            for i in 0..n {
                fs.create_node(ROOT_INO, &name(i), &node(Kind::Dir), who)
                    .unwrap();
            }
            let mk = t.elapsed();
            let t = std::time::Instant::now();
            for i in 0..n {
                fs.rmdir(ROOT_INO, &name(i)).unwrap();
            }
            let rm = t.elapsed();
            let t = std::time::Instant::now();
            for i in 0..n {
                fs.create_node(ROOT_INO, &name(i), &node(Kind::File), who)
                    .unwrap();
            }
            let cr = t.elapsed();
            let t = std::time::Instant::now();
            for i in 0..n {
                fs.unlink(ROOT_INO, &name(i)).unwrap();
            }
            let ul = t.elapsed();
            let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / n as f64;
            eprintln!(
                "history {}: mkdir {:.1} us, rmdir {:.1}, create {:.1}, unlink {:.1}",
                if on { "on " } else { "off" },
                us(mk),
                us(rm),
                us(cr),
                us(ul)
            );
        }
    }
}
