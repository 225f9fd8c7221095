//! Every decoder takes random and mutated bytes without panicking: record codecs, block
//! values (all encodings, with any claimed length), key parsers and the dump/audit value
//! describer.

use proptest::prelude::*;

use kvfs::blocks::{self, encode, Codec};
use kvfs::dump::describe_value;
use kvfs::keyspace::records::*;
use kvfs::keyspace::{self as ks, Prefix};
use kvfs::util::Timestamp;

fn decode_everything(b: &[u8], len: u32) {
    let _ = Inode::decode(b);
    let _ = Dirent::decode(b);
    let _ = FmapEntry::decode(b);
    let _ = FormatRecord::decode(b);
    let _ = BlockInfo::decode(b);
    let _ = GarbageRecord::decode(b);
    let _ = ProcessRecord::decode(b);
    let _ = LockRecord::decode(b);
    let _ = decode_xattr(b);
    let _ = decode_counter(b);
    let _ = encode::decode(b, &[7; 32], len);
    let _ = encode::check_parity(b);
    let _ = ks::parse_inode_key(b);
    let _ = ks::describe_key(b);
    for p in Prefix::ALL {
        let mut k = vec![p.byte()];
        k.extend_from_slice(b);
        let _ = describe_value(&k, b);
        let _ = ks::describe_key(&k);
    }
}

fn valid_values() -> Vec<Vec<u8>> {
    let t = Timestamp { secs: 5, nsecs: 6 };
    let mut v = vec![
        Inode {
            kind: Kind::Symlink,
            perm: 0o777,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 3,
            alloc: 0,
            atime: t,
            mtime: t,
            ctime: t,
            btime: t,
            rdev: 0,
            parent: 0,
            target: b"abc".to_vec(),
        }
        .encode()
        .unwrap(),
        ProcessRecord {
            host: "h".into(),
            pid: 9,
            started: t,
            heartbeat: t,
            beats: 3,
        }
        .encode()
        .unwrap(),
        LockRecord {
            end: u64::MAX,
            write: true,
            pid: 4,
        }
        .encode()
        .unwrap(),
    ];
    let data: Vec<u8> = b"abcabcabc".iter().cycle().take(3000).copied().collect();
    for (c, p) in [
        (COMP_NONE, true),
        (COMP_ZSTD, true),
        (COMP_LZ4, false),
        (COMP_LZ4, true),
    ] {
        let codec = Codec {
            compression: c,
            level: 1,
            parity: p,
        };
        v.push(blocks::prepare(&data, &codec).unwrap().encoded.value);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600), len in any::<u32>()) {
        decode_everything(&b, len);
    }

    #[test]
    fn mutated_valid_values_never_panic(
        which in 0usize..7,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut v = valid_values()[which].clone();
        for (at, x) in edits {
            let i = at % v.len();
            v[i] ^= x | 1;
        }
        decode_everything(&v, 3000);
        v.truncate(cut % (v.len() + 1));
        decode_everything(&v, 3000);
    }
}
