//! File data: open/read/write/flush/fsync/release/truncate and the write-back buffer.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::attr::Attr;
use super::{
    charge, corrupt, errno, free_if_unused, load_inode, load_inode_opt, lock, save_inode, Fs,
    FsError, Result,
};
use crate::blocks;
use crate::keyspace::records::{decode_counter, encode_counter, FmapEntry, Kind};
use crate::keyspace::{self as ks, Hash, Ino};
use crate::kv::{Cf, Txn};
use crate::util::Timestamp;

pub struct FileState {
    ino: Ino,
    inner: Mutex<Inner>,
    /// Signalled when a flush running outside the mutex ends.
    settled: Condvar,
}

#[derive(Default)]
struct Inner {
    open: u32,
    /// Logical size, including buffered writes.
    size: u64,
    /// Size as last committed.
    committed_size: u64,
    /// Block number -> buffered image of the block.
    dirty: BTreeMap<u64, Slot>,
    dirty_bytes: u64,
    /// mtime of the newest buffered write.
    mtime: Option<Timestamp>,
    dirty_since: Option<Instant>,
    /// Where a sequential reader's next read would start.
    next_read: u64,
    /// Reads in a row that started near where the one before ended.
    seq_run: u32,
    /// First block not yet handed to the prefetcher in the current sequential run.
    ahead_from: u64,
    /// Flushes of this file running outside the mutex.
    inflight: u32,
    /// Source of slot generations.
    next_gen: u64,
}

/// How far ahead of a sequential reader blocks are prefetched.
const READAHEAD: u64 = 4 << 20;
/// How far a read may start from where the last one ended and still count as sequential
/// (the kernel's readahead requests arrive on several threads, a little out of order).
const SEQ_SLACK: u64 = 1 << 20;

/// One buffered block.
struct Slot {
    /// The block's content (shorter than the block size = zeros after). Shared with a flush
    /// in flight; a write copies it first if so.
    img: Arc<Vec<u8>>,
    /// Started empty (a whole-block write or past the committed end), not from committed data.
    fresh: bool,
    /// Bytes written into it since it was buffered (overlaps count twice).
    written: u64,
    /// Changes with every write into it: a flush commits it only if it is still what the
    /// flush hashed.
    gen: u64,
    /// Taken by a flush running outside the mutex (one at a time per slot).
    inflight: bool,
}

impl Slot {
    /// A fresh block not yet written whole: the tail of a file being appended to, or a block
    /// whose other part is still on its way (the kernel writes back 1 MiB runs on several
    /// threads at once, not in order, and not aligned to blocks). Committing it now would
    /// store a version that the rest of the write replaces at once.
    fn incomplete(&self, bs: u64) -> bool {
        self.fresh && self.written < bs
    }
}

/// Flushes of one file that may run outside its mutex at once; a writer that needs room
/// beyond that waits (the bound on buffered bytes).
const MAX_INFLIGHT: u32 = 2;

/// Slots a flush took: block number, generation, image.
type Taken = Vec<(u64, u64, Arc<Vec<u8>>)>;
/// Taken slots hashed and encoded (None: all zeros), by block number.
type Prepared = Vec<(u64, Option<blocks::Prepared>)>;

impl FileState {
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
    /// Open `ino`; returns the handle number. A writable mount counts the handle in the
    /// keyspace (`i ino \x01 mount-id`), so an unlink from anywhere keeps the inode alive.
    pub fn open(&self, ino: Ino, write: bool) -> Result<u64> {
        if write {
            self.writable()?;
        }
        let inode = self.txn(|t| {
            let inode = load_inode(t, ino)?;
            if inode.kind == Kind::Dir && write {
                return errno(libc::EISDIR);
            }
            self.count_open(t, ino)?;
            Ok(inode)
        })?;
        Ok(self.attach(ino, inode.size))
    }

    /// One more handle of this mount on `ino` in the keyspace (not on read-only mounts).
    pub(crate) fn count_open(&self, t: &mut dyn Txn, ino: Ino) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let key = ks::open_key(ino, self.mount_id);
        let n = match t.get(Cf::Meta, &key)? {
            Some(v) => decode_counter(&v).map_err(|e| corrupt(&key, e))?,
            None => {
                t.put(Cf::Meta, &ks::open_pseudo_key(ino), &[1])?;
                0
            }
        };
        Ok(t.put(Cf::Meta, &key, &encode_counter(n + 1))?)
    }

    /// A new handle on `ino` (of committed size `size`), sharing the inode's buffer.
    pub(crate) fn attach(&self, ino: Ino, size: u64) -> u64 {
        let state = {
            let mut files = lock(&self.files);
            let st = files
                .entry(ino)
                .or_insert_with(|| {
                    Arc::new(FileState {
                        ino,
                        inner: Mutex::new(Inner {
                            size,
                            committed_size: size,
                            ..Default::default()
                        }),
                        settled: Condvar::new(),
                    })
                })
                .clone();
            lock(&st.inner).open += 1;
            st
        };
        let mut h = lock(&self.handles);
        let fh = h.next;
        h.next += 1;
        h.files.insert(fh, state);
        fh
    }

    fn handle_state(&self, fh: u64) -> Result<Arc<FileState>> {
        lock(&self.handles)
            .files
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.handle_state(fh)?;
        let ino = st.ino;
        let mut s = lock(&st.inner);
        if offset >= s.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = s.size.min(offset + size as u64);
        let bs = self.bs;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut out = vec![0u8; (end - offset) as usize];
        // A sequential reader gets the blocks after this read prefetched. Two reads in a row
        // make a run: a random reader lands near its last read now and then (1 in 128 over
        // 256 MiB), and prefetching 4 MiB each time cost random 4 KiB reads a quarter.
        if offset.abs_diff(s.next_read) <= SEQ_SLACK {
            s.seq_run = s.seq_run.saturating_add(1);
        } else {
            s.seq_run = 0;
        }
        let sequential = s.seq_run >= 2;
        s.next_read = end;
        let ahead = if sequential {
            let from = (last + 1).max(s.ahead_from);
            let to = (last + READAHEAD / bs).min((s.size - 1) / bs);
            s.ahead_from = s.ahead_from.max(to + 1);
            from..to + 1
        } else {
            s.ahead_from = 0;
            0..0
        };
        // Committed blocks for the slots not held in the buffer; the window ahead only goes to
        // the prefetcher (scanned on its own: the blocks between were asked for already).
        let (atime_due, committed) = self.look(|t| {
            let inode = load_inode(t, ino)?;
            let (ks_, ke) = ks::fmap_range(ino, first, last + 1);
            let mut got = Vec::new();
            for (k, v) in t.scan(Cf::Fmap, &ks_, &ke, usize::MAX)? {
                let bn = ks::fmap_blockno(&k).unwrap_or(0);
                if s.dirty.contains_key(&bn) {
                    continue;
                }
                let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
                got.push((bn, blocks::read_cached(t, &self.cache, &ent.hash, ent.len)?));
            }
            if !ahead.is_empty() {
                let (ks_, ke) = ks::fmap_range(ino, ahead.start, ahead.end);
                for (k, v) in t.scan(Cf::Fmap, &ks_, &ke, usize::MAX)? {
                    let bn = ks::fmap_blockno(&k).unwrap_or(0);
                    if !s.dirty.contains_key(&bn) {
                        let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
                        self.prefetch.want(ent.hash, ent.len);
                    }
                }
            }
            Ok((!self.opts.noatime && relatime_due(&inode), got))
        })?;
        let place = |out: &mut [u8], bn: u64, data: &[u8]| {
            let bstart = bn * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + data.len() as u64);
            if to > from {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            }
        };
        for (bn, data) in &committed {
            place(&mut out, *bn, &data[..]);
        }
        for (bn, slot) in s.dirty.range(first..=last) {
            place(&mut out, *bn, &slot.img);
        }
        drop(s);
        if atime_due && !self.opts.read_only {
            // The data is read; a full disk or a conflict storm must not turn that into an
            // error because the access time could not be written.
            if let Err(e) = self.touch_atime(ino) {
                tracing::debug!(ino, error = %e, "atime not updated");
            }
        }
        Ok(out)
    }

    fn touch_atime(&self, ino: Ino) -> Result<()> {
        self.txn(|t| {
            if let Some(mut i) = load_inode_opt(t, ino)? {
                i.atime = Timestamp::now();
                save_inode(t, ino, &i)?;
            }
            Ok(())
        })
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.writable()?;
        self.space.check(data.len() as u64)?;
        let st = self.handle_state(fh)?;
        let ino = st.ino;
        let mut guard = lock(&st.inner);
        let s = &mut *guard;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let bs = self.bs;
        let mut pos = offset;
        while pos < end {
            let bn = pos / bs;
            let in_block = (pos % bs) as usize;
            let n = ((bs - in_block as u64).min(end - pos)) as usize;
            if !s.dirty.contains_key(&bn) {
                // Start from the committed content unless the write covers the whole slot or
                // the slot lies past the committed end of file.
                let fresh = (in_block == 0 && n as u64 == bs) || bn * bs >= s.committed_size;
                let img = if fresh {
                    Vec::new()
                } else {
                    self.committed_block(ino, bn)?
                };
                s.dirty_bytes += bs;
                self.dirty_total.fetch_add(bs, Ordering::Relaxed);
                let slot = Slot {
                    img: Arc::new(img),
                    fresh,
                    written: 0,
                    gen: 0,
                    inflight: false,
                };
                s.dirty.insert(bn, slot);
            }
            let slot = s.dirty.get_mut(&bn).ok_or(FsError::Errno(libc::EIO))?;
            let img = Arc::make_mut(&mut slot.img);
            if img.len() < in_block + n {
                img.resize(in_block + n, 0);
            }
            let src = (pos - offset) as usize;
            img[in_block..in_block + n].copy_from_slice(&data[src..src + n]);
            slot.written += n as u64;
            s.next_gen += 1;
            slot.gen = s.next_gen;
            pos += n as u64;
        }
        s.size = s.size.max(end);
        s.mtime = Some(Timestamp::now());
        s.dirty_since.get_or_insert_with(Instant::now);
        if self.over_limit(s) {
            self.make_room(&st, guard)?;
        }
        Ok(data.len() as u32)
    }

    fn over_limit(&self, s: &Inner) -> bool {
        s.dirty_bytes >= self.file_limit
            || self.dirty_total.load(Ordering::Relaxed) >= self.total_limit
    }

    fn committed_block(&self, ino: Ino, bn: u64) -> Result<Vec<u8>> {
        self.look(|t| {
            let key = ks::fmap_key(ino, bn);
            match t.get_untracked(Cf::Fmap, &key)? {
                None => Ok(Vec::new()),
                Some(v) => {
                    let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?;
                    Ok(blocks::read_cached(t, &self.cache, &ent.hash, ent.len)?.to_vec())
                }
            }
        })
    }

    /// Commit everything buffered for the file, after any flush in flight: a flush of the same
    /// blocks committed out of order could put older data over newer. Returns the guard.
    fn flush_locked<'a>(
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
        s.inflight += 1;
        drop(s);
        let prepared = self.prepare(&taken);
        let mut s = lock(&st.inner);
        let r = prepared.and_then(|(p, ahead)| self.commit(st.ino, &mut s, &taken, p, ahead));
        for (bn, _, _) in &taken {
            if let Some(x) = s.dirty.get_mut(bn) {
                x.inflight = false;
            }
        }
        s.inflight -= 1;
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
        let mut named: Vec<Hash> = Vec::new();
        let res = self.txn(|t| {
            named.clear();
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
                replace_block(t, ino, &mut inode.alloc, *bn, p.as_ref(), token)?;
            }
            inode.size = size;
            if let Some(m) = mtime {
                inode.mtime = m;
                inode.ctime = m;
            }
            save_inode(t, ino, &inode)
        });
        if let Some(a) = &ahead {
            self.settle_written_ahead(a, if res.is_ok() { &named[..] } else { &[] });
        }
        res?;
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

    /// After a flush that wrote blocks ahead: forget the `W` keys of those its commit named;
    /// drop the values of the others unless something else names them. Best effort: what
    /// fails here the next mount recovers.
    fn settle_written_ahead(&self, ahead: &blocks::Ahead, named: &[Hash]) {
        let unused: Vec<Hash> = ahead
            .hashes
            .iter()
            .filter(|h| !named.contains(h))
            .copied()
            .collect();
        let r = blocks::forget_written_ahead(&self.store, named).and_then(|_| {
            blocks::drop_written_ahead(&self.store, &unused, ahead.token).map(|_| ())
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, blocks = ahead.hashes.len(),
                "written-ahead blocks not settled; the next mount recovers them");
        }
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

    /// fsync/fdatasync: commit and make durable.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        self.flush(fh)?;
        Ok(self.store.sync()?)
    }

    /// Make every committed change durable (fsyncdir, syncfs).
    pub fn sync_all(&self) -> Result<()> {
        self.flush_all()?;
        Ok(self.store.sync()?)
    }

    /// Flush every file; with `older_than`, only files dirty for at least that long.
    pub fn flush_older(&self, older_than: Duration) -> Result<()> {
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

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(st) = lock(&self.handles).files.remove(&fh) else {
            return errno(libc::EBADF);
        };
        let ino = st.ino;
        let unlocked = self.unlock_handle(ino, fh);
        let _ns = lock(&self.ns_lock);
        let flushed = {
            let (mut s, r) = self.flush_locked(&st, lock(&st.inner));
            s.open -= 1;
            r
        };
        // The count goes down, and the last close anywhere of an unlinked file frees it.
        if !self.opts.read_only {
            self.txn(|t| {
                let key = ks::open_key(ino, self.mount_id);
                let n = match t.get(Cf::Meta, &key)? {
                    Some(v) => decode_counter(&v).map_err(|e| corrupt(&key, e))?,
                    None => 0,
                };
                if n > 1 {
                    t.put(Cf::Meta, &key, &encode_counter(n - 1))?;
                } else {
                    t.delete(Cf::Meta, &key)?;
                    t.put(Cf::Meta, &ks::open_pseudo_key(ino), &[1])?;
                }
                free_if_unused(t, ino).map(|_| ())
            })?;
        }
        let mut files = lock(&self.files);
        let last = {
            let s = lock(&st.inner);
            s.open == 0 && s.dirty_since.is_none()
        };
        if last {
            files.remove(&ino);
        }
        flushed.and(unlocked)
    }

    /// Set the size of `ino`: cut blocks past it (zeroing the tail of the last one) or extend
    /// with a hole.
    pub fn truncate(&self, ino: Ino, size: u64) -> Result<()> {
        self.writable()?;
        if size > i64::MAX as u64 {
            return errno(libc::EFBIG);
        }
        let st = self.file_state(ino);
        let mut guard = match &st {
            Some(f) => {
                let (g, r) = self.flush_locked(f, lock(&f.inner));
                r?;
                Some(g)
            }
            None => None,
        };
        let bs = self.bs;
        self.txn(|t| {
            let mut inode = load_inode(t, ino)?;
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return errno(libc::EISDIR),
                _ => return errno(libc::EINVAL),
            }
            if size < inode.size {
                let keep = size.div_ceil(bs);
                let (s, e) = ks::fmap_range(ino, keep, u64::MAX);
                for (k, v) in t.scan(Cf::Fmap, &s, &e, usize::MAX)? {
                    let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
                    t.get(Cf::Fmap, &k)?;
                    blocks::drop_ref(t, &ent.hash)?;
                    inode.alloc = inode.alloc.saturating_sub(charge(ent.len));
                    t.delete(Cf::Fmap, &k)?;
                }
                let tail = (size % bs) as usize;
                if tail != 0 {
                    let bn = size / bs;
                    let key = ks::fmap_key(ino, bn);
                    if let Some(v) = t.get(Cf::Fmap, &key)? {
                        let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?;
                        if ent.len as usize > tail {
                            let mut data = blocks::read(t, &ent.hash, ent.len)?;
                            data.truncate(tail);
                            let p = blocks::prepare(&data, &self.codec);
                            replace_block(t, ino, &mut inode.alloc, bn, p.as_ref(), None)?;
                        }
                    }
                }
            }
            let now = Timestamp::now();
            inode.size = size;
            inode.mtime = now;
            inode.ctime = now;
            save_inode(t, ino, &inode)
        })?;
        if let Some(s) = guard.as_deref_mut() {
            s.size = size;
            s.committed_size = size;
        }
        Ok(())
    }
}

/// Point block `bn` of `ino` at `new` (None: a hole), moving references and the st_blocks
/// charge. `ahead`: the token [`blocks::write_ahead`] stored `new`'s value with, if it did.
fn replace_block(
    t: &mut dyn Txn,
    ino: Ino,
    alloc: &mut u64,
    bn: u64,
    new: Option<&blocks::Prepared>,
    ahead: Option<u64>,
) -> Result<()> {
    let key = ks::fmap_key(ino, bn);
    let old = match t.get(Cf::Fmap, &key)? {
        Some(v) => Some(FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?),
        None => None,
    };
    if let (Some(o), Some(n)) = (&old, new) {
        if o.hash == n.hash {
            return Ok(());
        }
    }
    if let Some(o) = old {
        blocks::drop_ref(t, &o.hash)?;
        *alloc = alloc.saturating_sub(charge(o.len));
    }
    match new {
        Some(n) => {
            blocks::add_ref(t, n, ahead)?;
            let ent = FmapEntry {
                hash: n.hash,
                len: n.len,
            };
            t.put(Cf::Fmap, &key, &ent.encode())?;
            *alloc += charge(ent.len);
        }
        None => {
            if old.is_some() {
                t.delete(Cf::Fmap, &key)?;
            }
        }
    }
    Ok(())
}

/// relatime: update atime when it is not newer than mtime/ctime, or is a day old.
fn relatime_due(i: &crate::keyspace::records::Inode) -> bool {
    let now = Timestamp::now();
    i.atime <= i.mtime || i.atime <= i.ctime || now.secs - i.atime.secs >= 24 * 3600
}
