//! The replication protocol's frames and messages (keyspace.md, "Replication protocol").
//!
//! A frame is `len: u32 BE | xxh3-64 of the body: u64 LE | body`, the body one postcard
//! [`Msg`]. `len` is checked against [`MAX_FRAME`] before anything is allocated, the checksum
//! before the body is decoded: a flipped bit is refused, never applied (over TLS and ssh the
//! channel already authenticates every byte; over `exec:` pipes this is the only check). Every
//! byte read is untrusted: lengths capped, hashes checked by the receiver before use.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::Change;
use crate::keyspace::Hash;
use crate::util::Timestamp;

/// Protocol versions this build speaks. The replica, answering the primary's range, picks the
/// highest both speak or refuses.
pub const PROTO_MIN: u32 = 1;
pub const PROTO_MAX: u32 = 4;
/// The first version with `Fetch` (fetching evicted blocks back).
pub const PROTO_FETCH: u32 = 2;
/// The first version with `Follow` and `CaughtUp` (satellites pulling from an upstream).
pub const PROTO_FOLLOW: u32 = 3;
/// The first version whose groups may carry the primary's past holds (`V hash` puts and
/// deletes): a replica keeps the blocks its primary's history names.
pub const PROTO_PAST_HOLDS: u32 = 4;

/// Largest frame body: a block of the largest block size (4 MiB) with room to spare; a
/// group's stored parts are cut at 1 MiB.
pub const MAX_FRAME: usize = 8 << 20;
/// Hashes per `Have` question.
pub const MAX_HAVE: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Primary, first: who it is and which protocol versions it speaks.
    Hello {
        proto_min: u32,
        proto_max: u32,
        fs_id: [u8; 16],
        block_size: u32,
    },
    /// Replica: accepted; what it has applied (`fresh`: nothing yet).
    Welcome {
        proto: u32,
        applied: u64,
        chain: Hash,
        fresh: bool,
    },
    /// Either side: the reason it closes the connection.
    Refused { reason: String },
    /// Primary: which of these blocks do you hold?
    Have { hashes: Vec<Hash> },
    /// Replica: one answer per hash asked, in order.
    Holding { have: Vec<bool> },
    /// Primary: a block's content (trailing zeros removed), named by its SHA-256.
    Block {
        hash: Hash,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Primary: make the blocks sent so far durable and say so.
    Flush,
    /// Replica: that many blocks were verified and synced since the last `Flushed`.
    Flushed { count: u64 },
    /// Primary: one part of group `seq` (its chain after `prev`).
    Part {
        seq: u64,
        index: u32,
        last: bool,
        prev: Hash,
        chain: Hash,
        at: Timestamp,
        changes: Vec<Change>,
    },
    /// Replica: group `seq` is applied and synced.
    Applied { seq: u64, chain: Hash },
    /// Primary: done for now.
    Bye,
    /// Primary: for each of these block-map keys, the chunk checksums of the block you hold
    /// there (what a changed block's delta is computed against).
    Sums {
        #[serde(with = "serde_bytes_vec")]
        keys: Vec<Vec<u8>>,
    },
    /// Replica: one answer per key asked: the block it holds there, or none.
    SumsReply { sums: Vec<Option<BlockSums>> },
    /// Primary: block `hash` is block `base` (which the replica holds) with these chunks of
    /// [`CHUNK`] bytes: `None` keeps the base's chunk at that index, `Some` gives it.
    Delta {
        hash: Hash,
        base: Hash,
        chunks: Vec<Option<ByteBuf>>,
    },
    /// Fetcher (version 2): send me these blocks' stored values (at most [`MAX_FETCH`]).
    Fetch { hashes: Vec<Hash> },
    /// One answer per hash of a `Fetch`, in order: the block's stored `B` value (keyspace.md,
    /// block encodings); the fetcher decodes it and checks the content's SHA-256 against
    /// `hash` before using or storing anything.
    Content {
        hash: Hash,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// One answer per hash of a `Fetch`: this store does not hold it.
    NotHeld { hash: Hash },
    /// Satellite (version 3), first on a connection it made to an upstream: ship me your
    /// groups. The roles then turn: the upstream sends `Hello` and ships as a primary does,
    /// without blocks (a satellite fetches those on demand), and the satellite answers as a
    /// replica. It is known by its certificate, which the upstream has as a satellite.
    Follow { proto_min: u32, proto_max: u32 },
    /// Upstream (version 3): every group up to `head` is shipped; sent after each catch-up and
    /// every few seconds while there is nothing to ship (a keepalive).
    CaughtUp { head: u64 },
}

/// Hashes per `Fetch` request.
pub const MAX_FETCH: usize = 256;

/// Chunk size of deltas: writes are usually page-aligned.
pub const CHUNK: usize = 4096;

/// A held block's name, content length and the xxh3-128 of each [`CHUNK`] of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSums {
    pub hash: Hash,
    pub len: u32,
    pub chunks: Vec<[u8; 16]>,
}

/// Bytes that serialize as one byte string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let b: Vec<&serde_bytes::Bytes> = v.iter().map(|x| serde_bytes::Bytes::new(x)).collect();
        b.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let b: Vec<serde_bytes::ByteBuf> = Vec::deserialize(d)?;
        Ok(b.into_iter().map(|x| x.into_vec()).collect())
    }
}

/// The checksums of `data`'s chunks.
pub fn chunk_sums(data: &[u8]) -> Vec<[u8; 16]> {
    data.chunks(CHUNK)
        .map(|c| xxhash_rust::xxh3::xxh3_128(c).to_le_bytes())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by the peer")]
    Closed,
    #[error("frame of {0} bytes refused (at most {MAX_FRAME})")]
    TooBig(usize),
    #[error("frame checksum mismatch: the bytes were damaged on the way")]
    Checksum,
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("peer refused: {0}")]
    Refused(String),
}

/// Encode `m` as one frame.
pub fn frame(m: &Msg) -> Result<Vec<u8>, WireError> {
    let bad = |e: postcard::Error| WireError::Decode(e.to_string());
    // Sized first and encoded once into place: a block's bytes are copied once, not at every
    // doubling of a growing buffer and again behind the header.
    let len = postcard::experimental::serialized_size(m).map_err(bad)?;
    if len > MAX_FRAME {
        return Err(WireError::TooBig(len));
    }
    let mut out = Vec::with_capacity(12 + len);
    out.extend_from_slice(&[0; 12]);
    let mut out = postcard::to_extend(m, out).map_err(bad)?;
    let sum = xxhash_rust::xxh3::xxh3_64(&out[12..]);
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    out[4..12].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Write one message; returns the bytes it took on the wire.
pub fn send(w: &mut dyn Write, m: &Msg) -> Result<usize, WireError> {
    let f = frame(m)?;
    w.write_all(&f)?;
    w.flush()?;
    Ok(f.len())
}

/// Decode one frame's body after its header was checked.
pub fn decode_body(sum: u64, body: &[u8]) -> Result<Msg, WireError> {
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return Err(WireError::Checksum);
    }
    let (m, rest) =
        postcard::take_from_bytes::<Msg>(body).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(m)
}

/// Read one message.
pub fn recv(r: &mut dyn Read) -> Result<Msg, WireError> {
    let mut head = [0u8; 12];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooBig(len));
    }
    let sum = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(sum, &body)
}

/// Decode a whole frame from a buffer (the fuzzed entry point): never panics.
pub fn decode_frame(b: &[u8]) -> Result<Msg, WireError> {
    recv(&mut &b[..])
}

/// A short name of a message, for errors.
pub fn name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Welcome { .. } => "Welcome",
        Msg::Refused { .. } => "Refused",
        Msg::Have { .. } => "Have",
        Msg::Holding { .. } => "Holding",
        Msg::Block { .. } => "Block",
        Msg::Flush => "Flush",
        Msg::Flushed { .. } => "Flushed",
        Msg::Part { .. } => "Part",
        Msg::Applied { .. } => "Applied",
        Msg::Bye => "Bye",
        Msg::Sums { .. } => "Sums",
        Msg::SumsReply { .. } => "SumsReply",
        Msg::Delta { .. } => "Delta",
        Msg::Fetch { .. } => "Fetch",
        Msg::Content { .. } => "Content",
        Msg::NotHeld { .. } => "NotHeld",
        Msg::Follow { .. } => "Follow",
        Msg::CaughtUp { .. } => "CaughtUp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip_and_a_flipped_bit_is_refused() {
        let m = Msg::Part {
            seq: 7,
            index: 0,
            last: true,
            prev: [1; 32],
            chain: [2; 32],
            at: Timestamp::now(),
            changes: vec![Change::Put {
                cf: 1,
                key: b"f\0\0".to_vec(),
                value: vec![9; 40],
            }],
        };
        let f = frame(&m).unwrap();
        assert_eq!(decode_frame(&f).unwrap(), m);
        for bit in [12 * 8, f.len() * 8 - 1, 40 * 8 + 3] {
            let mut bad = f.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(decode_frame(&bad), Err(WireError::Checksum)));
        }
        let mut huge = f.clone();
        huge[..4].copy_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(decode_frame(&huge), Err(WireError::TooBig(_))));
        assert!(matches!(
            decode_frame(&f[..f.len() - 1]),
            Err(WireError::Io(_))
        ));
    }

    proptest! {
        /// Arbitrary bytes, and arbitrary bodies behind a correct header, never panic.
        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&b);
            let mut f = (b.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&b).to_le_bytes());
            f.extend_from_slice(&b);
            let _ = decode_frame(&f);
        }
    }
}
