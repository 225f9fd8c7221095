//! File operations: open, read, release, truncate, and readahead detection. Buffered
//! writes, flushes and commits are [`super::buffer`]'s.
//!
//! No block content is read with a file's mutex held or inside a transaction: an operation
//! reads the block map (under the mutex where it must agree with the buffer), lets go, gets
//! the content through the [`blocks::reader::BlockReader`], and rechecks what it decided on
//! where a change meanwhile would matter (a block freed under a reader, a tail block cut by
//! truncate).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::buffer::{replace_block, NewBlock};
use super::{
    charge, corrupt, errno, free_if_unused, load_inode, load_inode_opt, lock, save_inode, Atime,
    AtimeMode, Fs, FsError, Result,
};
use crate::blocks::{self, BlockError};
use crate::keyspace::records::{decode_counter, encode_counter, FmapEntry, Kind};
use crate::keyspace::{self as ks, Ino};
use crate::kv::{Cf, Txn};
use crate::util::Timestamp;

pub use super::buffer::FileState;

/// How far ahead of a sequential reader blocks are prefetched.
const READAHEAD: u64 = 4 << 20;
/// How far a read may start from where the last one ended and still count as sequential
/// (the kernel's readahead requests arrive on several threads, a little out of order).
const SEQ_SLACK: u64 = 1 << 20;

/// A truncate whose tail block keeps changing under it (writes racing the cut) tries this
/// often before it reports a conflict.
const TRUNCATE_TRIES: u32 = 16;

impl Fs {
    /// Open `ino`; returns the handle number. The inode must outlive its names while open
    /// here: a mount that alone changes its store keeps the handle in memory (an unlink of
    /// the last name writes the mount's handles to the keyspace then, see
    /// [`Fs::count_handles`]); elsewhere the handle is counted in the keyspace at once
    /// (`i ino 01 mount-id`), so that an unlink from any mount keeps the inode alive.
    pub fn open(&self, ino: Ino, write: bool) -> Result<u64> {
        if write {
            self.writable()?;
        }
        let check = |t: &mut dyn Txn| {
            let inode = load_inode(t, ino)?;
            if inode.kind == Kind::Dir && write {
                return errno(libc::EISDIR);
            }
            Ok(inode)
        };
        let (inode, fh) = if self.alone() {
            // Under `ns_lock`, which an unlink holds from its "open here?" to its commit: the
            // inode seen here is not freed before the handle is registered.
            let _ns = lock(&self.ns_lock);
            let inode = self.look(check)?;
            let fh = self.register(ino, inode.size, false);
            (inode, fh)
        } else {
            let inode = self.txn(|t| {
                let inode = check(t)?;
                self.count_open(t, ino)?;
                Ok(inode)
            })?;
            let fh = self.register(ino, inode.size, true);
            (inode, fh)
        };
        if !write && inode.kind == Kind::File {
            // A file opened for reading: the directory's next files may be read next.
            self.dir_ahead
                .opened(ino, &self.store, || self.prefetch.handle(), self.bs);
        }
        if self.keep_writing(ino, write) {
            lock(&self.handles).writers.insert(fh);
        }
        Ok(fh)
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

    /// Before `ino` loses its last name (in that transaction, with `ns_lock` held): write the
    /// handles this mount keeps on it in memory to its open count in the keyspace, so that the
    /// inode outlives its names until the last close here, and a crash leaves it to the
    /// sweeper. Returns what to record as counted once the transaction has committed
    /// ([`Fs::counted_handles`]).
    pub(crate) fn count_handles(
        &self,
        t: &mut dyn Txn,
        ino: Ino,
    ) -> Result<Option<(Arc<FileState>, u32)>> {
        let Some(st) = lock(&self.files).get(&ino).cloned() else {
            return Ok(None);
        };
        let n = {
            let s = lock(&st.inner);
            if s.open <= s.counted {
                return Ok(None);
            }
            s.open
        };
        self.write_open_count(t, ino, n)?;
        Ok(Some((st, n)))
    }

    /// Set this mount's open count of `ino` in the keyspace to `n` handles.
    pub(crate) fn write_open_count(&self, t: &mut dyn Txn, ino: Ino, n: u32) -> Result<()> {
        t.put(
            Cf::Meta,
            &ks::open_key(ino, self.mount_id),
            &encode_counter(n as u64),
        )?;
        Ok(t.put(Cf::Meta, &ks::open_pseudo_key(ino), &[1])?)
    }

    /// After the commit of a transaction that wrote [`Fs::count_handles`]'s count.
    pub(crate) fn counted_handles(counted: Option<(Arc<FileState>, u32)>) {
        if let Some((st, n)) = counted {
            let mut s = lock(&st.inner);
            s.counted = s.counted.max(n.min(s.open));
        }
    }

    /// With a cache size, the blocks of a file open for writing are kept resident (see
    /// [`crate::tier::Writing`]); returns whether this open is such a writer.
    pub(crate) fn keep_writing(&self, ino: Ino, write: bool) -> bool {
        let Some(t) = self
            .tier()
            .filter(|t| write && lock(&t.settings).cache_size.is_some())
        else {
            return false;
        };
        t.writing.opened(ino, || {
            let (a, b) = ks::fmap_range(ino, 0, u64::MAX);
            let mut blocks = Vec::new();
            // Best effort: a map that cannot be read leaves the file's blocks evictable.
            let _ = self.store.for_each(Cf::Fmap, &a, &b, |_, v| {
                blocks.extend(FmapEntry::decode(v).ok().map(|e| (e.hash, e.len)));
                true
            });
            blocks
        });
        true
    }

    /// A new handle on `ino` (of committed size `size`), sharing the inode's buffer;
    /// `counted` if the keyspace's open count includes it.
    pub(crate) fn register(&self, ino: Ino, size: u64, counted: bool) -> u64 {
        let state = self.hold(ino, size, counted);
        let mut h = lock(&self.handles);
        let fh = h.next;
        h.next += 1;
        h.files.insert(fh, state);
        fh
    }

    /// One more handle of this mount on `ino` (of committed size `size`; `counted` if the
    /// keyspace's open count includes it): the state its handles share.
    pub(crate) fn hold(&self, ino: Ino, size: u64, counted: bool) -> Arc<FileState> {
        let mut files = lock(&self.files);
        let st = files
            .entry(ino)
            .or_insert_with(|| Arc::new(FileState::new(ino, size)))
            .clone();
        let mut s = lock(&st.inner);
        s.open += 1;
        s.counted += counted as u32;
        drop(s);
        st
    }

    /// Drop a handle nothing used: its file was not created after all.
    pub(crate) fn unregister(&self, fh: u64) {
        let Some(st) = lock(&self.handles).files.remove(&fh) else {
            return;
        };
        let mut files = lock(&self.files);
        let mut s = lock(&st.inner);
        s.open -= 1;
        if s.unused() {
            drop(s);
            files.remove(&st.ino);
        }
    }

    pub(super) fn handle_state(&self, fh: u64) -> Result<Arc<FileState>> {
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
        // A sequential read of a file larger than the cache passes through it (tiering).
        let keep = !(sequential && self.tier().is_some_and(|t| t.streams_past(s.size)));
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
        // The map entries of the blocks not held in the buffer, and the buffered images
        // (shared, not copied); the window ahead only goes to the prefetcher (scanned on its
        // own: the blocks between were asked for already).
        let (atime_due, wanted) = self.look(|t| {
            let inode = load_inode(t, ino)?;
            let mut wanted = Vec::new();
            let mut want = |k: &[u8], v: &[u8]| {
                let bn = ks::fmap_blockno(k).unwrap_or(0);
                if !s.dirty.contains_key(&bn) {
                    wanted.push((bn, FmapEntry::decode(v).map_err(|e| corrupt(k, e))?));
                }
                Ok::<_, FsError>(())
            };
            if first == last {
                // One block (most small reads): a point read, which the table files' bloom
                // filters serve, instead of an iterator over every level (cold random 4 KiB
                // reads spent 11% of the daemon's CPU setting up and seeking that iterator).
                let k = ks::fmap_key(ino, first);
                if let Some(v) = t.get(Cf::Fmap, &k)? {
                    want(&k, &v)?;
                }
            } else {
                let (ks_, ke) = ks::fmap_range(ino, first, last + 1);
                for (k, v) in t.scan(Cf::Fmap, &ks_, &ke, usize::MAX)? {
                    want(&k, &v)?;
                }
            }
            if !ahead.is_empty() {
                let (ks_, ke) = ks::fmap_range(ino, ahead.start, ahead.end);
                let mut run = Vec::new();
                for (k, v) in t.scan(Cf::Fmap, &ks_, &ke, usize::MAX)? {
                    let bn = ks::fmap_blockno(&k).unwrap_or(0);
                    if !s.dirty.contains_key(&bn) {
                        let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
                        run.push((ent.hash, ent.len));
                    }
                }
                self.prefetch.want_run(run, keep);
            }
            Ok((self.atime_due(&inode, false), wanted))
        })?;
        let held: Vec<(u64, Arc<Vec<u8>>)> = s
            .dirty
            .range(first..=last)
            .map(|(bn, slot)| (*bn, slot.img.clone()))
            .collect();
        drop(s);
        let place = |out: &mut [u8], bn: u64, data: &[u8]| {
            let bstart = bn * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + data.len() as u64);
            if to > from {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            }
        };
        for (bn, ent) in wanted {
            if let Some(data) = self.block_content(ino, bn, ent, keep)? {
                place(&mut out, bn, &data[..]);
            }
        }
        for (bn, img) in &held {
            place(&mut out, *bn, &img[..]);
        }
        if atime_due {
            self.touch_atime(ino);
        }
        Ok(out)
    }

    /// The content of block `bn` of `ino`, whose map entry was `ent` when it was read. A
    /// block freed since (the file was overwritten or truncated meanwhile, and the sweeper
    /// was quick) is looked up again: the map then says what the block is now (`None`: a
    /// hole). A block missing while the map still names it is an error. An evicted block
    /// fetched back is stored here again if `keep`.
    fn block_content(
        &self,
        ino: Ino,
        bn: u64,
        mut ent: FmapEntry,
        keep: bool,
    ) -> Result<Option<Arc<Vec<u8>>>> {
        loop {
            match self.blocks.get_as(&ent.hash, ent.len, keep) {
                Ok(d) => return Ok(Some(d)),
                Err(BlockError::Missing { hash }) => match self.map_entry(ino, bn)? {
                    None => return Ok(None),
                    Some(now) if now.hash != hash => ent = now,
                    Some(_) => return Err(BlockError::Missing { hash }.into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Block `bn`'s entry in the committed block map of `ino`.
    fn map_entry(&self, ino: Ino, bn: u64) -> Result<Option<FmapEntry>> {
        self.look(|t| {
            let key = ks::fmap_key(ino, bn);
            match t.get_untracked(Cf::Fmap, &key)? {
                None => Ok(None),
                Some(v) => FmapEntry::decode(&v)
                    .map(Some)
                    .map_err(|e| corrupt(&key, e)),
            }
        })
    }

    /// The committed content of block `bn` of `ino` (empty for a hole).
    pub(super) fn committed_block(&self, ino: Ino, bn: u64) -> Result<Vec<u8>> {
        Ok(match self.map_entry(ino, bn)? {
            None => Vec::new(),
            Some(ent) => self
                .block_content(ino, bn, ent, true)?
                .map(|d| d.to_vec())
                .unwrap_or_default(),
        })
    }

    /// A read of `ino` sets its access time. Kept in memory and written with the buffers (at
    /// most a second later, and at fsync of the filesystem, remount and unmount), as ext4's
    /// lazytime keeps it in the inode cache: a first read of each file costs no transaction,
    /// and attributes show it at once ([`Fs::overlay`]). A crash may lose it. Under relatime
    /// the first read's time stays (the next ones are not due on ext4 either); `strictatime`
    /// keeps the last.
    pub(super) fn touch_atime(&self, ino: Ino) {
        let now = Timestamp::now();
        let strict = Atime::unpack(self.atime.load(Ordering::Relaxed)).0.mode == AtimeMode::Strict;
        let mut pending = lock(&self.atimes);
        if strict {
            pending.insert(ino, now);
        } else {
            pending.entry(ino).or_insert(now);
        }
    }

    /// Write the access times reads set (see [`Fs::touch_atime`]), in transactions of 256
    /// inodes; an inode gone meanwhile is skipped (a time set explicitly since took the read's
    /// out of the map: `setattr`). Best effort, as the reads that set them: a failure is
    /// logged and those times are dropped.
    pub fn write_atimes(&self) {
        let pending: Vec<(Ino, Timestamp)> = lock(&self.atimes).drain().collect();
        for chunk in pending.chunks(256) {
            let r = self.txn(|t| {
                for (ino, at) in chunk {
                    if let Some(mut i) = load_inode_opt(t, *ino)? {
                        i.atime = *at;
                        save_inode(t, *ino, &i)?;
                    }
                }
                Ok(())
            });
            if let Err(e) = r {
                tracing::debug!(inodes = chunk.len(), error = %e, "access times not written");
            }
        }
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let (st, writer) = {
            let mut h = lock(&self.handles);
            let Some(st) = h.files.remove(&fh) else {
                return errno(libc::EBADF);
            };
            (st, h.writers.remove(&fh))
        };
        let ino = st.ino;
        let unlocked = self.unlock_handle(ino, fh);
        let _ns = lock(&self.ns_lock);
        let (flushed, uncount) = {
            let (mut s, r) = self.flush_locked(&st, lock(&st.inner));
            (r, s.drop_handle())
        };
        let uncounted = if uncount {
            self.uncount_open(ino)
        } else {
            Ok(())
        };
        let mut files = lock(&self.files);
        let last = { lock(&st.inner).unused() };
        if last {
            files.remove(&ino);
        }
        drop(files);
        if let Some(t) = self.tier().filter(|_| writer) {
            t.writing.closed(ino);
        }
        flushed.and(uncounted).and(unlocked)
    }

    /// One handle of this mount on `ino` fewer in the keyspace; the last close anywhere of an
    /// unlinked file or removed directory frees it (not on read-only mounts).
    pub(super) fn uncount_open(&self, ino: Ino) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let freeing = self.txn(|t| {
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
            free_if_unused(t, ino)
        })?;
        self.finish_freeing(ino, freeing);
        Ok(())
    }

    /// Set the size of `ino`: cut blocks past it (zeroing the tail of the last one) or extend
    /// with a hole. The cut tail block is read and prepared before the transaction, with no
    /// lock held; the transaction uses it only if the map still names the block it was cut
    /// from, else it is cut again.
    pub fn truncate(&self, ino: Ino, size: u64) -> Result<()> {
        self.writable()?;
        if size > i64::MAX as u64 {
            return errno(libc::EFBIG);
        }
        let st = self.file_state(ino);
        let bs = self.bs;
        let tail = (size % bs) as usize;
        for _ in 0..TRUNCATE_TRIES {
            // The block the new end falls in, cut to `tail` bytes: (what it was, what it becomes).
            let cut = match self.map_entry(ino, size / bs)? {
                Some(ent) if tail != 0 && ent.len as usize > tail => {
                    let data = self.block_content(ino, size / bs, ent, true)?;
                    let p =
                        data.and_then(|d| blocks::prepare(&d[..tail.min(d.len())], &self.codec));
                    Some((ent.hash, p))
                }
                _ => None,
            };
            let mut guard = match &st {
                Some(f) => {
                    let (g, r) = self.flush_locked(f, lock(&f.inner));
                    r?;
                    Some(g)
                }
                None => None,
            };
            let done = self.txn(|t| cut_to(t, ino, size, bs, cut.as_ref()))?;
            if let Some(s) = guard.as_deref_mut() {
                s.epoch += 1;
                if done {
                    s.size = size;
                    s.committed_size = size;
                }
            }
            if done {
                return Ok(());
            }
        }
        Err(crate::kv::KvError::Conflict.into())
    }
}

/// The transaction of [`Fs::truncate`]. `cut`: the tail block as it was read and its cut
/// version; returns false (nothing written) when the map names another tail block now.
fn cut_to(
    t: &mut dyn Txn,
    ino: Ino,
    size: u64,
    bs: u64,
    cut: Option<&(crate::keyspace::Hash, Option<blocks::Prepared>)>,
) -> Result<bool> {
    let mut inode = load_inode(t, ino)?;
    match inode.kind {
        Kind::File => {}
        Kind::Dir => return errno(libc::EISDIR),
        _ => return errno(libc::EINVAL),
    }
    if size < inode.size {
        let tail = (size % bs) as usize;
        if tail != 0 {
            let bn = size / bs;
            let key = ks::fmap_key(ino, bn);
            if let Some(v) = t.get(Cf::Fmap, &key)? {
                let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?;
                if ent.len as usize > tail {
                    match cut {
                        Some((was, p)) if *was == ent.hash => {
                            let new = p
                                .as_ref()
                                .map_or(NewBlock::Hole, |p| NewBlock::Prepared(p, None));
                            replace_block(t, ino, &mut inode.alloc, bn, new)?
                        }
                        _ => return Ok(false),
                    }
                }
            }
        }
        let keep = size.div_ceil(bs);
        let (s, e) = ks::fmap_range(ino, keep, u64::MAX);
        for (k, v) in t.scan(Cf::Fmap, &s, &e, usize::MAX)? {
            let ent = FmapEntry::decode(&v).map_err(|e| corrupt(&k, e))?;
            t.get(Cf::Fmap, &k)?;
            blocks::drop_ref(t, &ent.hash)?;
            inode.alloc = inode.alloc.saturating_sub(charge(ent.len));
            t.delete(Cf::Fmap, &k)?;
        }
    }
    let now = Timestamp::now();
    inode.size = size;
    inode.mtime = now;
    inode.ctime = now;
    save_inode(t, ino, &inode)?;
    Ok(true)
}
