//! A satellite's side: `kvfs clone URL STORE` makes a read-only follower of an upstream (a
//! primary mounted with `-o listen=ADDR`), and its mount keeps pulling. A satellite is a
//! replica store with an `M upstream` record: it is shipped the upstream's groups without
//! their blocks, takes the blocks they name as evicted (held by the upstream) and fetches
//! them when read, into its own cache. It applies groups in order as a replica does, so it
//! only ever shows states its upstream had.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::listen::KEEPALIVE;
use super::serve::Server;
use super::transport::{self, Conn};
use super::{apply, ReplicaError, Upstream};
use crate::keyspace::records::FormatRecord;
use crate::kv::KvStore;
use crate::store::FormatOptions;
use crate::util::Timestamp;

/// A pull that hears nothing from its upstream for this long (it sends a keepalive every
/// [`KEEPALIVE`]) is cut and started again.
const SILENT: Duration = Duration::from_secs(KEEPALIVE.as_secs() * 6);

/// `kvfs clone`: create satellite `dir` of the upstream at `url` and pull until it holds the
/// upstream's state (metadata only). The store is made at the upstream's first message, with
/// its filesystem id and block size and `create`'s compression and parity.
pub fn clone(
    url: &str,
    fingerprint: Option<String>,
    dir: &Path,
    create: FormatOptions,
) -> Result<(), ReplicaError> {
    if crate::store::db_path(dir).join("CURRENT").exists() {
        return Err(ReplicaError::Refused {
            peer: url.into(),
            reason: format!(
                "{} holds a store already (`kvfs pull` catches a satellite up)",
                dir.display()
            ),
        });
    }
    let up = Upstream {
        url: url.into(),
        fingerprint,
        added: Timestamp::now(),
    };
    let server = Server::satellite(dir, create, up.clone());
    retrying(|| pull_with(&server, &up, dir, None))
}

/// A catch-up, tried again when the upstream hung up before it was done: it does so when the
/// satellite must start over from a new base group (made at its next logger round).
fn retrying(mut pull: impl FnMut() -> Result<(), ReplicaError>) -> Result<(), ReplicaError> {
    let mut tries = 0;
    loop {
        match pull() {
            Err(ReplicaError::Wire(super::wire::WireError::Closed)) if tries < 3 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// The satellite store's upstream, or why it is not one.
fn upstream_of(store: &KvStore) -> Result<Upstream, ReplicaError> {
    let not = |why: &str| ReplicaError::Refused {
        peer: "satellite".into(),
        reason: why.into(),
    };
    if !apply::is_follower_store(store)? {
        return Err(not(
            "not a satellite (no upstream): a primary or a promoted store",
        ));
    }
    super::upstream(store)?.ok_or_else(|| not("a replica, not a satellite: it has no upstream"))
}

/// `kvfs pull` (store not mounted): catch satellite `dir` up with its upstream once.
pub fn pull_once(
    store: Arc<KvStore>,
    format: FormatRecord,
    dir: &Path,
) -> Result<(), ReplicaError> {
    let up = upstream_of(&store)?;
    let server = Server::for_store(store, format, Some(up.clone()));
    retrying(|| pull_with(&server, &up, dir, None))
}

/// Connect to the upstream and pull, until caught up (`stop` None) or until the connection
/// ends or `stop` is set.
fn pull_with(
    server: &Server,
    up: &Upstream,
    dir: &Path,
    stop: Option<&AtomicBool>,
) -> Result<(), ReplicaError> {
    let conn = transport::connect(&up.url, up.fingerprint.as_deref(), dir)?;
    let cancel = conn.canceller();
    let mut w = Watched {
        conn,
        t0: Instant::now(),
        last: Arc::new(AtomicU64::new(0)),
    };
    let (t0, last) = (w.t0, w.last.clone());
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let quiet =
                    (t0.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
                let silent = quiet > SILENT.as_millis() as u64;
                if silent || stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                    cancel.cancel();
                    return;
                }
            }
        });
        let r = server.follow(&mut w, &up.url, stop.is_none());
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// A connection that notes when it last read anything.
struct Watched {
    conn: Conn,
    t0: Instant,
    /// Milliseconds after `t0` of the last read.
    last: Arc<AtomicU64>,
}

impl std::io::Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.conn.io.read(buf)?;
        self.last
            .store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl std::io::Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.conn.io.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.io.flush()
    }
}

/// The pull of a mounted satellite: follow the upstream until `stop`, reconnecting with
/// backoff (1 s doubling to 30 s) after an error. The mount serves what it has meanwhile.
pub fn run(store: Arc<KvStore>, format: &FormatRecord, dir: &Path, stop: &AtomicBool) {
    let up = match upstream_of(&store) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "satellite: not pulling");
            return;
        }
    };
    let url = up.url.clone();
    let server = Server::for_store(store, format.clone(), Some(up.clone()));
    let mut backoff = Duration::from_secs(1);
    let mut failing = None::<String>;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match pull_with(&server, &up, dir, Some(stop)) {
            Ok(()) => failing = None,
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                let msg = e.to_string();
                if failing.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(upstream = %url, error = %msg, "satellite: pulling failed; retrying");
                    failing = Some(msg);
                }
            }
        }
        // A connection that lasted reset the backoff.
        if t0.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
