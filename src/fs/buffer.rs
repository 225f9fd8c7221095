//! The write-back buffer of open files: slots of whole-block images, making room, flushing
//! and committing.
//!
//! Each open inode has one [`FileState`] shared by all its handles. Writes patch whole-block
//! images held in memory; a flush hashes the dirty images outside any transaction, then commits
//! all of them, the new size and mtime in one transaction. The state's mutex is held across a
//! flush, so readers never see a moment where data is neither buffered nor committed.
//! A flush happens on flush/fsync/release, from the timer thread, and in the write path when a
//! file holds more than its share of buffered bytes.
//!
//! The write path's flush (making room) is the exception to holding the mutex: it marks the
//! blocks it takes as in flight, and hashes them and writes their values ahead
//! ([`blocks::write_ahead`]) with the mutex released, so other writes to the file go on
//! meanwhile; it commits under the mutex only the blocks no write changed since (each write
//! bumps a slot's generation). In-flight blocks stay in the buffer, so readers still see them;
//! the other flushes wait until no flush of the file is in flight.
//!
//! A write into part of a block not buffered yet needs the committed block: it is read with
//! the mutex released (a read may be a fetch from a replica one day), and used only if no
//! commit or truncate of the file happened meanwhile (the state's `epoch`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::attr::Attr;
use super::{charge, corrupt, load_inode_opt, lock, save_inode, Fs, FsError, Result};
use crate::blocks;
use crate::keyspace::records::FmapEntry;
use crate::keyspace::{self as ks, Hash, Ino};
use crate::kv::{Cf, Txn};
use crate::util::Timestamp;

pub struct FileState {
    pub(super) ino: Ino,
    pub(super) inner: Mutex<Inner>,
    /// Signalled when a flush running outside the mutex ends.
    pub(super) settled: Condvar,
}

#[derive(Default)]
pub(super) struct Inner {
    /// This mount's handles on the file.
    pub(super) open: u32,
    /// Of `open`, the handles the mount's open count in the keyspace (`i ino 01 mount`)
    /// stands for. A mount that alone changes its store keeps its handles in memory and
    /// writes them there only when the file loses its last name while open
    /// ([`super::Fs::count_handles`]); elsewhere every handle is counted.
    pub(super) counted: u32,
    /// Logical size, including buffered writes.
    pub(super) size: u64,
    /// Size as last committed.
    pub(super) committed_size: u64,
    /// Block number -> buffered image of the block.
    pub(super) dirty: BTreeMap<u64, Slot>,
    pub(super) dirty_bytes: u64,
    /// mtime of the newest buffered write.
    pub(super) mtime: Option<Timestamp>,
    pub(super) dirty_since: Option<Instant>,
    /// Where a sequential reader's next read would start.
    pub(super) next_read: u64,
    /// Reads in a row that started near where the one before ended.
    pub(super) seq_run: u32,
    /// First block not yet handed to the prefetcher in the current sequential run.
    pub(super) ahead_from: u64,
    /// Flushes of this file running outside the mutex, and the bytes of the slots they took
    /// (still counted in `dirty_bytes` until committed).
    pub(super) inflight: u32,
    pub(super) inflight_bytes: u64,
    /// Source of slot generations.
    pub(super) next_gen: u64,
    /// Bumped by every commit and truncate: what was read of the committed blocks with the
    /// mutex released is current only if this did not move meanwhile.
    pub(super) epoch: u64,
    /// Committed blocks read for the write under way (see `lock_with_committed`).
    pub(super) fetched: HashMap<u64, Vec<u8>>,
    /// Bytes of the file's pending records (`J` keys: see the `journal` module).
    pub(super) pending_bytes: u64,
}

impl Inner {
    /// One handle fewer. Counted handles go last, so the keyspace's count never falls below
    /// what this mount must keep alive: returns whether one of them went (the caller then
    /// takes one from the keyspace's count).
    pub(super) fn drop_handle(&mut self) -> bool {
        self.open = self.open.saturating_sub(1);
        let uncount = self.counted > self.open;
        if uncount {
            self.counted -= 1;
        }
        uncount
    }

    /// No handle left and nothing buffered: the state may go from the mount's map.
    pub(super) fn unused(&self) -> bool {
        self.open == 0 && self.dirty_since.is_none()
    }
}

/// One buffered block.
pub(super) struct Slot {
    /// The block's content (shorter than the block size = zeros after). Shared with a flush
    /// in flight and with readers; a write copies it first if so.
    pub(super) img: Arc<Vec<u8>>,
    /// Started empty (a whole-block write or past the committed end), not from committed data.
    fresh: bool,
    /// Bytes written into it since it was buffered (overlaps count twice).
    written: u64,
    /// Changes with every write into it: a flush commits it only if it is still what the
    /// flush hashed.
    gen: u64,
    /// Taken by a flush running outside the mutex (one at a time per slot).
    inflight: bool,
    /// The part of the image written since its last pending record (empty: `lo >= hi`).
    lo: usize,
    hi: usize,
    /// Its pending records: sequence number, bytes, and whether in the fsync log (else a
    /// `J` key).
    records: Vec<(u64, u64, bool)>,
}

impl Slot {
    /// A fresh block not yet written whole: the tail of a file being appended to, or a block
    /// whose other part is still on its way (the kernel writes back 1 MiB runs on several
    /// threads at once, not in order, and not aligned to blocks). Committing it now would
    /// store a version that the rest of the write replaces at once.
    fn incomplete(&self, bs: u64) -> bool {
        self.fresh && self.written < bs
    }

    /// Bytes written since the last pending record.
    pub(super) fn unrecorded(&self) -> usize {
        self.hi.min(self.img.len()).saturating_sub(self.lo)
    }

    /// Where they start in the block, and the image's bytes there.
    pub(super) fn unrecorded_bytes(&self) -> Option<(usize, &[u8])> {
        let hi = self.hi.min(self.img.len());
        (self.lo < hi).then(|| (self.lo, &self.img[self.lo..hi]))
    }

    /// A pending record was written (`done`: it now holds those bytes) or may have been.
    pub(super) fn recorded(&mut self, seq: u64, bytes: u64, done: bool, logged: bool) {
        self.records.push((seq, bytes, logged));
        if done {
            self.lo = usize::MAX;
            self.hi = 0;
        }
    }
}

/// Flushes of one file that may run outside its mutex at once; a writer that needs room
/// beyond that waits (the bound on buffered bytes). Three, not two: while two flights wait
/// on the store (its one flush thread writes and syncs each in turn), a third is hashed and
/// encoded instead of waiting (1 GiB sequential write, 5 rounds interleaved on fresh stores:
/// 161-196 -> 175-213 MB/s; 8 MiB more buffered per file being written).
const MAX_INFLIGHT: u32 = 3;

/// A close commits the file's buffered writes when they reach this many bytes; less waits
/// for the release (see `Fs::flush_on_close`).
const CLOSE_COMMIT_MIN: u64 = 1 << 20;

/// Slots a flush took: block number, generation, image.
type Taken = Vec<(u64, u64, Arc<Vec<u8>>)>;
/// Taken slots hashed and encoded (None: all zeros), by block number.
type Prepared = Vec<(u64, Option<blocks::Prepared>)>;

impl FileState {
    pub(super) fn new(ino: Ino, size: u64) -> FileState {
        FileState {
            ino,
            inner: Mutex::new(Inner {
                size,
                committed_size: size,
                ..Default::default()
            }),
            settled: Condvar::new(),
        }
    }

    pub(crate) fn open_count(&self) -> u32 {
        lock(&self.inner).open
    }

    pub(crate) fn overlay(&self, a: &mut Attr) {
        let s = lock(&self.inner);
        if s.dirty_since.is_some() {
            a.size = s.size;
            if let Some(m) = s.mtime {
                a.mtime = m;
                a.ctime = m;
            }
        }
    }
}

impl Fs {
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.writable()?;
        self.space.check(data.len() as u64)?;
        let st = self.handle_state(fh)?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let bs = self.bs;
        let mut guard = self.lock_with_committed(&st, offset, end)?;
        let s = &mut *guard;
        let mut pos = offset;
        while pos < end {
            let bn = pos / bs;
            let in_block = (pos % bs) as usize;
            let n = ((bs - in_block as u64).min(end - pos)) as usize;
            if !s.dirty.contains_key(&bn) {
                let fresh = starts_fresh(s, bn, pos, n as u64, bs);
                let img = if fresh {
                    Vec::new()
                } else {
                    s.fetched.remove(&bn).ok_or(FsError::Errno(libc::EIO))?
                };
                s.dirty_bytes += bs;
                self.dirty_total.fetch_add(bs, Ordering::Relaxed);
                let slot = Slot {
                    img: Arc::new(img),
                    fresh,
                    written: 0,
                    gen: 0,
                    inflight: false,
                    lo: usize::MAX,
                    hi: 0,
                    records: Vec::new(),
                };
                s.dirty.insert(bn, slot);
            }
            let slot = s.dirty.get_mut(&bn).ok_or(FsError::Errno(libc::EIO))?;
            let img = Arc::make_mut(&mut slot.img);
            let src = &data[(pos - offset) as usize..][..n];
            if img.len() == in_block {
                // Appending (a fresh block written in order): no zeroing before the copy.
                img.extend_from_slice(src);
            } else {
                if img.len() < in_block + n {
                    img.resize(in_block + n, 0);
                }
                img[in_block..in_block + n].copy_from_slice(src);
            }
            slot.written += n as u64;
            slot.lo = slot.lo.min(in_block);
            slot.hi = slot.hi.max(in_block + n);
            s.next_gen += 1;
            slot.gen = s.next_gen;
            pos += n as u64;
        }
        s.fetched.clear();
        s.size = s.size.max(end);
        if !self.kernel_times.load(Ordering::Relaxed) {
            s.mtime = Some(Timestamp::now());
        }
        s.dirty_since.get_or_insert_with(Instant::now);
        if self.over_limit(s) {
            self.make_room(&st, guard)?;
        }
        Ok(data.len() as u32)
    }

    /// The state's mutex, with the committed content of every block of `[offset, end)` that
    /// a write there must start from (not buffered, not wholly overwritten, not past the
    /// committed end) in `fetched`. Those blocks are read with the mutex released; what was
    /// read is kept only if no commit or truncate moved the epoch meanwhile.
    fn lock_with_committed<'a>(
        &self,
        st: &'a FileState,
        offset: u64,
        end: u64,
    ) -> Result<MutexGuard<'a, Inner>> {
        let bs = self.bs;
        let mut have: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut have_epoch = None;
        loop {
            let mut s = lock(&st.inner);
            if have_epoch != Some(s.epoch) {
                have.clear();
            }
            let mut need = Vec::new();
            let mut pos = offset;
            while pos < end {
                let bn = pos / bs;
                let n = (bs - pos % bs).min(end - pos);
                if !s.dirty.contains_key(&bn)
                    && !starts_fresh(&s, bn, pos, n, bs)
                    && !have.contains_key(&bn)
                {
                    need.push(bn);
                }
                pos += n;
            }
            if need.is_empty() {
                s.fetched = have;
                return Ok(s);
            }
            have_epoch = Some(s.epoch);
            drop(s);
            for bn in need {
                have.insert(bn, self.committed_block(st.ino, bn)?);
            }
        }
    }

    fn over_limit(&self, s: &Inner) -> bool {
        // Slots already in flight do not count: a write arriving while 8 MiB were in flight
        // found the file over its limit and flushed its own 1 MiB, too little to be written
        // ahead, so most of a sequential write's blocks went through the WAL too (1.8x the
        // data written to disk).
        s.dirty_bytes.saturating_sub(s.inflight_bytes) >= self.file_limit
            || self.dirty_total.load(Ordering::Relaxed) >= self.total_limit
    }

    /// Commit everything buffered for the file, after any flush in flight: a flush of the same
    /// blocks committed out of order could put older data over newer. Returns the guard.
    pub(super) fn flush_locked<'a>(
        &self,
        st: &'a FileState,
        mut s: MutexGuard<'a, Inner>,
    ) -> (MutexGuard<'a, Inner>, Result<()>) {
        while s.inflight > 0 {
            s = st.settled.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.dirty_since.is_none() {
            return (s, Ok(()));
        }
        let taken: Taken = s
            .dirty
            .iter()
            .map(|(bn, x)| (*bn, x.gen, x.img.clone()))
            .collect();
        let r = self
            .prepare(&taken)
            .and_then(|(p, ahead)| self.commit(st.ino, &mut s, &taken, p, ahead));
        (s, r)
    }

    /// Make room in the write path: flush the complete blocks (incomplete ones too if they
    /// hold more than half the file's share) with the mutex released while they are hashed
    /// and written ahead; commit those no write changed meanwhile.
    fn make_room<'a>(&self, st: &'a FileState, mut s: MutexGuard<'a, Inner>) -> Result<()> {
        while s.inflight >= MAX_INFLIGHT {
            s = st.settled.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if !self.over_limit(&s) {
            return Ok(());
        }
        let bs = self.bs;
        let held = s
            .dirty
            .values()
            .filter(|x| !x.inflight && x.incomplete(bs))
            .count() as u64
            * bs;
        let keep = held <= self.file_limit / 2;
        let taken: Taken = s
            .dirty
            .iter_mut()
            .filter(|(_, x)| !(x.inflight || keep && x.incomplete(bs)))
            .map(|(bn, x)| {
                x.inflight = true;
                (*bn, x.gen, x.img.clone())
            })
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        let flight_bytes = taken.len() as u64 * bs;
        s.inflight += 1;
        s.inflight_bytes += flight_bytes;
        drop(s);
        // Over the cache size while replicas take what was written: go at their pace.
        self.wait_for_room();
        let prepared = self.prepare(&taken);
        let mut s = lock(&st.inner);
        let r = prepared.and_then(|(p, ahead)| self.commit(st.ino, &mut s, &taken, p, ahead));
        for (bn, _, _) in &taken {
            if let Some(x) = s.dirty.get_mut(bn) {
                x.inflight = false;
            }
        }
        s.inflight -= 1;
        s.inflight_bytes -= flight_bytes;
        st.settled.notify_all();
        r
    }

    /// Hash and encode taken slots (on all cores) and write the new blocks' values ahead when
    /// there are enough of them. No lock needed.
    fn prepare(&self, taken: &Taken) -> Result<(Prepared, Option<blocks::Ahead>)> {
        let slots: Vec<(u64, &[u8])> = taken.iter().map(|(bn, _, img)| (*bn, &img[..])).collect();
        let prepared = blocks::prepare_all(&slots, &self.codec);
        if prepared.len() != slots.len() {
            // A hashing thread died (a bug): keep the data buffered, report EIO.
            return Err(FsError::Kv(crate::kv::KvError::Other(
                "block preparation failed".into(),
            )));
        }
        let new: Vec<&blocks::Prepared> = prepared.iter().filter_map(|(_, p)| p.as_ref()).collect();
        let ahead = blocks::write_ahead(&self.store, &new)?;
        Ok((prepared, ahead))
    }

    /// Commit the prepared blocks whose slots still hold what was taken, with the size and
    /// mtime, in one transaction; then drop them from the buffer and settle what was written
    /// ahead. On error the data stays buffered: a later flush may succeed (ENOSPC cleared).
    fn commit(
        &self,
        ino: Ino,
        s: &mut Inner,
        taken: &Taken,
        prepared: Prepared,
        ahead: Option<blocks::Ahead>,
    ) -> Result<()> {
        let bs = self.bs;
        let gens: HashMap<u64, u64> = taken.iter().map(|(bn, g, _)| (*bn, *g)).collect();
        let current: Vec<&(u64, Option<blocks::Prepared>)> = prepared
            .iter()
            .filter(|(bn, _)| s.dirty.get(bn).map(|x| x.gen) == gens.get(bn).copied())
            .collect();
        let size = s.size;
        let mtime = s.mtime;
        // The pending records of these blocks go with the commit that holds their bytes: a
        // `J` key is deleted, a block with records in the fsync log gets its `j` mark.
        let (mut settled, mut settled_bytes, mut marks, mut logged) =
            (Vec::new(), 0, Vec::new(), 0);
        for (bn, _) in &current {
            let recs = s.dirty.get(bn).map_or(&[][..], |x| &x.records[..]);
            for (seq, bytes, in_log) in recs {
                if *in_log {
                    logged += 1;
                } else {
                    settled.push(ks::pending_key(ino, *bn, *seq));
                }
                settled_bytes += bytes;
            }
            if recs.iter().any(|r| r.2) {
                marks.push(ks::covered_key(ino, *bn));
            }
        }
        let mut named: Vec<Hash> = Vec::new();
        let res = self.txn(|t| {
            named.clear();
            for k in &settled {
                t.delete(Cf::Meta, k)?;
            }
            // Every record of these blocks was numbered before this (under the mutex).
            let below = self.pending_seq.load(Ordering::SeqCst).to_be_bytes();
            for k in &marks {
                t.put(Cf::Meta, k, &below)?;
            }
            let Some(mut inode) = load_inode_opt(t, ino)? else {
                // Freed under us (cannot happen while open); drop the data.
                return Ok(());
            };
            for (bn, p) in &current {
                if *bn * bs >= size {
                    continue;
                }
                let token = p
                    .as_ref()
                    .and_then(|p| blocks::Ahead::token_for(ahead.as_ref(), &p.hash));
                if let (Some(_), Some(p)) = (token, p) {
                    named.push(p.hash);
                }
                let new = p
                    .as_ref()
                    .map_or(NewBlock::Hole, |p| NewBlock::Prepared(p, token));
                replace_block(t, ino, &mut inode.alloc, *bn, new)?;
            }
            inode.size = size;
            if let Some(m) = mtime {
                inode.mtime = m;
                inode.ctime = m;
            }
            save_inode(t, ino, &inode)
        });
        if let Some(a) = &ahead {
            blocks::settle_flush(&self.store, a, if res.is_ok() { &named[..] } else { &[] });
        }
        res?;
        if logged > 0 {
            // In this order: a restart of the log that saw the count fall saw this too.
            self.log.settled.fetch_add(1, Ordering::SeqCst);
            self.log.held.fetch_sub(logged, Ordering::SeqCst);
        }
        if let Some(t) = self.tier() {
            if t.writing.tracks(ino) {
                let named: Vec<_> = current
                    .iter()
                    .filter_map(|(_, p)| p.as_ref().map(|p| (p.hash, p.len)))
                    .collect();
                t.writing.wrote(ino, &named);
            }
            // At most this much is new here (less where blocks were stored already).
            let bytes = current
                .iter()
                .filter_map(|(_, p)| p.as_ref())
                .map(|p| p.encoded.value.len() as u64)
                .sum();
            t.gate.added(bytes);
        }
        s.epoch += 1;
        s.pending_bytes -= settled_bytes;
        let done = current.len() as u64 * bs;
        self.dirty_total.fetch_sub(done, Ordering::Relaxed);
        s.dirty_bytes -= done;
        for (bn, _) in &current {
            s.dirty.remove(bn);
        }
        s.committed_size = size;
        if s.dirty.is_empty() {
            s.mtime = None;
            s.dirty_since = None;
        }
        Ok(())
    }

    /// Commit buffered writes of `ino`, if it has any.
    pub fn flush_ino(&self, ino: Ino) -> Result<()> {
        if let Some(st) = self.file_state(ino) {
            let (_s, r) = self.flush_locked(&st, lock(&st.inner));
            r?;
        }
        Ok(())
    }

    pub fn flush(&self, fh: u64) -> Result<()> {
        let st = self.handle_state(fh)?;
        let (_s, r) = self.flush_locked(&st, lock(&st.inner));
        r
    }

    /// A close (the kernel's FLUSH): commit what is buffered, except a little, which the
    /// handle's release commits (the kernel sends it without the closing process waiting),
    /// or the timer. `tar x`, `cp -r` and package managers close every small file they write
    /// and waited for its commit each time.
    pub fn flush_on_close(&self, fh: u64) -> Result<()> {
        let st = self.handle_state(fh)?;
        let s = lock(&st.inner);
        if s.dirty_bytes < CLOSE_COMMIT_MIN {
            return Ok(());
        }
        let (_s, r) = self.flush_locked(&st, s);
        r
    }

    /// fsync/fdatasync: commit (or record, see the `journal` module) and make durable.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let st = self.handle_state(fh)?;
        self.make_durable(&st)?;
        self.sync_then_restart_log(false)
    }

    /// Make every committed change durable (fsyncdir).
    pub fn sync_store(&self) -> Result<()> {
        Ok(self.store.sync()?)
    }

    /// Commit every buffered write and make it durable (syncfs, unmount).
    pub fn sync_all(&self) -> Result<()> {
        self.flush_all()?;
        self.sync_then_restart_log(true)
    }

    /// Flush every file; with `older_than`, only files dirty for at least that long. The
    /// access times reads set go too.
    pub fn flush_older(&self, older_than: Duration) -> Result<()> {
        self.write_atimes();
        let states: Vec<_> = lock(&self.files).values().cloned().collect();
        let mut first_err = None;
        for st in states {
            let s = lock(&st.inner);
            if s.dirty_since.is_some_and(|d| d.elapsed() >= older_than) {
                if let Err(e) = self.flush_locked(&st, s).1 {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    pub fn flush_all(&self) -> Result<()> {
        self.flush_older(Duration::ZERO)
    }
}

/// What a block-map slot is to hold.
pub(super) enum NewBlock<'a> {
    Hole,
    /// A block prepared by this flush: stored if new (`ahead`: the token
    /// [`blocks::write_ahead`] stored its value with, if it did).
    Prepared(&'a blocks::Prepared, Option<u64>),
    /// A block another map names already (a copy sharing it): one more reference.
    Shared(FmapEntry),
}

/// Point block `bn` of `ino` at `new`, moving references and the st_blocks charge.
pub(super) fn replace_block(
    t: &mut dyn Txn,
    ino: Ino,
    alloc: &mut u64,
    bn: u64,
    new: NewBlock,
) -> Result<()> {
    let key = ks::fmap_key(ino, bn);
    let old = match t.get(Cf::Fmap, &key)? {
        Some(v) => Some(FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?),
        None => None,
    };
    let ent = match new {
        NewBlock::Hole => None,
        NewBlock::Prepared(p, _) => Some(FmapEntry {
            hash: p.hash,
            len: p.len,
        }),
        NewBlock::Shared(e) => Some(e),
    };
    if let (Some(o), Some(n)) = (&old, &ent) {
        if o.hash == n.hash {
            return Ok(());
        }
    }
    if let Some(o) = &old {
        blocks::drop_ref(t, &o.hash)?;
        *alloc = alloc.saturating_sub(charge(o.len));
    }
    match new {
        NewBlock::Prepared(p, ahead) => blocks::add_ref(t, p, ahead)?,
        NewBlock::Shared(e) => blocks::add_copy_ref(t, &e.hash)?,
        NewBlock::Hole => {}
    }
    match ent {
        Some(e) => {
            t.put(Cf::Fmap, &key, &e.encode()?)?;
            *alloc += charge(e.len);
        }
        None if old.is_some() => t.delete(Cf::Fmap, &key)?,
        None => {}
    }
    Ok(())
}

/// Whether a write of `n` bytes at `pos` into block `bn` starts from an empty image: it covers
/// the whole block, or the block lies past the committed end of file.
fn starts_fresh(s: &Inner, bn: u64, pos: u64, n: u64, bs: u64) -> bool {
    (pos % bs == 0 && n == bs) || bn * bs >= s.committed_size
}
