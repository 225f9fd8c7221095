//! The kv layer: the only code in kvfs that knows RocksDB.
//!
//! Everything above sees [`KvStore`], the [`Txn`] trait and the [`Cf`] enum. A store is one
//! `OptimisticTransactionDB` with one column family per [`Cf`]. Every filesystem operation runs
//! through [`KvStore::transact`]: the closure gets a fresh transaction, and when commit reports a
//! conflict (RocksDB `Busy`/`TryAgain`) the whole closure runs again after a jittered backoff, a
//! bounded number of times. No other error is retried.
//!
//! Conflict rule (optimistic): [`Txn::get`] tracks the key it read (RocksDB `GetForUpdate`), and
//! every put, merge and delete is tracked; commit fails if any tracked key was written by
//! someone else after this transaction first touched it. [`Txn::get_untracked`] and
//! [`Txn::scan`] take no conflict, so callers use them only where a tracked key already covers
//! the decision (a directory scan is covered by the directory's inode, which every dirent change
//! rewrites).

use std::path::Path;
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, ErrorKind, MergeOperands,
    OptimisticTransactionDB, OptimisticTransactionOptions, Options, ReadOptions, WriteOptions,
};

/// Column families. The names are part of the on-disk format (keyspace.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Metadata: `M`, `i`, `d`, `g`, `p` keys.
    Meta,
    /// Block maps: `f ino blockno`.
    Fmap,
    /// Block contents: `B hash`.
    Blocks,
    /// Block index: `b hash` info, `r hash shard` refcounts (merge), `G hash shard` garbage.
    Bidx,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Meta, Cf::Fmap, Cf::Blocks, Cf::Bidx];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Fmap => "fmap",
            Cf::Blocks => "blocks",
            Cf::Bidx => "bidx",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Another transaction wrote a key this one tracked; the caller may retry.
    #[error("transaction conflict")]
    Conflict,
    /// The disk under the store is full.
    #[error("no space left on the store's disk: {0}")]
    NoSpace(String),
    /// RocksDB reports corruption of its own files.
    #[error("store corruption: {0}")]
    Corruption(String),
    /// The store is open in another process (RocksDB LOCK held).
    #[error("store is in use by another process (already mounted?)")]
    Locked,
    /// A write on a store opened read-only (tools inspecting a mounted store).
    #[error("store is open read-only")]
    ReadOnly,
    #[error("store error: {0}")]
    Other(String),
}

impl From<rocksdb::Error> for KvError {
    fn from(e: rocksdb::Error) -> Self {
        let msg = e.to_string();
        match e.kind() {
            ErrorKind::Busy | ErrorKind::TryAgain => KvError::Conflict,
            ErrorKind::Corruption => KvError::Corruption(msg),
            _ if msg.contains("No space left") => KvError::NoSpace(msg),
            _ if msg.contains("lock") && msg.contains("LOCK") => KvError::Locked,
            _ => KvError::Other(msg),
        }
    }
}

/// Errors that [`KvStore::transact`] can inspect to decide on a retry.
pub trait Retryable: From<KvError> {
    fn is_conflict(&self) -> bool;
}

impl Retryable for KvError {
    fn is_conflict(&self) -> bool {
        matches!(self, KvError::Conflict)
    }
}

/// One key/value pair from a scan.
pub type Pair = (Vec<u8>, Vec<u8>);

/// The operations a filesystem transaction may use. An engine other than RocksDB (the
/// FoundationDB engine of phase 4) implements this same trait.
pub trait Txn {
    /// Read a key and track it for conflicts.
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Read a key without tracking it (bulk data whose name already proves its content).
    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError>;
    /// Apply a merge operand (the `Bidx` family sums little-endian i64 counters).
    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError>;
    /// Keys in `[start, end)`, in order, at most `limit`, seeing this transaction's own writes.
    /// Untracked.
    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError>;
}

/// Options chosen at open time.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub create: bool,
    /// Open without taking the store's lock, for reading only: works while another process
    /// has the store open, and sees what that process had committed at this moment (its WAL
    /// is replayed into memory, nothing is written).
    pub read_only: bool,
    /// Block cache in bytes shared by all families.
    pub cache_bytes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create: false,
            read_only: false,
            cache_bytes: 32 << 20,
        }
    }
}

enum Db {
    Rw(OptimisticTransactionDB),
    Ro(rocksdb::DB),
}

/// Run the same expression on whichever RocksDB handle the store has.
macro_rules! with_db {
    ($self:expr, $d:ident => $e:expr) => {
        match &$self.db {
            Db::Rw($d) => $e,
            Db::Ro($d) => $e,
        }
    };
}

pub struct KvStore {
    db: Db,
    /// One block-space reclaim at a time (the mount's sweeper and `kvfs gc` may both ask):
    /// each switches blob collection on and off around its compaction.
    reclaiming: std::sync::Mutex<()>,
}

/// Most conflicts resolve in a few rounds; past this the caller gets EIO-class `Conflict`
/// rather than spinning forever.
const MAX_ATTEMPTS: u32 = 64;

fn sum_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut total = existing.map(decode_i64).unwrap_or(0);
    for op in operands {
        total = total.wrapping_add(decode_i64(op));
    }
    Some(total.to_le_bytes().to_vec())
}

/// Decode a counter; malformed bytes count as 0 here and are reported by audit.
pub fn decode_i64(b: &[u8]) -> i64 {
    <[u8; 8]>::try_from(b).map(i64::from_le_bytes).unwrap_or(0)
}

/// Whether files in `dir` can be opened with O_DIRECT (tmpfs, for one, refuses it).
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".direct-io-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

impl KvStore {
    pub fn open(path: &Path, o: &OpenOptions) -> Result<KvStore, KvError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(o.create);
        db_opts.create_missing_column_families(o.create);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        // Memtable flushes (which write the blob files holding block data) and compactions
        // bypass the page cache: the block bytes were already copied once into the WAL, and a
        // second copy through the page cache cost a sequential 1 GiB write 15% of its speed
        // (336-378 -> 406-422 MB/s, fresh stores, 3 runs each). Only where O_DIRECT works
        // (not on tmpfs).
        if !o.read_only && direct_io_works(path) {
            db_opts.set_use_direct_io_for_flush_and_compaction(true);
        }
        let cache = Cache::new_lru_cache(o.cache_bytes);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut opts = Options::default();
            let mut bbo = BlockBasedOptions::default();
            bbo.set_block_cache(&cache);
            bbo.set_bloom_filter(10.0, false);
            match cf {
                Cf::Blocks => {
                    // Block values are already named by content and encoded above (no
                    // RocksDB compression). They go to blob files at flush (integrated
                    // BlobDB), so compaction moves only small keys and pointers instead of
                    // rewriting every block at each level.
                    opts.set_compression_type(rocksdb::DBCompressionType::None);
                    opts.set_write_buffer_size(16 << 20);
                    opts.set_max_write_buffer_number(3);
                    opts.set_enable_blob_files(true);
                    opts.set_min_blob_size(1024);
                    opts.set_blob_file_size(256 << 20);
                    // Blob garbage collection relocates every live value of the oldest blob
                    // files whenever a compaction passes over them: with it on at all times a
                    // bulk write rewrote part of what it had just written (three 256 MiB
                    // files grew the store by 1.04-1.09x instead of 1.006x, and the write
                    // competed with the rewrite). Blocks never change, only get freed, so
                    // collection runs when the sweeper has freed some (`reclaim_block_space`).
                    opts.set_enable_blob_gc(false);
                    bbo.set_block_size(16 << 10);
                }
                Cf::Bidx => {
                    opts.set_merge_operator_associative("kvfs_sum_i64", sum_merge);
                    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
                }
                _ => opts.set_compression_type(rocksdb::DBCompressionType::Lz4),
            }
            opts.set_block_based_table_factory(&bbo);
            ColumnFamilyDescriptor::new(cf.name(), opts)
        });
        let db = if o.read_only {
            Db::Ro(
                rocksdb::DB::open_cf_descriptors_read_only(&db_opts, path, cfs, false)
                    .map_err(KvError::from)?,
            )
        } else {
            Db::Rw(
                OptimisticTransactionDB::open_cf_descriptors(&db_opts, path, cfs)
                    .map_err(KvError::from)?,
            )
        };
        Ok(KvStore {
            db,
            reclaiming: std::sync::Mutex::new(()),
        })
    }

    /// Whether this process holds the store alone (a read-write RocksDB open takes its lock),
    /// so that any other mount recorded in it cannot be alive.
    pub fn is_exclusive(&self) -> bool {
        matches!(self.db, Db::Rw(_))
    }

    pub fn is_read_only(&self) -> bool {
        matches!(self.db, Db::Ro(_))
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, KvError> {
        with_db!(self, d => d.cf_handle(cf.name()))
            .ok_or_else(|| KvError::Other(format!("column family {} missing", cf.name())))
    }

    fn rw(&self) -> Result<&OptimisticTransactionDB, KvError> {
        match &self.db {
            Db::Rw(d) => Ok(d),
            Db::Ro(_) => Err(KvError::ReadOnly),
        }
    }

    /// Run `f` as one transaction, retrying the whole closure on conflict.
    pub fn transact<T, E: Retryable>(
        &self,
        mut f: impl FnMut(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let db = self.rw().map_err(E::from)?;
        let mut attempt = 0;
        loop {
            let wo = WriteOptions::default();
            let to = OptimisticTransactionOptions::default();
            let txn = db.transaction_opt(&wo, &to);
            let mut t = RocksTxn { store: self, txn };
            let out = f(&mut t);
            let res = match out {
                Ok(v) => t.txn.commit().map(|_| v).map_err(|e| E::from(e.into())),
                Err(e) => {
                    let _ = t.txn.rollback();
                    Err(e)
                }
            };
            match res {
                Err(e) if e.is_conflict() && attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    backoff(attempt);
                }
                other => return other,
            }
        }
    }

    /// Run `f` once on a consistent snapshot of the store: reads only (writes fail with
    /// [`KvError::ReadOnly`]), no conflict tracking, no commit, so no retry. For operations
    /// that only look (lookup, getattr, read, readdir): a snapshot cannot see half of a
    /// concurrent transaction, and skipping the tracking keeps them off the commit path.
    pub fn read<T, E: From<KvError>>(
        &self,
        f: impl FnOnce(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        with_db!(self, d => {
            let mut r = SnapRead {
                store: self,
                snap: d.snapshot(),
            };
            f(&mut r)
        })
    }

    /// Make every committed transaction durable (sync the WAL).
    pub fn sync(&self) -> Result<(), KvError> {
        self.rw()?.flush_wal(true).map_err(KvError::from)
    }

    /// Write `pairs` into `cf` without the write-ahead log, then flush `cf`'s memtable, which
    /// writes and syncs the table and blob files: the values are on disk when this returns.
    /// Bulk block data takes this path because the log would copy every byte once more before
    /// the blob file does (a 1 GiB sequential write spent 28% of the daemon's CPU copying
    /// into the log). Outside any transaction: the caller makes sure a commit names only
    /// values it saw reach the disk (`blocks::write_ahead`).
    pub fn write_ahead(&self, cf: Cf, pairs: &[(Vec<u8>, &[u8])]) -> Result<(), KvError> {
        let db = self.rw()?;
        let h = self.cf(cf)?;
        let mut batch = rocksdb::WriteBatchWithTransaction::<true>::default();
        for (k, v) in pairs {
            batch.put_cf(h, k, v);
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        db.write_opt(batch, &wo)?;
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        db.flush_cf_opt(h, &fo)?;
        Ok(())
    }

    /// Delete `keys` outside any transaction (logged, not synced): bookkeeping whose loss in
    /// a crash recovery repairs, and on which no transaction decides.
    pub fn delete_untracked(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<(), KvError> {
        let db = self.rw()?;
        let h = self.cf(cf)?;
        let mut batch = rocksdb::WriteBatchWithTransaction::<true>::default();
        for k in keys {
            batch.delete_cf(h, k);
        }
        db.write_opt(batch, &WriteOptions::default())?;
        Ok(())
    }

    /// Flush memtables to SST files (used at clean shutdown so the WAL can be dropped).
    pub fn flush_all(&self) -> Result<(), KvError> {
        let db = self.rw()?;
        for cf in Cf::ALL {
            db.flush_cf(self.cf(cf)?)?;
        }
        Ok(())
    }

    /// Give the disk space of deleted blocks back: compact the blocks family with blob
    /// garbage collection on (it is off otherwise). Deleted blocks free their space only when
    /// compaction drops their keys and blob files nothing references any more go; collection
    /// also moves the live values out of the oldest blob files so those can go.
    pub fn reclaim_block_space(&self) -> Result<(), KvError> {
        let db = self.rw()?;
        let _one = crate::util::lock(&self.reclaiming);
        let cf = self.cf(Cf::Blocks)?;
        db.set_options_cf(&cf, &[("enable_blob_garbage_collection", "true")])?;
        db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        db.set_options_cf(&cf, &[("enable_blob_garbage_collection", "false")])?;
        Ok(())
    }

    /// Bytes in the blob files that hold block values (live and garbage), 0 if unknown.
    pub fn block_file_bytes(&self) -> u64 {
        self.cf(Cf::Blocks)
            .ok()
            .and_then(|cf| {
                with_db!(self, d => d.property_int_value_cf(cf, "rocksdb.total-blob-file-size"))
                    .ok()
                    .flatten()
            })
            .unwrap_or(0)
    }

    /// Read outside a transaction (tools, statistics).
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let h = self.cf(cf)?;
        Ok(with_db!(self, d => d.get_cf(h, key))?)
    }

    /// Scan outside a transaction, calling `visit` for each pair in `[start, end)` until it
    /// returns false.
    pub fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError> {
        let h = self.cf(cf)?;
        with_db!(self, d => {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(end.to_vec());
            let mut it = d.raw_iterator_cf_opt(h, ro);
            it.seek(start);
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                if !visit(k, v) {
                    return Ok(());
                }
                it.next();
            }
            it.status().map_err(KvError::from)
        })
    }

    /// Total bytes of live SST files and WAL, for statfs and reports.
    pub fn disk_usage(&self) -> u64 {
        let mut total = 0;
        for cf in Cf::ALL {
            if let Ok(h) = self.cf(cf) {
                for prop in [
                    "rocksdb.live-sst-files-size",
                    "rocksdb.live-blob-file-size",
                    "rocksdb.cur-size-all-mem-tables",
                ] {
                    total += with_db!(self, d => d.property_int_value_cf(h, prop))
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                }
            }
        }
        total
    }
}

fn backoff(attempt: u32) {
    // Exponential with full jitter, capped at ~20 ms.
    let cap_us = (50u64 << attempt.min(9)).min(20_000);
    let us = crate::util::rand_u64() % cap_us.max(1);
    std::thread::sleep(Duration::from_micros(us));
}

/// Read options for a scan that stops before `end`.
fn bounded(end: &[u8]) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end.to_vec());
    ro
}

/// Up to `limit` pairs from `start` on.
fn collect<D: rocksdb::DBAccess>(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, D>,
    start: &[u8],
    limit: usize,
) -> Result<Vec<Pair>, KvError> {
    it.seek(start);
    let mut out = Vec::new();
    while it.valid() && out.len() < limit {
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.push((k.to_vec(), v.to_vec()));
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// A read-only view of one snapshot, behind the [`Txn`] trait.
struct SnapRead<'a, D: rocksdb::DBAccess> {
    store: &'a KvStore,
    snap: rocksdb::SnapshotWithThreadMode<'a, D>,
}

impl<D: rocksdb::DBAccess> Txn for SnapRead<'_, D> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.snap.get_cf(self.store.cf(cf)?, key)?)
    }

    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.get(cf, key)
    }

    fn put(&mut self, _: Cf, _: &[u8], _: &[u8]) -> Result<(), KvError> {
        Err(KvError::ReadOnly)
    }

    fn delete(&mut self, _: Cf, _: &[u8]) -> Result<(), KvError> {
        Err(KvError::ReadOnly)
    }

    fn merge(&mut self, _: Cf, _: &[u8], _: &[u8]) -> Result<(), KvError> {
        Err(KvError::ReadOnly)
    }

    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        let it = self
            .snap
            .raw_iterator_cf_opt(self.store.cf(cf)?, bounded(end));
        collect(it, start, limit)
    }
}

struct RocksTxn<'a> {
    store: &'a KvStore,
    txn: rocksdb::Transaction<'a, OptimisticTransactionDB>,
}

impl Txn for RocksTxn<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.txn.get_for_update_cf(self.store.cf(cf)?, key, true)?)
    }

    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.txn.get_cf(self.store.cf(cf)?, key)?)
    }

    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.put_cf(self.store.cf(cf)?, key, value)?)
    }

    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.delete_cf(self.store.cf(cf)?, key)?)
    }

    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.merge_cf(self.store.cf(cf)?, key, operand)?)
    }

    fn scan(
        &mut self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Pair>, KvError> {
        let it = self
            .txn
            .raw_iterator_cf_opt(self.store.cf(cf)?, bounded(end));
        collect(it, start, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_tmp() -> (tempfile::TempDir, KvStore) {
        let dir = tempfile::tempdir().unwrap();
        let o = OpenOptions {
            create: true,
            ..Default::default()
        };
        let s = KvStore::open(dir.path(), &o).unwrap();
        (dir, s)
    }

    #[test]
    fn deleted_block_values_leave_the_blob_files_when_space_is_reclaimed() {
        let (_d, s) = open_tmp();
        let v = vec![7u8; 64 << 10];
        for i in 0..64u32 {
            s.transact(|t| t.put(Cf::Blocks, &i.to_be_bytes(), &v))
                .unwrap();
        }
        s.flush_all().unwrap();
        let full = s.block_file_bytes();
        assert!(full >= 64 * v.len() as u64, "blob files hold {full} bytes");
        for i in 0..64u32 {
            s.transact(|t| t.delete(Cf::Blocks, &i.to_be_bytes()))
                .unwrap();
        }
        s.flush_all().unwrap();
        s.reclaim_block_space().unwrap();
        let after = s.block_file_bytes();
        assert!(
            after < full / 4,
            "blob files still hold {after} of {full} bytes"
        );
    }

    #[test]
    fn merge_sums_counters_inside_transactions() {
        let (_d, s) = open_tmp();
        for d in [1i64, 1, -1, 5] {
            s.transact(|t| t.merge(Cf::Bidx, b"rX", &d.to_le_bytes()))
                .unwrap();
        }
        let v = s.get(Cf::Bidx, b"rX").unwrap().unwrap();
        assert_eq!(decode_i64(&v), 6);
    }

    #[test]
    fn concurrent_read_modify_write_is_serialized_by_retry() {
        let (_d, s) = open_tmp();
        let s = std::sync::Arc::new(s);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        s.transact(|t| {
                            let v = t.get(Cf::Meta, b"n")?.map(|v| decode_i64(&v)).unwrap_or(0);
                            t.put(Cf::Meta, b"n", &(v + 1).to_le_bytes())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(decode_i64(&s.get(Cf::Meta, b"n").unwrap().unwrap()), 800);
    }

    #[test]
    fn scan_sees_own_writes_and_respects_bounds() {
        let (_d, s) = open_tmp();
        let got = s
            .transact(|t| {
                t.put(Cf::Meta, b"a1", b"x")?;
                t.put(Cf::Meta, b"a2", b"y")?;
                t.put(Cf::Meta, b"b1", b"z")?;
                t.scan(Cf::Meta, b"a", b"b", 10)
            })
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, b"a2");
    }

    #[test]
    fn snapshot_reads_see_committed_state_and_refuse_writes() {
        let (_d, s) = open_tmp();
        s.transact(|t| t.put(Cf::Meta, b"a1", b"x")).unwrap();
        let got = s
            .read(|t| {
                let v = t.get(Cf::Meta, b"a1")?;
                let n = t.scan(Cf::Meta, b"a", b"b", 10)?.len();
                Ok::<_, KvError>((v, n))
            })
            .unwrap();
        assert_eq!(got, (Some(b"x".to_vec()), 1));
        assert!(matches!(
            s.read(|t| t.put(Cf::Meta, b"a2", b"y")),
            Err(KvError::ReadOnly)
        ));
    }

    #[test]
    fn second_open_reports_locked() {
        let (d, _s) = open_tmp();
        let err = KvStore::open(d.path(), &OpenOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, KvError::Locked), "{err:?}");
    }
}
