//! A primary's listener (`kvfs mount STORE DIR -o listen=ADDR`; a replica's is `kvfs serve
//! --listen`, which ends in [`serve_satellite`] too): satellites connect here, over
//! mutual TLS, to pull groups (`Follow`: the roles turn and this side ships as to a replica,
//! without blocks) and to fetch the blocks they read (`Hello`, then `Fetch`). Only the
//! certificates of satellites registered on this store are accepted
//! (`kvfs replica add STORE NAME satellite: --fingerprint SHA256:...`), looked up again at each
//! connection, so one added or removed while mounted counts from its next connection.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::serve::answer_fetch;
use super::ship::{self, Session};
use super::transport::{Canceller, Conn};
use super::wire::{self, Msg, WireError, PROTO_FETCH, PROTO_FOLLOW, PROTO_MAX, PROTO_MIN};
use super::{log, tls, ReplicaError, ReplicaRecord};
use crate::keyspace::records::FormatRecord;
use crate::kv::KvStore;

/// Connections served at once (each satellite has one pulling and a few fetching).
const MAX_CONNECTIONS: usize = 32;
/// A caught-up satellite hears from its upstream this often (it gives up on a silent one).
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a new satellite's connection waits for the logger to write its first group.
const BASE_WAIT: Duration = Duration::from_secs(60);

/// Accept satellites on `listener` until `stop`; every connection is then cut.
pub fn run(
    store: &KvStore,
    format: &FormatRecord,
    store_dir: &Path,
    listener: TcpListener,
    stop: &AtomicBool,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "listener: cannot poll for connections; not serving satellites");
        return;
    }
    let active = AtomicUsize::new(0);
    let cancels = Mutex::new(HashMap::<u64, Canceller>::new());
    let mut next_id = 0u64;
    std::thread::scope(|sc| {
        while !stop.load(Ordering::Relaxed) {
            let sock = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let peer = sock
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                tracing::warn!(peer, "too many connections; dropped");
                continue;
            }
            next_id += 1;
            let id = next_id;
            lock(&cancels).insert(id, Canceller::tcp(&sock));
            active.fetch_add(1, Ordering::Relaxed);
            let (active, cancels) = (&active, &cancels);
            sc.spawn(move || {
                if let Err(e) = connection(store, format, store_dir, sock, &peer, stop) {
                    match e {
                        ReplicaError::Wire(WireError::Closed) => {}
                        e if stop.load(Ordering::Relaxed) => {
                            tracing::debug!(peer, error = %e, "satellite connection cut at unmount")
                        }
                        e => tracing::warn!(peer, error = %e, "satellite connection ended"),
                    }
                }
                lock(cancels).remove(&id);
                active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        for c in lock(&cancels).values() {
            c.cancel();
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The satellites registered on `store`: name and record.
fn satellites(store: &KvStore) -> Result<Vec<(String, ReplicaRecord)>, ReplicaError> {
    let mut s = super::replicas(store)?;
    s.retain(|(_, r)| r.is_satellite());
    Ok(s)
}

fn connection(
    store: &KvStore,
    format: &FormatRecord,
    store_dir: &Path,
    sock: TcpStream,
    peer: &str,
    stop: &AtomicBool,
) -> Result<(), ReplicaError> {
    let allowed = satellite_fingerprints(store)?;
    let _ = sock.set_nodelay(true);
    // Generous: a satellite answers each group after a transaction and a sync.
    let _ = sock.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(120)));
    let cancel = Canceller::tcp(&sock);
    let cfg = tls::server_config(store_dir, &allowed, false, None)?;
    let stream = tls::accept(cfg, sock)?;
    let fp =
        peer_fingerprint(&stream).ok_or_else(|| refused(peer, "no client certificate".into()))?;
    let Some(name) = satellite_named(store, &fp)? else {
        return Err(refused(
            peer,
            format!("{fp} is not a satellite of this store"),
        ));
    };
    serve_satellite(store, format, stream, cancel, &name, peer, stop)
}

/// The fingerprint of the certificate the peer of `stream` presented.
pub fn peer_fingerprint(stream: &TlsStream) -> Option<String> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| tls::fingerprint(c.as_ref()))
}

/// The name of the satellite registered on `store` with certificate `fp`, if any.
pub fn satellite_named(store: &KvStore, fp: &str) -> Result<Option<String>, ReplicaError> {
    Ok(satellites(store)?
        .into_iter()
        .find(|(_, r)| {
            r.fingerprint
                .as_deref()
                .is_some_and(|f| f.eq_ignore_ascii_case(fp))
        })
        .map(|(name, _)| name))
}

/// The fingerprints of the satellites registered on `store`.
pub fn satellite_fingerprints(store: &KvStore) -> Result<Vec<String>, ReplicaError> {
    Ok(satellites(store)?
        .into_iter()
        .filter_map(|(_, r)| r.fingerprint)
        .collect())
}

/// A TLS connection accepted by a listener.
pub type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Serve satellite `name` on `stream`, a connection it made (TLS done, its certificate
/// checked): follow (`Follow`: ship it the log) or fetch (`Hello`, then `Fetch`es). A
/// primary's listener and a replica's (`kvfs serve --listen`) both end here.
pub fn serve_satellite(
    store: &KvStore,
    format: &FormatRecord,
    mut stream: TlsStream,
    cancel: Canceller,
    name: &str,
    peer: &str,
    stop: &AtomicBool,
) -> Result<(), ReplicaError> {
    match wire::recv(&mut stream)? {
        Msg::Follow {
            proto_min,
            proto_max,
        } => {
            if proto_max < PROTO_FOLLOW || proto_min > PROTO_MAX {
                let reason = format!(
                    "protocol versions {proto_min}..{proto_max} offered, this upstream speaks {PROTO_FOLLOW}..{PROTO_MAX}"
                );
                let _ = wire::send(
                    &mut stream,
                    &Msg::Refused {
                        reason: reason.clone(),
                    },
                );
                return Err(refused(peer, reason));
            }
            let conn = Conn::duplex(Box::new(stream), format!("satellite {name}"), cancel);
            let r = follow(store, format, conn, name, stop);
            if let Err(e) = &r {
                if !stop.load(Ordering::Relaxed)
                    && !matches!(e, ReplicaError::Wire(WireError::Closed))
                {
                    ship::note_error(store, name, e);
                }
            }
            r
        }
        Msg::Hello {
            proto_min,
            proto_max,
            fs_id,
            ..
        } => {
            let proto = PROTO_MAX.min(proto_max);
            let reason = if proto < PROTO_FETCH.max(proto_min).max(PROTO_MIN) {
                Some(format!("protocol versions {proto_min}..{proto_max} offered, fetching needs {PROTO_FETCH}..{PROTO_MAX}"))
            } else if fs_id != format.fs_id {
                Some("another filesystem".to_string())
            } else {
                None
            };
            if let Some(reason) = reason {
                let _ = wire::send(
                    &mut stream,
                    &Msg::Refused {
                        reason: reason.clone(),
                    },
                );
                return Err(refused(peer, reason));
            }
            let head = log::head(store)?;
            wire::send(
                &mut stream,
                &Msg::Welcome {
                    proto,
                    applied: head.seq,
                    chain: head.chain,
                    fresh: false,
                },
            )?;
            loop {
                match wire::recv(&mut stream)? {
                    Msg::Fetch { hashes } => answer_fetch(store, &mut stream, hashes)?,
                    Msg::Bye => return Ok(()),
                    m => return Err(WireError::Unexpected(wire::name(&m).into()).into()),
                }
            }
        }
        m => Err(WireError::Unexpected(wire::name(&m).into()).into()),
    }
}

fn refused(peer: &str, reason: String) -> ReplicaError {
    ReplicaError::Refused {
        peer: peer.into(),
        reason,
    }
}

/// Ship to satellite `name` on `conn` (it connected and asked to follow) until it hangs up or
/// `stop`: whatever the log holds past what it acknowledged, then `CaughtUp`, then again as
/// the log grows, with a `CaughtUp` every [`KEEPALIVE`] meanwhile.
fn follow(
    store: &KvStore,
    format: &FormatRecord,
    conn: Conn,
    name: &str,
    stop: &AtomicBool,
) -> Result<(), ReplicaError> {
    // A satellite added a moment ago gets its first group (the whole filesystem) at the
    // logger's next round.
    let waited = Instant::now();
    let (rec, base) = loop {
        let rec = ship::record(store, name)?
            .ok_or_else(|| refused(name, "no longer a satellite of this store".into()))?;
        if let Some(b) = rec.base {
            break (rec, b);
        }
        if stop.load(Ordering::Relaxed) || waited.elapsed() > BASE_WAIT {
            return Err(refused(name, "its first group is not logged yet".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(mut s) = Session::handshake(conn, store, format, name, &rec, base)? else {
        return Err(refused(
            name,
            "it starts over from a new copy of the whole filesystem: reconnect".into(),
        ));
    };
    let mut told = None::<Instant>;
    while !stop.load(Ordering::Relaxed) {
        let head = log::head(store)?.seq;
        let Some(rec) = ship::record(store, name)? else {
            // Removed while connected (`kvfs replica remove`).
            let reason = "no longer a satellite of this store".to_string();
            s.refuse_now(reason.clone());
            return Err(refused(name, reason));
        };
        let acked = rec.acked;
        if acked < head {
            s.idle(false);
            let acked = s.ship_pending(store, stop)?;
            s.caught_up(acked)?;
            s.idle(true);
            told = Some(Instant::now());
        } else if told.is_none_or(|t| t.elapsed() >= KEEPALIVE) {
            if s.caught_up(acked).is_err() && told.is_some() {
                // Caught up and gone: `kvfs clone` and `kvfs pull` hang up once they are.
                return Err(WireError::Closed.into());
            }
            told = Some(Instant::now());
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    s.close();
    Ok(())
}
