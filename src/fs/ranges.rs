//! Operations on ranges of blocks: `copy_file_range` that shares blocks instead of copying
//! them, and `lseek` SEEK_DATA/SEEK_HOLE answered from the block map.
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
