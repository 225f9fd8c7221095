//! Block encodings: how a block's content is stored in its `B hash` value.
//!
//! ```text
//! B value := 02 xxh3(content) enc                    xxh3: u64 little-endian, of the plain content
//!          | 01 enc                                  (no checksum; read as well)
//! enc     := 00 content                              plain
//!          | 'z' alg compressed                      alg 1 = zstd, 2 = lz4 (raw block format)
//!          | 'p' psum sums[n] parity[512] inner       inner = a plain or 'z' enc
//! ```
//! Compression is used only when it makes the block smaller. Parity covers `inner` cut into
//! `n` 512-byte sectors (the last one zero-padded): `sums` are the low 32 bits of each sector's
//! xxh3 (little-endian), `parity` is the XOR of all sectors and `psum` its checksum. The block's
//! name is the SHA-256 of the plain content, so dedup ignores the encoding and the hash is the
//! final judge. A read decodes and checks the content's xxh3 (28 GB/s, against SHA-256's 1.6):
//! a match is accepted; a mismatch is judged by the SHA-256 (the checksum itself may be the
//! damaged part). Only then does it look at the sector checksums and rebuild one sector from
//! parity (trying every sector if the checksums are themselves damaged), accepting the result
//! only when the SHA-256 matches. Audit always checks the SHA-256.

use xxhash_rust::xxh3::xxh3_64;

use crate::keyspace::records::{
    COMP_LZ4, COMP_NONE, COMP_ZSTD, ENC_COMPRESSED, ENC_PARITY, ENC_PLAIN,
};
use crate::keyspace::Hash;

pub const SECTOR: usize = 512;

/// The largest block (content) any store may have; a larger claimed length is corruption,
/// refused before anything is allocated for it.
pub const MAX_CONTENT: u32 = 4 << 20;

/// Bit of [`crate::keyspace::records::BlockInfo::encoding`] set when the block has parity; the
/// low bits are the compression algorithm actually used (0 = stored plain).
pub const INFO_PARITY: u8 = 0x80;

/// How new blocks are encoded (from the store's format record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Codec {
    pub compression: u8,
    pub level: i8,
    pub parity: bool,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            compression: COMP_NONE,
            level: 0,
            parity: false,
        }
    }
}

impl Codec {
    pub fn from_format(f: &crate::keyspace::records::FormatRecord) -> Codec {
        Codec {
            compression: f.compression,
            level: f.level,
            parity: f.parity,
        }
    }
}

/// A block ready to store.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The whole `B` value, version byte included.
    pub value: Vec<u8>,
    /// For `BlockInfo::encoding`: compression used, plus [`INFO_PARITY`].
    pub info: u8,
}

fn compress(alg: u8, level: i8, content: &[u8]) -> Option<Vec<u8>> {
    match alg {
        COMP_ZSTD => zstd::bulk::compress(content, level as i32).ok(),
        COMP_LZ4 => Some(lz4_flex::block::compress(content)),
        _ => None,
    }
}

fn decompress(alg: u8, data: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let out = match alg {
        COMP_ZSTD => zstd::bulk::decompress(data, len).map_err(|e| format!("zstd: {e}"))?,
        COMP_LZ4 => lz4_flex::block::decompress(data, len).map_err(|e| format!("lz4: {e}"))?,
        a => return Err(format!("unknown compression algorithm {a}")),
    };
    if out.len() != len {
        return Err(format!(
            "decompressed to {} bytes, expected {len}",
            out.len()
        ));
    }
    Ok(out)
}

/// Bytes of each of the three samples [`worth_compressing`] probes.
const PROBE: usize = 2048;

/// Whether compressing `content` is worth trying: blocks under 16 KiB always are; of a larger
/// one, three samples (start, middle, end) are compressed with lz4 together, and unless they
/// shrink by at least a sixteenth the block is stored plain. Already-compressed data (media,
/// archives, encrypted files, fio's buffers) then costs about a tenth of a full lz4 pass
/// instead of the pass itself, which was a fifth of the daemon's CPU in a sequential write of
/// random data (lz4 at about 0.5 GB/s, zstd slower). A block whose samples miss its
/// compressible part is stored plain: the format allows both, and only space is lost.
fn worth_compressing(content: &[u8]) -> bool {
    let n = content.len();
    if n < 16 << 10 {
        return true;
    }
    let mut probe = Vec::with_capacity(3 * PROBE);
    for at in [0, n / 2 - PROBE / 2, n - PROBE] {
        probe.extend_from_slice(&content[at..at + PROBE]);
    }
    lz4_flex::block::compress(&probe).len() * 16 < probe.len() * 15
}

/// Encode `content` as the codec says.
pub fn encode(codec: &Codec, content: &[u8]) -> Encoded {
    let mut inner = Vec::new();
    let mut info = COMP_NONE;
    let tried = if codec.compression != COMP_NONE && worth_compressing(content) {
        compress(codec.compression, codec.level, content)
    } else {
        None
    };
    if let Some(c) = tried {
        if c.len() + 2 < content.len() {
            inner.reserve(c.len() + 2);
            inner.push(ENC_COMPRESSED);
            inner.push(codec.compression);
            inner.extend_from_slice(&c);
            info = codec.compression;
        }
    }
    if inner.is_empty() {
        inner.reserve(content.len() + 1);
        inner.push(ENC_PLAIN);
        inner.extend_from_slice(content);
    }
    let mut value = Vec::with_capacity(inner.len() + 9);
    value.push(2u8);
    value.extend_from_slice(&xxh3_64(content).to_le_bytes());
    if codec.parity {
        value.extend_from_slice(&wrap_parity(&inner));
        info |= INFO_PARITY;
    } else {
        value.extend_from_slice(&inner);
    }
    Encoded { value, info }
}

fn sector_sum(s: &[u8]) -> u32 {
    xxh3_64(s) as u32
}

fn sectors(inner: &[u8]) -> impl Iterator<Item = &[u8]> {
    inner.chunks(SECTOR)
}

fn parity_of(inner: &[u8]) -> [u8; SECTOR] {
    let mut p = [0u8; SECTOR];
    for s in sectors(inner) {
        for (a, b) in p.iter_mut().zip(s) {
            *a ^= b;
        }
    }
    p
}

/// `'p' psum sums parity inner`
fn wrap_parity(inner: &[u8]) -> Vec<u8> {
    let n = inner.len().div_ceil(SECTOR);
    let parity = parity_of(inner);
    let mut v = Vec::with_capacity(1 + 4 + 4 * n + SECTOR + inner.len());
    v.push(ENC_PARITY);
    v.extend_from_slice(&sector_sum(&parity).to_le_bytes());
    for s in sectors(inner) {
        v.extend_from_slice(&sector_sum(s).to_le_bytes());
    }
    v.extend_from_slice(&parity);
    v.extend_from_slice(inner);
    v
}

/// The parts of a parity encoding: (psum, sums, parity, inner). The sector count is derived
/// from the total length (`rest` = everything after `'p'` is `4 + 4n + 512 + inner` with
/// `512(n-1) < inner <= 512n`), so no stored length can mislead it.
/// A parity encoding taken apart.
struct ParityParts<'a> {
    psum: u32,
    sums: Vec<u32>,
    parity: &'a [u8],
    inner: &'a [u8],
}

fn split_parity(rest: &[u8]) -> Result<ParityParts<'_>, String> {
    let t = rest
        .len()
        .checked_sub(4 + SECTOR)
        .ok_or("parity header truncated")?;
    // t = 4n + inner, inner in (512(n-1), 512n]  =>  n = ceil(t / 516) or close to it.
    let n = (t.div_ceil(SECTOR + 4)..=t.div_ceil(SECTOR + 4) + 1)
        .find(|&n| {
            let Some(inner) = t.checked_sub(4 * n) else {
                return false;
            };
            inner > SECTOR * n.saturating_sub(1) && inner <= SECTOR * n
        })
        .ok_or("parity layout inconsistent with its length")?;
    let psum = u32::from_le_bytes(rest[..4].try_into().map_err(|_| "psum")?);
    let sums = rest[4..4 + 4 * n]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let parity = &rest[4 + 4 * n..4 + 4 * n + SECTOR];
    let inner = &rest[4 + 4 * n + SECTOR..];
    Ok(ParityParts {
        psum,
        sums,
        parity,
        inner,
    })
}

fn decode_inner(inner: &[u8], len: usize) -> Result<Vec<u8>, String> {
    match inner {
        [ENC_PLAIN, content @ ..] => {
            if content.len() != len {
                return Err(format!(
                    "length {} but the block map says {len}",
                    content.len()
                ));
            }
            Ok(content.to_vec())
        }
        [ENC_COMPRESSED, alg, data @ ..] => decompress(*alg, data, len),
        [] => Err("empty encoding".into()),
        [t, ..] => Err(format!("unknown encoding {t:#04x}")),
    }
}

fn verified(content: Vec<u8>, hash: &Hash) -> Result<Vec<u8>, String> {
    if super::hash(&content) == *hash {
        Ok(content)
    } else {
        Err("content does not match its SHA-256 name".into())
    }
}

/// The version header of a `B` value: its content checksum (if any) and the encoding.
fn header(value: &[u8]) -> Result<(Option<u64>, &[u8]), String> {
    match value {
        [1, enc @ ..] if !enc.is_empty() => Ok((None, enc)),
        [2, rest @ ..] if rest.len() > 8 => {
            let sum = u64::from_le_bytes(rest[..8].try_into().map_err(|_| "checksum")?);
            Ok((Some(sum), &rest[8..]))
        }
        [] | [_] | [1 | 2, ..] => Err("value too short".into()),
        [t, ..] => Err(format!("unknown version tag {t}")),
    }
}

/// The [`Encoded::info`] byte of a stored value (compression used, parity bit), read from
/// its header: a value fetched from a replica is stored as it came.
pub fn info_of(value: &[u8]) -> Result<u8, String> {
    let (_, enc) = header(value)?;
    let inner_info = |inner: &[u8]| match inner {
        [ENC_PLAIN, ..] => Ok(COMP_NONE),
        [ENC_COMPRESSED, alg, ..] => Ok(*alg),
        _ => Err("unknown inner encoding".to_string()),
    };
    match enc {
        [ENC_PARITY, rest @ ..] => Ok(inner_info(split_parity(rest)?.inner)? | INFO_PARITY),
        _ => inner_info(enc),
    }
}

/// How hard a decode checks the content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The stored xxh3 where there is one (reads).
    Fast,
    /// Always the SHA-256 of the name (audit).
    Strong,
}

fn checked(
    content: Vec<u8>,
    hash: &Hash,
    sum: Option<u64>,
    check: Check,
) -> Result<Vec<u8>, String> {
    match (sum, check) {
        (Some(s), Check::Fast) if xxh3_64(&content) == s => Ok(content),
        // A mismatch may be a damaged checksum over good content: the name decides.
        _ => verified(content, hash),
    }
}

/// A decoded block.
#[derive(Debug)]
pub struct Decoded {
    pub content: Vec<u8>,
    /// Set when parity rebuilt a damaged sector: which one, and the healed `B` value to store.
    pub repaired: Option<(usize, Vec<u8>)>,
}

/// Decode and verify (by its xxh3) a `B` value of a block named `hash` with `len` content
/// bytes: the read path.
pub fn decode(value: &[u8], hash: &Hash, len: u32) -> Result<Decoded, String> {
    decode_with(value, hash, len, Check::Fast)
}

/// Decode and verify a `B` value, checking the content as `check` says.
pub fn decode_with(value: &[u8], hash: &Hash, len: u32, check: Check) -> Result<Decoded, String> {
    if len > MAX_CONTENT {
        return Err(format!("content length {len} exceeds any block size"));
    }
    let len = len as usize;
    let (sum, enc) = header(value)?;
    if enc[0] != ENC_PARITY {
        let content = checked(decode_inner(enc, len)?, hash, sum, check)?;
        return Ok(Decoded {
            content,
            repaired: None,
        });
    }
    let ParityParts {
        sums,
        parity,
        inner,
        ..
    } = split_parity(&enc[1..])?;
    let first_err = match decode_inner(inner, len).and_then(|c| checked(c, hash, sum, check)) {
        Ok(content) => {
            return Ok(Decoded {
                content,
                repaired: None,
            })
        }
        Err(e) => e,
    };
    // Damaged: try sectors whose checksum fails first, then every other one.
    let n = sums.len();
    let mut order: Vec<usize> = (0..n)
        .filter(|&i| sector_sum(&inner[i * SECTOR..((i + 1) * SECTOR).min(inner.len())]) != sums[i])
        .collect();
    let rest: Vec<usize> = (0..n).filter(|i| !order.contains(i)).collect();
    order.extend(rest);
    let mut fixed = inner.to_vec();
    for i in order {
        let (a, b) = (i * SECTOR, ((i + 1) * SECTOR).min(inner.len()));
        let mut rebuilt = [0u8; SECTOR];
        rebuilt.copy_from_slice(parity);
        for (j, s) in sectors(inner).enumerate() {
            if j != i {
                for (x, y) in rebuilt.iter_mut().zip(s) {
                    *x ^= y;
                }
            }
        }
        let saved = fixed[a..b].to_vec();
        fixed[a..b].copy_from_slice(&rebuilt[..b - a]);
        if let Ok(content) = decode_inner(&fixed, len).and_then(|c| verified(c, hash)) {
            // Same header (the content, and so its checksum, is what it was), new parity part.
            let mut healed = value[..value.len() - enc.len()].to_vec();
            healed.extend_from_slice(&wrap_parity(&fixed));
            return Ok(Decoded {
                content,
                repaired: Some((i, healed)),
            });
        }
        fixed[a..b].copy_from_slice(&saved);
    }
    Err(format!("{first_err}; parity could not rebuild it"))
}

/// For audit: whether a parity-encoded value's checksums and parity still match its data (a
/// block may decode fine while its parity is damaged, which would make a later repair
/// impossible). `Ok` for values without parity.
pub fn check_parity(value: &[u8]) -> Result<(), String> {
    let Ok((_, [ENC_PARITY, rest @ ..])) = header(value) else {
        return Ok(());
    };
    let ParityParts {
        psum,
        sums,
        parity,
        inner,
    } = split_parity(rest)?;
    if sector_sum(parity) != psum || parity_of(inner)[..] != parity[..] {
        return Err("parity sector damaged".into());
    }
    for (i, s) in sectors(inner).enumerate() {
        if sector_sum(s) != sums[i] {
            return Err(format!("sector {i} checksum mismatch"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        b"kvfs stores blocks by hash. "
            .iter()
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def1u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn codecs() -> Vec<Codec> {
        let mut v = Vec::new();
        for compression in [COMP_NONE, COMP_ZSTD, COMP_LZ4] {
            for parity in [false, true] {
                v.push(Codec {
                    compression,
                    level: 1,
                    parity,
                });
            }
        }
        v
    }

    #[test]
    fn every_codec_round_trips_compressible_and_random_content() {
        for c in codecs() {
            for data in [text(65536), noise(65536), text(1), noise(700), text(513)] {
                let h = crate::blocks::hash(&data);
                let e = encode(&c, &data);
                let d = decode(&e.value, &h, data.len() as u32).unwrap();
                assert_eq!(d.content, data, "{c:?}");
                assert!(d.repaired.is_none());
                check_parity(&e.value).unwrap();
            }
        }
    }

    #[test]
    fn compression_is_used_only_when_it_saves_space() {
        let c = Codec {
            compression: COMP_ZSTD,
            level: 1,
            parity: false,
        };
        let e = encode(&c, &text(65536));
        assert_eq!(e.info, COMP_ZSTD);
        assert!(e.value.len() < 2000);
        let e = encode(&c, &noise(65536));
        assert_eq!(e.info, COMP_NONE);
        assert_eq!(e.value.len(), 65536 + 10);
    }

    #[test]
    fn a_block_compressible_in_part_is_still_compressed_and_noise_is_not_tried() {
        let c = Codec {
            compression: COMP_LZ4,
            level: 0,
            parity: false,
        };
        // Half text, half noise: the samples see the text, the block shrinks by about half.
        let mut half = text(32768);
        half.extend_from_slice(&noise(32768));
        let e = encode(&c, &half);
        assert_eq!(e.info, COMP_LZ4);
        assert!(e.value.len() < 34000, "{}", e.value.len());
        assert!(worth_compressing(&text(65536)));
        assert!(!worth_compressing(&noise(65536)));
        // Small blocks are always tried.
        assert!(worth_compressing(&noise(8192)));
    }

    #[test]
    fn parity_rebuilds_any_one_damaged_sector() {
        for compression in [COMP_NONE, COMP_LZ4] {
            let c = Codec {
                compression,
                level: 1,
                parity: true,
            };
            let data = noise(10_000);
            let h = crate::blocks::hash(&data);
            let e = encode(&c, &data);
            for pos in [
                e.value.len() - 1,
                e.value.len() - 5000,
                e.value.len() - 9000,
            ] {
                let mut bad = e.value.clone();
                bad[pos] ^= 0x55;
                bad[pos - 3] ^= 0xff;
                assert!(check_parity(&bad).is_err());
                let d = decode(&bad, &h, data.len() as u32).unwrap();
                assert_eq!(d.content, data);
                let (_, healed) = d.repaired.expect("repair reported");
                assert_eq!(healed, e.value);
            }
        }
    }

    #[test]
    fn parity_survives_a_damaged_checksum_and_refuses_two_bad_sectors() {
        let c = Codec {
            compression: COMP_NONE,
            level: 0,
            parity: true,
        };
        let data = noise(4000);
        let h = crate::blocks::hash(&data);
        let e = encode(&c, &data);
        // Damage one data sector and the checksum of another: checksums mislead, the
        // exhaustive pass still finds the right sector.
        let mut bad = e.value.clone();
        let inner_start = e.value.len() - (data.len() + 1);
        bad[inner_start + 700] ^= 1;
        bad[10 + 4 + 4 * 3] ^= 1; // checksum of sector 3 (after 02, xxh3, 'p', psum)
        assert_eq!(decode(&bad, &h, 4000).unwrap().content, data);
        bad[inner_start + 2000] ^= 1; // a second damaged sector: beyond one parity sector
        assert!(decode(&bad, &h, 4000).is_err());
    }

    #[test]
    fn format_1_values_without_a_checksum_still_read() {
        let data = text(3000);
        let h = crate::blocks::hash(&data);
        let mut v1 = vec![1u8, ENC_PLAIN];
        v1.extend_from_slice(&data);
        assert_eq!(decode(&v1, &h, 3000).unwrap().content, data);
        let last = v1.len() - 1;
        v1[last] ^= 1;
        assert!(
            decode(&v1, &h, 3000).is_err(),
            "checked by the SHA-256 instead"
        );
    }

    #[test]
    fn a_damaged_checksum_over_good_content_still_reads() {
        let data = noise(5000);
        let h = crate::blocks::hash(&data);
        let mut v = encode(&Codec::default(), &data).value;
        v[3] ^= 0xff; // inside the xxh3
        assert_eq!(decode(&v, &h, 5000).unwrap().content, data);
        let last = v.len() - 1;
        v[last] ^= 1; // and now the content too
        assert!(decode(&v, &h, 5000).is_err());
    }

    #[test]
    fn damage_without_parity_is_an_error() {
        for c in codecs().into_iter().filter(|c| !c.parity) {
            let data = text(9000);
            let h = crate::blocks::hash(&data);
            let mut v = encode(&c, &data).value;
            let last = v.len() - 1;
            v[last] ^= 0x10;
            assert!(decode(&v, &h, 9000).is_err(), "{c:?}");
        }
    }
}
