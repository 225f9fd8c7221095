//! A store on disk: a directory holding the RocksDB database under `db/`. Creating one writes
//! the `M format` record and the root directory; opening one checks that the directory is a
//! store, that no other process has it open, and that its format major version is ours.

use std::path::{Path, PathBuf};

use crate::keyspace::records::{
    encode_counter, FormatRecord, Inode, COMP_LZ4, COMP_NONE, COMP_ZSTD, FORMAT_MAJOR,
    FORMAT_MINOR, FORMAT_PATCH, HASH_SHA256, UPGRADABLE_MAJORS,
};
use crate::keyspace::{self as ks, ROOT_INO};
use crate::kv::{Cf, KvError, KvStore, OpenOptions};
use crate::util::Timestamp;

/// Default block size for `format`; the store's own value lives in `M format`.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = crate::blocks::encode::MAX_CONTENT;

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

/// Where a mount listens for requests from the tools (`kvfs gc` on a mounted store).
pub fn control_socket(store: &Path) -> PathBuf {
    store.join("kvfs.sock")
}

/// Whether another process has the store open for writing (a mount): RocksDB holds a POSIX
/// lock on `db/LOCK` while open; asking about it takes nothing.
pub fn in_use(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(db_path(path).join("LOCK")) else {
        return false;
    };
    // SAFETY: a zeroed flock is a valid argument; F_GETLK only fills it in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

/// What `format` records: fixed for the life of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatOptions {
    pub block_size: u32,
    /// `COMP_NONE`, `COMP_ZSTD` or `COMP_LZ4`.
    pub compression: u8,
    /// zstd level, 1..=19.
    pub level: i8,
    pub parity: bool,
    /// The filesystem id: random for a new filesystem, the primary's for a replica store.
    pub fs_id: Option<[u8; 16]>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            compression: COMP_LZ4,
            level: 0,
            parity: false,
            fs_id: None,
        }
    }
}

impl FormatOptions {
    /// Parse `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    pub fn parse_compression(s: &str) -> Result<(u8, i8), String> {
        match s.split_once(':') {
            None if s == "none" => Ok((COMP_NONE, 0)),
            None if s == "lz4" => Ok((COMP_LZ4, 0)),
            None if s == "zstd" => Ok((COMP_ZSTD, 1)),
            Some(("zstd", l)) => l
                .parse::<i8>()
                .ok()
                .filter(|l| (1..=19).contains(l))
                .map(|l| (COMP_ZSTD, l))
                .ok_or_else(|| format!("zstd level must be 1..19, not {l:?}")),
            _ => Err(format!(
                "unknown compression {s:?} (none, lz4, zstd or zstd:LEVEL)"
            )),
        }
    }
}

/// Create a new store at `path` with default settings but the block size.
pub fn format(path: &Path, block_size: u32) -> Result<FormatRecord, StoreError> {
    format_with(
        path,
        &FormatOptions {
            block_size,
            ..Default::default()
        },
    )
}

/// Create a new store at `path` (the directory may exist if empty).
pub fn format_with(path: &Path, o: &FormatOptions) -> Result<FormatRecord, StoreError> {
    let block_size = o.block_size;
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
    init(&kv, o).map_err(|source| StoreError::Kv {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a new filesystem into an empty store: the format record, the inode counter and the
/// root directory, synced. Any engine; `format_with` for a store on disk.
pub fn init(kv: &KvStore, o: &FormatOptions) -> Result<FormatRecord, KvError> {
    let block_size = o.block_size;
    let fs_id = o.fs_id.unwrap_or_else(|| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&crate::util::rand_u64().to_le_bytes());
        id[8..].copy_from_slice(&crate::util::rand_u64().to_le_bytes());
        id
    });
    let rec = FormatRecord {
        major: FORMAT_MAJOR,
        minor: FORMAT_MINOR,
        patch: FORMAT_PATCH,
        block_size,
        hash: HASH_SHA256,
        created: Timestamp::now(),
        fs_id,
        compression: o.compression,
        level: o.level,
        parity: o.parity,
    };
    let now = Timestamp::now();
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = Inode::new_dir(0o755, uid, gid, ROOT_INO, now);
    kv.transact(|t| {
        t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()?)?;
        t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(ROOT_INO + 1))?;
        t.put(Cf::Meta, &ks::inode_key(ROOT_INO), &root.encode()?)
    })
    .and_then(|_| kv.sync())?;
    Ok(rec)
}

/// Open an existing store for reading and writing, alone. A store of an older format is
/// upgraded to this build's (keyspace.md, "Upgrades").
pub fn open(path: &Path) -> Result<(KvStore, FormatRecord), StoreError> {
    let (kv, mut rec) = open_with(path, false)?;
    if (rec.major, rec.minor) < (FORMAT_MAJOR, FORMAT_MINOR) {
        let (from, from_major) = (rec.version(), rec.major);
        rec.major = FORMAT_MAJOR;
        rec.minor = FORMAT_MINOR;
        rec.patch = FORMAT_PATCH;
        let kv_err = |source| StoreError::Kv {
            path: path.to_path_buf(),
            source,
        };
        if from_major < 4 {
            // Format 4 indexes every resident block by last use and counts their bytes.
            let n = crate::blocks::resident::index_existing(&kv).map_err(kv_err)?;
            tracing::info!(blocks = n, "indexed the store's blocks by last use");
        }
        kv.transact(|t| t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()?))
            .and_then(|_| kv.sync())
            .map_err(|source| StoreError::Kv {
                path: path.to_path_buf(),
                source,
            })?;
        tracing::info!(from, to = %rec.version(), "upgraded the store's format");
    }
    Ok((kv, rec))
}

/// Open an existing store for reading only, without its lock: works while it is mounted.
pub fn open_read_only(path: &Path) -> Result<(KvStore, FormatRecord), StoreError> {
    open_with(path, true)
}

/// Open a store that another process has open for writing (a replica `kvfs serve` keeps
/// applying to), following it: [`KvStore::catch_up`] shows what it committed since. The
/// follower's own files live in `STORE/follow-PID`, removed by a later open once PID is gone.
pub fn open_follower(path: &Path) -> Result<(KvStore, FormatRecord), StoreError> {
    let own = path.join(format!("follow-{}", std::process::id()));
    // Those of followers that are gone (a pid that no longer runs).
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("follow-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    std::fs::create_dir_all(&own).map_err(|source| StoreError::Io {
        path: own.clone(),
        source,
    })?;
    open_opts(
        path,
        OpenOptions {
            read_only: true,
            follow: Some(own),
            ..Default::default()
        },
    )
}

fn open_with(path: &Path, read_only: bool) -> Result<(KvStore, FormatRecord), StoreError> {
    open_opts(
        path,
        OpenOptions {
            read_only,
            ..Default::default()
        },
    )
}

fn open_opts(path: &Path, oo: OpenOptions) -> Result<(KvStore, FormatRecord), StoreError> {
    let read_only = oo.read_only;
    if !path.is_dir() {
        return Err(StoreError::Missing(path.to_path_buf()));
    }
    if !db_path(path).join("CURRENT").exists() {
        return Err(StoreError::NotAStore(path.to_path_buf()));
    }
    // A read-only open beside a live mount can race its compactions (a file listed in the
    // manifest is deleted before it is opened): try again a few times.
    let mut attempt = 0;
    let opened = loop {
        match KvStore::open(&db_path(path), &oo) {
            Err(KvError::Other(_) | KvError::Corruption(_)) if read_only && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => break r,
        }
    };
    let kv = opened.map_err(|e| match e {
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
    if rec.major != FORMAT_MAJOR && !UPGRADABLE_MAJORS.contains(&rec.major) {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: rec.version(),
        });
    }
    if !rec.block_size.is_power_of_two()
        || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&rec.block_size)
        || rec.hash != HASH_SHA256
        || rec.compression > COMP_LZ4
    {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "block size {} / hash id {} / compression id {} out of range",
                rec.block_size, rec.hash, rec.compression
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
            kv.transact(|t| t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()?))
                .unwrap();
        }
        let e = open(d.path()).err().unwrap();
        assert!(matches!(e, StoreError::Version { .. }), "{e}");
    }

    #[test]
    fn format_1_store_is_upgraded_in_place_and_keeps_its_data() {
        use crate::keyspace::records::FormatRecordV1;
        let d = tempfile::tempdir().unwrap();
        let rec = format(d.path(), 128 << 10).unwrap();
        {
            let (kv, _) = open(d.path()).unwrap();
            let v1 = FormatRecordV1 {
                major: 1,
                minor: 0,
                patch: 0,
                block_size: rec.block_size,
                hash: rec.hash,
                created: rec.created,
                fs_id: rec.fs_id,
            };
            kv.transact(|t| t.put(Cf::Meta, ks::META_FORMAT, &v1.encode()?))
                .unwrap();
        }
        let (ro, got) = open_read_only(d.path()).unwrap();
        assert_eq!(got.version(), "1.0.0", "a read-only open changes nothing");
        drop(ro);
        let (_kv, got) = open(d.path()).unwrap();
        assert_eq!(got.major, FORMAT_MAJOR);
        assert_eq!((got.block_size, got.fs_id), (rec.block_size, rec.fs_id));
        assert_eq!(got.compression, COMP_NONE);
        assert!(!got.parity);
    }

    #[test]
    fn format_3_store_gets_its_blocks_indexed_at_the_upgrade() {
        use crate::blocks::{add_ref, prepare, resident, Codec};
        use crate::keyspace::records::{BlockInfo, BlockInfoV1};
        let d = tempfile::tempdir().unwrap();
        format(d.path(), DEFAULT_BLOCK_SIZE).unwrap();
        let hashes: Vec<_> = {
            let (kv, mut rec) = open(d.path()).unwrap();
            // A format 3 store: blocks with tag-1 records, no index, no counters.
            let blocks: Vec<_> = (0..5u8)
                .map(|i| prepare(&[i + 1; 3000], &Codec::default()).unwrap())
                .collect();
            for b in &blocks {
                kv.transact(|t| add_ref(t, b, None)).unwrap();
            }
            kv.transact(|t| {
                for b in &blocks {
                    let info = BlockInfo::decode(
                        &t.get(Cf::Bidx, &ks::block_info_key(&b.hash))?.unwrap(),
                    )?;
                    t.delete(Cf::Bidx, &ks::last_use_key(info.used, &b.hash))?;
                    let v1 = BlockInfoV1 {
                        len: info.len,
                        stored: info.stored,
                        encoding: info.encoding,
                    };
                    t.put(
                        Cf::Bidx,
                        &ks::block_info_key(&b.hash),
                        &crate::keyspace::records::encode_v1(&v1)?,
                    )?;
                }
                for s in 0..crate::kv::SUM_SHARDS {
                    t.delete(Cf::Bidx, &ks::counter_shard_key(ks::COUNTER_RESIDENT, s))?;
                }
                rec.major = 3;
                t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()?)
            })
            .unwrap();
            blocks.iter().map(|b| b.hash).collect()
        };
        let (kv, got) = open(d.path()).unwrap();
        assert_eq!(got.major, FORMAT_MAJOR);
        let stored: u64 = hashes
            .iter()
            .map(|h| {
                let i =
                    BlockInfo::decode(&kv.get(Cf::Bidx, &ks::block_info_key(h)).unwrap().unwrap())
                        .unwrap();
                assert!(kv
                    .get(Cf::Bidx, &ks::last_use_key(i.used, h))
                    .unwrap()
                    .is_some());
                i.stored as u64
            })
            .sum();
        assert_eq!(resident::totals(&kv).unwrap().resident, stored);
        // (The blocks have references no file holds: audit says so; the index is right.)
        let report = crate::audit::audit(&kv, &Default::default()).unwrap();
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.what.contains("refcount 1 but no references")),
            "{report}"
        );
    }

    #[test]
    fn older_minor_is_raised_at_a_read_write_open_and_a_newer_one_kept() {
        let d = tempfile::tempdir().unwrap();
        format(d.path(), DEFAULT_BLOCK_SIZE).unwrap();
        let set_minor = |minor: u32| {
            let (kv, mut rec) = open(d.path()).unwrap();
            rec.minor = minor;
            kv.transact(|t| t.put(Cf::Meta, ks::META_FORMAT, &rec.encode()?))
                .unwrap();
        };
        set_minor(0);
        let (ro, got) = open_read_only(d.path()).unwrap();
        assert_eq!(got.minor, 0, "a read-only open changes nothing");
        drop(ro);
        assert_eq!(open(d.path()).unwrap().1.minor, FORMAT_MINOR);
        set_minor(FORMAT_MINOR + 1);
        assert_eq!(open(d.path()).unwrap().1.minor, FORMAT_MINOR + 1);
    }

    #[test]
    fn read_only_open_works_beside_a_writer() {
        let d = tempfile::tempdir().unwrap();
        format(d.path(), DEFAULT_BLOCK_SIZE).unwrap();
        let (kv, _) = open(d.path()).unwrap();
        kv.transact(|t| t.put(Cf::Meta, b"Mtest", b"1")).unwrap();
        let (ro, _) = open_read_only(d.path()).unwrap();
        assert_eq!(
            ro.get(Cf::Meta, b"Mtest").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert!(ro.transact(|t| t.put(Cf::Meta, b"Mx", b"1")).is_err());
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(format(d.path(), 1000).is_err());
        assert!(format(d.path(), 1024).is_err());
    }
}
