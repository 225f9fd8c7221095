//! The replication thread of a mount: the logger's rounds, and one shipper per replica.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::log;
use super::ship::{note_error, record, Session};
use super::transport;
use super::ReplicaError;
use crate::blocks::reader::Tiering;
use crate::keyspace::records::FormatRecord;
use crate::kv::KvStore;

/// A connection with nothing to ship for this long is closed (and reopened when there is).
const IDLE_CLOSE: Duration = Duration::from_secs(30);

/// The replication thread of a mount: a logger round every 100 ms (trimming every second),
/// and one shipping thread per replica that ships whenever the log is ahead of what it
/// acknowledged, reconnecting with backoff after errors. Returns when `stop` is set (every
/// connection is then cut, so a hung replica cannot hold the unmount).
/// `fetch` brings back blocks evicted here that a replica lacks (one added after eviction).
pub fn run(
    store: &KvStore,
    format: &FormatRecord,
    store_dir: &Path,
    stop: &AtomicBool,
    fetch: Option<Arc<dyn Tiering>>,
) {
    let cancels = std::sync::Mutex::new(HashMap::<String, transport::Canceller>::new());
    std::thread::scope(|sc| {
        let mut running: HashMap<String, std::thread::ScopedJoinHandle<'_, ()>> = HashMap::new();
        let mut last_trim = Instant::now();
        let mut last_err = None::<Instant>;
        let mut logger = log::Logger::default();
        let mut first = true;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = logger.round(store) {
                if last_err.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::error!(error = %e, "replication log round failed");
                    last_err = Some(Instant::now());
                }
            }
            if first || last_trim.elapsed() > Duration::from_secs(1) {
                first = false;
                last_trim = Instant::now();
                if let Err(e) = logger.trim(store) {
                    tracing::error!(error = %e, "trimming the replication log failed");
                }
                running.retain(|_, h| !h.is_finished());
                for (name, r) in super::replicas(store).unwrap_or_default() {
                    // Satellites connect to the mount's listener and pull.
                    if running.contains_key(&name) || r.is_satellite() {
                        continue;
                    }
                    let n = name.clone();
                    let (cancels, fetch) = (&cancels, fetch.clone());
                    running.insert(
                        name,
                        sc.spawn(move || {
                            let to = Target {
                                format,
                                store_dir,
                                name: &n,
                                fetch,
                            };
                            shipper(store, &to, stop, cancels)
                        }),
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for c in cancels.lock().unwrap_or_else(|e| e.into_inner()).values() {
            c.cancel();
        }
    });
}

/// Whom a shipper ships to, and from where.
struct Target<'a> {
    format: &'a FormatRecord,
    store_dir: &'a Path,
    name: &'a str,
    fetch: Option<Arc<dyn Tiering>>,
}

fn shipper(
    store: &KvStore,
    to: &Target<'_>,
    stop: &AtomicBool,
    cancels: &std::sync::Mutex<HashMap<String, transport::Canceller>>,
) {
    let (format, store_dir, name) = (to.format, to.store_dir, to.name);
    let mut backoff = Duration::from_millis(500);
    let sleep = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match record(store, name) {
            Ok(Some(r)) if r.is_satellite() => return,
            Ok(Some(r)) if r.base.is_some() => {}
            Ok(Some(_)) => {
                sleep(Duration::from_millis(100));
                continue;
            }
            _ => return,
        }
        let ahead = || -> Result<bool, ReplicaError> {
            let head = log::head(store)?;
            Ok(record(store, name)?.is_some_and(|r| r.acked < head.seq))
        };
        if !matches!(ahead(), Ok(true)) {
            sleep(Duration::from_millis(100));
            continue;
        }
        let res = (|| -> Result<(), ReplicaError> {
            let Some(mut s) = Session::open(store, format, store_dir, name)? else {
                return Ok(());
            };
            s.fetching_through(to.fetch.clone());
            cancels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.into(), s.canceller());
            let mut idle = Instant::now();
            while !stop.load(Ordering::Relaxed) && idle.elapsed() < IDLE_CLOSE {
                if ahead()? {
                    s.idle(false);
                    s.ship_pending(store, stop)?;
                    s.idle(true);
                    idle = Instant::now();
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            s.close();
            Ok(())
        })();
        cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match res {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                if !stop.load(Ordering::Relaxed) {
                    note_error(store, name, &e);
                }
                sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
