//! Versioned value codecs. Every value is one version byte followed by a postcard body (or raw
//! bytes where noted in keyspace.md), so a V2 record can be added beside V1 and decoded by tag.
//! Decoding never panics: bad bytes give [`DecodeError`], which the fs layer turns into EIO and
//! a log line naming the key.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{Hash, Ino};
use crate::util::Timestamp;

/// The on-disk format this build writes. A store of another major is refused at open, except
/// format 1 stores, which this build upgrades in place (see keyspace.md, "Upgrades").
pub const FORMAT_MAJOR: u32 = 5;
pub const FORMAT_MINOR: u32 = 5;
pub const FORMAT_PATCH: u32 = 0;
/// Older majors this build reads and upgrades.
pub const UPGRADABLE_MAJORS: &[u32] = &[1, 2, 3, 4];

/// Hash algorithm ids for [`FormatRecord::hash`].
pub const HASH_SHA256: u8 = 1;

/// Block encodings, carried in the block value header (`B hash` = `01` encoding ...).
pub const ENC_PLAIN: u8 = 0;
/// `z` + algorithm id + compressed content.
pub const ENC_COMPRESSED: u8 = b'z';
/// `p` + sector checksums + parity + an inner plain or compressed encoding.
pub const ENC_PARITY: u8 = b'p';

/// Compression algorithm ids (after `z`, and in [`FormatRecord::compression`]; 0 = none).
pub const COMP_NONE: u8 = 0;
pub const COMP_ZSTD: u8 = 1;
pub const COMP_LZ4: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot decode {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

fn err(what: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        reason: reason.into(),
    }
}

/// A record that could not be encoded: never written (an empty value would read back as
/// corrupt), the operation fails instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot encode {what}: {reason}")]
pub struct EncodeError {
    pub what: &'static str,
    pub reason: String,
}

impl From<DecodeError> for crate::kv::KvError {
    fn from(e: DecodeError) -> Self {
        crate::kv::KvError::Other(e.to_string())
    }
}

impl From<EncodeError> for crate::kv::KvError {
    fn from(e: EncodeError) -> Self {
        crate::kv::KvError::Other(e.to_string())
    }
}

fn encode_tagged<T: Serialize>(tag: u8, v: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![tag];
    let body = postcard::to_allocvec(v).map_err(|e| EncodeError {
        what: std::any::type_name::<T>(),
        reason: e.to_string(),
    })?;
    out.extend(body);
    Ok(out)
}

pub(crate) fn encode_v1<T: Serialize>(v: &T) -> Result<Vec<u8>, EncodeError> {
    encode_tagged(1, v)
}

fn decode_body<T: DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, DecodeError> {
    let (v, rest) = postcard::take_from_bytes(body).map_err(|e| err(what, e.to_string()))?;
    if !rest.is_empty() {
        return Err(err(what, format!("{} trailing bytes", rest.len())));
    }
    Ok(v)
}

/// A record written at tag 2 whose tag-1 form `V1` is still read, converted by `up`.
fn decode_v2_or_v1<T: DeserializeOwned, V1: DeserializeOwned>(
    what: &'static str,
    b: &[u8],
    up: impl FnOnce(V1) -> T,
) -> Result<T, DecodeError> {
    match b.split_first() {
        None => Err(err(what, "empty value")),
        Some((1, body)) => decode_body(what, body).map(up),
        Some((2, body)) => decode_body(what, body),
        Some((t, _)) => Err(err(what, format!("unknown version tag {t}"))),
    }
}

pub(crate) fn decode_v1<T: DeserializeOwned>(
    what: &'static str,
    b: &[u8],
) -> Result<T, DecodeError> {
    match b.split_first() {
        None => Err(err(what, "empty value")),
        Some((1, body)) => decode_body(what, body),
        Some((t, _)) => Err(err(what, format!("unknown version tag {t}"))),
    }
}

/// `M format`: what this store is. Version tag 2 (tag 1, [`FormatRecordV1`], is read too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatRecord {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub block_size: u32,
    pub hash: u8,
    pub created: Timestamp,
    pub fs_id: [u8; 16],
    /// Compression tried on every new block: [`COMP_NONE`], [`COMP_ZSTD`] or [`COMP_LZ4`].
    pub compression: u8,
    /// zstd level (ignored for the others).
    pub level: i8,
    /// Whether new blocks carry 512-byte-sector parity.
    pub parity: bool,
}

/// The format record of format 1.x stores (version tag 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatRecordV1 {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub block_size: u32,
    pub hash: u8,
    pub created: Timestamp,
    pub fs_id: [u8; 16],
}

impl FormatRecordV1 {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
}

impl FormatRecord {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_tagged(2, self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v2_or_v1("format record", b, |v: FormatRecordV1| FormatRecord {
            major: v.major,
            minor: v.minor,
            patch: v.patch,
            block_size: v.block_size,
            hash: v.hash,
            created: v.created,
            fs_id: v.fs_id,
            compression: COMP_NONE,
            level: 0,
            parity: false,
        })
    }
    pub fn version(&self) -> String {
        format!("{}.{}.{}", self.major, self.minor, self.patch)
    }
    /// The encoding settings as words, for reports.
    pub fn encoding_name(&self) -> String {
        let c = match self.compression {
            COMP_ZSTD => format!("zstd:{}", self.level),
            COMP_LZ4 => "lz4".into(),
            _ => "none".into(),
        };
        if self.parity {
            format!("{c}+parity")
        } else {
            c
        }
    }
}

/// File kinds as stored in inodes and dirents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl Kind {
    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// `i ino`: the inode record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky (`mode & 07777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Bytes of block content this file maps (rounded up to 4 KiB per block), for st_blocks.
    pub alloc: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub btime: Timestamp,
    pub rdev: u32,
    /// Directories: the one parent (root: itself). Others: 0.
    pub parent: Ino,
    /// Symlinks: the target bytes.
    pub target: Vec<u8>,
}

impl Inode {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("inode", b)
    }
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | self.perm as u32
    }

    /// An empty directory under `parent`, created `now`.
    pub fn new_dir(perm: u16, uid: u32, gid: u32, parent: Ino, now: Timestamp) -> Inode {
        Inode {
            kind: Kind::Dir,
            perm,
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
            parent,
            target: vec![],
        }
    }
}

/// `d parent name`: a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub ino: Ino,
    pub kind: Kind,
}

impl Dirent {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("dirent", b)
    }
}

/// `f ino blockno`: which block holds this part of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FmapEntry {
    pub hash: Hash,
    /// Content length (the block's trailing zeros are not stored).
    pub len: u32,
}

impl FmapEntry {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("block-map entry", b)
    }
}

/// `b hash`: facts about a block (small, so existence checks stay cheap). Version tag 2;
/// tag 1 ([`BlockInfoV1`], the first three fields) reads as resident, used at 0, logged at 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Plain content length.
    pub len: u32,
    /// Bytes of the whole stored `B` value (the last one stored, when evicted).
    pub stored: u32,
    /// Compression used (`COMP_*`), plus 0x80 when the block carries parity.
    pub encoding: u8,
    /// When it was last used (Unix seconds, coarse): its `A` key while resident.
    pub used: u32,
    /// The latest log group that named it after a new reference (0: none since the store
    /// began logging; the replicas' base groups cover those).
    pub logged: u64,
    /// Its content is not here (`B` absent): replicas hold it.
    pub evicted: bool,
    /// Pinned subtrees naming it (`kvfs pin`): while above 0 it has no `A` key and is never
    /// evicted.
    pub pins: u32,
}

/// The tag-1 `b` record (formats 1 to 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfoV1 {
    pub len: u32,
    pub stored: u32,
    pub encoding: u8,
}

impl BlockInfo {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_tagged(2, self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v2_or_v1("block info", b, |v: BlockInfoV1| BlockInfo {
            len: v.len,
            stored: v.stored,
            encoding: v.encoding,
            ..Default::default()
        })
    }
}

/// `g ino` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GarbageRecord {
    pub since: Timestamp,
}

impl GarbageRecord {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("garbage record", b)
    }
}

/// `J ino blockno seq`: bytes a write put at `offset` in the block, which an fsync made durable
/// before the block itself was committed (format 5.4). The file's size and modification time
/// at that fsync come with them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWrite {
    pub offset: u32,
    pub size: u64,
    pub mtime: Option<Timestamp>,
    pub data: Vec<u8>,
}

impl PendingWrite {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        PendingWrite::encode_parts(self.offset, self.size, self.mtime, &self.data)
    }

    /// The record of these fields, bytes copied once: postcard writes a `Vec<u8>` through
    /// serde one byte at a time (the same layout: a varint length, then the bytes).
    pub fn encode_parts(
        offset: u32,
        size: u64,
        mtime: Option<Timestamp>,
        data: &[u8],
    ) -> Result<Vec<u8>, EncodeError> {
        let mut out = encode_v1(&(offset, size, mtime))?;
        out.reserve(data.len() + 10);
        let mut n = data.len() as u64;
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(data);
        Ok(out)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("pending write", b)
    }
}

/// `p mount-id`: one running (or dead, not yet reaped) mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub host: String,
    /// OS process id of the mount daemon.
    pub pid: u32,
    pub started: Timestamp,
    /// Bumped every few seconds while the mount lives.
    pub heartbeat: Timestamp,
    pub beats: u64,
}

impl ProcessRecord {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("process record", b)
    }
}

/// `i ino \x00 mount-id owner start`: one POSIX record lock (byte range `start..=end`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Last byte covered, inclusive (`u64::MAX`: to end of file and beyond).
    pub end: u64,
    /// Exclusive (F_WRLCK) or shared (F_RDLCK).
    pub write: bool,
    /// Process that took it, for F_GETLK.
    pub pid: u32,
}

impl LockRecord {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_v1(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        decode_v1("lock", b)
    }
}

/// `i ino \x02 name` value: `[1][raw bytes]`.
pub fn encode_xattr(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 1);
    out.push(1);
    out.extend_from_slice(v);
    out
}

pub fn decode_xattr(b: &[u8]) -> Result<&[u8], DecodeError> {
    match b.split_first() {
        Some((1, v)) => Ok(v),
        Some((t, _)) => Err(err("xattr", format!("unknown version tag {t}"))),
        None => Err(err("xattr", "empty value")),
    }
}

/// `M next_ino` value: `[1][u64 big-endian]`.
pub fn encode_counter(n: u64) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

pub fn decode_counter(b: &[u8]) -> Result<u64, DecodeError> {
    match b {
        [1, rest @ ..] if rest.len() == 8 => Ok(u64::from_be_bytes(
            rest.try_into().map_err(|_| err("counter", "length"))?,
        )),
        _ => Err(err("counter", "expected [1][8 bytes]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_inode() -> Inode {
        Inode {
            kind: Kind::File,
            perm: 0o644,
            uid: 1000,
            gid: 100,
            nlink: 1,
            size: 12345,
            alloc: 16384,
            atime: Timestamp { secs: 1, nsecs: 2 },
            mtime: Timestamp { secs: 3, nsecs: 4 },
            ctime: Timestamp { secs: 5, nsecs: 6 },
            btime: Timestamp { secs: 7, nsecs: 8 },
            rdev: 0,
            parent: 0,
            target: vec![],
        }
    }

    #[test]
    fn records_round_trip() {
        let i = sample_inode();
        assert_eq!(Inode::decode(&i.encode().unwrap()).unwrap(), i);
        let d = Dirent {
            ino: 9,
            kind: Kind::Dir,
        };
        assert_eq!(Dirent::decode(&d.encode().unwrap()).unwrap(), d);
        let f = FmapEntry {
            hash: [7; 32],
            len: 100,
        };
        assert_eq!(FmapEntry::decode(&f.encode().unwrap()).unwrap(), f);
        assert_eq!(decode_counter(&encode_counter(77)).unwrap(), 77);
        // Hand-written encoding, postcard's layout: decoded as the struct, every length.
        for n in [0, 1, 127, 128, 300, 16383, 16384, 65536] {
            let p = PendingWrite {
                offset: 4096,
                size: 1 << 40,
                mtime: Some(Timestamp { secs: 9, nsecs: 1 }),
                data: (0..n).map(|i| i as u8).collect(),
            };
            let v = p.encode().unwrap();
            assert_eq!(v[1..], postcard::to_allocvec(&p).unwrap()[..]);
            assert_eq!(PendingWrite::decode(&v).unwrap(), p);
        }
    }

    #[test]
    fn unknown_version_tag_is_an_error_not_a_panic() {
        let mut b = sample_inode().encode().unwrap();
        b[0] = 2;
        assert!(Inode::decode(&b).unwrap_err().reason.contains("version"));
        assert!(Inode::decode(&[]).is_err());
    }

    #[test]
    fn every_truncation_and_bit_flip_decodes_or_errors_without_panic() {
        let b = sample_inode().encode().unwrap();
        for n in 0..b.len() {
            let _ = Inode::decode(&b[..n]);
        }
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                let _ = Inode::decode(&c);
                let _ = Dirent::decode(&c);
                let _ = FmapEntry::decode(&c);
                let _ = FormatRecord::decode(&c);
            }
        }
    }
}
