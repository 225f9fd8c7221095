//! Operations on ranges of blocks: `copy_file_range` that shares blocks instead of copying
//! them, `fallocate` in all of ext4's modes, and `lseek` SEEK_DATA/SEEK_HOLE answered from the
//! block map.
//!
//! fallocate: allocating (mode 0, `KEEP_SIZE`) stores nothing, since unwritten blocks are holes,
//! but refuses with ENOSPC a length the disk could not take beside its reserve; `PUNCH_HOLE`
//! and `ZERO_RANGE` drop the whole blocks of the range from the map and write zeros into the
//! partial ends; `COLLAPSE_RANGE` and `INSERT_RANGE` (block-aligned, as ext4 wants for its own
//! block size) only move block-map entries, in one transaction.
//!
//! A copy maps the destination's whole blocks that lie inside the range, at the same offset
//! within a block as the source, to the source's blocks (one more reference each; no content
//! is read, hashed or written), [`COPY_BATCH`] blocks per transaction, each consistent. The
//! unaligned head and tail, and a copy whose two offsets are not equally aligned, go through
//! read and write as bytes. The source's buffered writes are flushed first: they are part of
//! the source.

use super::buffer::{replace_block, NewBlock};
use super::{corrupt, errno, load_inode, lock, save_inode, Fs, FsError, Result};
use crate::keyspace::records::{FmapEntry, Kind};
use crate::keyspace::{self as ks, Ino};
use crate::kv::{Cf, Txn};
use crate::util::Timestamp;

/// Blocks one copy transaction maps (each a few small writes).
const COPY_BATCH: u64 = 1024;
/// Bytes copied as bytes per read/write step.
const CHUNK: u64 = 1 << 20;
/// Most bytes one call copies (the FUSE reply counts in u32; callers loop).
const MAX_COPY: u64 = 1 << 30;

impl Fs {
    /// copy_file_range(2) from handle `fh_in` at `off_in` to `fh_out` at `off_out`; returns
    /// the bytes copied (fewer than `len` at the source's end, or past [`MAX_COPY`]).
    pub fn copy_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        self.writable()?;
        let src = self.handle_state(fh_in)?;
        let dst = self.handle_state(fh_out)?;
        // The source's buffered writes are part of it.
        let size_in = {
            let (s, r) = self.flush_locked(&src, lock(&src.inner));
            r?;
            s.size
        };
        if off_in >= size_in || len == 0 {
            return Ok(0);
        }
        let len = len.min(size_in - off_in).min(MAX_COPY);
        let end_out = off_out.checked_add(len).filter(|e| *e <= i64::MAX as u64);
        let end_out = end_out.ok_or(FsError::Errno(libc::EFBIG))?;
        if src.ino == dst.ino && off_in < end_out && off_out < off_in + len {
            return errno(libc::EINVAL);
        }
        self.space.check(0)?;
        let bs = self.bs;
        // Whole destination blocks inside the range, when both sides are equally aligned.
        let (first, last) = if off_in % bs == off_out % bs {
            (off_out.div_ceil(bs), end_out / bs)
        } else {
            (0, 0)
        };
        if first >= last {
            self.copy_bytes(fh_in, off_in, fh_out, off_out, len)?;
            return Ok(len);
        }
        let head = first * bs - off_out;
        self.copy_bytes(fh_in, off_in, fh_out, off_out, head)?;
        // The source block of destination block `first`.
        let src_first = (off_in + head) / bs;
        {
            let (mut s, r) = self.flush_locked(&dst, lock(&dst.inner));
            r?;
            let mut bn = first;
            while bn < last {
                let to = (bn + COPY_BATCH).min(last);
                let src_from = src_first + (bn - first);
                let size = self.txn(|t| share_blocks(t, src.ino, src_from, dst.ino, bn..to, bs))?;
                s.size = s.size.max(size);
                s.committed_size = s.committed_size.max(size);
                s.epoch += 1;
                bn = to;
            }
        }
        let done = last * bs - off_out;
        self.copy_bytes(fh_in, off_in + done, fh_out, off_out + done, len - done)?;
        Ok(len)
    }

    /// Copy `len` bytes through read and write (the unaligned parts of a copy).
    fn copy_bytes(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let mut data = self.read(fh_in, off_in + done, n as u32)?;
            // Past the source's end (it shrank meanwhile) the copy reads zeros.
            data.resize(n as usize, 0);
            self.write(fh_out, off_out + done, &data)?;
            done += n;
        }
        Ok(())
    }

    /// fallocate(2) on handle `fh`.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        self.writable()?;
        let end = offset.checked_add(len).filter(|e| *e <= i64::MAX as u64);
        let end = end.ok_or(FsError::Errno(libc::EFBIG))?;
        if len == 0 {
            return errno(libc::EINVAL);
        }
        let st = self.handle_state(fh)?;
        let bs = self.bs;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = lock(&st.inner).size;
        let op = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {
                self.space.can_hold(len)?;
                Range::Allocate
            }
            libc::FALLOC_FL_PUNCH_HOLE if keep => Range::Zero,
            libc::FALLOC_FL_ZERO_RANGE => Range::Zero,
            libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE if keep => {
                return errno(libc::EINVAL)
            }
            m @ (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) => {
                let collapse = m == libc::FALLOC_FL_COLLAPSE_RANGE;
                if offset % bs != 0 || len % bs != 0 {
                    return errno(libc::EINVAL);
                }
                if (collapse && end >= size) || (!collapse && offset >= size) {
                    return errno(libc::EINVAL);
                }
                if !collapse {
                    self.space.check(0)?;
                    if size + len > i64::MAX as u64 {
                        return errno(libc::EFBIG);
                    }
                }
                Range::Shift { collapse }
            }
            _ => return errno(libc::EOPNOTSUPP),
        };
        if let Range::Zero = op {
            // The partial blocks at either end get zeros, within the file (and past it when
            // the size is to grow).
            let limit = if keep { size.min(end) } else { end };
            let (head_end, tail_start) = (
                offset.next_multiple_of(bs).min(end),
                (end / bs * bs).max(offset),
            );
            for (a, b) in [(offset, head_end), (tail_start.max(head_end), end)] {
                let b = b.min(limit);
                if a < b && !(a % bs == 0 && b - a == bs) {
                    self.write(fh, a, &vec![0u8; (b - a) as usize])?;
                }
            }
        }
        let (mut s, r) = self.flush_locked(&st, lock(&st.inner));
        r?;
        let new_size = self.txn(|t| change_range(t, st.ino, offset, end, bs, keep, op))?;
        s.size = new_size;
        s.committed_size = new_size;
        s.epoch += 1;
        Ok(())
    }

    /// lseek(2) SEEK_DATA / SEEK_HOLE from `offset`: a mapped block is data, an absent one a
    /// hole, and the end of the file is a hole. ENXIO at or past the end, or when no data
    /// follows (SEEK_DATA). Buffered writes are flushed first.
    pub fn seek_data(&self, fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let st = self.handle_state(fh)?;
        let (_s, r) = self.flush_locked(&st, lock(&st.inner));
        r?;
        let bs = self.bs;
        self.look(|t| {
            let size = load_inode(t, st.ino)?.size;
            if offset >= size {
                return errno(libc::ENXIO);
            }
            let mut bn = offset / bs;
            let end = size.div_ceil(bs);
            while bn < end {
                let to = (bn + COPY_BATCH).min(end);
                let (s, e) = ks::fmap_range(st.ino, bn, to);
                let mapped: Vec<u64> = t
                    .scan(Cf::Fmap, &s, &e, usize::MAX)?
                    .iter()
                    .filter_map(|(k, _)| ks::fmap_blockno(k))
                    .collect();
                match whence {
                    libc::SEEK_DATA => {
                        if let Some(b) = mapped.first() {
                            return Ok((*b * bs).max(offset));
                        }
                    }
                    _ => {
                        // The first block of [bn, to) that is not mapped.
                        let gap = (bn..to)
                            .zip(mapped.iter().copied().chain(std::iter::repeat(u64::MAX)))
                            .find(|(want, got)| want != got)
                            .map(|(want, _)| want);
                        if let Some(g) = gap {
                            return Ok((g * bs).max(offset).min(size));
                        }
                    }
                }
                bn = to;
            }
            if whence == libc::SEEK_DATA {
                errno(libc::ENXIO)
            } else {
                Ok(size)
            }
        })
    }
}

/// What a fallocate does to the block map.
#[derive(Clone, Copy)]
enum Range {
    /// Nothing mapped (holes are free); the size may grow.
    Allocate,
    /// Whole blocks inside the range become holes; the size may grow.
    Zero,
    /// Block-aligned: the blocks after the range move down over it, or up to open it.
    Shift { collapse: bool },
}

/// The transaction of a fallocate on `[offset, end)`; returns the new size.
fn change_range(
    t: &mut dyn Txn,
    ino: Ino,
    offset: u64,
    end: u64,
    bs: u64,
    keep: bool,
    op: Range,
) -> Result<u64> {
    let mut inode = load_inode(t, ino)?;
    if inode.kind != Kind::File {
        return errno(libc::ENODEV);
    }
    let grow = |size: u64| if keep { size } else { size.max(end) };
    match op {
        Range::Allocate => inode.size = grow(inode.size),
        Range::Zero => {
            let (from, to) = (offset.div_ceil(bs), end / bs);
            if from < to {
                let (s, e) = ks::fmap_range(ino, from, to);
                for (k, _) in t.scan(Cf::Fmap, &s, &e, usize::MAX)? {
                    if let Some(bn) = ks::fmap_blockno(&k) {
                        replace_block(t, ino, &mut inode.alloc, bn, NewBlock::Hole)?;
                    }
                }
            }
            inode.size = grow(inode.size);
        }
        Range::Shift { collapse } => {
            let n = (end - offset) / bs;
            let first = offset / bs;
            let (s, e) = ks::fmap_range(ino, first, u64::MAX);
            let entries = t.scan(Cf::Fmap, &s, &e, usize::MAX)?;
            let mut moved = Vec::with_capacity(entries.len());
            for (k, v) in &entries {
                let Some(bn) = ks::fmap_blockno(k) else {
                    continue;
                };
                let ent = FmapEntry::decode(v).map_err(|e| corrupt(k, e))?;
                t.get(Cf::Fmap, k)?;
                if collapse && bn < first + n {
                    // Collapsed away: the reference goes.
                    replace_block(t, ino, &mut inode.alloc, bn, NewBlock::Hole)?;
                    continue;
                }
                t.delete(Cf::Fmap, k)?;
                moved.push((if collapse { bn - n } else { bn + n }, ent));
            }
            for (bn, ent) in moved {
                t.put(Cf::Fmap, &ks::fmap_key(ino, bn), &ent.encode()?)?;
            }
            inode.size = if collapse {
                inode.size - (end - offset)
            } else {
                inode.size + (end - offset)
            };
        }
    }
    let now = Timestamp::now();
    inode.mtime = now;
    inode.ctime = now;
    save_inode(t, ino, &inode)?;
    Ok(inode.size)
}

/// The transaction of one copy batch: the destination's blocks `blocks` take what the
/// source maps from block `src_from` on. Returns the destination's size after it.
fn share_blocks(
    t: &mut dyn Txn,
    src: Ino,
    src_from: u64,
    dst: Ino,
    blocks: std::ops::Range<u64>,
    bs: u64,
) -> Result<u64> {
    let mut inode = load_inode(t, dst)?;
    if inode.kind != Kind::File {
        return errno(libc::EINVAL);
    }
    let (from, to) = (blocks.start, blocks.end);
    for bn in blocks {
        // Read with tracking: a concurrent change of the source's block retries this copy.
        let key = ks::fmap_key(src, src_from + (bn - from));
        let new = match t.get(Cf::Fmap, &key)? {
            Some(v) => NewBlock::Shared(FmapEntry::decode(&v).map_err(|e| corrupt(&key, e))?),
            None => NewBlock::Hole,
        };
        replace_block(t, dst, &mut inode.alloc, bn, new)?;
    }
    let now = Timestamp::now();
    inode.size = inode.size.max(to * bs);
    inode.mtime = now;
    inode.ctime = now;
    save_inode(t, dst, &inode)?;
    Ok(inode.size)
}
