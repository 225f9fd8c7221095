//! The crash harness (as sled's): a real mount process serves a workload of writes, renames,
//! unlinks, links and fsyncs; it is SIGKILLed at a random moment; then `kvfs audit` must find
//! the store clean and every byte fsynced before the kill must read back identical, round
//! after round on the same store. `KVFS_CRASH_ROUNDS` sets the rounds (CI runs a few;
//! `tools/crash-harness` runs 100).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::locks::run_kvfs;

/// What the workload knows to be durable: the file's path and its fsynced prefix.
type Durable = Arc<Mutex<BTreeMap<PathBuf, Vec<u8>>>>;

/// Operations until the mount goes away (the first error ends the workload). Files named
/// `keep-*` are never touched again after their fsync; `log-*` files only grow, and their
/// fsynced prefix is what must survive; `big-*` files (4-20 MiB, enough for their blocks to
/// be written ahead of their commits) are durable once fsynced; everything else is churn.
fn workload(root: PathBuf, round: u64, durable: Durable) {
    let mut rng = Rng(round.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let dir = root.join(format!("r{round}"));
    if fs::create_dir(&dir).is_err() {
        return;
    }
    let log_path = dir.join("log");
    let Ok(mut log) = OpenOptions::new().create(true).append(true).open(&log_path) else {
        return;
    };
    let mut logged = Vec::new();
    for i in 0u64.. {
        let r = (|| -> std::io::Result<()> {
            match rng.below(9) {
                0 | 1 => {
                    // A file written and fsynced: durable from here on.
                    let p = dir.join(format!("keep-{i}"));
                    let data = pattern(round * 100_000 + i, rng.below(300_000) as usize);
                    let mut f = File::create(&p)?;
                    f.write_all(&data)?;
                    f.sync_all()?;
                    durable.lock().unwrap().insert(p, data);
                }
                2 | 3 => {
                    let chunk = pattern(i, rng.below(20_000) as usize + 1);
                    log.write_all(&chunk)?;
                    logged.extend_from_slice(&chunk);
                    if rng.below(2) == 0 {
                        log.sync_data()?;
                        durable
                            .lock()
                            .unwrap()
                            .insert(log_path.clone(), logged.clone());
                    }
                }
                4 => {
                    let p = dir.join(format!("churn-{}", rng.below(20)));
                    fs::write(&p, pattern(i, rng.below(100_000) as usize))?;
                }
                5 => {
                    let a = dir.join(format!("churn-{}", rng.below(20)));
                    let b = dir.join(format!("churn-{}", rng.below(20)));
                    let _ = fs::rename(a, b);
                }
                6 => {
                    let a = dir.join(format!("churn-{}", rng.below(20)));
                    let b = dir.join(format!("link-{}", rng.below(5)));
                    let _ = fs::remove_file(&b);
                    let _ = fs::hard_link(a, b);
                    let _ = fs::remove_file(dir.join(format!("churn-{}", rng.below(20))));
                }
                8 => {
                    let p = dir.join(format!("big-{i}"));
                    let data = pattern(
                        round * 100_000 + i,
                        (4 << 20) + rng.below(16 << 20) as usize,
                    );
                    let mut f = File::create(&p)?;
                    for chunk in data.chunks(1 << 20) {
                        f.write_all(chunk)?;
                    }
                    f.sync_all()?;
                    durable.lock().unwrap().insert(p, data);
                }
                _ => {
                    let d = dir.join(format!("sub-{}", rng.below(4)));
                    if fs::create_dir(&d).is_err() {
                        let _ = fs::remove_dir(&d);
                    } else {
                        fs::write(d.join("x"), b"x")?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            // The mount is gone (ENOTCONN) or the kill hit mid-call: the workload ends.
            if !matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) {
                eprintln!("round {round}: workload ended on {e}");
            }
            return;
        }
    }
}

fn audit_clean(store: &Path, round: u64) {
    let out = Command::new(KVFS).arg("audit").arg(store).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "round {round}: audit after the kill:\n{text}"
    );
}

fn rounds() -> u64 {
    std::env::var("KVFS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

#[test]
fn sigkill_at_random_moments_leaves_a_clean_store_and_every_fsynced_byte() {
    let Some(mut m) = mount() else { return };
    let durable: Durable = Arc::default();
    let mut rng = Rng(std::process::id() as u64 * 7919 + 17);
    let t0 = Instant::now();
    let n = rounds();
    for round in 0..n {
        let root = m.mnt.clone();
        let d = durable.clone();
        let w = std::thread::spawn(move || workload(root, round, d));
        std::thread::sleep(Duration::from_millis(50 + rng.below(600)));
        m.crash();
        w.join().unwrap();
        audit_clean(&m.store, round);
        m.start();
        for (p, want) in durable.lock().unwrap().iter() {
            let got = fs::read(p).unwrap_or_else(|e| panic!("round {round}: {}: {e}", p.display()));
            let is_log = p.file_name().is_some_and(|n| n == "log");
            if is_log {
                assert!(
                    got.len() >= want.len() && got[..want.len()] == want[..],
                    "round {round}: {} lost fsynced bytes ({} of {} survive)",
                    p.display(),
                    got.len(),
                    want.len()
                );
            } else {
                assert!(
                    got == *want,
                    "round {round}: {} differs after the crash",
                    p.display()
                );
            }
        }
    }
    eprintln!(
        "{n} crash rounds, {} durable files checked, {:.1}s",
        durable.lock().unwrap().len(),
        t0.elapsed().as_secs_f64()
    );
    m.unmount();
    audit_clean(&m.store, n);
    let (_, ahead) = run_kvfs(&["dump", "--prefix", "W"], &m.store);
    assert!(
        ahead.trim().is_empty(),
        "written-ahead markers survived recovery and a clean exit:\n{ahead}"
    );
}

/// An fsync of small writes on a mount alone with its store writes pending records (`J`)
/// instead of committing whole blocks. SIGKILLed right after such fsyncs, the store holds
/// them; the next mount applies them: every synced byte, the size (writes past the end, with
/// holes), and a clean audit before and after. A file unlinked while open loses its records
/// with the inode.
#[test]
fn writes_an_fsync_recorded_survive_a_crash_and_the_next_mount_applies_them() {
    use std::os::unix::fs::FileExt;
    let Some(mut m) = mount() else { return };
    let p = m.path("db");
    let mut model = pattern(1, 1 << 20);
    fs::write(&p, &model).unwrap();
    File::open(&p).unwrap().sync_all().unwrap();
    let gone = m.path("gone");
    let g = File::create(&gone).unwrap();
    g.write_all_at(&pattern(2, 200_000), 0).unwrap();
    g.sync_data().unwrap();
    g.write_all_at(b"held open, then unlinked", 70_000).unwrap();
    g.sync_data().unwrap();
    fs::remove_file(&gone).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut rng = Rng(std::process::id() as u64 * 31 + 7);
    for i in 0..300 {
        let len = 1 + rng.below(9000) as usize;
        // Some land past the end, leaving a hole before them.
        let off = rng.below(model.len() as u64 + 70_000) as usize;
        let data = pattern(1000 + i, len);
        f.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
        f.sync_data().unwrap();
    }
    // The mount commits a file's buffered blocks, deleting their records, when a write past
    // its end makes them mostly new, when a handle closes, and once they have been buffered
    // for 2 s: on a loaded machine the loop can end right after such a commit (1 record left
    // in a crash-harness run). So close a second handle (a commit) and end with small writes,
    // each fsynced (every fifth just past the end, after a small hole): their records are
    // what the crash leaves.
    drop(File::open(&p).unwrap());
    for i in 0..30 {
        let past_end = i % 5 == 0;
        let data = pattern(
            5000 + i,
            1 + rng.below(if past_end { 512 } else { 4096 }) as usize,
        );
        let off = if past_end {
            model.len() + rng.below(64) as usize
        } else {
            rng.below((model.len() - data.len()) as u64) as usize
        };
        f.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + data.len() {
            model.resize(off + data.len(), 0);
        }
        model[off..off + data.len()].copy_from_slice(&data);
        f.sync_data().unwrap();
    }
    m.crash();
    drop((f, g));
    let (ok, pending) = run_kvfs(&["dump", "--prefix", "J"], &m.store);
    assert!(ok, "{pending}");
    // Most go to the fsync log (RocksDB synced), some to `J` keys.
    let logged = fsync_log_records(&m.store);
    assert!(
        pending.lines().count() + logged > 10,
        "the fsyncs left no pending records to apply ({logged} in the fsync log):\n{pending}"
    );
    audit_clean(&m.store, 0);
    m.start();
    assert!(
        m.log().contains("applied writes an fsync made durable"),
        "{}",
        m.log()
    );
    assert_eq!(fs::metadata(&p).unwrap().len(), model.len() as u64);
    assert!(
        fs::read(&p).unwrap() == model,
        "content differs after the crash"
    );
    m.unmount();
    let (_, pending) = run_kvfs(&["dump", "--prefix", "J"], &m.store);
    assert!(
        pending.trim().is_empty(),
        "records left after they were applied:\n{pending}"
    );
    assert_eq!(
        fsync_log_records(&m.store),
        0,
        "the fsync log did not start over"
    );
    audit_clean(&m.store, 1);
}

/// What `kvfs audit` says the fsync log holds.
fn fsync_log_records(store: &Path) -> usize {
    let (_, out) = run_kvfs(&["audit"], store);
    out.lines()
        .find_map(|l| {
            l.strip_prefix("note: ")?
                .split_once(" record(s) in the fsync log")
        })
        .map_or(0, |(n, _)| n.parse().unwrap())
}

/// A block committed after an fsync put its bytes in the fsync log holds newer bytes than the
/// log's record: the next mount must not lay the record over them. Another file's record
/// keeps the log from starting over, as a busy mount's would.
#[test]
fn a_block_committed_after_its_fsync_log_record_keeps_its_newer_bytes() {
    use std::os::unix::fs::FileExt;
    let Some(mut m) = mount() else { return };
    let (a, b) = (m.path("a"), m.path("b"));
    for p in [&a, &b] {
        fs::write(p, pattern(1, 256 << 10)).unwrap();
        File::open(p).unwrap().sync_all().unwrap();
    }
    let fa = OpenOptions::new().write(true).open(&a).unwrap();
    let fb = OpenOptions::new().write(true).open(&b).unwrap();
    // Small fsynced writes: records, in the log once RocksDB has nothing unsynced.
    let mut model_a = pattern(1, 256 << 10);
    for i in 0..8u64 {
        let x = pattern(100 + i, 4096);
        fb.write_all_at(&x, 4096).unwrap();
        fb.sync_data().unwrap();
        let y = pattern(200 + i, 4096);
        fa.write_all_at(&y, i * 8192).unwrap();
        model_a[(i * 8192) as usize..][..4096].copy_from_slice(&y);
        fa.sync_data().unwrap();
    }
    // b's first block, written whole: its fsync commits it (not a record) and syncs.
    let newer = pattern(300, 64 << 10);
    fb.write_all_at(&newer, 0).unwrap();
    fb.sync_data().unwrap();
    // a's last write time, which the kernel pushed before its fsync: durable with it.
    let mtime_a = fs::metadata(&a).unwrap().modified().unwrap();
    m.crash();
    drop((fa, fb));
    assert!(
        fsync_log_records(&m.store) >= 8,
        "the fsyncs did not go to the fsync log"
    );
    audit_clean(&m.store, 0);
    // A read-only mount cannot apply them: it says so, counting only the records their
    // blocks do not hold (b's newer block holds its records' bytes).
    m.opts = "ro".into();
    m.start();
    let warned = m
        .log()
        .lines()
        .find(|l| l.contains("that a crashed mount did not commit"))
        .map(str::to_string);
    m.unmount();
    m.opts.clear();
    let count = |what: &str| -> Option<usize> {
        let l = warned.as_deref()?;
        l.split(&format!("{what}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    // a's 8 records (in the log, or `J` keys where RocksDB had unsynced commits); fewer if
    // the timer committed a's block before the crash on a slow machine.
    let left = count("keyed").zip(count("logged")).map(|(k, l)| k + l);
    assert!(left.is_some_and(|n| (1..=8).contains(&n)), "{warned:?}");
    m.start();
    let mut model_b = pattern(1, 256 << 10);
    model_b[..64 << 10].copy_from_slice(&newer);
    assert!(
        fs::read(&b).unwrap() == model_b,
        "b's committed block lost its newer bytes"
    );
    assert!(
        fs::read(&a).unwrap() == model_a,
        "a lost bytes an fsync made durable"
    );
    assert_eq!(fs::metadata(&a).unwrap().modified().unwrap(), mtime_a);
    m.unmount();
    assert_eq!(fsync_log_records(&m.store), 0);
    audit_clean(&m.store, 1);
}

/// Replication mode: the primary ships to a replica over `exec:` while the workload runs, and
/// at a random moment the primary's mount, the replica's server or both are SIGKILLed. After
/// every round both audits are clean and the replica holds every group the primary recorded
/// as acknowledged; at the end a final sync makes the trees equal.
#[test]
fn sigkill_of_primary_and_replica_loses_nothing_acknowledged() {
    use crate::replica as r;
    let Some(mut m) = mount() else { return };
    let replica = r::replica_dir(&m);
    r::add(&m, "home", &r::exec_url(&replica), &[]);
    let mut rng = Rng(std::process::id() as u64 * 31 + 5);
    let t0 = Instant::now();
    let n = rounds();
    let mut killed = (0, 0);
    for round in 0..n {
        let root = m.mnt.clone();
        let w = std::thread::spawn(move || workload(root, round, Arc::default()));
        std::thread::sleep(Duration::from_millis(400 + rng.below(1100)));
        // 0: the replica's server, then the primary a moment later (the workload ends only
        // with its mount); 1: the primary alone; 2: both at once.
        let which = rng.below(3);
        if which != 1 {
            if let Some(pid) = r::server_pid(&replica) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.1 += 1;
            }
        }
        if which == 0 {
            std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        }
        m.crash();
        killed.0 += 1;
        w.join().unwrap();
        audit_clean(&m.store, round);
        if replica.join("db").exists() {
            audit_clean(&replica, round);
            let acked = r::status_json(&m.store)["replication"]["replicas"][0]["acked"]
                .as_u64()
                .unwrap();
            let applied = r::status_json(&replica)["replication"]["replica_of"]["applied"]
                .as_u64()
                .unwrap();
            assert!(
                applied >= acked,
                "round {round}: the primary recorded group {acked} as acknowledged, the replica holds {applied}"
            );
        }
        m.start();
    }
    m.unmount();
    let out = r::sync(&m.store);
    assert!(out.contains("home\tin sync"), "{out}");
    audit_clean(&replica, n);
    m.start();
    let rm = Mounted::existing(&replica, "").unwrap();
    r::wait_equal(&m.mnt, &rm.mnt, 15);
    eprintln!(
        "{n} rounds, {} primary and {} replica kills, {:.1}s",
        killed.0,
        killed.1,
        t0.elapsed().as_secs_f64()
    );
}
