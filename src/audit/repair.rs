//! Repairs (`kvfs audit --repair`): each fix runs in its own transaction after the checks.

use super::Result;
use crate::blocks;
use crate::fs::{self as fsops, FsError};
use crate::keyspace::records::{encode_counter, BlockInfo, Dirent, Inode, Kind};
use crate::keyspace::{self as ks, Hash, Ino, REF_SHARDS, ROOT_INO};
use crate::kv::{Cf, KvStore, Txn};
use crate::util::Timestamp;

/// A repair: done in its own transaction after the checks.
pub(super) enum Fix {
    SetNlink(Ino, u32),
    SetAlloc(Ino, u64),
    ToLostFound(Ino),
    DeleteDirent(Vec<u8>),
    DeleteKey(Cf, Vec<u8>),
    PutKey(Cf, Vec<u8>, Vec<u8>),
    /// A sharded counter: every shard removed, shard 0 set to the value.
    SetCounter(&'static str, i64),
    DropFmap(Vec<u8>, Hash),
    SetRefcount(Hash, i64),
    MarkGarbageBlock(Hash),
    RewriteBlock(Hash, Vec<u8>),
    SetNextIno(u64),
}

fn lost_found(t: &mut dyn Txn) -> Result<Ino> {
    let key = ks::dirent_key(ROOT_INO, b"lost+found");
    if let Some(v) = t.get(Cf::Meta, &key)? {
        let d = Dirent::decode(&v).map_err(|e| fsops::FsError::Corrupt {
            key: ks::describe_key(&key),
            reason: e.to_string(),
        })?;
        if d.kind == Kind::Dir {
            return Ok(d.ino);
        }
        return Err(FsError::Errno(libc::EEXIST));
    }
    let ino = fsops::take_inode_numbers(t, 1)?;
    let dir = Inode::new_dir(0o700, 0, 0, ROOT_INO, Timestamp::now());
    fsops::save_inode(t, ino, &dir)?;
    t.put(
        Cf::Meta,
        &key,
        &Dirent {
            ino,
            kind: Kind::Dir,
        }
        .encode()?,
    )?;
    let mut root = fsops::load_inode(t, ROOT_INO)?;
    fsops::nlink_up(ROOT_INO, &mut root)?;
    fsops::save_inode(t, ROOT_INO, &root)?;
    Ok(ino)
}

pub(super) fn apply(store: &KvStore, fix: &Fix) -> Result<String> {
    store.transact(|t| -> Result<String> {
        Ok(match fix {
            Fix::SetNlink(ino, n) => {
                let mut i = fsops::load_inode(t, *ino)?;
                i.nlink = *n;
                fsops::save_inode(t, *ino, &i)?;
                format!("nlink set to {n}")
            }
            Fix::SetAlloc(ino, a) => {
                let mut i = fsops::load_inode(t, *ino)?;
                i.alloc = *a;
                fsops::save_inode(t, *ino, &i)?;
                format!("alloc set to {a}")
            }
            Fix::ToLostFound(ino) => {
                let lf = lost_found(t)?;
                let mut i = fsops::load_inode(t, *ino)?;
                let name = format!("#{ino}");
                t.put(
                    Cf::Meta,
                    &ks::dirent_key(lf, name.as_bytes()),
                    &Dirent {
                        ino: *ino,
                        kind: i.kind,
                    }
                    .encode()?,
                )?;
                let mut d = fsops::load_inode(t, lf)?;
                if i.kind == Kind::Dir {
                    i.parent = lf;
                    fsops::nlink_up(lf, &mut d)?;
                } else {
                    i.nlink = 1;
                }
                d.mtime = Timestamp::now();
                d.ctime = d.mtime;
                fsops::save_inode(t, lf, &d)?;
                fsops::save_inode(t, *ino, &i)?;
                format!("linked as /lost+found/{name}")
            }
            Fix::DeleteDirent(k) => {
                t.delete(Cf::Meta, k)?;
                "entry removed".into()
            }
            Fix::DeleteKey(cf, k) => {
                t.delete(*cf, k)?;
                "key removed".into()
            }
            Fix::PutKey(cf, k, v) => {
                t.put(*cf, k, v)?;
                "key written".into()
            }
            Fix::SetCounter(name, v) => {
                for s in 0..crate::kv::SUM_SHARDS {
                    t.delete(Cf::Bidx, &ks::counter_shard_key(name, s))?;
                }
                t.put(Cf::Bidx, &ks::counter_shard_key(name, 0), &v.to_le_bytes())?;
                format!("set to {v}")
            }
            Fix::DropFmap(k, h) => {
                t.delete(Cf::Fmap, k)?;
                blocks::drop_ref(t, h)?;
                "block-map entry removed".into()
            }
            Fix::SetRefcount(h, n) => {
                for s in 0..REF_SHARDS {
                    t.delete(Cf::Bidx, &ks::refcount_key(h, s))?;
                }
                if *n != 0 {
                    t.put(Cf::Bidx, &ks::refcount_key(h, 0), &n.to_le_bytes())?;
                } else {
                    t.put(Cf::Bidx, &ks::block_garbage_key(h, 0), &[])?;
                }
                format!("refcount set to {n}")
            }
            Fix::MarkGarbageBlock(h) => {
                t.put(Cf::Bidx, &ks::block_garbage_key(h, 0), &[])?;
                if t.get(Cf::Bidx, &ks::block_info_key(h))?.is_none() {
                    // A block without info: give it one so the sweeper can free it.
                    if let Some(v) = t.get_untracked(Cf::Blocks, &ks::block_key(h))? {
                        let mut info = BlockInfo {
                            stored: v.len() as u32,
                            ..Default::default()
                        };
                        crate::blocks::resident::stored(t, h, &mut info)?;
                        t.put(Cf::Bidx, &ks::block_info_key(h), &info.encode()?)?;
                    }
                }
                "marked for the sweeper".into()
            }
            Fix::RewriteBlock(h, v) => {
                t.put(Cf::Blocks, &ks::block_key(h), v)?;
                let ik = ks::block_info_key(h);
                if let Some(raw) = t.get(Cf::Bidx, &ik)? {
                    if let Ok(mut info) = BlockInfo::decode(&raw) {
                        info.stored = v.len() as u32;
                        t.put(Cf::Bidx, &ik, &info.encode()?)?;
                    }
                }
                "block rewritten from parity".into()
            }
            Fix::SetNextIno(n) => {
                t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(*n))?;
                format!("set to {n}")
            }
        })
    })
}
