//! The keyspace: pure key builders and parsers, and the one prefix registry.
//!
//! Every key kvfs writes starts with a [`Prefix`] byte and lives in that prefix's column family;
//! keyspace.md documents each one byte for byte and a test keeps the two in agreement. Numbers
//! in keys are big-endian so scans come back in numeric order. `0xff` never starts a key, so the
//! range of a prefix `P` is `[P, P+1)`.

mod durable;
pub mod past;
pub mod records;

pub use durable::{covered_key, parse_covered_key, parse_pending_key, pending_key, pending_range};

use crate::kv::Cf;

/// Inode numbers. 1 is the root directory; 0 is never used.
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// SHA-256 of a block's content.
pub type Hash = [u8; 32];

/// Number of refcount shards per block: concurrent writers of the same block add to different
/// keys and so do not conflict. Part of the format (the sweeper reads all shards).
pub const REF_SHARDS: u8 = 16;

/// The prefix registry: every key kind, its leading byte and its column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    Meta,
    Inode,
    Dirent,
    Garbage,
    Process,
    Fmap,
    Block,
    BlockInfo,
    Refcount,
    BlockGarbage,
    WrittenAhead,
    Change,
    Log,
    Replica,
    Hold,
    LastUse,
    Unlogged,
    Counter,
    Past,
    Moment,
    PastHold,
    PrimaryPast,
    Pending,
    Covered,
}

impl Prefix {
    pub const ALL: [Prefix; 24] = [
        Prefix::Meta,
        Prefix::Inode,
        Prefix::Dirent,
        Prefix::Garbage,
        Prefix::Process,
        Prefix::Fmap,
        Prefix::Block,
        Prefix::BlockInfo,
        Prefix::Refcount,
        Prefix::BlockGarbage,
        Prefix::WrittenAhead,
        Prefix::Change,
        Prefix::Log,
        Prefix::Replica,
        Prefix::Hold,
        Prefix::LastUse,
        Prefix::Unlogged,
        Prefix::Counter,
        Prefix::Past,
        Prefix::Moment,
        Prefix::PastHold,
        Prefix::PrimaryPast,
        Prefix::Pending,
        Prefix::Covered,
    ];

    pub const fn byte(self) -> u8 {
        match self {
            Prefix::Meta => b'M',
            Prefix::Inode => b'i',
            Prefix::Dirent => b'd',
            Prefix::Garbage => b'g',
            Prefix::Process => b'p',
            Prefix::Fmap => b'f',
            Prefix::Block => b'B',
            Prefix::BlockInfo => b'b',
            Prefix::Refcount => b'r',
            Prefix::BlockGarbage => b'G',
            Prefix::WrittenAhead => b'W',
            Prefix::Change => b'c',
            Prefix::Log => b'L',
            Prefix::Replica => b'R',
            Prefix::Hold => b'H',
            Prefix::LastUse => b'A',
            Prefix::Unlogged => b'U',
            Prefix::Counter => b's',
            Prefix::Past => b'Y',
            Prefix::Moment => b'Z',
            Prefix::PastHold => b'V',
            Prefix::PrimaryPast => b'P',
            Prefix::Pending => b'J',
            Prefix::Covered => b'j',
        }
    }

    pub const fn cf(self) -> Cf {
        match self {
            Prefix::Meta
            | Prefix::Inode
            | Prefix::Dirent
            | Prefix::Garbage
            | Prefix::Process
            | Prefix::Change
            | Prefix::Log
            | Prefix::Replica
            | Prefix::Past
            | Prefix::Moment
            | Prefix::Pending
            | Prefix::Covered => Cf::Meta,
            Prefix::Fmap => Cf::Fmap,
            Prefix::Block | Prefix::WrittenAhead => Cf::Blocks,
            Prefix::BlockInfo
            | Prefix::Refcount
            | Prefix::BlockGarbage
            | Prefix::Hold
            | Prefix::LastUse
            | Prefix::Unlogged
            | Prefix::Counter
            | Prefix::PastHold
            | Prefix::PrimaryPast => Cf::Bidx,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Prefix::Meta => "metadata",
            Prefix::Inode => "inode",
            Prefix::Dirent => "dirent",
            Prefix::Garbage => "garbage-inode",
            Prefix::Process => "process",
            Prefix::Fmap => "block-map",
            Prefix::Block => "block",
            Prefix::BlockInfo => "block-info",
            Prefix::Refcount => "refcount",
            Prefix::BlockGarbage => "garbage-block",
            Prefix::WrittenAhead => "written-ahead",
            Prefix::Change => "change",
            Prefix::Log => "log-part",
            Prefix::Replica => "replica",
            Prefix::Hold => "hold",
            Prefix::LastUse => "last-use",
            Prefix::Unlogged => "unlogged-ref",
            Prefix::Counter => "counter",
            Prefix::Past => "past-value",
            Prefix::Moment => "moment",
            Prefix::PastHold => "past-hold",
            Prefix::PrimaryPast => "primary-past-hold",
            Prefix::Pending => "pending-write",
            Prefix::Covered => "covered-writes",
        }
    }

    pub fn from_byte(b: u8) -> Option<Prefix> {
        Prefix::ALL.into_iter().find(|p| p.byte() == b)
    }

    /// `[P, P+1)`: every key of this prefix.
    pub fn range(self) -> (Vec<u8>, Vec<u8>) {
        (vec![self.byte()], vec![self.byte() + 1])
    }
}

/// A mount's random id: the `p` key and the owner part of open counts and locks. A type of its
/// own: it sits in keys beside inode numbers, lock owners and offsets, all of them u64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MountId(pub u64);

impl MountId {
    /// A fresh random id (never 0).
    pub fn random() -> MountId {
        MountId(crate::util::rand_u64().max(1))
    }

    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl std::fmt::LowerHex for MountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Sub-key tags after `i ino` (the seed's scheme).
pub mod inode_sub {
    /// `i ino \x00 mount-id owner start`: record locks.
    pub const LOCK: u8 = 0x00;
    /// `i ino \x01 mount-id`: per-mount open count.
    pub const OPEN: u8 = 0x01;
    /// `i ino \x02 name`: extended attribute.
    pub const XATTR: u8 = 0x02;
    /// `i ino \xfe attr`: conflict pseudo-keys.
    pub const PSEUDO: u8 = 0xfe;
    /// `i ino \xfe 'l'`: every lock change of the inode reads and writes it.
    pub const PSEUDO_LOCKS: u8 = b'l';
    /// `i ino \xfe 'o'`: written when a mount's open count appears or disappears.
    pub const PSEUDO_OPEN: u8 = b'o';
}

/// `M` keys.
pub const META_FORMAT: &[u8] = b"Mformat";
pub const META_NEXT_INO: &[u8] = b"Mnext_ino";
/// The shipping log's head on a primary (last group written and its chain hash).
pub const META_LOG_HEAD: &[u8] = b"Mlog";
/// On a replica store: whose filesystem it follows and what it has applied.
pub const META_REPLICA: &[u8] = b"Mreplica";
/// Settings kept in the store (`kvfs config`).
pub const META_CONFIG: &[u8] = b"Mconfig";
/// The roots of pinned subtrees (`kvfs pin`).
pub const META_PINS: &[u8] = b"Mpins";
/// On a satellite store (format 4.1): the upstream it pulls from (`kvfs clone`).
pub const META_UPSTREAM: &[u8] = b"Mupstream";
/// On a replica with satellites (format 5.3): the last group of its primary applied while it
/// logged what it applied (u64 LE). Below `M replica`'s `applied`, a build that did not log
/// applied groups since, and its satellites start over from a new base group.
pub const META_LOGGED: &[u8] = b"Mlogged";
/// History (format 5): since when it is kept, how far it was trimmed, named snapshots.
pub const META_HISTORY: &[u8] = b"Mhistory";

fn with_ino(p: Prefix, ino: Ino, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + extra);
    k.push(p.byte());
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// `i ino`
pub fn inode_key(ino: Ino) -> Vec<u8> {
    with_ino(Prefix::Inode, ino, 0)
}

/// `i ino \x02 name`
pub fn xattr_key(ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = with_ino(Prefix::Inode, ino, 1 + name.len());
    k.push(inode_sub::XATTR);
    k.extend_from_slice(name);
    k
}

/// Range of all xattrs of `ino`.
pub fn xattr_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    let mut s = with_ino(Prefix::Inode, ino, 1);
    s.push(inode_sub::XATTR);
    let mut e = with_ino(Prefix::Inode, ino, 1);
    e.push(inode_sub::XATTR + 1);
    (s, e)
}

/// Range of every sub-key of `ino` (locks, open counts, xattrs, pseudo-keys), not the record.
pub fn inode_sub_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    let mut s = inode_key(ino);
    s.push(0x00);
    let e = inode_key(ino + 1);
    (s, e)
}

fn inode_sub_key(ino: Ino, tag: u8, extra: usize) -> Vec<u8> {
    let mut k = with_ino(Prefix::Inode, ino, 1 + extra);
    k.push(tag);
    k
}

fn inode_sub_tag_range(ino: Ino, tag: u8) -> (Vec<u8>, Vec<u8>) {
    (inode_sub_key(ino, tag, 0), inode_sub_key(ino, tag + 1, 0))
}

/// `i ino \x01 mount-id`
pub fn open_key(ino: Ino, mount: MountId) -> Vec<u8> {
    let mut k = inode_sub_key(ino, inode_sub::OPEN, 8);
    k.extend_from_slice(&mount.to_be_bytes());
    k
}

/// Every open count of `ino`.
pub fn open_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    inode_sub_tag_range(ino, inode_sub::OPEN)
}

/// `i ino \x00 mount-id owner start`
pub fn lock_key(ino: Ino, mount: MountId, owner: u64, start: u64) -> Vec<u8> {
    let mut k = inode_sub_key(ino, inode_sub::LOCK, 24);
    k.extend_from_slice(&mount.to_be_bytes());
    k.extend_from_slice(&owner.to_be_bytes());
    k.extend_from_slice(&start.to_be_bytes());
    k
}

/// Every lock of `ino`.
pub fn lock_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    inode_sub_tag_range(ino, inode_sub::LOCK)
}

/// `(mount, owner, start)` of a lock key.
pub fn parse_lock_key(key: &[u8]) -> Option<(MountId, u64, u64)> {
    if key.len() != 34 || key[0] != Prefix::Inode.byte() || key[9] != inode_sub::LOCK {
        return None;
    }
    let n = |i: usize| {
        <[u8; 8]>::try_from(&key[i..i + 8])
            .ok()
            .map(u64::from_be_bytes)
    };
    Some((MountId(n(10)?), n(18)?, n(26)?))
}

/// `i ino \xfe 'l'`: the lock-table pseudo-key.
pub fn lock_pseudo_key(ino: Ino) -> Vec<u8> {
    let mut k = inode_sub_key(ino, inode_sub::PSEUDO, 1);
    k.push(inode_sub::PSEUDO_LOCKS);
    k
}

/// A lock-table pseudo-key value naming `version` (format 5.2): `02` + u64 big-endian.
pub fn lock_version_value(version: u64) -> [u8; 9] {
    let mut v = [2u8; 9];
    v[1..].copy_from_slice(&version.to_be_bytes());
    v
}

/// The version a lock-table pseudo-key value names; `None` for `01` (no version: the sweeper's,
/// and every value before 5.2) and for anything else.
pub fn lock_version(v: &[u8]) -> Option<u64> {
    match v {
        [2, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// `i ino \xfe 'o'`: the open-set pseudo-key.
pub fn open_pseudo_key(ino: Ino) -> Vec<u8> {
    let mut k = inode_sub_key(ino, inode_sub::PSEUDO, 1);
    k.push(inode_sub::PSEUDO_OPEN);
    k
}

/// What an `i` key is: the record itself or one of its sub-keys.
#[derive(Debug, PartialEq, Eq)]
pub enum InodeKey<'a> {
    Record(Ino),
    Lock(Ino, MountId, u64, u64),
    Open(Ino, MountId),
    Xattr(Ino, &'a [u8]),
    Pseudo(Ino, &'a [u8]),
    Unknown,
}

pub fn parse_inode_key(key: &[u8]) -> InodeKey<'_> {
    let Some(ino) = key_ino(key).filter(|_| key[0] == Prefix::Inode.byte()) else {
        return InodeKey::Unknown;
    };
    let rest = &key[9..];
    match rest.split_first() {
        None => InodeKey::Record(ino),
        Some((&inode_sub::LOCK, _)) => match parse_lock_key(key) {
            Some((m, o, s)) => InodeKey::Lock(ino, m, o, s),
            None => InodeKey::Unknown,
        },
        Some((&inode_sub::OPEN, m)) => match <[u8; 8]>::try_from(m) {
            Ok(m) => InodeKey::Open(ino, MountId(u64::from_be_bytes(m))),
            Err(_) => InodeKey::Unknown,
        },
        Some((&inode_sub::XATTR, name)) if !name.is_empty() => InodeKey::Xattr(ino, name),
        Some((&inode_sub::PSEUDO, a)) => InodeKey::Pseudo(ino, a),
        _ => InodeKey::Unknown,
    }
}

/// `p mount-id`
pub fn process_key(mount: MountId) -> Vec<u8> {
    let mut k = vec![Prefix::Process.byte()];
    k.extend_from_slice(&mount.to_be_bytes());
    k
}

/// The mount id of a `p` key.
pub fn process_key_id(key: &[u8]) -> Option<MountId> {
    (key.len() == 9 && key[0] == Prefix::Process.byte())
        .then(|| key_ino(key))
        .flatten()
        .map(MountId)
}

/// `d parent name`
pub fn dirent_key(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = with_ino(Prefix::Dirent, parent, name.len());
    k.extend_from_slice(name);
    k
}

/// Range of every entry of directory `parent`.
pub fn dirent_range(parent: Ino) -> (Vec<u8>, Vec<u8>) {
    (
        with_ino(Prefix::Dirent, parent, 0),
        with_ino(Prefix::Dirent, parent + 1, 0),
    )
}

/// The name part of a dirent key.
pub fn dirent_name(key: &[u8]) -> &[u8] {
    key.get(9..).unwrap_or(&[])
}

/// `g ino`
pub fn garbage_key(ino: Ino) -> Vec<u8> {
    with_ino(Prefix::Garbage, ino, 0)
}

/// `f ino blockno`
pub fn fmap_key(ino: Ino, blockno: u64) -> Vec<u8> {
    let mut k = with_ino(Prefix::Fmap, ino, 8);
    k.extend_from_slice(&blockno.to_be_bytes());
    k
}

/// Block numbers `[from, to)` of `ino`'s map.
pub fn fmap_range(ino: Ino, from: u64, to: u64) -> (Vec<u8>, Vec<u8>) {
    let end = if to == u64::MAX {
        with_ino(Prefix::Fmap, ino + 1, 0)
    } else {
        fmap_key(ino, to)
    };
    (fmap_key(ino, from), end)
}

/// Block number of an `f` key.
pub fn fmap_blockno(key: &[u8]) -> Option<u64> {
    key.get(9..17)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// Inode number of any `i`, `d`, `g`, `f` key.
pub fn key_ino(key: &[u8]) -> Option<Ino> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

fn with_hash(p: Prefix, h: &Hash, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(33 + extra);
    k.push(p.byte());
    k.extend_from_slice(h);
    k
}

/// `B hash`
pub fn block_key(h: &Hash) -> Vec<u8> {
    with_hash(Prefix::Block, h, 0)
}

/// `b hash`
pub fn block_info_key(h: &Hash) -> Vec<u8> {
    with_hash(Prefix::BlockInfo, h, 0)
}

/// `r hash shard`
pub fn refcount_key(h: &Hash, shard: u8) -> Vec<u8> {
    let mut k = with_hash(Prefix::Refcount, h, 1);
    k.push(shard);
    k
}

/// `G hash shard`
pub fn block_garbage_key(h: &Hash, shard: u8) -> Vec<u8> {
    let mut k = with_hash(Prefix::BlockGarbage, h, 1);
    k.push(shard);
    k
}

/// `W hash`: the block's value was written ahead of the transaction that references it.
pub fn written_ahead_key(h: &Hash) -> Vec<u8> {
    with_hash(Prefix::WrittenAhead, h, 0)
}

/// `A secs hash`: the last-use index, ordered by when each resident block was last used.
pub fn last_use_key(secs: u32, h: &Hash) -> Vec<u8> {
    let mut k = Vec::with_capacity(37);
    k.push(Prefix::LastUse.byte());
    k.extend_from_slice(&secs.to_be_bytes());
    k.extend_from_slice(h);
    k
}

/// The use time and block of an `A` key.
pub fn parse_last_use_key(k: &[u8]) -> Option<(u32, Hash)> {
    if k.len() != 37 || k[0] != Prefix::LastUse.byte() {
        return None;
    }
    let secs = u32::from_be_bytes(k[1..5].try_into().ok()?);
    Some((secs, Hash::try_from(&k[5..37]).ok()?))
}

/// `U hash`: a reference to the block not yet in the shipping log.
pub fn unlogged_key(h: &Hash) -> Vec<u8> {
    with_hash(Prefix::Unlogged, h, 0)
}

/// `s name`: a store-wide counter (merge operands summed) that one writer adds to.
pub fn counter_key(name: &str) -> Vec<u8> {
    let mut k = vec![Prefix::Counter.byte()];
    k.extend_from_slice(name.as_bytes());
    k
}

/// `s name / shard`: one shard of a counter written with [`crate::kv::Txn::add_sum`]; its
/// value is the sum of all shards.
pub fn counter_shard_key(name: &str, shard: u8) -> Vec<u8> {
    crate::kv::sum_shard_key(&counter_key(name), shard)
}

/// Every shard of counter `name`.
pub fn counter_shards(name: &str) -> (Vec<u8>, Vec<u8>) {
    let mut a = counter_key(name);
    a.push(b'/');
    let mut b = a.clone();
    b.push(0xff);
    (a, b)
}

/// Stored bytes of the blocks whose content is here.
pub const COUNTER_RESIDENT: &str = "resident";
/// Stored bytes of the blocks evicted (their content on replicas only).
pub const COUNTER_EVICTED: &str = "evicted";

/// The hash inside a `B`, `b`, `r`, `G`, `W` or `U` key.
pub fn key_hash(key: &[u8]) -> Option<Hash> {
    key.get(1..33).and_then(|b| Hash::try_from(b).ok())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key rendered for logs: prefix letter, then decoded numbers and hex.
pub fn describe_key(key: &[u8]) -> String {
    match key.first().copied().and_then(Prefix::from_byte) {
        Some(Prefix::Process) if key.len() == 9 => {
            format!("p {:016x}", key_ino(key).unwrap_or(0))
        }
        Some(Prefix::Inode) if key.len() > 9 => {
            let ino = key_ino(key).unwrap_or(0);
            match parse_inode_key(key) {
                InodeKey::Lock(_, m, o, s) => {
                    format!("i {ino} lock mount {m:016x} owner {o:x} start {s}")
                }
                InodeKey::Open(_, m) => format!("i {ino} open mount {m:016x}"),
                InodeKey::Xattr(_, n) => format!("i {ino} xattr {:?}", String::from_utf8_lossy(n)),
                InodeKey::Pseudo(_, a) => format!("i {ino} pseudo {}", hex(a)),
                _ => format!("i {ino} {}", hex(&key[9..])),
            }
        }
        Some(Prefix::Inode | Prefix::Dirent | Prefix::Garbage | Prefix::Fmap) if key.len() >= 9 => {
            let ino = key_ino(key).unwrap_or(0);
            let rest = &key[9..];
            let tail = match key[0] {
                b'd' => format!(" {:?}", String::from_utf8_lossy(rest)),
                b'f' => format!(" block {}", fmap_blockno(key).unwrap_or(0)),
                _ if rest.is_empty() => String::new(),
                _ => format!(" {}", hex(rest)),
            };
            format!("{} {ino}{tail}", key[0] as char)
        }
        Some(
            Prefix::Block
            | Prefix::BlockInfo
            | Prefix::Refcount
            | Prefix::BlockGarbage
            | Prefix::WrittenAhead
            | Prefix::Unlogged
            | Prefix::PastHold
            | Prefix::PrimaryPast,
        ) if key.len() >= 33 => {
            format!(
                "{} {}{}",
                key[0] as char,
                hex(&key[1..33]),
                if key.len() > 33 {
                    format!(" {}", hex(&key[33..]))
                } else {
                    String::new()
                }
            )
        }
        Some(Prefix::Pending) => match parse_pending_key(key) {
            Some((ino, bn, seq)) => format!("J {ino} block {bn} seq {seq}"),
            None => format!("J {}", hex(&key[1..])),
        },
        Some(Prefix::Covered) => match parse_covered_key(key) {
            Some((ino, bn)) => format!("j {ino} block {bn}"),
            None => format!("j {}", hex(&key[1..])),
        },
        Some(Prefix::LastUse) => match parse_last_use_key(key) {
            Some((secs, h)) => format!("A {secs} {}", hex(&h)),
            None => format!("A {}", hex(&key[1..])),
        },
        _ => format!("{:?}", String::from_utf8_lossy(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_never_0xff() {
        for (i, a) in Prefix::ALL.iter().enumerate() {
            assert_ne!(a.byte(), 0xff);
            assert_eq!(Prefix::from_byte(a.byte()), Some(*a));
            for b in &Prefix::ALL[i + 1..] {
                assert_ne!(a.byte(), b.byte());
            }
        }
    }

    #[test]
    fn fmap_keys_sort_by_block_number() {
        let a = fmap_key(7, 1);
        let b = fmap_key(7, 256);
        let c = fmap_key(8, 0);
        assert!(a < b && b < c);
        let (s, e) = fmap_range(7, 0, u64::MAX);
        assert!(s <= a && b < e && c >= e);
        assert_eq!(fmap_blockno(&b), Some(256));
    }

    #[test]
    fn sub_keys_parse_back_and_stay_inside_their_inode() {
        let k = lock_key(5, MountId(0xabc), 7, 100);
        assert_eq!(
            parse_inode_key(&k),
            InodeKey::Lock(5, MountId(0xabc), 7, 100)
        );
        assert_eq!(
            parse_inode_key(&open_key(5, MountId(9))),
            InodeKey::Open(5, MountId(9))
        );
        assert_eq!(
            parse_inode_key(&xattr_key(5, b"user.x")),
            InodeKey::Xattr(5, b"user.x")
        );
        assert_eq!(parse_inode_key(&inode_key(5)), InodeKey::Record(5));
        let (s, e) = inode_sub_range(5);
        for k in [k, open_key(5, MountId(9)), lock_pseudo_key(5)] {
            assert!(s <= k && k < e);
        }
        let (ls, le) = lock_range(5);
        assert!(ls <= lock_key(5, MountId(u64::MAX), u64::MAX, u64::MAX));
        assert!(
            lock_key(5, MountId(u64::MAX), u64::MAX, u64::MAX) < le
                && le <= open_key(5, MountId(0))
        );
        assert_eq!(process_key_id(&process_key(MountId(42))), Some(MountId(42)));
    }

    #[test]
    fn inode_sub_range_holds_xattrs_but_not_record_or_next_inode() {
        let (s, e) = inode_sub_range(5);
        let x = xattr_key(5, b"user.a");
        assert!(s <= x && x < e);
        assert!(inode_key(5) < s);
        assert!(inode_key(6) >= e);
    }

    /// keyspace.md's registry table and the code's registry must agree.
    #[test]
    fn keyspace_md_matches_prefix_registry() {
        let md = include_str!("../../keyspace.md");
        let start = md
            .find("<!-- registry:start -->")
            .expect("registry start marker");
        let end = md
            .find("<!-- registry:end -->")
            .expect("registry end marker");
        let mut rows = Vec::new();
        for line in md[start..end].lines() {
            let cols: Vec<&str> = line.split('|').map(|c| c.trim()).collect();
            if cols.len() < 5 || !cols[1].starts_with('`') {
                continue;
            }
            let byte = cols[1].trim_matches('`');
            rows.push((byte.to_string(), cols[2].to_string(), cols[3].to_string()));
        }
        let want: Vec<_> = Prefix::ALL
            .iter()
            .map(|p| {
                (
                    (p.byte() as char).to_string(),
                    p.name().to_string(),
                    p.cf().name().to_string(),
                )
            })
            .collect();
        assert_eq!(
            rows, want,
            "keyspace.md registry table differs from Prefix::ALL"
        );
    }
}
