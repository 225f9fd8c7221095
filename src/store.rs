//! A store on disk: a directory holding the RocksDB database under `db/`. Creating one writes
//! the `M format` record and the root directory; opening one checks that the directory is a
//! store, that no other process has it open, and that its format major version is ours.

use std::path::{Path, PathBuf};

use crate::keyspace::records::{
    encode_counter, FormatRecord, Inode, Kind, FORMAT_MAJOR, FORMAT_MINOR, FORMAT_PATCH,
    HASH_SHA256,
};
use crate::keyspace::{self as ks, ROOT_INO};
use crate::kv::{Cf, KvError, KvStore, OpenOptions};
use crate::util::Timestamp;

/// Default block size for `format`; the store's own value lives in `M format`.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: no such directory")]
    Missing(PathBuf),
    #[error("{0}: not a kvfs store (no database in it; create one with `kvfs format`)")]
    NotAStore(PathBuf),
    #[error("{0}: already a kvfs store")]
    Exists(PathBuf),
    #[error("{0}: the store is in use by another process (is it mounted?)")]
    InUse(PathBuf),
    #[error(
        "{path}: store format {found} is not supported by this kvfs (format {FORMAT_MAJOR}.x); \
         use a kvfs release that reads format {found}"
    )]
    Version { path: PathBuf, found: String },
    #[error(
        "{0}: block size must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
    )]
    BlockSize(u32),
    #[error("{path}: corrupt format record: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Kv { path: PathBuf, source: KvError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn db_path(store: &Path) -> PathBuf {
    store.join("db")
}

/// Create a new store at `path` (the directory may exist if empty).
pub fn format(path: &Path, block_size: u32) -> Result<FormatRecord, StoreError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(StoreError::BlockSize(block_size));
    }
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if db_path(path).join("CURRENT").exists() {
        return Err(StoreError::Exists(path.to_path_buf()));
    }
    std::fs::create_dir_all(db_path(path)).map_err(io)?;
    let kv = KvStore::open(
        &db_path(path),
        &OpenOptions {
            create: true,
            ..Default::default()
        },
    )
    .map_err(|source| StoreError::Kv {
        path: path.to_path_buf(),
        source,
    })?;
    let mut fs_id = [0u8; 16];
    fs_id[..8].copy_from_slice(&crate::util::rand_u64().to_le_bytes());
    fs_id[8..].copy_from_slice(&crate::util::rand_u64().to_le_bytes());
    let rec = FormatRecord {
        major: FORMAT_MAJOR,
        minor: FORMAT_MINOR,
        patch: FORMAT_PATCH,
        block_size,
        hash: HASH_SHA256,
        created: Timestamp::now(),
        fs_id,
    };
    let now = Timestamp::now();
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = Inode {
        kind: Kind::Dir,
        perm: 0o755,
        uid,
        gid,
        nlink: 2,
        size: 0,
        alloc: 0,
        atime: now,
        mtime: now,
        ctime: now,
        btime: now,
        rdev: 0,
        parent: ROOT_INO,
        target: vec![],
    };
    kv.transact(|t| {
        t.put(Cf::Meta, ks::META_FORMAT, &rec.encode())?;
        t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(ROOT_INO + 1))?;
        t.put(Cf::Meta, &ks::inode_key(ROOT_INO), &root.encode())
    })
    .and_then(|_| kv.sync())
    .map_err(|source| StoreError::Kv {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(rec)
}

/// Open an existing store.
pub fn open(path: &Path) -> Result<(KvStore, FormatRecord), StoreError> {
    if !path.is_dir() {
        return Err(StoreError::Missing(path.to_path_buf()));
    }
    if !db_path(path).join("CURRENT").exists() {
        return Err(StoreError::NotAStore(path.to_path_buf()));
    }
    let kv = KvStore::open(&db_path(path), &OpenOptions::default()).map_err(|e| match e {
        KvError::Locked => StoreError::InUse(path.to_path_buf()),
        source => StoreError::Kv {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let raw = kv
        .get(Cf::Meta, ks::META_FORMAT)
        .map_err(|source| StoreError::Kv {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| StoreError::NotAStore(path.to_path_buf()))?;
    let rec = FormatRecord::decode(&raw).map_err(|e| {
        // A record we cannot even decode may be a future major version with a new layout.
        if raw.first().is_some_and(|&t| t != 1) {
            StoreError::Version {
                path: path.to_path_buf(),
                found: format!("record version {}", raw[0]),
            }
        } else {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        }
    })?;
    if rec.major != FORMAT_MAJOR {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: rec.version(),
        });
    }
    if !rec.block_size.is_power_of_two()
        || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&rec.block_size)
        || rec.hash != HASH_SHA256
    {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "block size {} / hash id {} out of range",
                rec.block_size, rec.hash
            ),
        });
    }
    Ok((kv, rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_then_open_round_trips_and_refuses_twice() {
        let d = tempfile::tempdir().unwrap();
        let rec = format(d.path(), 128 << 10).unwrap();
        assert!(matches!(format(d.path(), 4096), Err(StoreError::Exists(_))));
        let (_kv, got) = open(d.path()).unwrap();
        assert_eq!(got, rec);
        assert!(matches!(open(d.path()), Err(StoreError::InUse(_))));
    }

    #[test]
    fn open_refuses_other_major_and_non_stores() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(open(d.path()), Err(StoreError::NotAStore(_))));
        assert!(matches!(
            open(&d.path().join("nope")),
            Err(StoreError::Missing(_))
        ));
        format(d.path(), DEFAULT_BLOCK_SIZE).unwrap();
        {
            let (kv, mut rec) = open(d.path()).unwrap();
            rec.major = FORMAT_MAJOR + 1;
            kv.transact(|t| t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()))
                .unwrap();
        }
        let e = open(d.path()).err().unwrap();
        assert!(matches!(e, StoreError::Version { .. }), "{e}");
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(format(d.path(), 1000).is_err());
        assert!(format(d.path(), 1024).is_err());
    }
}
