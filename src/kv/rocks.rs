//! The RocksDB engine: the only code in kvfs that knows RocksDB.
//!
//! A store is one `OptimisticTransactionDB` with one column family per [`Cf`]. Transactions
//! track reads with `GetForUpdate`; a conflict at commit comes back as `Busy`/`TryAgain` and
//! is mapped to [`KvError::Conflict`]. Block values go to blob files (integrated BlobDB).

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, ErrorKind, MergeOperands,
    OptimisticTransactionDB, OptimisticTransactionOptions, Options, ReadOptions, WriteOptions,
};

use super::{sum_counters, Cf, Engine, EngineTxn, KvError, OpenOptions, Pair, Txn};

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

/// The WAL bytes a store may hold before the families keeping its oldest file are flushed.
/// 64 MiB cost `tar x` of the bench tree 9% (forced flushes mid-burst); at 256 MiB bursts
/// rarely reach it, and an idle mount checkpoints anyway (`Fs::idle_for`, mount.rs).
const MAX_TOTAL_WAL: u64 = 256 << 20;

/// The write buffer (memtable) of a family: the blocks family's flushes write its blob
/// files, 16 MiB at a time; the others keep RocksDB's default.
fn write_buffer(cf: Cf) -> usize {
    match cf {
        Cf::Blocks => 16 << 20,
        _ => 64 << 20,
    }
}

/// About the disk space reserved ahead for the WAL file a checkpoint starts
/// ([`RocksEngine::flushing_small`]): each family's write buffer while it flushes.
const IDLE_WAL_RESERVE: usize = 4 << 20;

pub struct RocksEngine {
    db: Db,
    /// One block-space reclaim at a time (the mount's sweeper and `kvfs gc` may both ask):
    /// each switches blob collection on and off around its compaction.
    reclaiming: std::sync::Mutex<()>,
    /// A secondary instance following a writer: RocksDB gives it no snapshots, so a reader
    /// holds this for reading while catching up holds it for writing, and a read never
    /// sees half of a catch-up.
    follower: Option<std::sync::RwLock<()>>,
    /// The newest sequence number known synced to the WAL: a sync with nothing committed
    /// since has no work (an fdatasync of an unchanged file still costs the disk a flush,
    /// ~50 us here; SQLite's rollback journal syncs its directory right after its journal).
    synced: std::sync::atomic::AtomicU64,
}

fn sum_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    Some(sum_counters(existing, operands.into_iter()))
}

impl RocksEngine {
    pub fn open(path: &Path, o: &OpenOptions) -> Result<RocksEngine, KvError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(o.create);
        db_opts.create_missing_column_families(o.create);
        db_opts.set_max_background_jobs(2);
        // A flush that a full memtable starts takes every family with it: the WAL file is
        // kept until every family with data in it has flushed, and the metadata families
        // (64 MiB buffers) flushed only at the idle checkpoint, so a burst's block values sat
        // in the WAL and in the blob files at once: right after `tar x` of the bench tree the
        // store held 1.73x its stored block bytes, 1.10x with this (`tar x` 2303/2181/2278 ->
        // 2333/2229/2292 ms; 1 GiB write and fsync-each unchanged; creates and unlinks 2-5%
        // slower, within twice the noise). Explicit flushes (the bulk path, checkpoints) name
        // their families and flush only those.
        db_opts.set_atomic_flush(true);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        // Every WAL file stays until each family has flushed what it holds: the blocks family
        // flushes every 16 MiB, the small ones (64 MiB buffers) rarely, so an emptied store
        // held 1.5 GB of WAL in 123 files after five rounds of write-and-delete (RocksDB's
        // default cap is 4x all write buffers). Past this total, the families holding the
        // oldest WAL file are flushed.
        db_opts.set_max_total_wal_size(MAX_TOTAL_WAL);
        // Memtable flushes (which write the blob files holding block data) and compactions go
        // through the page cache, synced by RocksDB where it must (bytes_per_sync starts the
        // writeback early). They used O_DIRECT, which measured 15% faster on this VM's disk
        // in 2026-11; by 2026-11-30 the disk took 9-15 ms for each of the flush's 1 MiB
        // O_DIRECT writes, one at a time, and the page cache's writeback ran 1.6-1.8x faster:
        // 1 GiB sequential write 70-84 -> 129-130 MB/s, random 4 KiB writes 6.4-6.7k ->
        // 11.8-12.2k IOPS, tar x 5.5-5.7 -> 4.5-5.6 s (tools/ab-write, 2 rounds each).
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
                    opts.set_max_write_buffer_number(3);
                    opts.set_enable_blob_files(true);
                    opts.set_min_blob_size(1024);
                    opts.set_blob_file_size(256 << 20);
                    // Blob garbage collection relocates every live value of the oldest blob
                    // files whenever a compaction passes over them: with it on at all times a
                    // bulk write rewrote part of what it had just written (three 256 MiB
                    // files grew the store by 1.04-1.09x instead of 1.006x, and the write
                    // competed with the rewrite). Blocks never change, only get freed, so
                    // collection runs when the sweeper has freed some (`reclaim_freed_space`).
                    opts.set_enable_blob_gc(false);
                    bbo.set_block_size(16 << 10);
                }
                cf if cf.sums() => {
                    opts.set_merge_operator_associative("kvfs_sum_i64", sum_merge);
                    // Counters every block store, eviction and fetch adds to (`s resident`)
                    // would otherwise collect one operand per change in the memtable, and
                    // each commit's conflict check of such a key walked them all (a fetch
                    // of 512 MiB spent most of its CPU there): past 16, the sum is stored.
                    opts.set_max_successive_merges(16);
                    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
                }
                _ => opts.set_compression_type(rocksdb::DBCompressionType::Lz4),
            }
            opts.set_write_buffer_size(write_buffer(*cf));
            opts.set_block_based_table_factory(&bbo);
            ColumnFamilyDescriptor::new(cf.name(), opts)
        });
        let db = if let (true, Some(own)) = (o.read_only, &o.follow) {
            // A secondary instance: reads the writer's files and WAL, keeps its own info log
            // in `own`, and catches up on demand.
            db_opts.set_max_open_files(-1);
            Db::Ro(rocksdb::DB::open_cf_descriptors_as_secondary(
                &db_opts, path, own, cfs,
            )?)
        } else if o.read_only {
            Db::Ro(rocksdb::DB::open_cf_descriptors_read_only(
                &db_opts, path, cfs, false,
            )?)
        } else {
            Db::Rw(OptimisticTransactionDB::open_cf_descriptors(
                &db_opts, path, cfs,
            )?)
        };
        Ok(RocksEngine {
            db,
            reclaiming: std::sync::Mutex::new(()),
            synced: std::sync::atomic::AtomicU64::new(0),
            follower: (o.read_only && o.follow.is_some()).then(|| std::sync::RwLock::new(())),
        })
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

    /// Run `flush`, whose first memtable switch starts a new WAL file, with every family's
    /// write buffer at [`IDLE_WAL_RESERVE`], restored after. That file reserves disk space
    /// ahead (fallocate) of 1.1x the write buffer of the family switched: 70 MiB, which an
    /// idle, emptied store held for a log of 229 bytes (`du` 76 MiB). The reserve itself
    /// stays: without it each fsync's WAL append allocates (`allow_fallocate=false`: 4 KiB
    /// writes with fsync 10% slower, 3 rounds); a small one grows by its own size when
    /// written past.
    fn flushing_small(&self, flush: impl FnOnce() -> Result<(), KvError>) -> Result<(), KvError> {
        let db = self.rw()?;
        // Every family, even past one that failed; the first error.
        let set_buffers = |small: bool| -> Result<(), KvError> {
            let mut first = Ok(());
            for cf in Cf::ALL {
                let size = if small {
                    IDLE_WAL_RESERVE
                } else {
                    write_buffer(cf)
                };
                let set = self.cf(cf).and_then(|h| {
                    Ok(db.set_options_cf(h, &[("write_buffer_size", &size.to_string())])?)
                });
                first = first.and(set);
            }
            first
        };
        // Restored whatever happened: a family left at 4 MiB would flush four to sixteen
        // times as often until the next checkpoint.
        let flushed = set_buffers(true).and_then(|()| flush());
        let restored = set_buffers(false);
        flushed.and(restored)
    }
}

impl Engine for RocksEngine {
    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, KvError> {
        let db = self.rw()?;
        let txn = db.transaction_opt(
            &WriteOptions::default(),
            &OptimisticTransactionOptions::default(),
        );
        Ok(Box::new(RocksTxn { engine: self, txn }))
    }

    fn snapshot(&self) -> Box<dyn Txn + '_> {
        if let (Some(gate), Db::Ro(db)) = (&self.follower, &self.db) {
            return Box::new(GatedRead {
                engine: self,
                db,
                _gate: gate.read().unwrap_or_else(|e| e.into_inner()),
            });
        }
        with_db!(self, d => Box::new(SnapRead {
            engine: self,
            snap: d.snapshot(),
        }))
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let h = self.cf(cf)?;
        Ok(with_db!(self, d => d.get_cf(h, key))?)
    }

    /// The value pinned where RocksDB read it (a blob's read buffer), not copied into a
    /// `Vec` first. Block values skip RocksDB's own checksum: each carries the xxh3 of its
    /// content, checked by every decode, and its SHA-256 name judges a mismatch; the CRC32C
    /// pass over every blob read cost 3% of a cold sequential read's CPU.
    fn get_in_place(
        &self,
        cf: Cf,
        key: &[u8],
        visit: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, KvError> {
        let h = self.cf(cf)?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(cf != Cf::Blocks);
        Ok(with_db!(self, d => d.get_pinned_cf_opt(h, key, &ro))?
            .map(|v| visit(&v))
            .is_some())
    }

    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), KvError> {
        let h = self.cf(cf)?;
        with_db!(self, d => {
            let mut it = d.raw_iterator_cf_opt(h, bounded(end));
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

    fn sync(&self) -> Result<(), KvError> {
        use std::sync::atomic::Ordering;
        let db = self.rw()?;
        // A commit appends to the WAL file before it returns: once the file is synced after
        // `latest` was read, everything up to it is on disk.
        let latest = db.latest_sequence_number();
        if latest != 0 && latest <= self.synced.load(Ordering::Acquire) {
            return Ok(());
        }
        db.flush_wal(true)?;
        self.synced.fetch_max(latest, Ordering::AcqRel);
        Ok(())
    }

    fn all_synced(&self) -> bool {
        use std::sync::atomic::Ordering;
        match &self.db {
            Db::Rw(db) => {
                let latest = db.latest_sequence_number();
                latest != 0 && latest <= self.synced.load(Ordering::Acquire)
            }
            Db::Ro(_) => false,
        }
    }

    fn is_exclusive(&self) -> bool {
        matches!(self.db, Db::Rw(_))
    }

    fn is_read_only(&self) -> bool {
        matches!(self.db, Db::Ro(_))
    }

    fn catch_up(&self) -> Result<(), KvError> {
        match (&self.db, &self.follower) {
            (Db::Ro(d), Some(gate)) => {
                let _g = gate.write().unwrap_or_else(|e| e.into_inner());
                Ok(d.try_catch_up_with_primary()?)
            }
            _ => Ok(()),
        }
    }

    /// Write `pairs` into `cf` without the WAL, then flush `cf`'s memtable, which writes and
    /// syncs the table and blob files: the values are on disk when this returns. The WAL
    /// would copy every byte once more before the blob file does (a 1 GiB sequential write
    /// spent 28% of the daemon's CPU copying into the log).
    ///
    /// The WAL is synced first: the flush also persists the writes to `cf` of earlier
    /// commits whose other families live only in the unsynced WAL, and a power loss would
    /// then keep half of such a commit (a block value without its `b` record).
    fn store_bulk_durably(&self, cf: Cf, pairs: &[(Vec<u8>, &[u8])]) -> Result<(), KvError> {
        let db = self.rw()?;
        let h = self.cf(cf)?;
        db.flush_wal(true)?;
        // Sized up front: grown by doubling, the batch's buffer was copied again and again
        // (3% of the daemon's CPU in a sequential write).
        let bytes = pairs.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
        let mut batch = rocksdb::WriteBatchWithTransaction::<true>::with_capacity_bytes(bytes);
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

    fn delete_unsynced(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<(), KvError> {
        let db = self.rw()?;
        let h = self.cf(cf)?;
        let mut batch = rocksdb::WriteBatchWithTransaction::<true>::default();
        for k in keys {
            batch.delete_cf(h, k);
        }
        db.write_opt(batch, &WriteOptions::default())?;
        Ok(())
    }

    /// One plain write batch: atomic, logged, no conflict check (a transaction's commit
    /// validates every key it wrote).
    fn write_unchecked(&self, ops: &[crate::kv::Write]) -> Result<(), KvError> {
        let db = self.rw()?;
        let mut batch = rocksdb::WriteBatchWithTransaction::<true>::default();
        for (cf, k, v) in ops {
            let h = self.cf(*cf)?;
            match v {
                Some(v) => batch.put_cf(h, k, v),
                None => batch.delete_cf(h, k),
            }
        }
        db.write_opt(batch, &WriteOptions::default())?;
        Ok(())
    }

    /// Flush every memtable to table files, so the WAL can be dropped.
    fn checkpoint(&self) -> Result<(), KvError> {
        let db = self.rw()?;
        self.flushing_small(|| {
            db.flush_wal(true)?;
            for cf in Cf::ALL {
                db.flush_cf(self.cf(cf)?)?;
            }
            Ok(())
        })
    }

    /// Compact the blocks family with blob garbage collection on (it is off otherwise).
    /// Deleted blocks free their space only when compaction drops their keys and blob files
    /// nothing references any more go; collection also moves the live values out of the
    /// oldest blob files so those can go.
    fn reclaim_freed_space(&self) -> Result<(), KvError> {
        let db = self.rw()?;
        let _one = crate::util::lock(&self.reclaiming);
        let cf = self.cf(Cf::Blocks)?;
        // The compaction would flush the memtable first, starting a WAL file with a full
        // reserve (an emptied store kept 18 MiB of it); flushed here, it finds none.
        self.flushing_small(|| Ok(db.flush_cf(&cf)?))?;
        db.set_options_cf(&cf, &[("enable_blob_garbage_collection", "true")])?;
        db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        db.set_options_cf(&cf, &[("enable_blob_garbage_collection", "false")])?;
        Ok(())
    }

    fn block_storage_bytes(&self) -> Option<u64> {
        let cf = self.cf(Cf::Blocks).ok()?;
        with_db!(self, d => d.property_int_value_cf(cf, "rocksdb.total-blob-file-size"))
            .ok()
            .flatten()
    }

    /// Live table and blob files plus memtables.
    fn bytes_on_disk(&self) -> u64 {
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
    engine: &'a RocksEngine,
    snap: rocksdb::SnapshotWithThreadMode<'a, D>,
}

/// [`Txn`] for a read-only view whose `$view` field reads with `get_cf` and
/// `raw_iterator_cf_opt` (a snapshot, or a follower's database behind its gate).
macro_rules! read_view_txn {
    (impl[$($g:tt)*] $ty:ty, $view:ident) => {
        impl<$($g)*> Txn for $ty {
            fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
                Ok(self.$view.get_cf(self.engine.cf(cf)?, key)?)
            }

            super::snapshot_txn_methods!();

            fn scan(
                &mut self,
                cf: Cf,
                start: &[u8],
                end: &[u8],
                limit: usize,
            ) -> Result<Vec<Pair>, KvError> {
                let it = self
                    .$view
                    .raw_iterator_cf_opt(self.engine.cf(cf)?, bounded(end));
                collect(it, start, limit)
            }
        }
    };
}

read_view_txn!(impl[D: rocksdb::DBAccess] SnapRead<'_, D>, snap);

/// A consistent read of a follower: plain reads while no catch-up can run.
struct GatedRead<'a> {
    engine: &'a RocksEngine,
    db: &'a rocksdb::DB,
    _gate: std::sync::RwLockReadGuard<'a, ()>,
}

read_view_txn!(impl[] GatedRead<'_>, db);

struct RocksTxn<'a> {
    engine: &'a RocksEngine,
    txn: rocksdb::Transaction<'a, OptimisticTransactionDB>,
}

impl Txn for RocksTxn<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.txn.get_for_update_cf(self.engine.cf(cf)?, key, true)?)
    }

    fn get_untracked(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.txn.get_cf(self.engine.cf(cf)?, key)?)
    }

    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.put_cf(self.engine.cf(cf)?, key, value)?)
    }

    fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.delete_cf(self.engine.cf(cf)?, key)?)
    }

    fn merge(&mut self, cf: Cf, key: &[u8], operand: &[u8]) -> Result<(), KvError> {
        Ok(self.txn.merge_cf(self.engine.cf(cf)?, key, operand)?)
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
            .raw_iterator_cf_opt(self.engine.cf(cf)?, bounded(end));
        collect(it, start, limit)
    }
}

impl EngineTxn for RocksTxn<'_> {
    fn as_txn(&mut self) -> &mut dyn Txn {
        self
    }

    fn commit(self: Box<Self>) -> Result<(), KvError> {
        Ok(self.txn.commit()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvStore;

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
        s.checkpoint().unwrap();
        let full = s.block_storage_bytes();
        assert!(full >= 64 * v.len() as u64, "blob files hold {full} bytes");
        for i in 0..64u32 {
            s.transact(|t| t.delete(Cf::Blocks, &i.to_be_bytes()))
                .unwrap();
        }
        s.checkpoint().unwrap();
        s.reclaim_freed_space().unwrap();
        let after = s.block_storage_bytes();
        assert!(
            after < full / 4,
            "blob files still hold {after} of {full} bytes"
        );
    }

    #[test]
    fn a_checkpoint_leaves_a_small_wal_reserve_and_the_write_buffers_as_they_were() {
        use std::os::unix::fs::MetadataExt;
        let (d, s) = open_tmp();
        let wal_disk = || -> u64 {
            std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
                .sum()
        };
        for round in 0..2u32 {
            for i in 0..1000u32 {
                s.transact(|t| t.put(Cf::Meta, &(round * 1000 + i).to_be_bytes(), &[1; 100]))
                    .unwrap();
            }
            s.checkpoint().unwrap();
            // The first write after it reserves the new WAL file's space: RocksDB's own
            // reserve would be 1.1x the 64 MiB buffer.
            s.transact(|t| t.put(Cf::Meta, b"after", b"x")).unwrap();
            let wal = wal_disk();
            assert!(
                wal <= 2 * IDLE_WAL_RESERVE as u64,
                "round {round}: WAL takes {wal} bytes"
            );
        }
        let opts = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .unwrap();
        let text = std::fs::read_to_string(opts).unwrap();
        let small = format!("write_buffer_size={IDLE_WAL_RESERVE}\n");
        assert!(
            !text.contains(&small),
            "a family kept the checkpoint's buffer"
        );
    }

    #[test]
    fn second_open_reports_locked() {
        let (d, _s) = open_tmp();
        let err = KvStore::open(d.path(), &OpenOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, KvError::Locked), "{err:?}");
    }

    #[test]
    fn the_engine_passes_the_conformance_suite() {
        crate::kv::conformance::run_all(&|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_path_buf();
            let open = move || {
                KvStore::open(
                    &path,
                    &OpenOptions {
                        create: true,
                        ..Default::default()
                    },
                )
                .unwrap()
            };
            crate::kv::conformance::Subject::new(dir, open)
        });
    }
}
