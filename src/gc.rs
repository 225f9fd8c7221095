//! The process table and the sweeper.
//!
//! Every mount registers `p mount-id` (host, pid, start time, heartbeat) and bumps the
//! heartbeat every [`HEARTBEAT`]; a clean exit deletes it. A mount is dead when its heartbeat
//! is older than the timeout, or, on an engine where one process holds the store exclusively
//! (RocksDB), when it is not the mount doing the sweep. [`sweep`] removes dead mounts' entries,
//! open counts and locks, frees garbage inodes (`g`) nobody has open any more, and blocks whose
//! references reached zero. Each removal is its own transaction, so a sweep cut short leaves
//! nothing half-done and the next sweep goes on from there.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use crate::blocks;
use crate::fs::{self, FsError};
use crate::keyspace::records::ProcessRecord;
use crate::keyspace::{self as ks, Ino, InodeKey, MountId, Prefix};
use crate::kv::{Cf, KvStore};
use crate::util::Timestamp;

/// How often a mount bumps its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Default age after which a heartbeat means a dead mount.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

type Result<T> = std::result::Result<T, FsError>;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Write this mount's `p` record.
pub fn register(store: &KvStore, id: MountId) -> Result<ProcessRecord> {
    let now = Timestamp::now();
    let rec = ProcessRecord {
        host: hostname(),
        pid: std::process::id(),
        started: now,
        heartbeat: now,
        beats: 0,
    };
    store
        .transact(|t| Ok::<_, FsError>(t.put(Cf::Meta, &ks::process_key(id), &rec.encode()?)?))?;
    Ok(rec)
}

/// Bump the heartbeat. Returns false when the record had vanished (a sweeper took this mount
/// for dead) and was written anew; the caller must then restore its open counts.
pub fn heartbeat(store: &KvStore, id: MountId, started: Timestamp) -> Result<bool> {
    let key = ks::process_key(id);
    store.transact(|t| {
        let now = Timestamp::now();
        let (rec, existed) = match t.get(Cf::Meta, &key)? {
            Some(v) => match ProcessRecord::decode(&v) {
                Ok(mut r) => {
                    r.heartbeat = now;
                    r.beats += 1;
                    (r, true)
                }
                Err(e) => return Err(fs_corrupt(&key, e)),
            },
            None => (
                ProcessRecord {
                    host: hostname(),
                    pid: std::process::id(),
                    started,
                    heartbeat: now,
                    beats: 0,
                },
                false,
            ),
        };
        t.put(Cf::Meta, &key, &rec.encode()?)?;
        Ok(existed)
    })
}

pub fn unregister(store: &KvStore, id: MountId) -> Result<()> {
    store.transact(|t| Ok::<_, FsError>(t.delete(Cf::Meta, &ks::process_key(id))?))
}

fn fs_corrupt(key: &[u8], e: impl fmt::Display) -> FsError {
    FsError::Corrupt {
        key: ks::describe_key(key),
        reason: e.to_string(),
    }
}

/// One entry of the process table.
#[derive(Clone, Debug)]
pub struct MountEntry {
    pub id: MountId,
    /// `None` when the record does not decode (treated as dead).
    pub rec: Option<ProcessRecord>,
    pub alive: bool,
}

/// The process table, each entry judged alive or dead.
pub fn mounts(store: &KvStore, timeout: Duration, own: Option<MountId>) -> Result<Vec<MountEntry>> {
    let (s, e) = Prefix::Process.range();
    let now = Timestamp::now();
    let exclusive = store.is_exclusive();
    let mut out = Vec::new();
    store.for_each(Cf::Meta, &s, &e, |k, v| {
        let Some(id) = ks::process_key_id(k) else {
            return true;
        };
        let rec = ProcessRecord::decode(v).ok();
        let fresh = rec.as_ref().is_some_and(|r| {
            now.secs.saturating_sub(r.heartbeat.secs) < timeout.as_secs().max(1) as i64
        });
        let alive = if exclusive {
            Some(id) == own
        } else {
            Some(id) == own || fresh
        };
        out.push(MountEntry { id, rec, alive });
        true
    })?;
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub dry_run: bool,
    pub timeout: Duration,
    /// The mount running the sweep (never reaped).
    pub own: Option<MountId>,
    /// Also settle blocks written ahead by flushes that never committed (`W` keys). Right when
    /// no flush can be in flight: at mount start, at a mount's exit, on an unmounted store.
    /// (Safe at any time, but it would make a flush in flight store its blocks again.)
    pub recover: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            dry_run: false,
            timeout: DEFAULT_TIMEOUT,
            own: None,
            recover: false,
        }
    }
}

impl SweepOptions {
    /// The sweep a mount runs itself (it never reaps `id`); `recover` where none of its
    /// flushes can be in flight: at its start and its exit.
    pub fn by_mount(id: MountId, recover: bool) -> Self {
        SweepOptions {
            own: Some(id),
            recover,
            ..Default::default()
        }
    }
}

/// What a sweep found (dry run) or did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub dry_run: bool,
    pub live_mounts: u64,
    pub dead_mounts: u64,
    pub open_counts: u64,
    pub locks: u64,
    pub inodes_freed: u64,
    pub blocks_freed: u64,
    /// Values written ahead that no commit named, dropped.
    pub written_ahead: u64,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        self.dead_mounts
            + self.open_counts
            + self.locks
            + self.inodes_freed
            + self.blocks_freed
            + self.written_ahead
            == 0
    }
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        write!(
            f,
            "live mounts: {}\n{verb}: {} dead mount(s), {} open count(s), {} lock(s)\n{}: {} garbage inode(s), {} unreferenced block(s), {} block(s) written ahead by a flush that never committed",
            self.live_mounts,
            self.dead_mounts,
            self.open_counts,
            self.locks,
            if self.dry_run { "would free" } else { "freed" },
            self.inodes_freed,
            self.blocks_freed,
            self.written_ahead
        )
    }
}

/// What `kvfs gc` runs: a sweep, then (unless a dry run) the disk space of the blocks it freed
/// given back at once instead of at the mount's next reclaim.
pub fn collect(store: &KvStore, o: &SweepOptions) -> Result<SweepReport> {
    let r = sweep(store, o)?;
    if !o.dry_run && r.blocks_freed > 0 {
        store.reclaim_freed_space()?;
    }
    Ok(r)
}

/// Run one sweep.
pub fn sweep(store: &KvStore, o: &SweepOptions) -> Result<SweepReport> {
    let mut r = SweepReport {
        dry_run: o.dry_run,
        ..Default::default()
    };
    let table = mounts(store, o.timeout, o.own)?;
    let live: HashSet<MountId> = table.iter().filter(|m| m.alive).map(|m| m.id).collect();
    r.live_mounts = live.len() as u64;
    let dead: HashSet<MountId> = table.iter().filter(|m| !m.alive).map(|m| m.id).collect();
    r.dead_mounts = dead.len() as u64;
    if !dead.is_empty() {
        // Open counts and locks of dead mounts, grouped by inode.
        let mut per_ino: BTreeMap<Ino, Vec<Vec<u8>>> = BTreeMap::new();
        let (s, e) = Prefix::Inode.range();
        store.for_each(Cf::Meta, &s, &e, |k, _| {
            match ks::parse_inode_key(k) {
                InodeKey::Open(ino, m) if dead.contains(&m) => {
                    r.open_counts += 1;
                    per_ino.entry(ino).or_default().push(k.to_vec());
                }
                InodeKey::Lock(ino, m, _, _) if dead.contains(&m) => {
                    r.locks += 1;
                    per_ino.entry(ino).or_default().push(k.to_vec());
                }
                _ => {}
            }
            true
        })?;
        if !o.dry_run {
            for (ino, keys) in &per_ino {
                store.transact(|t| {
                    for k in keys {
                        t.delete(Cf::Meta, k)?;
                    }
                    t.put(Cf::Meta, &ks::open_pseudo_key(*ino), &[1])?;
                    t.put(Cf::Meta, &ks::lock_pseudo_key(*ino), &[1])?;
                    Ok::<_, FsError>(())
                })?;
            }
            for id in &dead {
                unregister(store, *id)?;
            }
        }
    }
    // Garbage inodes: free those with no name and no open count left.
    let (s, e) = Prefix::Garbage.range();
    let mut garbage = Vec::new();
    store.for_each(Cf::Meta, &s, &e, |k, _| {
        if let Some(i) = ks::key_ino(k) {
            garbage.push(i);
        }
        true
    })?;
    for ino in garbage {
        // Open counts held by no live mount (a dead one, or one with no process entry at all)
        // do not keep the inode.
        let (os, oe) = ks::open_range(ino);
        let mut stale = Vec::new();
        let mut open = false;
        store.for_each(Cf::Meta, &os, &oe, |k, _| {
            if let InodeKey::Open(_, m) = ks::parse_inode_key(k) {
                if live.contains(&m) {
                    open = true;
                } else {
                    if !dead.contains(&m) || !o.dry_run {
                        r.open_counts += 1;
                    }
                    stale.push(k.to_vec());
                }
            }
            true
        })?;
        if o.dry_run {
            let nlink0 = match store.get(Cf::Meta, &ks::inode_key(ino))? {
                Some(v) => crate::keyspace::records::Inode::decode(&v)
                    .map(|i| i.nlink == 0)
                    .unwrap_or(false),
                None => false,
            };
            r.inodes_freed += (nlink0 && !open) as u64;
            continue;
        }
        // A huge file is freed in bounded transactions, one after the other.
        let freed = loop {
            let step = store.transact(|t| {
                for k in &stale {
                    t.delete(Cf::Meta, k)?;
                }
                if !stale.is_empty() {
                    t.put(Cf::Meta, &ks::open_pseudo_key(ino), &[1])?;
                }
                fs::free_if_unused(t, ino)
            })?;
            if step != fs::Freeing::Partly {
                break step == fs::Freeing::Done;
            }
        };
        r.inodes_freed += freed as u64;
    }
    if o.recover {
        r.written_ahead = blocks::recover_written_ahead(store, o.dry_run)?;
    }
    r.blocks_freed = if o.dry_run {
        blocks::count_garbage(store)?
    } else {
        blocks::collect_all_garbage(store)?
    };
    Ok(r)
}
