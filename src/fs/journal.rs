//! Pending writes: an fsync that makes the written bytes durable without committing their
//! blocks.
//!
//! A 4 KiB write into a 64 KiB block makes the whole block new: committing it at every fsync
//! hashed, compressed and logged 64 KiB for 4 (fio's 4 KiB random writes with fsync after
//! each, a database's pages and its log). On a mount alone with its store, an fsync instead
//! writes what changed in each buffered block since the last fsync, as one `J ino blockno seq`
//! record per block (keyspace.md), in one transaction, and syncs it: the blocks stay buffered
//! and are committed later as any buffered write is, in the transaction that deletes their
//! records. The records are therefore only ever read after a crash: the next mount applies
//! them, in `seq` order, to the blocks as they were committed, before it serves.
//!
//! Only a mount alone with its store writes them (no other process could read the blocks in
//! between, nor change them), and nothing but this mount's own commits (which flush first
//! when they touch blocks: truncate, copies, punching holes) changes a block with pending
//! records, so "committed block, then the records in order" is the content the fsync saw.
//! Freeing an inode deletes its records.
//!
//! Where RocksDB holds nothing unsynced, the records go to the fsync log instead (see
//! `fsynclog`): one overwrite and its sync, not a transaction and a WAL sync. The commit of a
//! block then writes its `j` key instead of deleting `J` keys, and replay applies a log
//! record only above its block's `j`, merged in `seq` order with the block's `J` records.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::buffer::{replace_block, FileState, NewBlock};
use super::fsynclog::{FsyncLog, LogRecord, LOG_BYTES};
use super::{corrupt, load_inode_opt, lock, save_inode, Fs, FsError, Result};
use crate::blocks;
use crate::keyspace::records::PendingWrite;
use crate::keyspace::{self as ks, Ino, Prefix};
use crate::kv::{Cf, KvError, Pair};

/// The fsync log of a mount alone with its store, and what it waits for to start over.
#[derive(Default)]
pub(super) struct LogState {
    log: OnceLock<FsyncLog>,
    /// Records of the log that buffered blocks hold (not committed yet).
    pub(super) held: AtomicU64,
    /// Bumped by every commit that took some in, after its transaction.
    pub(super) settled: AtomicU64,
}

/// An fsync writes pending records while the file's unrecorded changes are at most this many
/// bytes; more, and committing the blocks costs about the same, so it commits them.
const PENDING_MAX_WRITE: u64 = 256 << 10;

/// ... and while they are at most 1/`RECORD_SHARE` of the bytes of the blocks they are in.
const RECORD_SHARE: u64 = 2;

/// A file's pending records may hold this many bytes before its next fsync commits its
/// blocks instead (the same bytes rewritten and synced again and again would pile up).
const PENDING_MAX_HELD: u64 = 4 << 20;

impl Fs {
    /// fsync's first half: make what `st` buffers durable, as pending records when that is
    /// cheaper than committing it (see the module). The caller syncs the store after.
    pub(super) fn make_durable(&self, st: &FileState) -> Result<()> {
        let mut s = lock(&st.inner);
        if !self.alone() {
            return self.flush_locked(st, s).1;
        }
        while s.inflight > 0 {
            s = st.settled.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.dirty_since.is_none() {
            return Ok(());
        }
        let (mut changed, mut blocks) = (0, 0);
        for x in s.dirty.values().filter(|x| x.unrecorded() > 0) {
            changed += x.unrecorded() as u64;
            blocks += x.img.len() as u64;
        }
        // A record saves only what it leaves out of the blocks; a new small file (its blocks
        // all new bytes) would be logged twice, as its record and at its commit soon after
        // (write, fsync, close and rename of 100 KB files: 1,194 -> 888 a second).
        if changed > PENDING_MAX_WRITE
            || changed * RECORD_SHARE > blocks
            || s.pending_bytes + changed > PENDING_MAX_HELD
        {
            return self.flush_locked(st, s).1;
        }
        let (size, mtime) = (s.size, s.mtime);
        let mut recs = Vec::new();
        for (bn, x) in &s.dirty {
            if let Some((lo, data)) = x.unrecorded_bytes() {
                let seq = self.pending_seq.fetch_add(1, Ordering::Relaxed);
                let v = PendingWrite::encode_parts(lo as u32, size, mtime, data)?;
                recs.push((*bn, seq, v));
            }
        }
        // Under the file's mutex: a commit of these blocks (which deletes their records)
        // cannot come between the records and their note in the slots. Noted even when the
        // transaction fails, so that the commit deletes them whatever it left behind; the
        // bytes count as recorded only when it succeeded.
        let logged = self.log_append(st.ino, &recs);
        let r = if logged {
            Ok(())
        } else {
            self.txn(|t| {
                for (bn, seq, v) in &recs {
                    t.put(Cf::Meta, &ks::pending_key(st.ino, *bn, *seq), v)?;
                }
                Ok(())
            })
        };
        for (bn, seq, v) in recs {
            let bytes = if r.is_ok() { v.len() as u64 } else { 0 };
            if let Some(x) = s.dirty.get_mut(&bn) {
                x.recorded(seq, bytes, r.is_ok(), logged);
            }
            s.pending_bytes += bytes;
        }
        r
    }

    /// Write `recs` to the fsync log, if the mount has one, it has room, and RocksDB holds
    /// nothing unsynced (else the fsync syncs RocksDB anyway, and the records go with it).
    fn log_append(&self, ino: Ino, recs: &[(u64, u64, Vec<u8>)]) -> bool {
        let Some(log) = self.log.log.get() else {
            return false;
        };
        if recs.is_empty() || !self.store.all_synced() {
            return false;
        }
        let n = recs.len() as u64;
        // Counted before the frame goes in: a restart of the log checks the count under the
        // log's lock, which the append takes.
        self.log.held.fetch_add(n, Ordering::SeqCst);
        match log.append(ino, recs) {
            Ok(true) => true,
            r => {
                self.log.held.fetch_sub(n, Ordering::SeqCst);
                if let Err(e) = r {
                    tracing::error!(error = %e, "fsync log: a write failed; fsyncs go through the store until it starts over");
                }
                false
            }
        }
    }

    /// Sync the store, then start the fsync log over if no buffered block holds a record of
    /// it and no commit that took some in came after the sync began: every record in it is
    /// then in a durable commit. Only once it is half full unless `now` (a restart is a sync
    /// of its own: restarting whenever the count fell to zero cost SQLite's rollback journal
    /// mode a third sync per transaction).
    pub(super) fn sync_then_restart_log(&self, now: bool) -> Result<()> {
        let settled = self.log.settled.load(Ordering::SeqCst);
        self.store.sync()?;
        let Some(log) = self.log.log.get() else {
            return Ok(());
        };
        let used = log.used();
        if used == 0 || !now && used < LOG_BYTES / 2 || self.log.held.load(Ordering::SeqCst) != 0 {
            return Ok(());
        }
        let quiet = || {
            self.log.held.load(Ordering::SeqCst) == 0
                && self.log.settled.load(Ordering::SeqCst) == settled
        };
        if let Err(e) = log.reset_if(quiet) {
            tracing::error!(error = %e, "fsync log: starting over failed");
        }
        Ok(())
    }

    /// Open the fsync log in `dir` (a mount alone with its store, before it serves), apply
    /// its records and the `J` keys ([`Fs::replay_pending`]), start it over, and use it for
    /// this mount's fsyncs. Returns the number of records applied.
    pub fn replay_with_log(&self, dir: &Path) -> Result<usize> {
        let io = |e: std::io::Error| {
            FsError::Kv(KvError::Other(format!(
                "{}: {e}",
                dir.join(super::fsynclog::LOG_NAME).display()
            )))
        };
        // A log that cannot be made (a full disk) only costs speed: fsyncs then write `J`
        // keys. One that exists but cannot be read may hold what fsyncs made durable.
        let made = dir.join(super::fsynclog::LOG_NAME).exists();
        let (log, recs) = match FsyncLog::open(dir) {
            Ok(x) => x,
            Err(e) if !made => {
                tracing::warn!(error = %e, "no fsync log: fsyncs sync the store's WAL");
                return self.replay_pending();
            }
            Err(e) => return Err(io(e)),
        };
        let (marks, covered) = self.covered()?;
        let live: Vec<LogRecord> = recs
            .into_iter()
            .filter(|r| unapplied(&covered, r))
            .collect();
        let applied = self.replay(live)?;
        // All of it is committed now: durable, then the log starts over and the marks go.
        self.store.sync()?;
        log.reset_if(|| true).map_err(io)?;
        for chunk in marks.chunks(1024) {
            self.txn(|t| {
                for (k, _) in chunk {
                    t.delete(Cf::Meta, k)?;
                }
                Ok(())
            })?;
        }
        let _ = self.log.log.set(log);
        Ok(applied)
    }

    /// The `j` marks: their keys, and each block's mark.
    fn covered(&self) -> Result<(Vec<Pair>, Marks)> {
        let (a, b) = Prefix::Covered.range();
        let marks = self.look(|t| Ok(t.scan(Cf::Meta, &a, &b, usize::MAX)?))?;
        let covered = marks
            .iter()
            .filter_map(|(k, v)| {
                let mark = ks::parse_covered_key(k)
                    .zip(<[u8; 8]>::try_from(v.as_slice()).ok().map(u64::from_be_bytes));
                if mark.is_none() {
                    tracing::error!(key = %ks::describe_key(k), "a damaged `j` mark: its block's log records are all applied");
                }
                mark
            })
            .collect();
        Ok((marks, covered))
    }

    /// How many records of the fsync log in `dir` their blocks do not hold yet (what a crashed
    /// mount left; a mount that cannot apply them warns).
    pub fn unapplied_log_records(&self, dir: &Path) -> Result<usize> {
        let recs = super::fsynclog::read_records(dir)
            .map_err(|e| FsError::Kv(KvError::Other(format!("{}: {e}", dir.display()))))?;
        if recs.is_empty() {
            return Ok(0);
        }
        let (_, covered) = self.covered()?;
        Ok(recs.iter().filter(|r| unapplied(&covered, r)).count())
    }

    /// How many pending records the store holds (some when a mount crashed with them).
    pub fn pending_records(&self) -> Result<usize> {
        let (a, b) = Prefix::Pending.range();
        Ok(self
            .look(|t| Ok(t.scan(Cf::Meta, &a, &b, usize::MAX)?))?
            .len())
    }

    /// Apply the pending records an earlier mount left (it crashed, or was killed, between an
    /// fsync and the commit of the blocks), each file in one transaction. Before serving, on a
    /// mount alone with its store. Returns the number of records applied. A record that does
    /// not decode is logged and dropped (its bytes are lost, the others applied); a block that
    /// cannot be read is an error, and the records stay for a later mount.
    pub fn replay_pending(&self) -> Result<usize> {
        self.replay(Vec::new())
    }

    /// [`Fs::replay_pending`] with records of the fsync log in force.
    fn replay(&self, logged: Vec<LogRecord>) -> Result<usize> {
        let (a, b) = Prefix::Pending.range();
        let all = self.look(|t| Ok(t.scan(Cf::Meta, &a, &b, usize::MAX)?))?;
        let mut by_ino: BTreeMap<Ino, (Vec<Pair>, Vec<LogRecord>)> = BTreeMap::new();
        for (k, v) in all {
            // The range holds only `J` keys: a key of another length names no inode.
            let ino = ks::parse_pending_key(&k).map_or(0, |(ino, _, _)| ino);
            by_ino.entry(ino).or_default().0.push((k, v));
        }
        for r in logged {
            by_ino.entry(r.ino).or_default().1.push(r);
        }
        let (files, mut applied) = (by_ino.len(), 0);
        for (ino, (recs, logged)) in by_ino {
            applied += self.replay_file(ino, &recs, logged)?;
        }
        if files > 0 {
            tracing::info!(
                files,
                records = applied,
                "applied writes an fsync made durable"
            );
        }
        Ok(applied)
    }

    /// [`Fs::replay_pending`] for one file: its `J` records and those of the fsync log, each
    /// block's in `seq` order. The `J` keys go in the transaction that applies them.
    fn replay_file(&self, ino: Ino, recs: &[Pair], logged: Vec<LogRecord>) -> Result<usize> {
        let bs = self.bs;
        let mut parsed: BTreeMap<u64, Vec<(u64, PendingWrite)>> = BTreeMap::new();
        let keyed = recs
            .iter()
            .map(|(k, v)| (k.clone(), ks::parse_pending_key(k), v));
        let from_log = logged.iter().map(|r| {
            let k = ks::pending_key(r.ino, r.bn, r.seq);
            (k, Some((r.ino, r.bn, r.seq)), &r.value)
        });
        for (k, at, v) in keyed.chain(from_log) {
            let r = match at {
                None => Err(bad(&k, "not a pending-write key")),
                Some((_, bn, seq)) => match PendingWrite::decode(v) {
                    Err(e) => Err(corrupt(&k, e)),
                    Ok(r) if r.offset as u64 + r.data.len() as u64 > bs => {
                        Err(bad(&k, "its bytes run past the block"))
                    }
                    Ok(r) => Ok((bn, seq, r)),
                },
            };
            match r {
                Ok((bn, seq, r)) => parsed.entry(bn).or_default().push((seq, r)),
                Err(e) => tracing::error!(error = %e, "a pending write is damaged; dropped"),
            }
        }
        for rs in parsed.values_mut() {
            rs.sort_by_key(|(seq, _)| *seq);
        }
        let applied = parsed.values().map(Vec::len).sum();
        // The blocks as committed, read before the transaction (a read may fetch).
        let mut images = Vec::new();
        for (bn, rs) in &parsed {
            let mut img = self.committed_block(ino, *bn)?;
            for (_, r) in rs {
                let (lo, hi) = (r.offset as usize, r.offset as usize + r.data.len());
                if img.len() < hi {
                    img.resize(hi, 0);
                }
                img[lo..hi].copy_from_slice(&r.data);
            }
            images.push((*bn, blocks::prepare(&img, &self.codec)));
        }
        let all: Vec<&PendingWrite> = parsed.values().flatten().map(|(_, r)| r).collect();
        let size = all.iter().map(|r| r.size).max().unwrap_or(0);
        let mtime = all.iter().filter_map(|r| r.mtime).max();
        self.txn(|t| {
            if let Some(mut inode) = load_inode_opt(t, ino)? {
                for (bn, p) in &images {
                    let new = p
                        .as_ref()
                        .map_or(NewBlock::Hole, |p| NewBlock::Prepared(p, None));
                    replace_block(t, ino, &mut inode.alloc, *bn, new)?;
                }
                inode.size = inode.size.max(size);
                if let Some(m) = mtime.filter(|m| *m > inode.mtime) {
                    inode.mtime = m;
                    inode.ctime = inode.ctime.max(m);
                }
                save_inode(t, ino, &inode)?;
            }
            for (k, _) in recs {
                t.delete(Cf::Meta, k)?;
            }
            Ok(())
        })?;
        Ok(applied)
    }
}

/// Each block's `j` mark: the log records below it are in the block.
type Marks = HashMap<(Ino, u64), u64>;

/// A log record at or above its block's `j` mark (below it, the block's committed content
/// holds its bytes already).
fn unapplied(covered: &Marks, r: &LogRecord) -> bool {
    covered.get(&(r.ino, r.bn)).is_none_or(|&m| r.seq >= m)
}

fn bad(key: &[u8], reason: &str) -> FsError {
    FsError::Corrupt {
        key: ks::describe_key(key),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FsOptions;
    use crate::kv::mem::MemEngine;
    use crate::kv::KvStore;

    /// An fsync of small overwrites leaves records and commits nothing; the next mount of the
    /// store (the first one gone without committing: a crash) applies them, and drops a damaged
    /// one beside them.
    #[test]
    fn the_next_mount_applies_records_and_drops_a_damaged_one() {
        let engine = MemEngine::new();
        let kv = || KvStore::with_engine(std::sync::Arc::new(engine.clone()));
        let format = crate::store::init(&kv(), &Default::default()).unwrap();
        let fs = Fs::new(kv(), format.clone(), FsOptions::default());
        assert!(fs.alone());
        let (attr, fh) = fs.create_test_file(b"f");
        let ino = attr.ino;
        let mut want = vec![7u8; 100_000];
        fs.write(fh, 0, &want).unwrap();
        fs.fsync(fh).unwrap();
        assert_eq!(fs.pending_records().unwrap(), 0, "new bytes are committed");
        fs.write(fh, 10, b"hello").unwrap();
        fs.write(fh, 70_000, b"world").unwrap();
        fs.write(fh, 100_000, b"!").unwrap();
        fs.fsync(fh).unwrap();
        assert_eq!(
            fs.pending_records().unwrap(),
            2,
            "one record per block changed"
        );
        let damaged = ks::pending_key(ino, 0, 1);
        fs.store()
            .transact(|t| t.put(Cf::Meta, &damaged, &[1, 0xff]))
            .unwrap();
        drop(fs);
        let fs = Fs::new(kv(), format, FsOptions::default());
        assert_eq!(fs.replay_pending().unwrap(), 2);
        assert_eq!(fs.pending_records().unwrap(), 0);
        want[10..15].copy_from_slice(b"hello");
        want[70_000..70_005].copy_from_slice(b"world");
        want.push(b'!');
        let fh = fs.open(ino, false).unwrap();
        assert!(fs.read(fh, 0, 200_000).unwrap() == want);
        assert_eq!(fs.getattr(ino).unwrap().size, 100_001);
    }
}
