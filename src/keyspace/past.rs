//! Keys of history (format 5): the value a key had before each change (`Y`), the moments
//! at which changes were recorded (`Z`), and the references history holds on blocks (`V`).
//!
//! `Y cf escaped-key 00 00 at`: `cf` is the family index of the key, `escaped-key` the key
//! with every `00` byte written `00 ff`, then the terminator `00 00` and the moment `at`
//! (u64 big-endian nanoseconds since the epoch). The escape keeps the order of the keys and
//! makes no escaped key a prefix of another's terminator, so the records of one key are
//! contiguous and sorted by moment, and the records of a range of keys `[a, b)` are the range
//! `[Y cf esc(a), Y cf esc(b))` (without terminators).

use super::{Hash, Prefix};
use crate::kv::Cf;

const TERM: [u8; 2] = [0x00, 0x00];

fn escape_into(k: &mut Vec<u8>, key: &[u8]) {
    for &b in key {
        k.push(b);
        if b == 0 {
            k.push(0xff);
        }
    }
}

/// `Y cf esc(key)`, without terminator: the lower bound of the records of keys from `key`.
pub fn past_bound(cf: Cf, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len() + key.len() / 8 + 10);
    k.push(Prefix::Past.byte());
    k.push(cf.index() as u8);
    escape_into(&mut k, key);
    k
}

/// `Y cf esc(key) 00 00 at`: the value `key` had until the change recorded at `at`.
pub fn past_key(cf: Cf, key: &[u8], at: u64) -> Vec<u8> {
    let mut k = past_bound(cf, key);
    k.extend_from_slice(&TERM);
    k.extend_from_slice(&at.to_be_bytes());
    k
}

/// The records of `key` recorded after `at` (exclusive): `[past_key(at + 1), end)`.
pub fn past_after(cf: Cf, key: &[u8], at: u64) -> (Vec<u8>, Vec<u8>) {
    let start = past_key(cf, key, at.saturating_add(1));
    let mut end = past_bound(cf, key);
    end.extend_from_slice(&[0x00, 0x01]);
    (start, end)
}

/// The records of every key in `[start, end)` of `cf`.
pub fn past_range(cf: Cf, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (past_bound(cf, start), past_bound(cf, end))
}

/// `(cf, key, at)` of a `Y` key; `None` if malformed.
pub fn parse_past_key(k: &[u8]) -> Option<(Cf, Vec<u8>, u64)> {
    let (&p, rest) = k.split_first()?;
    if p != Prefix::Past.byte() {
        return None;
    }
    let (&cf, mut rest) = rest.split_first()?;
    let cf = *Cf::ALL.get(cf as usize)?;
    let mut key = Vec::with_capacity(rest.len());
    loop {
        match rest {
            [0x00, 0xff, tail @ ..] => {
                key.push(0);
                rest = tail;
            }
            [0x00, 0x00, tail @ ..] => {
                let at = u64::from_be_bytes(<[u8; 8]>::try_from(tail).ok()?);
                return Some((cf, key, at));
            }
            [0x00, ..] | [] => return None,
            [b, tail @ ..] => {
                key.push(*b);
                rest = tail;
            }
        }
    }
}

/// `Z at`: the keys whose past was recorded at `at`.
pub fn moment_key(at: u64) -> Vec<u8> {
    let mut k = vec![Prefix::Moment.byte()];
    k.extend_from_slice(&at.to_be_bytes());
    k
}

/// The moment of a `Z` key.
pub fn parse_moment_key(k: &[u8]) -> Option<u64> {
    match k.split_first() {
        Some((&p, rest)) if p == Prefix::Moment.byte() => {
            Some(u64::from_be_bytes(<[u8; 8]>::try_from(rest).ok()?))
        }
        _ => None,
    }
}

/// `V hash`: how many `Y` records name the block (an i64 merge counter): such a block stays
/// resident (see keyspace.md, History).
pub fn past_hold_key(h: &Hash) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(Prefix::PastHold.byte());
    k.extend_from_slice(h);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_keys_keep_key_order_and_parse_back() {
        let keys: Vec<Vec<u8>> = vec![
            b"d".to_vec(),
            vec![b'd', 0],
            vec![b'd', 0, 0],
            vec![b'd', 0, 1],
            vec![b'd', 0, 0xff],
            vec![b'd', 1],
            b"da".to_vec(),
            b"db".to_vec(),
        ];
        let mut all = Vec::new();
        for k in &keys {
            for at in [0u64, 5, u64::MAX] {
                let y = past_key(Cf::Meta, k, at);
                assert_eq!(parse_past_key(&y), Some((Cf::Meta, k.clone(), at)));
                all.push((k.clone(), at, y));
            }
        }
        let mut sorted = all.clone();
        sorted.sort_by(|a, b| a.2.cmp(&b.2));
        let mut by_key = all.clone();
        by_key.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        assert_eq!(sorted, by_key, "escaped order is (key, moment) order");
        // A range of keys holds exactly the records of the keys inside it.
        for a in &keys {
            for b in &keys {
                let (s, e) = past_range(Cf::Meta, a, b);
                for (k, _, y) in &all {
                    let inside = k >= a && k < b;
                    assert_eq!(*y >= s && *y < e, inside, "{a:?}..{b:?} {k:?}");
                }
            }
            let (s, e) = past_after(Cf::Meta, a, 5);
            for (k, at, y) in &all {
                assert_eq!(*y >= s && *y < e, k == a && *at > 5);
            }
        }
        assert_eq!(parse_past_key(b"Y\x00d\x00"), None);
        assert_eq!(parse_past_key(b"Y\x09d"), None);
        assert_eq!(parse_moment_key(&moment_key(77)), Some(77));
    }
}
