//! The simulation's tests: CI's bounded run, `tools/sim`'s long run, one seed's replay, and
//! bounded freeing of a huge file.

use super::*;

#[test]
fn a_huge_file_is_freed_in_bounded_transactions() {
    let engine = MemEngine::new();
    let kv = KvStore::with_engine(Arc::new(engine.clone()));
    let format = store::init(
        &kv,
        &FormatOptions {
            block_size: BS,
            ..Default::default()
        },
    )
    .unwrap();
    let fs = Fs::new(kv, format, FsOptions::default());
    let n = NewNode {
        kind: Kind::File,
        mode: 0o644,
        umask: 0,
        rdev: 0,
        target: b"",
    };
    let blocks = 2 * crate::fs::FREE_BATCH + 10;
    let mut last_ino = 0;
    for name in [&b"unlinked"[..], b"released"] {
        let (a, fh) = fs.create_open(ROOT_INO, name, &n, WHO).unwrap();
        for b in 0..blocks {
            let mut data = vec![1u8; BS as usize];
            data[..8].copy_from_slice(&(b as u64).to_le_bytes());
            data[8] = name[0];
            fs.write(fh, (b * BS as usize) as u64, &data).unwrap();
        }
        engine.take_largest_commit();
        if name == b"unlinked" {
            fs.release(fh).unwrap();
            fs.unlink(ROOT_INO, name).unwrap();
        } else {
            // Unlinked while open: the last close frees it.
            fs.unlink(ROOT_INO, name).unwrap();
            fs.release(fh).unwrap();
        }
        let largest = engine.take_largest_commit();
        assert!(
            largest <= 3 * crate::fs::FREE_BATCH + 32,
            "one commit made {largest} writes"
        );
        assert!(fs.getattr(a.ino).is_err(), "the inode is gone");
        last_ino = a.ino;
    }
    crate::blocks::collect_all_garbage(fs.store()).unwrap();
    let report = audit(fs.store(), &AuditOptions::default()).unwrap();
    assert!(report.problems.is_empty(), "{report}");
    assert_eq!(
        report.counts.fmap_entries, 0,
        "{last_ino}: every block dropped"
    );
    assert_eq!(report.counts.blocks, 0, "every block freed");
}

/// CI's bounded run.
#[test]
fn random_operations_survive_faults_and_crashes() {
    let t0 = std::time::Instant::now();
    let s = run(1, 40, 150, (20, 30));
    eprintln!("simulation: {s:?} in {:.1?}", t0.elapsed());
    assert!(
        s.crashes >= 40
            && s.faults > 0
            && s.shipments >= 10
            && s.satellite_shipments >= 5
            && s.relayed_shipments >= 3
            && s.moments >= 20
            && s.evicted > 0
            && s.fetched > 0,
        "{s:?}"
    );
}

/// `tools/sim SECONDS`: seeds until the time is up, then the totals.
#[test]
#[ignore]
fn long() {
    let secs: u64 = std::env::var("KVFS_SIM_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let first: u64 = std::env::var("KVFS_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(crate::util::rand_u64)
        % 1_000_000_000;
    // One worker per core, each taking the next seed.
    let t0 = std::time::Instant::now();
    let next = std::sync::atomic::AtomicU64::new(first);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let total = std::sync::Mutex::new(Stats::default());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                while t0.elapsed().as_secs() < secs {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let s = run(seed, 1, 200, (20, 30));
                    let mut t = crate::util::lock(&total);
                    t.seeds += s.seeds;
                    t.ops += s.ops;
                    t.faults += s.faults;
                    t.failed_ops += s.failed_ops;
                    t.crashes += s.crashes;
                    t.shipments += s.shipments;
                    t.satellite_shipments += s.satellite_shipments;
                    t.relayed_shipments += s.relayed_shipments;
                    t.evicted += s.evicted;
                    t.fetched += s.fetched;
                    t.moments += s.moments;
                }
            });
        }
    });
    let total = crate::util::lock(&total);
    let seed = next.load(std::sync::atomic::Ordering::Relaxed);
    let mins = t0.elapsed().as_secs_f64() / 60.0;
    println!(
        "seeds {first}..{seed}: {} seeds ({:.0}/min on {workers} cores), {} operations, {} faults injected ({} operations failed on one), {} crashes survived, {} shipments compared ({} to the satellite, {} from the replica to its satellite), {} blocks evicted, {} fetched back, {} past moments compared",
        total.seeds,
        total.seeds as f64 / mins,
        total.ops,
        total.faults,
        total.failed_ops,
        total.crashes,
        total.shipments,
        total.satellite_shipments,
        total.relayed_shipments,
        total.evicted,
        total.fetched,
        total.moments
    );
}

/// Replay one seed: `KVFS_SIM_SEED=N cargo test --lib sim::tests::replay -- --ignored`.
#[test]
#[ignore]
fn replay() {
    let seed: u64 = std::env::var("KVFS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("KVFS_SIM_SEED");
    println!("{:?}", run(seed, 1, 200, (20, 30)));
}
