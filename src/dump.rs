//! `kvfs dump`: every key of a store with its decoded value, one per line, for people
//! debugging a store. Works on a mounted store (read-only open, no lock taken). The value
//! decoder here is also audit's "does every record decode" check.

use std::io::Write;

use crate::blocks::encode::INFO_PARITY;
use crate::keyspace::records::{
    decode_counter, decode_v1, decode_xattr, BlockInfo, Dirent, FmapEntry, FormatRecord,
    GarbageRecord, Inode, LockRecord, PendingWrite, ProcessRecord,
};
use crate::keyspace::{self as ks, Ino, InodeKey, Prefix};
use crate::kv::{decode_i64, KvError, KvStore};
use crate::replica::{ChangeMarker, LogHead, LogPart, ReplicaRecord, ReplicaState, Upstream};

/// Longest raw value shown in full (hex); longer ones are cut.
const SHOW_BYTES: usize = 48;

fn hex_cut(b: &[u8]) -> String {
    if b.len() <= SHOW_BYTES {
        ks::hex(b)
    } else {
        format!("{}... ({} bytes)", ks::hex(&b[..SHOW_BYTES]), b.len())
    }
}

fn printable(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => format!("hex {}", hex_cut(b)),
    }
}

fn pseudo_value(name: &[u8], v: &[u8]) -> Result<String, String> {
    let locks = name == [ks::inode_sub::PSEUDO_LOCKS];
    match (v, ks::lock_version(v)) {
        ([1], _) => Ok("01".into()),
        (_, Some(n)) if locks => Ok(format!("version {n:016x}")),
        _ if locks => Err(format!("expected 01 or 02 + version, found {}", hex_cut(v))),
        _ => Err(format!("expected 01, found {}", hex_cut(v))),
    }
}

/// The value of `key` in human-readable form, or why it does not decode.
pub fn describe_value(key: &[u8], v: &[u8]) -> Result<String, String> {
    let e = |e: crate::keyspace::records::DecodeError| e.to_string();
    match key.first().copied().and_then(Prefix::from_byte) {
        Some(Prefix::Meta) => match key {
            ks::META_FORMAT => FormatRecord::decode(v).map(|r| format!("{r:?}")).map_err(e),
            ks::META_NEXT_INO | ks::META_LOGGED => {
                decode_counter(v).map(|n| n.to_string()).map_err(e)
            }
            ks::META_LOG_HEAD => LogHead::decode(v).map(|h| format!("{h:?}")).map_err(e),
            ks::META_REPLICA => ReplicaState::decode(v).map(|r| format!("{r:?}")).map_err(e),
            ks::META_UPSTREAM => Upstream::decode(v).map(|u| format!("{u:?}")).map_err(e),
            ks::META_CONFIG => decode_v1::<Vec<(String, String)>>("settings", v)
                .map(|s| format!("{s:?}"))
                .map_err(e),
            ks::META_PINS => decode_v1::<Vec<u64>>("pins", v)
                .map(|p| format!("pinned roots {p:?}"))
                .map_err(e),
            ks::META_HISTORY => crate::history::HistoryState::decode(v)
                .map(|h| format!("{h:?}"))
                .map_err(e),
            _ => Err(format!("unknown metadata key, value {}", hex_cut(v))),
        },
        Some(Prefix::Inode) => match ks::parse_inode_key(key) {
            InodeKey::Record(_) => Inode::decode(v).map(|i| format!("{i:?}")).map_err(e),
            InodeKey::Lock(..) => LockRecord::decode(v).map(|l| format!("{l:?}")).map_err(e),
            InodeKey::Open(..) => decode_counter(v)
                .map(|n| format!("{n} open handle(s)"))
                .map_err(e),
            InodeKey::Xattr(..) => decode_xattr(v).map(printable).map_err(e),
            InodeKey::Pseudo(_, name) => pseudo_value(name, v),
            InodeKey::Unknown => Err(format!("unknown inode sub-key, value {}", hex_cut(v))),
        },
        Some(Prefix::Dirent) if key.len() > 9 => {
            Dirent::decode(v).map(|d| format!("{d:?}")).map_err(e)
        }
        Some(Prefix::Garbage) if key.len() == 9 => GarbageRecord::decode(v)
            .map(|g| format!("{g:?}"))
            .map_err(e),
        Some(Prefix::Process) if key.len() == 9 => ProcessRecord::decode(v)
            .map(|p| format!("{p:?}"))
            .map_err(e),
        Some(Prefix::Pending) if key.len() == 25 => PendingWrite::decode(v)
            .map(|p| {
                format!(
                    "{} bytes at {} in the block, size {}, mtime {:?}",
                    p.data.len(),
                    p.offset,
                    p.size,
                    p.mtime
                )
            })
            .map_err(e),
        Some(Prefix::Covered) if key.len() == 17 => match <[u8; 8]>::try_from(v) {
            Ok(t) => Ok(format!(
                "fsync log records below seq {} are in the block",
                u64::from_be_bytes(t)
            )),
            Err(_) => Err(format!("sequence number is {} bytes, expected 8", v.len())),
        },
        Some(Prefix::Fmap) if key.len() == 17 => FmapEntry::decode(v)
            .map(|f| format!("block {} len {}", ks::hex(&f.hash), f.len))
            .map_err(e),
        Some(Prefix::Block) if key.len() == 33 => {
            // Tag 1: the encoding follows; tag 2: an 8-byte xxh3 of the content comes first.
            let enc = match v {
                [1, rest @ ..] => rest,
                [2, rest @ ..] if rest.len() > 8 => &rest[8..],
                _ => &[][..],
            };
            match enc {
                [e, more @ ..] => Ok(format!(
                    "encoding {} ({} bytes stored)",
                    match *e {
                        0 => "plain".to_string(),
                        b'z' => format!("z{}", more.first().copied().unwrap_or(0)),
                        b'p' => "parity".to_string(),
                        x => format!("unknown {x:#04x}"),
                    },
                    v.len()
                )),
                [] => Err(format!("bad block header {}", hex_cut(v))),
            }
        }
        Some(Prefix::BlockInfo) if key.len() == 33 => BlockInfo::decode(v)
            .map(|b| {
                format!(
                    "len {} stored {} compression {}{} used {} logged {}{}{}",
                    b.len,
                    b.stored,
                    b.encoding & !INFO_PARITY,
                    if b.encoding & INFO_PARITY != 0 {
                        " +parity"
                    } else {
                        ""
                    },
                    b.used,
                    b.logged,
                    if b.evicted { " evicted" } else { "" },
                    if b.pins > 0 {
                        format!(" pinned {}", b.pins)
                    } else {
                        String::new()
                    }
                )
            })
            .map_err(e),
        Some(Prefix::Refcount) if key.len() == 34 => {
            if v.len() == 8 {
                Ok(format!("{:+}", decode_i64(v)))
            } else {
                Err(format!("counter is {} bytes, expected 8", v.len()))
            }
        }
        Some(Prefix::BlockGarbage) if key.len() == 34 => {
            if v.is_empty() {
                Ok("candidate".into())
            } else {
                Err(format!("expected empty, found {}", hex_cut(v)))
            }
        }
        Some(Prefix::WrittenAhead) if key.len() == 33 => match <[u8; 8]>::try_from(v) {
            Ok(t) => Ok(format!(
                "written ahead (token {:016x}), awaiting its commit or recovery",
                u64::from_le_bytes(t)
            )),
            Err(_) => Err(format!("token is {} bytes, expected 8", v.len())),
        },
        Some(Prefix::Past) => match crate::keyspace::past::parse_past_key(key) {
            Some((cf, k, at)) => crate::history::decode_past(v)
                .map(|old| {
                    let was = match old {
                        None => "absent".to_string(),
                        Some(o) => describe_value(&k, &o).unwrap_or_else(|w| format!("!! {w}")),
                    };
                    format!(
                        "{} {} until {}: {was}",
                        cf.name(),
                        ks::describe_key(&k),
                        crate::history::when::show(at)
                    )
                })
                .map_err(e),
            None => Err("malformed past-value key".into()),
        },
        Some(Prefix::Moment) if key.len() == 9 => crate::history::decode_moment(v)
            .map(|m| {
                format!(
                    "{} key(s) changed{}",
                    m.keys.len(),
                    if m.values.is_some() {
                        " (pending: their past values inside)"
                    } else {
                        ""
                    }
                )
            })
            .map_err(e),
        Some(Prefix::PastHold) if key.len() == 33 => {
            if v.len() == 8 {
                Ok(format!("{} past reference(s)", decode_i64(v)))
            } else {
                Err(format!("counter is {} bytes, expected 8", v.len()))
            }
        }
        Some(Prefix::Change) if key.len() == 9 => ChangeMarker::decode(v)
            .map(|m| format!("{} key(s) changed", m.keys.len()))
            .map_err(e),
        Some(Prefix::Log) if key.len() == 13 => LogPart::decode(v)
            .map(|p| {
                format!(
                    "{} change(s){}, chain {}",
                    p.changes.len(),
                    if p.last { ", last part" } else { "" },
                    ks::hex(&p.chain)
                )
            })
            .map_err(e),
        Some(Prefix::Replica) if key.len() > 1 => ReplicaRecord::decode(v)
            .map(|r| format!("{r:?}"))
            .map_err(e),
        Some(Prefix::Hold) if key.len() == 33 && v.is_empty() => {
            Ok("held for a group not yet applied".into())
        }
        Some(Prefix::PrimaryPast) if key.len() == 33 && v.is_empty() => {
            Ok("held for the primary's history".into())
        }
        Some(Prefix::LastUse) if key.len() == 37 && v.is_empty() => Ok("resident".into()),
        Some(Prefix::Unlogged) if key.len() == 33 => match <[u8; 8]>::try_from(v) {
            Ok(t) => Ok(format!(
                "a reference not yet logged (token {:016x})",
                u64::from_le_bytes(t)
            )),
            Err(_) => Err(format!("token is {} bytes, expected 8", v.len())),
        },
        Some(Prefix::Counter) if key.len() > 1 => {
            if v.len() == 8 {
                Ok(format!("{}", decode_i64(v)))
            } else {
                Err(format!("counter is {} bytes, expected 8", v.len()))
            }
        }
        _ => Err(format!("unknown key kind, value {}", hex_cut(v))),
    }
}

/// What to dump.
#[derive(Clone, Debug, Default)]
pub struct DumpFilter {
    /// Only keys of this prefix.
    pub prefix: Option<Prefix>,
    /// Only keys about this inode (`i`, `d` as parent, `f`, `g`).
    pub inode: Option<Ino>,
}

/// Find a prefix by its letter or its name (`i`, `inode`, `block-map`...).
pub fn parse_prefix(s: &str) -> Option<Prefix> {
    Prefix::ALL
        .into_iter()
        .find(|p| p.name() == s || (s.len() == 1 && s.as_bytes()[0] == p.byte()))
}

/// Write the dump; returns (keys, undecodable values).
pub fn dump(store: &KvStore, f: &DumpFilter, out: &mut dyn Write) -> Result<(u64, u64), KvError> {
    let (mut n, mut bad) = (0u64, 0u64);
    let mut io_err = None;
    for p in Prefix::ALL {
        if f.prefix.is_some_and(|want| want != p) {
            continue;
        }
        let (s, e) = match f.inode {
            Some(ino) => match p {
                Prefix::Inode | Prefix::Dirent | Prefix::Garbage | Prefix::Fmap => {
                    let mut s = vec![p.byte()];
                    s.extend_from_slice(&ino.to_be_bytes());
                    let mut e = vec![p.byte()];
                    e.extend_from_slice(&(ino + 1).to_be_bytes());
                    (s, e)
                }
                _ => continue,
            },
            None => p.range(),
        };
        store.for_each(p.cf(), &s, &e, |k, v| {
            n += 1;
            let line = match describe_value(k, v) {
                Ok(d) => format!("{}  =>  {d}", ks::describe_key(k)),
                Err(why) => {
                    bad += 1;
                    format!("{}  =>  !! {why}", ks::describe_key(k))
                }
            };
            if let Err(e) = writeln!(out, "{line}") {
                io_err = Some(e);
                return false;
            }
            true
        })?;
        if let Some(e) = io_err.take() {
            // A closed pipe (`kvfs dump | head`) ends the dump quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok((n, bad));
            }
            return Err(KvError::Other(e.to_string()));
        }
    }
    Ok((n, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{encode, Codec};

    #[test]
    fn block_values_of_both_tags_and_written_ahead_tokens_decode() {
        let data = vec![5u8; 3000];
        let h = crate::blocks::hash(&data);
        let v = encode::encode(&Codec::default(), &data).value;
        assert_eq!(v[0], 2, "blocks are written with tag 2");
        let got = describe_value(&ks::block_key(&h), &v).unwrap();
        assert!(got.starts_with("encoding plain"), "{got}");
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&v[9..]);
        let got = describe_value(&ks::block_key(&h), &v1).unwrap();
        assert!(got.starts_with("encoding plain"), "{got}");
        assert!(describe_value(&ks::block_key(&h), &[2, 0, 0]).is_err());
        let w = describe_value(&ks::written_ahead_key(&h), &7u64.to_le_bytes()).unwrap();
        assert!(w.contains("0000000000000007"), "{w}");
        assert!(describe_value(&ks::written_ahead_key(&h), &[1]).is_err());
    }
}
