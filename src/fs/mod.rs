//! Filesystem operations: lookup, create, rename, read, write... with no FUSE types.
//!
//! Each operation is one [`KvStore::transact`] closure: it reads what it decides on with
//! conflict tracking, writes its changes, and is re-run whole on conflict. Nothing leaves the
//! closure before commit: attributes returned to the caller are built from the committed
//! values. File data goes through the per-inode write-back buffer of [`file`], which commits
//! whole blocks on fsync, a close of 1 MiB or more, release, rename, a timer and memory
//! pressure. Block content is read only through the [`blocks::reader::BlockReader`], never
//! with a file's mutex held or inside a transaction (see [`file`]).
//!
//! Locks, in the order they may be taken: `ns_lock` (operations that can drop a link count to
//! zero, release, and an open counted in memory only), then `files` (the open-file table), then
//! one file's state.

mod acl;
mod attr;
mod buffer;
mod dir;
mod file;
mod fsynclog;
pub use fsynclog::records_in as fsync_log_records;
mod journal;
mod lock;
mod ranges;
mod scan;
mod space;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::blocks::{self, BlockError, Codec};
use crate::keyspace::records::{
    decode_counter, encode_counter, DecodeError, FormatRecord, GarbageRecord, Inode, Kind,
};
use crate::keyspace::{self as ks, Ino, MountId};
use crate::kv::{Cf, KvError, KvStore, Retryable, Txn};
use crate::util::{lock, Timestamp};

pub use attr::{Attr, KillSetid, SetAttr, SetTime, StatFs, XattrReply};
pub use dir::{DirEntry, NewNode};
pub use file::FileState;

pub use lock::{LockKind, LockQuery, LockSpec};
pub use space::{disk_space, DiskSpace};

/// Longest name a directory entry may have.
pub const NAME_MAX: usize = 255;

/// Errors of filesystem operations. [`FsError::Errno`] is the POSIX answer; the others are
/// failures of the store, which the FUSE adapter reports as EIO/ENOSPC with a log line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("errno {0}")]
    Errno(i32),
    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Kv(#[from] KvError),
}

impl FsError {
    /// The store's disk is full (ENOSPC to the caller).
    pub fn is_no_space(&self) -> bool {
        matches!(self, FsError::Kv(KvError::NoSpace(_)))
    }

    /// A write reached a store opened read-only (EROFS).
    pub fn is_read_only(&self) -> bool {
        matches!(self, FsError::Kv(KvError::ReadOnly))
    }
}

impl Retryable for FsError {
    fn is_conflict(&self) -> bool {
        matches!(self, FsError::Kv(KvError::Conflict))
    }
}

impl From<crate::keyspace::records::EncodeError> for FsError {
    fn from(e: crate::keyspace::records::EncodeError) -> Self {
        FsError::Kv(e.into())
    }
}

impl From<BlockError> for FsError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Kv(k) => FsError::Kv(k),
            BlockError::Corrupt { hash, reason } => FsError::Corrupt {
                key: ks::describe_key(&ks::block_key(&hash)),
                reason,
            },
            BlockError::Missing { hash } => FsError::Corrupt {
                key: ks::describe_key(&ks::block_key(&hash)),
                reason: "block missing".into(),
            },
            BlockError::Unavailable { hash, reason } => FsError::Corrupt {
                key: ks::describe_key(&ks::block_key(&hash)),
                reason: format!("evicted, not fetched: {reason}"),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

pub(crate) fn errno<T>(e: i32) -> Result<T> {
    Err(FsError::Errno(e))
}

pub(crate) fn corrupt(key: &[u8], e: DecodeError) -> FsError {
    FsError::Corrupt {
        key: ks::describe_key(key),
        reason: e.to_string(),
    }
}

/// Who is asking: the credentials of the calling process.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Mount-time choices.
#[derive(Clone, Debug, Default)]
pub struct FsOptions {
    pub read_only: bool,
    /// When reads and listings update access times (a remount may change it later).
    pub atime: Atime,
    /// Bytes of buffered writes per file before the write path flushes it itself.
    pub file_buffer_limit: Option<u64>,
    /// Bytes of buffered writes over all files before writers flush.
    pub total_buffer_limit: Option<u64>,
    /// The store's directory: new data is refused while its disk is down to the reserve.
    pub space_path: Option<std::path::PathBuf>,
    /// The store changes under this (read-only) mount: another process writes it (a replica
    /// that `kvfs serve` keeps applying to), so the kernel must not keep file pages across
    /// opens.
    pub follow: bool,
}

/// When reads update access times: the mount's `relatime` (default, as ext4), `strictatime`
/// or `noatime`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AtimeMode {
    #[default]
    Relatime,
    Strict,
    Never,
}

/// The mount's access-time options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Atime {
    pub mode: AtimeMode,
    /// `nodiratime`: listing a directory leaves its access time alone.
    pub nodir: bool,
}

impl Atime {
    fn pack(self, frozen: bool) -> u8 {
        let m = match self.mode {
            AtimeMode::Relatime => 0,
            AtimeMode::Strict => 1,
            AtimeMode::Never => 2,
        };
        m | (self.nodir as u8) << 2 | (frozen as u8) << 3
    }

    fn unpack(v: u8) -> (Atime, bool) {
        let mode = match v & 3 {
            1 => AtimeMode::Strict,
            2 => AtimeMode::Never,
            _ => AtimeMode::Relatime,
        };
        (
            Atime {
                mode,
                nodir: v & 4 != 0,
            },
            v & 8 != 0,
        )
    }
}

const INO_BATCH: u64 = 1024;
/// Readahead fetchers: a cold block read waits on the disk, so a few in flight at once.
const PREFETCH_THREADS: usize = 8;
const PREFETCH_QUEUE: usize = 256;

pub struct Fs {
    store: Arc<KvStore>,
    format: FormatRecord,
    codec: Codec,
    bs: u64,
    opts: FsOptions,
    /// The access-time options ([`Atime::pack`]) and whether the kernel's mount is read-only
    /// now (remounted `ro`: no access times are written); a remount changes them.
    atime: std::sync::atomic::AtomicU8,
    /// The kernel stamps files' mtime and ctime for the writes it sends (writeback cache) and
    /// pushes them with SETATTR: a write then leaves them alone, or a write the kernel sends
    /// after its SETATTR would give the file the later time at which it arrived.
    kernel_times: std::sync::atomic::AtomicBool,
    /// This mount's id: the key of its `p` record and the owner of its open counts and locks.
    mount_id: MountId,
    locks: lock::LockTable,
    no_caps: attr::NoCaps,
    space: space::SpaceGuard,
    ino_pool: Mutex<(u64, u64)>,
    ns_lock: Mutex<()>,
    files: Mutex<HashMap<Ino, Arc<FileState>>>,
    /// The one way to block content: cache of verified blocks, single-flight reads.
    blocks: Arc<blocks::reader::BlockReader>,
    prefetch: blocks::prefetch::Prefetcher,
    /// Readahead across the files of a directory read in order.
    dir_ahead: scan::DirAhead,
    /// Tiering, when the mount keeps a cache size: writers wait at its gate.
    tier: std::sync::OnceLock<Arc<crate::tier::Tier>>,
    handles: Mutex<Handles>,
    /// Access times reads set and the store does not have yet (written with the buffers).
    atimes: Mutex<HashMap<Ino, Timestamp>>,
    dirty_total: AtomicU64,
    /// When this mount's operations last committed (ms since `started`).
    last_change: AtomicU64,
    /// When this mount's operations last looked at or changed the store (ms since `started`).
    last_use: AtomicU64,
    started: std::time::Instant,
    file_limit: u64,
    total_limit: u64,
    /// Sequence numbers of pending records (`J` keys): from the mount's start time in
    /// nanoseconds, so a later mount's come after an earlier one's.
    pending_seq: AtomicU64,
    log: journal::LogState,
}

/// A directory's entries as read for an open handle.
type Listing = Arc<Vec<DirEntry>>;

#[derive(Default)]
struct Handles {
    next: u64,
    files: HashMap<u64, Arc<FileState>>,
    /// The handles open for writing.
    writers: std::collections::HashSet<u64>,
    /// Open directories: the inode and, once read, its listing.
    dirs: HashMap<u64, (Ino, Option<Listing>)>,
}

impl Fs {
    pub fn new(store: KvStore, format: FormatRecord, opts: FsOptions) -> Fs {
        let bs = format.block_size as u64;
        let store = Arc::new(store);
        let reader = Arc::new(blocks::reader::BlockReader::new(store.clone(), 32 << 20));
        let prefetch =
            blocks::prefetch::Prefetcher::new(reader.clone(), PREFETCH_THREADS, PREFETCH_QUEUE);
        Fs {
            store,
            codec: Codec::from_format(&format),
            format,
            bs,
            mount_id: MountId::random(),
            locks: lock::LockTable::default(),
            no_caps: attr::NoCaps::default(),
            space: space::SpaceGuard::new(opts.space_path.clone()),
            file_limit: opts.file_buffer_limit.unwrap_or(8 << 20),
            total_limit: opts.total_buffer_limit.unwrap_or(32 << 20),
            atime: std::sync::atomic::AtomicU8::new(opts.atime.pack(false)),
            kernel_times: std::sync::atomic::AtomicBool::new(false),
            opts,
            ino_pool: Mutex::new((0, 0)),
            ns_lock: Mutex::new(()),
            files: Mutex::new(HashMap::new()),
            atimes: Mutex::new(HashMap::new()),
            blocks: reader,
            prefetch,
            dir_ahead: scan::DirAhead::default(),
            tier: std::sync::OnceLock::new(),
            handles: Mutex::new(Handles {
                next: 1,
                ..Default::default()
            }),
            dirty_total: AtomicU64::new(0),
            last_change: AtomicU64::new(0),
            last_use: AtomicU64::new(0),
            started: std::time::Instant::now(),
            pending_seq: AtomicU64::new(Timestamp::now().nanos().max(0) as u64),
            log: journal::LogState::default(),
        }
    }

    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// The store, shared (for the threads that work beside the filesystem).
    pub fn store_arc(&self) -> Arc<KvStore> {
        self.store.clone()
    }

    /// Install tiering: evicted blocks come back through `hook`; writers wait at `tier`'s
    /// gate while it makes room.
    pub fn set_tiering(
        &self,
        hook: Arc<dyn blocks::reader::Tiering>,
        tier: Option<Arc<crate::tier::Tier>>,
    ) {
        self.blocks.set_tiering(hook);
        if let Some(t) = tier {
            let _ = self.tier.set(t);
        }
    }

    /// Where evicted blocks come back from, if tiering is set up.
    pub fn tiering_hook(&self) -> Option<Arc<dyn blocks::reader::Tiering>> {
        self.blocks.tiering()
    }

    /// The mount's tiering state, if installed.
    pub fn tier(&self) -> Option<&Arc<crate::tier::Tier>> {
        self.tier.get()
    }

    /// Pin (`up`) or unpin the subtree at `root` (`kvfs pin` through the control socket).
    pub fn pin(&self, root: Ino, up: bool) -> Result<crate::tier::pin::PinReport> {
        let hook = self
            .blocks
            .tiering()
            .ok_or_else(|| FsError::Kv(KvError::Other("tiering is not set up".into())))?;
        self.flush_all()?;
        Ok(crate::tier::pin::pin(&self.store, &*hook, root, up)?)
    }

    /// How long a writer waits at the tiering gate for room, at most.
    pub(crate) fn wait_for_room(&self) {
        if let Some(t) = self.tier.get() {
            t.gate.wait_room(std::time::Duration::from_secs(10));
        }
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    pub fn format_record(&self) -> &FormatRecord {
        &self.format
    }

    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    /// Whether another process changes the store under this mount ([`FsOptions::follow`]).
    pub fn follows(&self) -> bool {
        self.opts.follow
    }

    /// Whether nothing but this mount changes the store (one process holds it writable, and
    /// it is not a followed replica): what the mount remembers of it then stays true until
    /// the mount itself changes it.
    pub fn alone(&self) -> bool {
        !self.opts.read_only && !self.follows() && self.store.is_exclusive()
    }

    pub fn mount_id(&self) -> MountId {
        self.mount_id
    }

    /// Whether the store's disk is down to its reserve (new data gets ENOSPC).
    pub fn space_low(&self) -> bool {
        self.space.check(0).is_err()
    }

    fn writable(&self) -> Result<()> {
        if self.opts.read_only {
            errno(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn txn<T>(&self, f: impl FnMut(&mut dyn Txn) -> Result<T>) -> Result<T> {
        if self.store.is_read_only() {
            // An engine opened for reading only (a followed replica): the operation runs on
            // a snapshot, and any write it attempts fails with EROFS.
            return self.store.read(f);
        }
        let r = self.store.transact(f);
        let now = self.started.elapsed().as_millis() as u64;
        self.last_change.store(now, Ordering::Relaxed);
        self.last_use.store(now, Ordering::Relaxed);
        r
    }

    /// How long no filesystem operation has changed the store and nothing is buffered (the
    /// mount's own bookkeeping, heartbeat and sweeps, does not count).
    pub fn idle_for(&self) -> std::time::Duration {
        if self.dirty_total.load(Ordering::Relaxed) > 0 {
            return std::time::Duration::ZERO;
        }
        let last = self.last_change.load(Ordering::Relaxed);
        std::time::Duration::from_millis(
            (self.started.elapsed().as_millis() as u64).saturating_sub(last),
        )
    }

    /// How long no filesystem operation has looked at or changed the store, nothing being
    /// buffered: background work that competes for the cores (history's indexing) waits for it.
    pub fn quiet_for(&self) -> std::time::Duration {
        let last = self.last_use.load(Ordering::Relaxed);
        let since = (self.started.elapsed().as_millis() as u64).saturating_sub(last);
        self.idle_for().min(std::time::Duration::from_millis(since))
    }

    /// A look without a change: one consistent snapshot, no conflict tracking, no commit.
    fn look<T>(&self, f: impl FnOnce(&mut dyn Txn) -> Result<T>) -> Result<T> {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_use.store(now, Ordering::Relaxed);
        self.store.read(f)
    }

    /// A fresh inode number. Numbers come from `M next_ino` in batches so concurrent creates
    /// do not all rewrite one counter; a batch cut short by a crash leaves only a gap.
    fn alloc_ino(&self) -> Result<Ino> {
        let mut pool = lock(&self.ino_pool);
        if pool.0 >= pool.1 {
            let start = self.txn(|t| take_inode_numbers(t, INO_BATCH))?;
            *pool = (start, start + INO_BATCH);
        }
        let ino = pool.0;
        pool.0 += 1;
        Ok(ino)
    }

    /// Free unreferenced blocks.
    pub fn collect_garbage(&self) -> Result<u64> {
        Ok(blocks::collect_all_garbage(&self.store)?)
    }

    fn file_state(&self, ino: Ino) -> Option<Arc<FileState>> {
        lock(&self.files).get(&ino).cloned()
    }

    /// Inodes this mount holds open (for re-registering after its `p` record vanished, and
    /// for the clean-shutdown release).
    pub fn open_inodes(&self) -> Vec<(Ino, u32)> {
        let mut counts: HashMap<Ino, u32> = lock(&self.files)
            .iter()
            .map(|(i, s)| (*i, s.open_count()))
            .filter(|(_, n)| *n > 0)
            .collect();
        // A mount alone with its store holds its directory handles in `files` too.
        if !self.alone() {
            for (ino, _) in lock(&self.handles).dirs.values() {
                *counts.entry(*ino).or_default() += 1;
            }
        }
        counts.into_iter().collect()
    }

    /// Write this mount's open counts again (after its process entry was reaped by mistake),
    /// every handle counted (the files' in-memory ones too, so their counts stay exact).
    pub fn restore_open_counts(&self) -> Result<()> {
        let _ns = lock(&self.ns_lock);
        for (ino, n) in self.open_inodes() {
            let written = self.txn(|t| {
                if load_inode_opt(t, ino)?.is_none() {
                    return Ok(false);
                }
                self.write_open_count(t, ino, n)?;
                Ok(true)
            })?;
            if let Some(st) = lock(&self.files).get(&ino).filter(|_| written) {
                let mut s = lock(&st.inner);
                s.counted = s.open;
            }
        }
        Ok(())
    }

    /// Free what is left of `ino` after an operation freed part of it, one bounded
    /// transaction at a time. A failure leaves it to the sweeper (it is marked garbage).
    pub(crate) fn finish_freeing(&self, ino: Ino, first: Freeing) {
        let mut state = first;
        while state == Freeing::Partly {
            match self.txn(|t| free_if_unused(t, ino)) {
                Ok(s) => state = s,
                Err(e) => {
                    tracing::warn!(ino, error = %e, "freeing a file's blocks stopped; the sweeper goes on");
                    return;
                }
            }
        }
    }

    /// Clean shutdown: drop this mount's open counts and locks from the keyspace, freeing
    /// inodes whose last user it was. The kernel has released every handle by now, except
    /// after a lazy or forced unmount.
    pub fn release_all(&self) -> Result<()> {
        let _ns = lock(&self.ns_lock);
        let mut inos: Vec<Ino> = lock(&self.files).keys().copied().collect();
        inos.extend(lock(&self.handles).dirs.drain().map(|(_, (ino, _))| ino));
        inos.sort_unstable();
        inos.dedup();
        for ino in inos.into_iter().chain(self.locks.inodes()) {
            let freeing = self.txn(|t| {
                t.delete(Cf::Meta, &ks::open_key(ino, self.mount_id))?;
                lock::drop_mount_locks(t, ino, self.mount_id)?;
                free_if_unused(t, ino)
            })?;
            self.finish_freeing(ino, freeing);
        }
        lock(&self.files).clear();
        Ok(())
    }
}

/// Take `count` fresh inode numbers from `M next_ino`; returns the first.
pub(crate) fn take_inode_numbers(t: &mut dyn Txn, count: u64) -> Result<Ino> {
    let raw = t
        .get(Cf::Meta, ks::META_NEXT_INO)?
        .ok_or_else(|| FsError::Corrupt {
            key: "M next_ino".into(),
            reason: "missing".into(),
        })?;
    let n = decode_counter(&raw).map_err(|e| corrupt(ks::META_NEXT_INO, e))?;
    t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(n + count))?;
    Ok(n)
}

/// Whether any mount has `ino` open. Open-set changes write the `i ino \xfe 'o'` pseudo-key,
/// read here with tracking, so the untracked scan of the counts cannot miss a concurrent open.
pub(crate) fn any_open(t: &mut dyn Txn, ino: Ino) -> Result<bool> {
    t.get(Cf::Meta, &ks::open_pseudo_key(ino))?;
    let (s, e) = ks::open_range(ino);
    Ok(!t.scan(Cf::Meta, &s, &e, 1)?.is_empty())
}

/// Block-map entries one transaction drops when it frees a file. A file's blocks are freed
/// in transactions of at most this many (each entry costs three small writes), so freeing a
/// huge file stays within what any engine takes in one transaction (FoundationDB: 10 MB,
/// 5 s); the inode waits under its garbage mark between them, consistent at every step.
pub const FREE_BATCH: usize = 4096;

/// What an attempt to free an inode did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freeing {
    /// Not freed: it has names or is open (or is gone already).
    Kept,
    /// Part of its blocks were dropped; it waits under its garbage mark for the rest.
    Partly,
    Done,
}

/// Free `ino` if it has no names and no mount has it open (a batch of its blocks at most).
pub fn free_if_unused(t: &mut dyn Txn, ino: Ino) -> Result<Freeing> {
    match load_inode_opt(t, ino)? {
        Some(i) if i.nlink == 0 && !any_open(t, ino)? => free_inode(t, ino, &i),
        Some(_) => Ok(Freeing::Kept),
        None => {
            t.delete(Cf::Meta, &ks::garbage_key(ino))?;
            Ok(Freeing::Kept)
        }
    }
}

pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return errno(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return errno(libc::EINVAL);
    }
    Ok(())
}

pub(crate) fn load_inode_opt(t: &mut dyn Txn, ino: Ino) -> Result<Option<Inode>> {
    let key = ks::inode_key(ino);
    match t.get(Cf::Meta, &key)? {
        None => Ok(None),
        Some(v) => Inode::decode(&v).map(Some).map_err(|e| corrupt(&key, e)),
    }
}

pub(crate) fn load_inode(t: &mut dyn Txn, ino: Ino) -> Result<Inode> {
    load_inode_opt(t, ino)?.ok_or(FsError::Errno(libc::ENOENT))
}

pub(crate) fn save_inode(t: &mut dyn Txn, ino: Ino, inode: &Inode) -> Result<()> {
    Ok(t.put(Cf::Meta, &ks::inode_key(ino), &inode.encode()?)?)
}

pub(crate) fn load_dir(t: &mut dyn Txn, ino: Ino) -> Result<Inode> {
    let d = load_inode(t, ino)?;
    if d.kind != Kind::Dir {
        return errno(libc::ENOTDIR);
    }
    if d.nlink == 0 {
        // Removed while someone still had it as cwd: nothing may be created in it.
        return errno(libc::ENOENT);
    }
    Ok(d)
}

/// One link fewer. A stored count already at 0 is corrupt: EIO with the key in the log, never
/// an arithmetic panic in a FUSE worker.
pub(crate) fn nlink_down(ino: Ino, i: &mut Inode) -> Result<()> {
    i.nlink = i.nlink.checked_sub(1).ok_or_else(|| FsError::Corrupt {
        key: ks::describe_key(&ks::inode_key(ino)),
        reason: "link count is already 0".into(),
    })?;
    Ok(())
}

/// One link more; EMLINK where the count would overflow.
pub(crate) fn nlink_up(_ino: Ino, i: &mut Inode) -> Result<()> {
    i.nlink = i.nlink.checked_add(1).ok_or(FsError::Errno(libc::EMLINK))?;
    Ok(())
}

/// Round a block's content length up to what it is charged in st_blocks.
pub(crate) fn charge(len: u32) -> u64 {
    (len as u64).div_ceil(4096) * 4096
}

/// Drop the last name of `ino`: free it now, or mark it garbage while a mount has it open.
/// `Partly`: a huge file whose remaining blocks the caller frees after its commit
/// ([`Fs::finish_freeing`]).
pub(crate) fn drop_last_link(t: &mut dyn Txn, ino: Ino, inode: &Inode) -> Result<Freeing> {
    // One scan of the sub-keys answers "open anywhere?" and lists what a free deletes; the
    // tracked pseudo-key read makes it safe against a concurrent open (see `any_open`).
    t.get(Cf::Meta, &ks::open_pseudo_key(ino))?;
    let (s, e) = ks::inode_sub_range(ino);
    let subs = t.scan(Cf::Meta, &s, &e, usize::MAX)?;
    let open = subs
        .iter()
        .any(|(k, _)| matches!(ks::parse_inode_key(k), ks::InodeKey::Open(..)));
    if open {
        save_inode(t, ino, inode)?;
        mark_garbage(t, ino)?;
        Ok(Freeing::Kept)
    } else {
        free_inode_keys(t, ino, inode, &subs)
    }
}

fn mark_garbage(t: &mut dyn Txn, ino: Ino) -> Result<()> {
    let g = GarbageRecord {
        since: Timestamp::now(),
    };
    Ok(t.put(Cf::Meta, &ks::garbage_key(ino), &g.encode()?)?)
}

/// Delete an inode with everything under it, dropping its block references: at most
/// [`FREE_BATCH`] of them in this transaction (`Partly` when more remain).
pub fn free_inode(t: &mut dyn Txn, ino: Ino, inode: &Inode) -> Result<Freeing> {
    let (s, e) = ks::inode_sub_range(ino);
    let subs = t.scan(Cf::Meta, &s, &e, usize::MAX)?;
    free_inode_keys(t, ino, inode, &subs)
}

/// [`free_inode`] given the inode's sub-keys.
fn free_inode_keys(
    t: &mut dyn Txn,
    ino: Ino,
    inode: &Inode,
    subs: &[crate::kv::Pair],
) -> Result<Freeing> {
    // Blocks are mapped only below the size, each charged in `alloc`: an empty file has none.
    if inode.kind == Kind::File && (inode.size > 0 || inode.alloc > 0) {
        let (s, e) = ks::fmap_range(ino, 0, u64::MAX);
        let entries = t.scan(Cf::Fmap, &s, &e, FREE_BATCH + 1)?;
        let more = entries.len() > FREE_BATCH;
        let mut left = inode.clone();
        for (k, v) in entries.into_iter().take(FREE_BATCH) {
            let ent =
                crate::keyspace::records::FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
            blocks::drop_ref(t, &ent.hash)?;
            left.alloc = left.alloc.saturating_sub(charge(ent.len));
            t.delete(Cf::Fmap, &k)?;
        }
        if more {
            left.nlink = 0;
            save_inode(t, ino, &left)?;
            mark_garbage(t, ino)?;
            return Ok(Freeing::Partly);
        }
    }
    for (k, _) in subs {
        t.delete(Cf::Meta, k)?;
    }
    let (s, e) = ks::pending_range(ino);
    for (k, _) in t.scan(Cf::Meta, &s, &e, usize::MAX)? {
        t.delete(Cf::Meta, &k)?;
    }
    t.delete(Cf::Meta, &ks::inode_key(ino))?;
    t.delete(Cf::Meta, &ks::garbage_key(ino))?;
    Ok(Freeing::Done)
}

impl Fs {
    /// Whether a read of `i` (a listing, if `dir`) now updates its access time: never on a
    /// read-only mount or with `noatime` (or `nodiratime` for a listing), always with
    /// `strictatime`, else by relatime's rule (atime not newer than mtime or ctime, or a day
    /// old), as ext4.
    pub(crate) fn atime_due(&self, i: &Inode, dir: bool) -> bool {
        let (a, frozen) = Atime::unpack(self.atime.load(Ordering::Relaxed));
        let now = Timestamp::now();
        let off = self.opts.read_only || frozen || (dir && a.nodir);
        !off && match a.mode {
            AtimeMode::Never => false,
            AtimeMode::Strict => true,
            AtimeMode::Relatime => {
                i.atime <= i.mtime || i.atime <= i.ctime || now.secs - i.atime.secs >= 24 * 3600
            }
        }
    }

    /// The kernel owns write times from now on (it negotiated its writeback cache).
    pub fn set_kernel_times(&self) {
        self.kernel_times.store(true, Ordering::Relaxed);
    }

    /// A remount changed the mount's access-time options, or made it read-only (`frozen`:
    /// the kernel refuses every write; no access time is written either) or writable again.
    pub fn set_atime(&self, atime: Atime, frozen: bool) {
        self.atime.store(atime.pack(frozen), Ordering::Relaxed);
    }
}

/// Xattr names: 1 to 255 bytes (the VFS answers ERANGE otherwise).
pub(crate) fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return errno(libc::ERANGE);
    }
    Ok(())
}
