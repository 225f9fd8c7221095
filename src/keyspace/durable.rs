//! Keys of writes an fsync made durable before their blocks were committed: `J` pending
//! records and the `j` marks of the fsync log (keyspace.md).

use super::{fmap_blockno, key_ino, with_ino, Ino, Prefix};

/// `J ino blockno seq`: bytes an fsync made durable that block `blockno` does not hold yet.
pub fn pending_key(ino: Ino, blockno: u64, seq: u64) -> Vec<u8> {
    let mut k = with_ino(Prefix::Pending, ino, 16);
    k.extend_from_slice(&blockno.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Every `J` key of `ino`.
pub fn pending_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    (
        with_ino(Prefix::Pending, ino, 0),
        with_ino(Prefix::Pending, ino + 1, 0),
    )
}

/// Inode, block number and sequence number of a `J` key.
pub fn parse_pending_key(key: &[u8]) -> Option<(Ino, u64, u64)> {
    if key.len() != 25 || key[0] != Prefix::Pending.byte() {
        return None;
    }
    let n = |i: usize| u64::from_be_bytes(key[i..i + 8].try_into().unwrap_or([0; 8]));
    Some((n(1), n(9), n(17)))
}

/// `j ino blockno`: the fsync log's records of this block below this sequence number are in
/// its committed content (written by the commit that put them there).
pub fn covered_key(ino: Ino, blockno: u64) -> Vec<u8> {
    let mut k = with_ino(Prefix::Covered, ino, 8);
    k.extend_from_slice(&blockno.to_be_bytes());
    k
}

/// Inode and block number of a `j` key.
pub fn parse_covered_key(key: &[u8]) -> Option<(Ino, u64)> {
    if key.len() != 17 || key[0] != Prefix::Covered.byte() {
        return None;
    }
    Some((key_ino(key)?, fmap_blockno(key)?))
}
