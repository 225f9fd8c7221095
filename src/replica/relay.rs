//! A replica serving satellites (`kvfs serve --listen` on a replica store with satellites
//! registered): the replica logs what it applies as a primary logs what it commits. While it
//! has satellites the change tracker is installed on its store, so each group it applies
//! leaves a marker listing the keys it changed, and the logger turns markers into groups of
//! the replica's own log (its own seqs and chain, `M log`), which hold the blocks they name
//! until every satellite acknowledged them. Its listener takes primaries and satellites apart
//! by their certificates: a satellite's connection is served as a primary's listener serves
//! one (`Follow`, `Fetch`). A replica applies whole groups in single transactions, so every
//! state its log gives is a state its primary had, and so is every state of its satellites.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::listen::{peer_fingerprint, satellite_fingerprints, satellite_named, serve_satellite};
use super::serve::Server;
use super::tls::{self, PeerList};
use super::transport::Canceller;
use super::{log, ReplicaError};

/// Satellite connections of a server never end for a stop (the server runs until killed).
static NEVER: AtomicBool = AtomicBool::new(false);

/// One connection to `kvfs serve --listen`: a primary's shipment, or a registered satellite
/// following or fetching. `also` is the server's list of satellite certificates, refreshed
/// here from the store before the handshake, so one added while serving counts from its
/// next connection; `allow` are the primaries given on the command line. A certificate
/// accepted as a satellite's is only ever served as one: it never ships to the replica.
pub fn connection(
    server: &Server,
    cfg: Arc<rustls::ServerConfig>,
    (allow, also): (&[String], &PeerList),
    sock: TcpStream,
    peer: &str,
) -> Result<(), ReplicaError> {
    // A store that cannot be opened is the session's to refuse (it tells the primary why).
    let opened = server.opened().ok().flatten();
    if let Some(o) = &opened {
        let fps = satellite_fingerprints(&o.kv)?;
        *also.lock().unwrap_or_else(|e| e.into_inner()) = fps;
    }
    let _ = sock.set_write_timeout(Some(Duration::from_secs(120)));
    let cancel = Canceller::tcp(&sock);
    let mut stream = tls::accept(cfg, sock)?;
    let refused = |reason: String| ReplicaError::Refused {
        peer: peer.into(),
        reason,
    };
    let fp = peer_fingerprint(&stream).ok_or_else(|| refused("no client certificate".into()))?;
    if tls::allows_primary(server.path(), allow, &fp) {
        return server.session(&mut stream, peer);
    }
    let named = match &opened {
        Some(o) => satellite_named(&o.kv, &fp)?.map(|n| (o, n)),
        None => None,
    };
    match named {
        Some((o, name)) => serve_satellite(&o.kv, &o.format, stream, cancel, &name, peer, &NEVER),
        None => Err(refused(format!(
            "{fp} is neither an allowed primary nor a satellite of this replica"
        ))),
    }
}

/// The replica's log for its satellites, tended until `stop`: a logger round every second
/// (each applied group is logged right after it is applied; this catches what a failed round
/// left), trimming what every satellite acknowledged and freeing the blocks only the trimmed
/// groups held; and the control socket (`kvfs replica add|remove` while it serves).
pub fn tend(server: &Server, stop: &AtomicBool) {
    let mut logger = log::Logger::default();
    let mut control = false;
    let mut last_err = None::<Instant>;
    let mut last_round = Instant::now();
    std::thread::scope(|sc| {
        while !stop.load(Ordering::Relaxed) {
            // The control socket soon after the first primary created the store.
            std::thread::sleep(Duration::from_millis(100));
            let Ok(Some(o)) = server.opened() else {
                continue;
            };
            if !control {
                control = true;
                let path = crate::store::control_socket(server.path());
                match crate::control::bind(&path) {
                    Ok(l) => {
                        let kv = o.kv.clone();
                        sc.spawn(move || {
                            crate::control::serve_with(l, stop, |line| {
                                crate::control::answer_replicas(&kv, line).unwrap_or_else(|| {
                                    format!("error: kvfs serve answers replica-add and replica-remove only, not {:?}\n", line.trim())
                                })
                            })
                        });
                    }
                    Err(e) => {
                        tracing::error!(socket = %path.display(), error = %e, "no control socket: `kvfs replica add` needs the server stopped")
                    }
                }
            }
            if last_round.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last_round = Instant::now();
            let r = logger
                .round(&o.kv)
                .and_then(|_| logger.trim(&o.kv))
                .and_then(|n| {
                    if n > 0 {
                        crate::blocks::collect_all_garbage(&o.kv)?;
                    }
                    Ok(())
                });
            if let Err(e) = r {
                if last_err.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::error!(error = %e, "the log for this replica's satellites failed");
                    last_err = Some(Instant::now());
                }
            }
        }
    });
}
