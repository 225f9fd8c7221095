//! Tiering through real processes: a mounted primary with a cache size ships to a `kvfs serve`
//! child over loopback TCP with TLS, evicts what the replica acknowledged, and fetches it back
//! when read; a replica killed during a cold read gives EIO within the timeout and the read
//! works again once it is back; unreplicated data is never evicted; pins keep content here.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, pattern, Mounted};
use crate::replica::{add, audit_clean, config, ok, replica_dir, status_json, sync, TcpServer};

const MIB: u64 = 1 << 20;

fn tiering(store: &Path) -> serde_json::Value {
    status_json(store)["tiering"].clone()
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Wait until the store's resident bytes are at most `limit`.
fn wait_resident_under(store: &Path, limit: u64, secs: u64) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let t = tiering(store);
        if num(&t, "resident_block_bytes") <= limit {
            return t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "resident bytes still over {limit} after {secs}s: {t}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A mount with `opts` and a replica "home" served by a `kvfs serve` child over loopback TLS.
fn with_replica(opts: &str) -> Option<(Mounted, PathBuf, TcpServer)> {
    let m = common::mount_with("64K", opts)?;
    let replica = replica_dir(&m);
    let server = TcpServer::start(&replica, &m.store, "127.0.0.1:0");
    add(&m, "home", &server.url(), &["--fingerprint", &server.fp]);
    Some((m, replica, server))
}

/// 48 MiB written to `cold`, replicated, and the cache (16 MiB) brought under its size: most
/// of the file is evicted.
fn cold_file(m: &Mounted, seed: u64) {
    std::fs::write(m.path("cold"), pattern(seed, 48 << 20)).unwrap();
    sync(&m.store);
    wait_resident_under(&m.store, 16 * MIB, 30);
}

fn read_back(m: &Mounted, name: &str, seed: u64, len: usize) {
    let got = std::fs::read(m.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(got == pattern(seed, len), "{name} differs after fetching");
}

#[test]
fn a_cache_size_is_kept_and_everything_reads_back_through_fetches() {
    let Some((mut m, replica, server)) = with_replica("cache_size=64M") else {
        return;
    };
    sync(&m.store);

    // Sample the resident bytes while 256 MiB are written (8 files of 32 MiB).
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, store) = (stop.clone(), peak.clone(), m.store.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = num(&tiering(&store), "resident_block_bytes");
                peak.fetch_max(r, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for i in 0..8u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(100 + i, 32 << 20)).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    // 64 MiB, and at most what one round of flushes adds before the evictor catches up (the
    // write-back buffers' 32 MiB).
    assert!(peak <= 96 * MIB, "resident peaked at {} MiB", peak / MIB);
    sync(&m.store);
    let t = wait_resident_under(&m.store, 64 * MIB, 30);
    assert!(num(&t, "evicted_block_bytes") >= 150 * MIB, "{t}");
    assert_eq!(
        num(&t, "total_block_bytes"),
        num(&t, "resident_block_bytes") + num(&t, "evicted_block_bytes"),
        "{t}"
    );

    // Cold: every file reads back byte-exact, most of it fetched from the replica.
    drop_caches();
    for i in 0..8u64 {
        read_back(&m, &format!("f{i}"), 100 + i, 32 << 20);
    }
    // The counters reach the store within a second or two.
    std::thread::sleep(Duration::from_millis(2500));
    let t = tiering(&m.store);
    assert!(num(&t, "fetches") * 64 * 1024 >= 150 * MIB, "{t}");
    assert_eq!(num(&t, "fetch_failures"), 0, "{t}");
    m.unmount();
    audit_clean(&m.store);
    // The residency rules hold after the fetches (and eviction kept the cache size).
    let t = tiering(&m.store);
    assert!(num(&t, "resident_block_bytes") <= 96 * MIB, "{t}");
    // A read-only mount fetches what is evicted too (without storing it).
    m.opts = "ro".into();
    m.start();
    drop_caches();
    read_back(&m, "f0", 100, 32 << 20);
    m.unmount();
    // Every evicted block is on the replica, by hash.
    let out = ok(&[
        OsStr::new("audit"),
        m.store.as_os_str(),
        OsStr::new("--fetch"),
    ]);
    let evicted = num(&t, "evicted_blocks");
    assert!(
        out.contains(&format!("{evicted} of {evicted} evicted block(s) fetched")),
        "{out}"
    );
    drop(server);
    audit_clean(&replica);
}

#[test]
fn unreplicated_data_is_never_evicted() {
    let Some(mut m) = common::mount_with("64K", "cache_size=8M") else {
        return;
    };
    // A replica that is never reachable: nothing it acknowledged, nothing evicted.
    let replica = replica_dir(&m);
    let mut server = TcpServer::start(&replica, &m.store, "127.0.0.1:0");
    let (url, fp) = (server.url(), server.fp.clone());
    server.kill();
    add(&m, "gone", &url, &["--fingerprint", &fp]);
    for i in 0..4u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(i, 8 << 20)).unwrap();
    }
    // Two tiering rounds at least.
    std::thread::sleep(Duration::from_secs(3));
    let t = tiering(&m.store);
    assert_eq!(num(&t, "evicted_blocks"), 0, "{t}");
    assert!(num(&t, "resident_block_bytes") >= 32 * MIB, "{t}");
    for i in 0..4u64 {
        read_back(&m, &format!("f{i}"), i, 8 << 20);
    }
    // With min_copies=2 and one replica that has everything, still nothing goes.
    m.unmount();
    let server = TcpServer::start(&replica, &m.store, &url["tcp://".len()..]);
    m.opts = "cache_size=8M,min_copies=2".into();
    m.start();
    sync(&m.store);
    std::thread::sleep(Duration::from_secs(3));
    let t = tiering(&m.store);
    assert_eq!(num(&t, "evicted_blocks"), 0, "{t}");
    // One copy is enough by default: the store's own setting, changed while mounted.
    m.unmount();
    m.opts = String::new();
    m.start();
    config(&m.store, "cache_size=8M");
    wait_resident_under(&m.store, 8 * MIB, 30);
    m.unmount();
    audit_clean(&m.store);
    drop(server);
}

#[test]
fn a_dead_replica_gives_eio_in_time_and_reads_work_again_when_it_returns() {
    let Some((mut m, replica, mut server)) = with_replica("cache_size=16M,fetch_timeout=3") else {
        return;
    };
    let addr = server.addr.clone();
    cold_file(&m, 1);
    // Written now: resident (the newest data is not replicated yet, and is the hottest).
    std::fs::write(m.path("hot"), pattern(2, 1 << 20)).unwrap();

    server.kill();
    m.errors_expected = true;
    drop_caches();
    let t0 = Instant::now();
    let mut f = std::fs::File::open(m.path("cold")).unwrap();
    let mut buf = vec![0u8; 48 << 20];
    let r = f.read_exact(&mut buf);
    let took = t0.elapsed();
    assert_eq!(
        r.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::EIO),
        "{r:?}"
    );
    drop(f);
    assert!(took < Duration::from_secs(8), "EIO took {took:?}");
    // A second miss fails at once while the replica is known down.
    drop_caches();
    let t1 = Instant::now();
    assert!(std::fs::read(m.path("cold")).is_err());
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    // What is resident still reads.
    read_back(&m, "hot", 2, 1 << 20);
    assert!(m.log().contains("could not be fetched"), "{}", m.log());

    // The replica returns (same address): after the down period the read works again.
    let _server = TcpServer::start(&replica, &m.store, &addr);
    std::thread::sleep(Duration::from_secs(4));
    drop_caches();
    read_back(&m, "cold", 1, 48 << 20);
    m.unmount();
    audit_clean(&m.store);
}

#[test]
fn a_pinned_subtree_stays_resident_and_unpinning_lets_it_go() {
    let Some((mut m, _replica, server)) = with_replica("cache_size=8M") else {
        return;
    };
    std::fs::create_dir(m.path("thesis")).unwrap();
    std::fs::write(m.path("thesis/draft"), pattern(5, 6 << 20)).unwrap();
    std::fs::write(m.path("other"), pattern(6, 24 << 20)).unwrap();
    sync(&m.store);
    let t = wait_resident_under(&m.store, 8 * MIB, 30);
    assert!(num(&t, "evicted_blocks") > 0, "{t}");

    let out = ok(&[
        OsStr::new("pin"),
        m.store.as_os_str(),
        m.path("thesis").as_os_str(),
    ]);
    assert!(out.contains("pinned"), "{out}");
    let t = tiering(&m.store);
    assert!(num(&t, "pinned_bytes") >= 6 * MIB, "{t}");
    // Pinning twice is refused; the pinned content stays while the rest is read and evicted.
    let again = crate::replica::kvfs(&[
        OsStr::new("pin"),
        m.store.as_os_str(),
        m.path("thesis").as_os_str(),
    ]);
    assert!(!again.status.success());
    drop_caches();
    read_back(&m, "other", 6, 24 << 20);
    std::thread::sleep(Duration::from_secs(3));
    let t = tiering(&m.store);
    assert!(num(&t, "pinned_bytes") >= 6 * MIB, "{t}");
    // Offline, the pinned file still reads.
    drop(server);
    drop_caches();
    read_back(&m, "thesis/draft", 5, 6 << 20);

    ok(&[
        OsStr::new("unpin"),
        m.store.as_os_str(),
        m.path("thesis").as_os_str(),
    ]);
    let t = tiering(&m.store);
    assert_eq!(num(&t, "pinned_bytes"), 0, "{t}");
    m.unmount();
    audit_clean(&m.store);
}

#[test]
fn a_copy_that_shares_evicted_blocks_outlives_its_source() {
    let Some((mut m, replica, server)) = with_replica("cache_size=4M") else {
        return;
    };
    std::fs::write(m.path("a"), pattern(9, 16 << 20)).unwrap();
    sync(&m.store);
    let t = wait_resident_under(&m.store, 4 * MIB, 30);
    assert!(num(&t, "evicted_blocks") > 150, "{t}");
    // The copy names the evicted blocks without their content (no fetch); the source goes.
    let src = std::fs::File::open(m.path("a")).unwrap();
    let dst = std::fs::File::create(m.path("b")).unwrap();
    let (n, e) = crate::ranges::copy_range(&src, 0, &dst, 0, 16 << 20);
    assert_eq!((n, e), (16 << 20, 0));
    drop((src, dst));
    std::fs::remove_file(m.path("a")).unwrap();
    // Shipped in any order of groups, evicted again: the replica must still hold them.
    sync(&m.store);
    std::thread::sleep(Duration::from_secs(2));
    sync(&m.store);
    wait_resident_under(&m.store, 4 * MIB, 30);
    drop_caches();
    read_back(&m, "b", 9, 16 << 20);
    m.unmount();
    audit_clean(&m.store);
    let out = ok(&[
        OsStr::new("audit"),
        m.store.as_os_str(),
        OsStr::new("--fetch"),
    ]);
    assert!(out.contains("evicted block(s) fetched"), "{out}");
    drop(server);
    audit_clean(&replica);
}

/// How many of the blocks file `name` names are evicted (from the store's own records: the
/// mount's memory cache of block content would hide an eviction from a reader).
fn evicted_blocks_of(m: &Mounted, name: &str) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(m.path(name)).unwrap().ino().to_string();
    let map = ok(&[
        OsStr::new("dump"),
        m.store.as_os_str(),
        OsStr::new("--inode"),
        OsStr::new(&ino),
    ]);
    let hashes: std::collections::HashSet<&str> = map
        .lines()
        .filter_map(|l| l.split("=>  block ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    assert!(!hashes.is_empty(), "no block map for {name}: {map}");
    let infos = ok(&[
        OsStr::new("dump"),
        m.store.as_os_str(),
        OsStr::new("--prefix"),
        OsStr::new("b"),
    ]);
    infos
        .lines()
        .filter(|l| l.contains(" evicted"))
        .filter_map(|l| l.strip_prefix("b ")?.split_whitespace().next())
        .filter(|h| hashes.contains(h))
        .count()
}

#[test]
fn the_blocks_of_a_file_open_for_writing_stay_resident() {
    let Some((mut m, _replica, _server)) = with_replica("cache_size=8M") else {
        return;
    };
    let pressure = |m: &Mounted, from: u64| {
        for i in from..from + 3 {
            std::fs::write(m.path(&format!("o{i}")), pattern(50 + i, 8 << 20)).unwrap();
        }
        sync(&m.store);
        wait_resident_under(&m.store, 8 * MIB, 30);
    };
    let mut held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("held"))
        .unwrap();
    std::io::Write::write_all(&mut held, &pattern(40, 4 << 20)).unwrap();
    held.sync_all().unwrap();
    // 24 MiB more, replicated, and the cache brought under 8 MiB: the open file stays.
    pressure(&m, 0);
    assert_eq!(evicted_blocks_of(&m, "held"), 0);
    // Closed, the same pressure evicts (most of) it: its blocks are the coldest.
    drop(held);
    pressure(&m, 3);
    assert!(
        evicted_blocks_of(&m, "held") > 0,
        "the closed file's blocks were never evicted"
    );
    drop_caches();
    read_back(&m, "held", 40, 4 << 20);
    m.unmount();
    audit_clean(&m.store);
}

#[test]
fn a_replica_restarted_between_reads_costs_no_error() {
    let Some((mut m, replica, mut server)) = with_replica("cache_size=16M") else {
        return;
    };
    let addr = server.addr.clone();
    cold_file(&m, 3);
    drop_caches();
    read_back(&m, "cold", 3, 48 << 20);
    // The fetcher's pooled connections now lead to a server that is gone; a new one listens
    // at the same address.
    server.kill();
    let _server = TcpServer::start(&replica, &m.store, &addr);
    drop_caches();
    read_back(&m, "cold", 3, 48 << 20);
    assert!(!m.log().contains("could not be fetched"), "{}", m.log());
    m.unmount();
}

#[test]
fn blocks_only_the_past_names_are_evicted_and_a_past_mount_fetches_them() {
    let Some(mut m) = common::mount_with_format(
        &["--block-size", "64K", "--history", "7d"],
        "cache_size=16M",
    ) else {
        return;
    };
    let replica = replica_dir(&m);
    let server = TcpServer::start(&replica, &m.store, "127.0.0.1:0");
    add(&m, "home", &server.url(), &["--fingerprint", &server.fp]);
    std::fs::write(m.path("f"), pattern(1, 32 << 20)).unwrap();
    sync(&m.store);
    std::thread::sleep(Duration::from_millis(50));
    let then = crate::history::moment();
    std::thread::sleep(Duration::from_millis(50));
    // The first generation is now named only by the past.
    std::fs::write(m.path("f"), pattern(2, 32 << 20)).unwrap();
    sync(&m.store);
    let t = wait_resident_under(&m.store, 16 * MIB, 60);
    // 64 MiB of blocks, at most 16 resident: a good part of the past's were evicted.
    assert!(num(&t, "evicted_block_bytes") >= 48 * MIB, "{t}");
    // (Once the replication log let go of the group that carried the past's holds.)
    let t0 = Instant::now();
    loop {
        let h = status_json(&m.store)["history"].clone();
        if h["past_only_bytes"].as_u64().unwrap() >= 32 * MIB {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{h}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The past is read back through the replica, which kept it for this primary's history.
    drop_caches();
    let mut p = common::Mounted::existing(&m.store, &format!("at={then}")).unwrap();
    read_back(&p, "f", 1, 32 << 20);
    p.unmount();
    read_back(&m, "f", 2, 32 << 20);

    // Once the window lets go of the first generation, the replica drops it too.
    config(&m.store, "history=1s");
    let t0 = Instant::now();
    while status_json(&m.store)["history"]["past_only_bytes"] != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the past is not trimmed"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    sync(&m.store);
    m.unmount();
    audit_clean(&m.store);
    drop(server);
    audit_clean(&replica);
    let r = status_json(&replica);
    let stored = r["stored_bytes"].as_u64().unwrap();
    assert!(
        stored < 40 * MIB,
        "the replica still holds {} MiB for a past that is gone",
        stored / MIB
    );
}

#[test]
fn reading_a_file_larger_than_the_cache_in_order_leaves_the_working_set_resident() {
    let Some((mut m, replica, server)) = with_replica("") else {
        return;
    };
    let cache = |size: &str| config(&m.store, &format!("cache_size={size}"));
    cache("8M");
    std::fs::write(m.path("hot"), pattern(60, 4 << 20)).unwrap();
    std::fs::write(m.path("film"), pattern(61, 64 << 20)).unwrap();
    sync(&m.store);
    wait_resident_under(&m.store, 8 * MIB, 30);
    // Room for the working set: it is read (what was evicted of it is fetched and stored).
    cache("32M");
    drop_caches();
    read_back(&m, "hot", 60, 4 << 20);
    std::thread::sleep(Duration::from_millis(1500));
    let resident = num(&tiering(&m.store), "resident_block_bytes");
    let hot_evicted = evicted_blocks_of(&m, "hot");
    assert_eq!(hot_evicted, 0, "the working set was not stored when read");
    // A film watched once, twice the cache: it passes through, taking no room.
    drop_caches();
    read_back(&m, "film", 61, 64 << 20);
    std::thread::sleep(Duration::from_millis(2500));
    let t = tiering(&m.store);
    // Only what was read before the run was seen as sequential (two reads) is stored.
    assert!(
        num(&t, "resident_block_bytes") <= resident + 2 * MIB,
        "resident before: {resident}, after: {t}"
    );
    assert_eq!(evicted_blocks_of(&m, "hot"), 0, "{t}");
    assert_eq!(num(&t, "fetch_failures"), 0, "{t}");
    m.unmount();
    audit_clean(&m.store);
    drop(server);
    audit_clean(&replica);
}

#[test]
fn a_replica_added_after_eviction_gets_the_evicted_blocks_from_the_others() {
    let Some((mut m, replica, mut server)) = with_replica("cache_size=16M") else {
        return;
    };
    cold_file(&m, 70);
    // A second replica: its first group names blocks that are only on the first one.
    let second = m.tmp.path().join("second");
    let server2 = TcpServer::start(&second, &m.store, "127.0.0.1:0");
    add(
        &m,
        "second",
        &server2.url(),
        &["--fingerprint", &server2.fp],
    );
    let out = sync(&m.store);
    assert!(!out.contains("error"), "{out}");
    // The first replica gone, the evicted blocks come from the second.
    server.kill();
    drop_caches();
    read_back(&m, "cold", 70, 48 << 20);
    m.unmount();
    audit_clean(&m.store);
    ok(&[
        OsStr::new("replica"),
        OsStr::new("remove"),
        m.store.as_os_str(),
        OsStr::new("home"),
    ]);
    // The same for a third added while the store is not mounted (`kvfs replica sync`).
    let third = m.tmp.path().join("third");
    let server3 = TcpServer::start(&third, &m.store, "127.0.0.1:0");
    add(&m, "third", &server3.url(), &["--fingerprint", &server3.fp]);
    sync(&m.store);
    drop(server2);
    m.start();
    drop_caches();
    read_back(&m, "cold", 70, 48 << 20);
    m.unmount();
    drop(server3);
    for r in [&replica, &second, &third] {
        audit_clean(r);
    }
}
