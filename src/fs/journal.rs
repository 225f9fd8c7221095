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

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::buffer::{replace_block, FileState, NewBlock};
use super::{corrupt, load_inode_opt, lock, save_inode, Fs, FsError, Result};
use crate::blocks;
use crate::keyspace::records::PendingWrite;
use crate::keyspace::{self as ks, Ino, Prefix};
use crate::kv::{Cf, Pair};

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
        let r = self.txn(|t| {
            for (bn, seq, v) in &recs {
                t.put(Cf::Meta, &ks::pending_key(st.ino, *bn, *seq), v)?;
            }
            Ok(())
        });
        for (bn, seq, v) in recs {
            let bytes = if r.is_ok() { v.len() as u64 } else { 0 };
            if let Some(x) = s.dirty.get_mut(&bn) {
                x.recorded(seq, bytes, r.is_ok());
            }
            s.pending_bytes += bytes;
        }
        r
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
        let (a, b) = Prefix::Pending.range();
        let all = self.look(|t| Ok(t.scan(Cf::Meta, &a, &b, usize::MAX)?))?;
        let mut by_ino: BTreeMap<Ino, Vec<Pair>> = BTreeMap::new();
        for (k, v) in all {
            // The range holds only `J` keys: a key of another length names no inode.
            let ino = ks::parse_pending_key(&k).map_or(0, |(ino, _, _)| ino);
            by_ino.entry(ino).or_default().push((k, v));
        }
        let (files, mut applied) = (by_ino.len(), 0);
        for (ino, recs) in by_ino {
            applied += self.replay_file(ino, &recs)?;
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

    /// [`Fs::replay_pending`] for one file: its records in key order (block, then seq).
    fn replay_file(&self, ino: Ino, recs: &[Pair]) -> Result<usize> {
        let bs = self.bs;
        let mut parsed: BTreeMap<u64, Vec<PendingWrite>> = BTreeMap::new();
        for (k, v) in recs {
            let r = match ks::parse_pending_key(k) {
                None => Err(bad(k, "not a pending-write key")),
                Some((_, bn, _)) => match PendingWrite::decode(v) {
                    Err(e) => Err(corrupt(k, e)),
                    Ok(r) if r.offset as u64 + r.data.len() as u64 > bs => {
                        Err(bad(k, "its bytes run past the block"))
                    }
                    Ok(r) => Ok((bn, r)),
                },
            };
            match r {
                Ok((bn, r)) => parsed.entry(bn).or_default().push(r),
                Err(e) => tracing::error!(error = %e, "a pending write is damaged; dropped"),
            }
        }
        let applied = parsed.values().map(Vec::len).sum();
        // The blocks as committed, read before the transaction (a read may fetch).
        let mut images = Vec::new();
        for (bn, rs) in &parsed {
            let mut img = self.committed_block(ino, *bn)?;
            for r in rs {
                let (lo, hi) = (r.offset as usize, r.offset as usize + r.data.len());
                if img.len() < hi {
                    img.resize(hi, 0);
                }
                img[lo..hi].copy_from_slice(&r.data);
            }
            images.push((*bn, blocks::prepare(&img, &self.codec)));
        }
        let all: Vec<&PendingWrite> = parsed.values().flatten().collect();
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
