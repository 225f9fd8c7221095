//! The history hook of the kv layer under concurrent switching.

use super::*;

/// Keeps the past of every `k...` key as a `p` key per moment.
struct Pasts;
impl HistoryRecorder for Pasts {
    fn wants(&self, _: Cf, key: &[u8]) -> bool {
        key.starts_with(b"k")
    }
    fn record(&self, t: &mut dyn Txn, at: u64, befores: &[Before]) -> Result<(), KvError> {
        for (cf, key, old) in befores {
            let mut k = b"p".to_vec();
            k.extend_from_slice(&at.to_be_bytes());
            k.extend_from_slice(key);
            t.put(*cf, &k, old.as_deref().unwrap_or(b"-"))?;
        }
        Ok(())
    }
}

/// Commits that record their past, while another thread switches recording on and off:
/// no deadlock, moments strictly increase, each kept value is the one replaced.
#[test]
fn recording_switched_while_committing() {
    let kv = Arc::new(KvStore::with_engine(Arc::new(mem::MemEngine::new())));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let (kv, stop) = (kv.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r: Option<Arc<dyn HistoryRecorder>> =
                    (n % 2 == 0).then(|| Arc::new(Pasts) as _);
                kv.record_history(r, 0);
                n += 1;
            }
            kv.record_history(Some(Arc::new(Pasts)), 0);
        })
    };
    for i in 0..2000u32 {
        kv.transact(|t| {
            let old = t.get(Cf::Meta, b"k1")?;
            let next = old.map_or(0, |v| decode_i64(&v)) + 1;
            t.put(Cf::Meta, b"k1", &next.to_le_bytes())?;
            Ok::<_, KvError>(())
        })
        .unwrap_or_else(|e| panic!("commit {i}: {e}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    toggler.join().unwrap();
    // Recording on now: this one keeps its past whatever the toggling did before.
    kv.transact(|t| {
        let old = t.get(Cf::Meta, b"k1")?;
        let next = old.map_or(0, |v| decode_i64(&v)) + 1;
        t.put(Cf::Meta, b"k1", &next.to_le_bytes())
    })
    .unwrap();
    // The pasts recorded: moments increase, and each is the value before the next one.
    let mut pasts = Vec::new();
    kv.for_each(Cf::Meta, b"p", b"q", |k, v| {
        pasts.push((u64::from_be_bytes(k[1..9].try_into().unwrap()), v.to_vec()));
        true
    })
    .unwrap();
    assert!(!pasts.is_empty());
    assert!(pasts.windows(2).all(|w| w[0].0 < w[1].0));
    let mut last = -1i64;
    for (_, v) in &pasts {
        let n = if v == b"-" { 0 } else { decode_i64(v) };
        assert!(n > last, "kept {n} after {last}");
        last = n;
    }
}
