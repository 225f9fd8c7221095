//! `kvfs status`: whether a store is mounted, its live and dead mounts, and what its bytes
//! are: logical (file sizes), referenced content, unique content, stored (after encoding), and
//! the dedup and compression ratios they give. Reads a read-only view; changes nothing.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::fs::FsError;
use crate::gc::{self, MountEntry};
use crate::keyspace::records::{BlockInfo, FmapEntry, FormatRecord, Inode, Kind};
use crate::keyspace::{InodeKey, Prefix};
use crate::kv::{Cf, KvStore};
use crate::util::Timestamp;

#[derive(Clone, Debug, Default)]
pub struct Status {
    pub mounted: bool,
    pub format: Option<FormatRecord>,
    pub mounts: Vec<MountEntry>,
    pub inodes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Sum of regular files' sizes.
    pub logical_bytes: u64,
    /// Content bytes the block maps reference (holes and trailing zeros excluded).
    pub referenced_bytes: u64,
    /// Content bytes of the distinct blocks.
    pub unique_bytes: u64,
    /// Bytes of the stored block values (after compression and parity).
    pub stored_bytes: u64,
    pub blocks: u64,
    pub compressed_blocks: u64,
    pub parity_blocks: u64,
    pub garbage_inodes: u64,
    /// Bytes of the store's files on disk.
    pub disk_bytes: u64,
    pub tier: TierStatus,
    pub history: HistoryStatus,
}

/// What history keeps and costs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HistoryStatus {
    /// The `history` setting (`None`: not kept).
    pub window: Option<String>,
    /// The oldest moment whose state is kept whole (RFC 3339), snapshots aside.
    pub oldest: Option<String>,
    pub snapshots: usize,
    #[serde(flatten)]
    pub cost: crate::history::Cost,
}

/// Residency and fetching (tiering).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TierStatus {
    /// `cache_size` kept in the store (a mount may override it).
    pub cache_size: Option<u64>,
    pub min_copies: u32,
    /// A satellite's: its upstream holds every block (`replication.role` says so in JSON).
    #[serde(skip)]
    pub satellite: bool,
    /// Stored bytes of the blocks whose content is here.
    pub resident_block_bytes: u64,
    /// Stored bytes of every block, here or evicted.
    pub total_block_bytes: u64,
    pub evicted_blocks: u64,
    pub evicted_block_bytes: u64,
    /// Resident bytes of pinned blocks.
    pub pinned_bytes: u64,
    /// Resident bytes that replicas hold (by what they acknowledged): evictable now.
    pub evictable_bytes: u64,
    pub fetches: u64,
    pub fetched_bytes: u64,
    pub fetch_failures: u64,
    pub block_reads: u64,
    /// Block reads served without a fetch, of all block reads.
    pub hit_ratio: Option<f64>,
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.2}", a as f64 / b as f64)
    }
}

fn age(t: &Timestamp) -> String {
    let s = Timestamp::now().secs - t.secs;
    format!("{s}s ago")
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mounted: {}", if self.mounted { "yes" } else { "no" })?;
        if let Some(r) = &self.format {
            writeln!(
                f,
                "format: {} (block size {}, encoding {})",
                r.version(),
                r.block_size,
                r.encoding_name()
            )?;
        }
        writeln!(f, "mounts: {}", self.mounts.len())?;
        for m in &self.mounts {
            match &m.rec {
                Some(r) => writeln!(
                    f,
                    "  {:016x} {} host {} pid {} started {} heartbeat {} ({} beats)",
                    m.id,
                    if m.alive { "live" } else { "dead" },
                    r.host,
                    r.pid,
                    age(&r.started),
                    age(&r.heartbeat),
                    r.beats
                )?,
                None => writeln!(f, "  {:016x} dead (undecodable entry)", m.id)?,
            }
        }
        writeln!(
            f,
            "inodes: {} ({} files, {} directories, {} awaiting free)",
            self.inodes, self.files, self.dirs, self.garbage_inodes
        )?;
        writeln!(f, "logical bytes: {}", self.logical_bytes)?;
        writeln!(f, "referenced content bytes: {}", self.referenced_bytes)?;
        writeln!(f, "unique content bytes: {}", self.unique_bytes)?;
        writeln!(f, "stored block bytes: {}", self.stored_bytes)?;
        writeln!(
            f,
            "blocks: {} ({} compressed, {} with parity)",
            self.blocks, self.compressed_blocks, self.parity_blocks
        )?;
        writeln!(
            f,
            "dedup ratio: {} (referenced / unique)",
            ratio(self.referenced_bytes, self.unique_bytes)
        )?;
        writeln!(
            f,
            "compression ratio: {} (unique / stored)",
            ratio(self.unique_bytes, self.stored_bytes)
        )?;
        writeln!(f, "store size on disk: {}", self.disk_bytes)?;
        let t = &self.tier;
        writeln!(
            f,
            "resident block bytes: {} of {} ({} evicted blocks, {} bytes; cache size {})",
            t.resident_block_bytes,
            t.total_block_bytes,
            t.evicted_blocks,
            t.evicted_block_bytes,
            t.cache_size
                .map_or("unlimited".to_string(), |c| c.to_string())
        )?;
        let holders = match t.satellite {
            true => "by the upstream".to_string(),
            false => format!("by {} replica(s) or more", t.min_copies),
        };
        writeln!(
            f,
            "pinned bytes: {}; evictable now: {} (held {holders})",
            t.pinned_bytes, t.evictable_bytes
        )?;
        writeln!(
            f,
            "fetches: {} ({} bytes, {} failed); hit ratio {}",
            t.fetches,
            t.fetched_bytes,
            t.fetch_failures,
            t.hit_ratio.map_or("-".to_string(), |r| format!("{r:.4}"))
        )?;
        let h = &self.history;
        write!(
            f,
            "history: window {}, oldest moment kept {}, {} snapshot(s); {} past values at {} moments; held only by the past: {} blocks, {} bytes",
            h.window.as_deref().unwrap_or("off"),
            h.oldest.as_deref().unwrap_or("-"),
            h.snapshots,
            h.cost.records,
            h.cost.moments,
            h.cost.past_only_blocks,
            h.cost.past_only_bytes
        )
    }
}

fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Gather the status of the store at `dir`, opened (read-only) as `store`.
pub fn status(
    dir: &Path,
    store: &KvStore,
    format: &FormatRecord,
    mounted: bool,
    timeout: Duration,
) -> Result<Status, FsError> {
    let mut s = Status {
        mounted,
        format: Some(format.clone()),
        mounts: gc::mounts(store, timeout, None)?,
        disk_bytes: du(dir),
        ..Default::default()
    };
    // Read-only opens do not know which mount is the live one: judge by heartbeat instead.
    if store.is_read_only() {
        let now = Timestamp::now();
        for m in &mut s.mounts {
            m.alive = m
                .rec
                .as_ref()
                .is_some_and(|r| now.secs - r.heartbeat.secs < timeout.as_secs() as i64);
        }
    }
    let (a, b) = Prefix::Inode.range();
    store.for_each(Cf::Meta, &a, &b, |k, v| {
        if let InodeKey::Record(_) = crate::keyspace::parse_inode_key(k) {
            s.inodes += 1;
            if let Ok(i) = Inode::decode(v) {
                match i.kind {
                    Kind::File => {
                        s.files += 1;
                        s.logical_bytes += i.size;
                    }
                    Kind::Dir => s.dirs += 1,
                    _ => {}
                }
            }
        }
        true
    })?;
    let (a, b) = Prefix::Garbage.range();
    store.for_each(Cf::Meta, &a, &b, |_, _| {
        s.garbage_inodes += 1;
        true
    })?;
    let (a, b) = Prefix::Fmap.range();
    store.for_each(Cf::Fmap, &a, &b, |_, v| {
        if let Ok(e) = FmapEntry::decode(v) {
            s.referenced_bytes += e.len as u64;
        }
        true
    })?;
    let mut unlogged = std::collections::HashSet::new();
    let (a, b) = Prefix::Unlogged.range();
    store.for_each(Cf::Bidx, &a, &b, |k, _| {
        unlogged.extend(crate::keyspace::key_hash(k));
        true
    })?;
    let replicas: Vec<_> = crate::replica::replicas(store)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let upstream = crate::replica::is_satellite(store)?;
    let settings = crate::tier::config::TierSettings::resolve(
        &crate::tier::config::read(store)?,
        &Default::default(),
    )
    .ok();
    s.tier.cache_size = settings.and_then(|t| t.cache_size);
    let min_copies = settings.map_or(1, |t| t.min_copies);
    s.tier.min_copies = min_copies;
    s.tier.satellite = upstream;
    let (a, b) = Prefix::BlockInfo.range();
    store.for_each(Cf::Bidx, &a, &b, |k, v| {
        if let Ok(i) = BlockInfo::decode(v) {
            let t = &mut s.tier;
            t.total_block_bytes += i.stored as u64;
            if i.evicted {
                t.evicted_blocks += 1;
                t.evicted_block_bytes += i.stored as u64;
            } else if i.pins > 0 {
                t.pinned_bytes += i.stored as u64;
            } else if crate::tier::copies(&i, &replicas, upstream) >= min_copies
                && !crate::keyspace::key_hash(k).is_some_and(|h| unlogged.contains(&h))
            {
                t.evictable_bytes += i.stored as u64;
            }
            s.blocks += 1;
            s.unique_bytes += i.len as u64;
            s.stored_bytes += i.stored as u64;
            let enc = i.encoding & !crate::blocks::encode::INFO_PARITY;
            s.compressed_blocks += (enc != 0) as u64;
            s.parity_blocks += (i.encoding & crate::blocks::encode::INFO_PARITY != 0) as u64;
        }
        true
    })?;
    let counter = |name: &str| -> Result<u64, FsError> {
        Ok(store
            .get(Cf::Bidx, &crate::keyspace::counter_key(name))?
            .map_or(0, |v| crate::kv::decode_i64(&v).max(0) as u64))
    };
    let t = &mut s.tier;
    t.resident_block_bytes =
        crate::blocks::resident::counter_sum(store, crate::keyspace::COUNTER_RESIDENT)?.max(0)
            as u64;
    t.fetches = counter(crate::tier::COUNTER_FETCHED_BLOCKS)?;
    t.fetched_bytes = counter(crate::tier::COUNTER_FETCHED_BYTES)?;
    t.fetch_failures = counter(crate::tier::COUNTER_FETCH_FAILURES)?;
    t.block_reads = counter(crate::tier::COUNTER_BLOCK_READS)?;
    t.hit_ratio =
        (t.block_reads > 0).then(|| 1.0 - (t.fetches as f64 / t.block_reads as f64).min(1.0));
    let st = crate::history::state(store)?;
    s.history = HistoryStatus {
        window: crate::tier::config::read(store)?
            .get("history")
            .filter(|w| w.as_str() != "0")
            .cloned(),
        oldest: st.oldest().map(crate::history::when::show),
        snapshots: st.snapshots.len(),
        cost: crate::history::cost(store)?,
    };
    Ok(s)
}

/// The status and the replication facts as one JSON object (stable field names: README).
pub fn json(s: &Status, r: &crate::replica::status::Replication) -> serde_json::Value {
    let mounts: Vec<serde_json::Value> = s
        .mounts
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": format!("{:016x}", m.id),
                "alive": m.alive,
                "host": m.rec.as_ref().map(|r| r.host.clone()),
                "pid": m.rec.as_ref().map(|r| r.pid),
                "heartbeat": m.rec.as_ref().map(|r| r.heartbeat.secs),
            })
        })
        .collect();
    serde_json::json!({
        "mounted": s.mounted,
        "format": s.format.as_ref().map(|f| f.version()),
        "block_size": s.format.as_ref().map(|f| f.block_size),
        "encoding": s.format.as_ref().map(|f| f.encoding_name()),
        "fs_id": s.format.as_ref().map(|f| crate::keyspace::hex(&f.fs_id)),
        "mounts": mounts,
        "inodes": s.inodes,
        "files": s.files,
        "dirs": s.dirs,
        "garbage_inodes": s.garbage_inodes,
        "logical_bytes": s.logical_bytes,
        "referenced_bytes": s.referenced_bytes,
        "unique_bytes": s.unique_bytes,
        "stored_bytes": s.stored_bytes,
        "blocks": s.blocks,
        "disk_bytes": s.disk_bytes,
        "tiering": s.tier,
        "resident_block_bytes": s.tier.resident_block_bytes,
        "total_block_bytes": s.tier.total_block_bytes,
        "pinned_bytes": s.tier.pinned_bytes,
        "evictable_bytes": s.tier.evictable_bytes,
        "fetches": s.tier.fetches,
        "hit_ratio": s.tier.hit_ratio,
        "history": s.history,
        "replication": r,
    })
}
