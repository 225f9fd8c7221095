//! What every engine must do, as one suite run against each ([`run_all`]): the filesystem
//! above relies on exactly these behaviours and nothing engine-specific.

use std::any::Any;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{decode_i64, Cf, KvError, KvStore};

/// A store under test and the way to reopen it (drop it and open the same data again; an
/// engine that simulates crashes drops what was not synced).
pub struct Subject {
    _keep: Box<dyn Any>,
    open: Box<dyn Fn() -> KvStore>,
    store: Option<KvStore>,
}

impl Subject {
    pub fn new(keep: impl Any, open: impl Fn() -> KvStore + 'static) -> Subject {
        let store = open();
        Subject {
            _keep: Box::new(keep),
            open: Box::new(open),
            store: Some(store),
        }
    }

    fn s(&self) -> &KvStore {
        self.store.as_ref().expect("store open")
    }

    fn reopen(&mut self) {
        self.store = None;
        self.store = Some((self.open)());
    }
}

type Case = fn(&mut Subject);

const CASES: &[(&str, Case)] = &[
    ("read_your_writes", read_your_writes),
    ("snapshot_reads", snapshot_reads),
    ("tracked_read_conflicts", tracked_read_conflicts),
    (
        "untracked_reads_do_not_conflict",
        untracked_reads_do_not_conflict,
    ),
    (
        "pseudo_key_makes_a_scan_conflict",
        pseudo_key_makes_a_scan_conflict,
    ),
    ("blind_writes_conflict", blind_writes_conflict),
    (
        "merges_sum_inside_transactions",
        merges_sum_inside_transactions,
    ),
    ("range_deletes", range_deletes),
    ("iteration_order_and_bounds", iteration_order_and_bounds),
    (
        "retry_serializes_read_modify_write",
        retry_serializes_read_modify_write,
    ),
    (
        "failed_closure_writes_nothing",
        failed_closure_writes_nothing,
    ),
    (
        "synced_commit_survives_reopen",
        synced_commit_survives_reopen,
    ),
    ("outside_writes", outside_writes),
    ("unchecked_writes", unchecked_writes),
];

/// Run every case, each on a fresh subject from `make`.
pub fn run_all(make: &dyn Fn() -> Subject) {
    for (name, case) in CASES {
        let mut s = make();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut s)));
        if let Err(e) = r {
            panic!("conformance case {name} failed: {e:?}");
        }
    }
}

fn read_your_writes(s: &mut Subject) {
    let got = s
        .s()
        .transact(|t| {
            t.put(Cf::Meta, b"a", b"1")?;
            let a = t.get(Cf::Meta, b"a")?;
            t.delete(Cf::Meta, b"a")?;
            let gone = t.get(Cf::Meta, b"a")?;
            t.put(Cf::Meta, b"b", b"2")?;
            let b = t.get_untracked(Cf::Meta, b"b")?;
            Ok::<_, KvError>((a, gone, b))
        })
        .unwrap();
    assert_eq!(got, (Some(b"1".to_vec()), None, Some(b"2".to_vec())));
    assert_eq!(s.s().get(Cf::Meta, b"a").unwrap(), None);
    assert_eq!(s.s().get(Cf::Meta, b"b").unwrap(), Some(b"2".to_vec()));
}

fn snapshot_reads(s: &mut Subject) {
    let st = s.s();
    st.transact(|t| t.put(Cf::Meta, b"k1", b"old")).unwrap();
    let (before, n_before, after, n_after) = st
        .read(|r| {
            let before = r.get(Cf::Meta, b"k1")?;
            // Another transaction commits while the snapshot is held.
            st.transact(|t| {
                t.put(Cf::Meta, b"k1", b"new")?;
                t.put(Cf::Meta, b"k2", b"x")
            })?;
            let after = r.get(Cf::Meta, b"k1")?;
            let n = r.scan(Cf::Meta, b"k", b"l", 10)?.len();
            Ok::<_, KvError>((before, 1, after, n))
        })
        .unwrap();
    assert_eq!(before, after, "a snapshot does not move");
    assert_eq!(n_before, n_after);
    assert_eq!(st.get(Cf::Meta, b"k1").unwrap(), Some(b"new".to_vec()));
    assert!(matches!(
        st.read(|r| r.put(Cf::Meta, b"x", b"y")),
        Err(KvError::ReadOnly)
    ));
}

/// Run `f` as a transaction whose first attempt lets `other` commit in the middle; returns
/// how many attempts it took.
fn attempts_with_interference(
    st: &KvStore,
    mut f: impl FnMut(&mut dyn super::Txn) -> Result<(), KvError>,
    other: impl Fn(&KvStore),
) -> u32 {
    let n = AtomicU32::new(0);
    st.transact(|t| {
        if n.fetch_add(1, Ordering::Relaxed) == 0 {
            f(t)?;
            other(st);
            t.put(Cf::Meta, b"zz-mine", b"1")
        } else {
            f(t)?;
            t.put(Cf::Meta, b"zz-mine", b"1")
        }
    })
    .unwrap();
    n.load(Ordering::Relaxed)
}

fn tracked_read_conflicts(s: &mut Subject) {
    let st = s.s();
    st.transact(|t| t.put(Cf::Meta, b"x", b"0")).unwrap();
    let n = attempts_with_interference(
        st,
        |t| t.get(Cf::Meta, b"x").map(|_| ()),
        |o| o.transact(|t| t.put(Cf::Meta, b"x", b"1")).unwrap(),
    );
    assert_eq!(n, 2, "a tracked read of a changed key retries");
    // A read of a key that did not exist is tracked too.
    let n = attempts_with_interference(
        st,
        |t| t.get(Cf::Fmap, b"absent").map(|_| ()),
        |o| o.transact(|t| t.put(Cf::Fmap, b"absent", b"1")).unwrap(),
    );
    assert_eq!(n, 2, "a tracked read of a created key retries");
}

fn untracked_reads_do_not_conflict(s: &mut Subject) {
    let st = s.s();
    st.transact(|t| t.put(Cf::Meta, b"d1", b"0")).unwrap();
    let n = attempts_with_interference(
        st,
        |t| {
            t.scan(Cf::Meta, b"d", b"e", 100)?;
            t.get_untracked(Cf::Meta, b"d1").map(|_| ())
        },
        |o| {
            o.transact(|t| {
                t.put(Cf::Meta, b"d1", b"1")?;
                t.put(Cf::Meta, b"d2", b"1")
            })
            .unwrap()
        },
    );
    assert_eq!(n, 1, "scans and untracked reads take no conflict");
}

fn pseudo_key_makes_a_scan_conflict(s: &mut Subject) {
    let st = s.s();
    let n = attempts_with_interference(
        st,
        |t| {
            t.get(Cf::Meta, b"p-pseudo")?;
            t.scan(Cf::Meta, b"p", b"q", 100).map(|_| ())
        },
        |o| {
            o.transact(|t| {
                t.put(Cf::Meta, b"p1", b"1")?;
                t.put(Cf::Meta, b"p-pseudo", b"1")
            })
            .unwrap()
        },
    );
    assert_eq!(n, 2, "the pseudo-key covers the scan");
}

fn blind_writes_conflict(s: &mut Subject) {
    let st = s.s();
    let n = attempts_with_interference(
        st,
        |t| t.put(Cf::Meta, b"w", b"mine"),
        |o| o.transact(|t| t.put(Cf::Meta, b"w", b"theirs")).unwrap(),
    );
    assert_eq!(n, 2, "a written key is tracked");
    assert_eq!(st.get(Cf::Meta, b"w").unwrap(), Some(b"mine".to_vec()));
}

fn merges_sum_inside_transactions(s: &mut Subject) {
    let st = s.s();
    for d in [1i64, 1, -1, 5] {
        st.transact(|t| t.merge(Cf::Bidx, b"rX", &d.to_le_bytes()))
            .unwrap();
    }
    assert_eq!(decode_i64(&st.get(Cf::Bidx, b"rX").unwrap().unwrap()), 6);
    let seen = st
        .transact(|t| {
            t.merge(Cf::Bidx, b"rX", &10i64.to_le_bytes())?;
            t.merge(Cf::Bidx, b"rY", &(-2i64).to_le_bytes())?;
            let x = t.get(Cf::Bidx, b"rX")?.map(|v| decode_i64(&v));
            let y = t.get(Cf::Bidx, b"rY")?.map(|v| decode_i64(&v));
            Ok::<_, KvError>((x, y))
        })
        .unwrap();
    assert_eq!(seen, (Some(16), Some(-2)));
    // A put then a merge in one transaction, and a merge after a delete.
    st.transact(|t| {
        t.put(Cf::Bidx, b"rZ", &3i64.to_le_bytes())?;
        t.merge(Cf::Bidx, b"rZ", &4i64.to_le_bytes())?;
        t.delete(Cf::Bidx, b"rY")
    })
    .unwrap();
    st.transact(|t| t.merge(Cf::Bidx, b"rY", &7i64.to_le_bytes()))
        .unwrap();
    assert_eq!(decode_i64(&st.get(Cf::Bidx, b"rZ").unwrap().unwrap()), 7);
    assert_eq!(decode_i64(&st.get(Cf::Bidx, b"rY").unwrap().unwrap()), 7);
    let sc = st.read(|r| r.scan(Cf::Bidx, b"r", b"s", 10)).unwrap();
    let sums: Vec<i64> = sc.iter().map(|(_, v)| decode_i64(v)).collect();
    assert_eq!(sums, vec![16, 7, 7]);
}

fn range_deletes(s: &mut Subject) {
    let st = s.s();
    st.transact(|t| {
        for i in 0..20u8 {
            t.put(Cf::Fmap, &[b'f', i], &[i])?;
        }
        Ok::<_, KvError>(())
    })
    .unwrap();
    let left = st
        .transact(|t| {
            for (k, _) in t.scan(Cf::Fmap, &[b'f', 5], &[b'f', 15], usize::MAX)? {
                t.delete(Cf::Fmap, &k)?;
            }
            // The transaction's own scan no longer sees them.
            Ok::<_, KvError>(t.scan(Cf::Fmap, b"f", b"g", usize::MAX)?.len())
        })
        .unwrap();
    assert_eq!(left, 10);
    let mut keys = Vec::new();
    st.for_each(Cf::Fmap, b"f", b"g", |k, _| {
        keys.push(k[1]);
        true
    })
    .unwrap();
    assert_eq!(keys, (0..5).chain(15..20).collect::<Vec<u8>>());
}

fn iteration_order_and_bounds(s: &mut Subject) {
    let st = s.s();
    let keys: [&[u8]; 7] = [
        b"a",
        b"a\x00",
        b"a\x00\x01",
        b"a\x01",
        b"a\xfe",
        b"b",
        b"\x00",
    ];
    st.transact(|t| {
        for k in keys {
            t.put(Cf::Meta, k, b"v")?;
        }
        Ok::<_, KvError>(())
    })
    .unwrap();
    let want: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a\x00".to_vec(),
        b"a\x00\x01".to_vec(),
        b"a\x01".to_vec(),
        b"a\xfe".to_vec(),
    ];
    let in_txn = st
        .transact(|t| {
            // An uncommitted key inside the range shows in order.
            t.put(Cf::Meta, b"a\x00\x00", b"v")?;
            t.scan(Cf::Meta, b"a", b"b", usize::MAX)
        })
        .unwrap();
    let mut want_txn = want.clone();
    want_txn.insert(2, b"a\x00\x00".to_vec());
    assert_eq!(
        in_txn.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        want_txn
    );
    let snap = st
        .read(|r| r.scan(Cf::Meta, b"a", b"b", usize::MAX))
        .unwrap();
    assert_eq!(snap.len(), want_txn.len());
    let limited = st.read(|r| r.scan(Cf::Meta, b"a", b"b", 2)).unwrap();
    assert_eq!(limited.len(), 2);
    assert_eq!(limited[1].0, b"a\x00".to_vec());
    let empty = st.read(|r| r.scan(Cf::Meta, b"b", b"b", 10)).unwrap();
    assert!(empty.is_empty());
    let mut seen = Vec::new();
    st.for_each(Cf::Meta, b"a\x00", b"a\xfe", |k, _| {
        seen.push(k.to_vec());
        seen.len() < 2
    })
    .unwrap();
    assert_eq!(seen, vec![b"a\x00".to_vec(), b"a\x00\x00".to_vec()]);
    // Families are separate.
    assert!(st
        .read(|r| r.scan(Cf::Fmap, b"a", b"b", 10))
        .unwrap()
        .is_empty());
}

fn retry_serializes_read_modify_write(s: &mut Subject) {
    let st = s.store.take().expect("store");
    let st = Arc::new(st);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let st = st.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    st.transact(|t| {
                        let v = t.get(Cf::Meta, b"n")?.map(|v| decode_i64(&v)).unwrap_or(0);
                        t.put(Cf::Meta, b"n", &(v + 1).to_le_bytes())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(decode_i64(&st.get(Cf::Meta, b"n").unwrap().unwrap()), 400);
}

fn failed_closure_writes_nothing(s: &mut Subject) {
    let st = s.s();
    let r: Result<(), KvError> = st.transact(|t| {
        t.put(Cf::Meta, b"half", b"1")?;
        Err(KvError::Other("the operation failed".into()))
    });
    assert!(r.is_err());
    assert_eq!(st.get(Cf::Meta, b"half").unwrap(), None);
}

fn synced_commit_survives_reopen(s: &mut Subject) {
    s.s()
        .transact(|t| {
            t.put(Cf::Meta, b"durable", b"1")?;
            t.merge(Cf::Bidx, b"rD", &3i64.to_le_bytes())
        })
        .unwrap();
    s.s().sync().unwrap();
    s.reopen();
    assert_eq!(
        s.s().get(Cf::Meta, b"durable").unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(decode_i64(&s.s().get(Cf::Bidx, b"rD").unwrap().unwrap()), 3);
}

fn outside_writes(s: &mut Subject) {
    let v = vec![9u8; 10_000];
    s.s()
        .store_bulk_durably(Cf::Blocks, &[(b"Bx".to_vec(), &v[..])])
        .unwrap();
    s.s()
        .transact(|t| t.put(Cf::Blocks, b"Wx", b"token"))
        .unwrap();
    s.s()
        .delete_unsynced(Cf::Blocks, &[b"Wx".to_vec()])
        .unwrap();
    assert_eq!(s.s().get(Cf::Blocks, b"Wx").unwrap(), None);
    s.reopen();
    assert_eq!(
        s.s().get(Cf::Blocks, b"Bx").unwrap(),
        Some(v),
        "bulk values are durable"
    );
    s.s().checkpoint().unwrap();
    s.s().reclaim_freed_space().unwrap();
}

/// `write_unchecked`: puts and deletes of several families land together and survive a sync
/// and a reopen.
fn unchecked_writes(s: &mut Subject) {
    s.s().transact(|t| t.put(Cf::Meta, b"gone", b"x")).unwrap();
    s.s()
        .write_unchecked(&[
            (Cf::Meta, b"u1".to_vec(), Some(b"1".to_vec())),
            (Cf::Fmap, b"u2".to_vec(), Some(b"2".to_vec())),
            (Cf::Meta, b"gone".to_vec(), None),
        ])
        .unwrap();
    s.s().sync().unwrap();
    s.reopen();
    let st = s.s();
    assert_eq!(st.get(Cf::Meta, b"u1").unwrap(), Some(b"1".to_vec()));
    assert_eq!(st.get(Cf::Fmap, b"u2").unwrap(), Some(b"2".to_vec()));
    assert_eq!(st.get(Cf::Meta, b"gone").unwrap(), None);
}
