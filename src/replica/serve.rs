//! `kvfs serve`: the replica's end of the protocol, over stdio (under ssh or `exec:`) or TCP
//! with TLS. The store is created at the first primary's `Hello`, with that primary's
//! filesystem id and block size and this side's own compression and parity; from then on it
//! accepts only that filesystem. The server touches nothing outside its store directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::apply;
use super::transport::Duplex;
use super::wire::{
    self, Msg, WireError, MAX_FETCH, MAX_HAVE, PROTO_FETCH, PROTO_FOLLOW, PROTO_MAX, PROTO_MIN,
};
use super::{chain, Change, ReplicaError, Upstream};
use crate::blocks::{self, encode::Codec, Prepared};
use crate::keyspace::records::FormatRecord;
use crate::keyspace::{self as ks, Hash};
use crate::kv::{Cf, KvStore};
use crate::store::{self, FormatOptions};

/// Received block bytes kept in memory before they are stored (held) without waiting for the
/// primary's `Flush`. Each store is one flush of the blocks family (a fixed cost of ~150 ms
/// here): 16 MiB batches stored at ~70 MB/s, 32 MiB at ~110 MB/s.
const PENDING_BYTES: usize = 32 << 20;
/// A group's parts are gathered in memory before the one transaction that applies them.
const MAX_GROUP_BYTES: usize = 1 << 30;

/// The replica store behind a server, opened at the first `Hello` (or at start when it exists).
pub struct Server {
    path: PathBuf,
    /// Compression and parity for a store created here.
    create: FormatOptions,
    open: Mutex<Option<Arc<Opened>>>,
    /// A satellite's end: the store follows an upstream (recorded when it is created here) and
    /// takes groups without their blocks.
    satellite: Option<Upstream>,
    /// `kvfs serve --history SPAN`: the replica's own history window, set when it is opened.
    history: Option<String>,
}

pub struct Opened {
    pub kv: Arc<KvStore>,
    pub format: FormatRecord,
    codec: Codec,
}

impl Server {
    pub fn new(path: &Path, create: FormatOptions) -> Server {
        Server {
            path: path.to_path_buf(),
            create,
            open: Mutex::new(None),
            satellite: None,
            history: None,
        }
    }

    /// Keep every state this replica applies for `span` (its own window, e.g. `90d`).
    pub fn keeping_history(mut self, span: Option<String>) -> Server {
        self.history = span;
        self
    }

    /// The history window given to this server, then recording as the store's settings say.
    fn keep_history(&self, kv: &KvStore) -> Result<(), ReplicaError> {
        if let Some(h) = &self.history {
            crate::tier::config::write(kv, &[("history".to_string(), h.clone())])?;
        }
        crate::history::install(kv)?;
        Ok(())
    }

    /// The end of satellite `path`, which follows `upstream` (created at its first `Hello`).
    pub fn satellite(path: &Path, create: FormatOptions, upstream: Upstream) -> Server {
        Server {
            satellite: Some(upstream),
            ..Server::new(path, create)
        }
    }

    /// A server of a replica store opened already (any engine: the simulation's in-memory
    /// replica), or of a satellite store (`upstream`: a mount pulling into its own store).
    pub fn for_store(kv: Arc<KvStore>, format: FormatRecord, upstream: Option<Upstream>) -> Server {
        if let Err(e) = Self::log_for_satellites(&kv) {
            tracing::warn!(error = %e, "not logging for this replica's satellites");
        }
        let codec = Codec::from_format(&format);
        Server {
            path: PathBuf::new(),
            create: FormatOptions::default(),
            open: Mutex::new(Some(Arc::new(Opened { kv, format, codec }))),
            satellite: upstream,
            history: None,
        }
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A replica with satellites logs what it applies for them, from its open on.
    fn log_for_satellites(kv: &KvStore) -> Result<(), ReplicaError> {
        super::rebase_satellites_if_unlogged(kv)?;
        super::track_if_replicated(kv)?;
        Ok(())
    }

    /// The store, opened if it exists (for a server that starts before any primary).
    pub fn opened(&self) -> Result<Option<Arc<Opened>>, ReplicaError> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() && store::db_path(&self.path).join("CURRENT").exists() {
            let (kv, format) = store::open(&self.path).map_err(store_err)?;
            if apply::state(&kv)?.is_none() {
                return Err(refuse(format!(
                    "{} is a primary store, not a replica",
                    self.path.display()
                )));
            }
            match (super::upstream(&kv)?, &self.satellite) {
                (Some(u), None) => {
                    return Err(refuse(format!(
                        "{} is a satellite of {}: it takes no shipments",
                        self.path.display(),
                        u.url
                    )))
                }
                (None, Some(_)) => {
                    return Err(refuse(format!(
                        "{} is a replica store, not a satellite",
                        self.path.display()
                    )))
                }
                _ => {}
            }
            // Blocks a killed server had written ahead of the transaction naming them.
            crate::blocks::ahead::recover_written_ahead(&kv, false)?;
            // Its past is kept from here on if it has a history window.
            self.keep_history(&kv)?;
            Self::log_for_satellites(&kv)?;
            let codec = Codec::from_format(&format);
            *g = Some(Arc::new(Opened {
                kv: Arc::new(kv),
                format,
                codec,
            }));
        }
        Ok(g.clone())
    }

    fn open_for(&self, fs_id: [u8; 16], block_size: u32) -> Result<Arc<Opened>, ReplicaError> {
        if let Some(o) = self.opened()? {
            return Ok(o);
        }
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = g.clone() {
            return Ok(o);
        }
        let o = FormatOptions {
            block_size,
            fs_id: Some(fs_id),
            ..self.create
        };
        // Made aside and moved into place whole: a server killed while creating leaves no
        // half-made replica (a store without its replica state would refuse every primary).
        let aside = self.path.join("creating");
        let io = |what: &str| {
            let what = format!("{what} {}", aside.display());
            move |source| ReplicaError::Io { what, source }
        };
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io("cannot remove"))?;
        }
        store::format_with(&aside, &o).map_err(store_err)?;
        {
            let (kv, _) = store::open(&aside).map_err(store_err)?;
            if let Some(u) = &self.satellite {
                super::set_upstream(&kv, u)?;
            }
            apply::init_state(&kv)?;
        }
        std::fs::rename(store::db_path(&aside), store::db_path(&self.path))
            .map_err(io("cannot move the new store from"))?;
        std::fs::File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync the directory of"))?;
        let _ = std::fs::remove_dir_all(&aside);
        let (kv, format) = store::open(&self.path).map_err(store_err)?;
        self.keep_history(&kv)?;
        let kind = if self.satellite.is_some() {
            "satellite"
        } else {
            "replica"
        };
        tracing::info!(store = %self.path.display(), fs_id = %ks::hex(&fs_id), "created a {kind} store");
        let codec = Codec::from_format(&format);
        let opened = Arc::new(Opened {
            kv: Arc::new(kv),
            format,
            codec,
        });
        *g = Some(opened.clone());
        Ok(opened)
    }

    /// Serve one primary on `io` until it says `Bye` or the connection ends. Errors are also
    /// sent to the primary (best effort) and logged with the peer's name.
    pub fn session(&self, io: &mut dyn Duplex, peer: &str) -> Result<(), ReplicaError> {
        self.session_until(io, peer, false)
    }

    /// A satellite's pull on `io`, a connection it made to its upstream: ask to follow, then
    /// apply what comes, until the upstream says it is caught up (`once`) or the connection
    /// ends.
    pub fn follow(&self, io: &mut dyn Duplex, peer: &str, once: bool) -> Result<(), ReplicaError> {
        wire::send(
            io,
            &Msg::Follow {
                proto_min: PROTO_FOLLOW,
                proto_max: PROTO_MAX,
            },
        )?;
        self.session_until(io, peer, once)
    }

    fn session_until(
        &self,
        io: &mut dyn Duplex,
        peer: &str,
        once: bool,
    ) -> Result<(), ReplicaError> {
        let res = self.run(io, once);
        match &res {
            Ok(()) | Err(ReplicaError::Wire(WireError::Closed)) => {}
            Err(ReplicaError::Wire(WireError::Refused(_))) => {}
            Err(e) => {
                // A satellite's pull logs its own failures (and retries).
                if self.satellite.is_none() {
                    tracing::error!(peer, error = %e, "shipment refused");
                }
                let _ = wire::send(
                    io,
                    &Msg::Refused {
                        reason: e.to_string(),
                    },
                );
            }
        }
        match res {
            // A pull that must catch up was cut short: the caller says so (and may retry).
            Err(ReplicaError::Wire(WireError::Closed)) if !once => Ok(()),
            other => other,
        }
    }

    fn run(&self, io: &mut dyn Duplex, once: bool) -> Result<(), ReplicaError> {
        let (fs_id, block_size, proto) = match wire::recv(io)? {
            Msg::Hello {
                proto_min,
                proto_max,
                fs_id,
                block_size,
            } => {
                let proto = PROTO_MAX.min(proto_max);
                if proto < PROTO_MIN.max(proto_min) {
                    return Err(refuse(format!(
                        "protocol versions {proto_min}..{proto_max} offered, this replica speaks {PROTO_MIN}..{PROTO_MAX}"
                    )));
                }
                (fs_id, block_size, proto)
            }
            Msg::Follow { .. } => {
                return Err(refuse(
                    "not a satellite of this store: a satellite follows a primary mounted with -o listen=ADDR, or a replica served with --listen, where it is registered (kvfs replica add STORE NAME satellite: --fingerprint ...)".into(),
                ))
            }
            Msg::Refused { reason } => return Err(WireError::Refused(reason).into()),
            m => return Err(unexpected(&m)),
        };
        let st = self.open_for(fs_id, block_size)?;
        if st.format.fs_id != fs_id {
            return Err(refuse(format!(
                "this replica follows filesystem {}, not {}",
                ks::hex(&st.format.fs_id),
                ks::hex(&fs_id)
            )));
        }
        if st.format.block_size != block_size {
            return Err(refuse(format!(
                "block size {} here, {block_size} on the primary",
                st.format.block_size
            )));
        }
        let rs = apply::state(&st.kv)?.ok_or_else(|| refuse("not a replica store".into()))?;
        if let Some(when) = rs.promoted {
            return Err(refuse(format!(
                "this replica was promoted to a primary (at {} s since the epoch); it accepts no shipments from the old primary", when.secs
            )));
        }
        wire::send(
            io,
            &Msg::Welcome {
                proto,
                applied: rs.applied,
                chain: rs.chain,
                fresh: rs.applied == 0,
            },
        )?;
        let mut storer = Storer::new(st.clone());
        let mut parts: Vec<Vec<Change>> = Vec::new();
        let mut group_seq = 0u64;
        let mut group_bytes = 0usize;
        loop {
            match wire::recv(io)? {
                Msg::Have { hashes } => {
                    if hashes.len() > MAX_HAVE {
                        return Err(refuse(format!("{} hashes in one question", hashes.len())));
                    }
                    let have = apply::holding(&st.kv, &hashes)?;
                    wire::send(io, &Msg::Holding { have })?;
                }
                Msg::Block { hash, data } => {
                    let b = apply::prepare_received(&hash, &data, st.format.block_size, &st.codec)
                        .map_err(refuse)?;
                    storer.add(b)?;
                }
                Msg::Sums { keys } => {
                    if keys.len() > MAX_HAVE {
                        return Err(refuse(format!("{} keys in one question", keys.len())));
                    }
                    let sums = keys
                        .iter()
                        .map(|k| apply::block_sums(&st.kv, k))
                        .collect::<Result<Vec<_>, _>>()?;
                    wire::send(io, &Msg::SumsReply { sums })?;
                }
                Msg::Delta { hash, base, chunks } => {
                    let data = apply::rebuild(&st.kv, &base, &chunks, st.format.block_size)
                        .map_err(refuse)?;
                    let b = apply::prepare_received(&hash, &data, st.format.block_size, &st.codec)
                        .map_err(refuse)?;
                    storer.add(b)?;
                }
                Msg::Flush => {
                    let count = storer.store_all()?;
                    wire::send(io, &Msg::Flushed { count })?;
                }
                Msg::Part {
                    seq,
                    index,
                    last,
                    prev,
                    chain: claimed,
                    changes,
                    at,
                } => {
                    if index as usize != parts.len() || (index > 0 && seq != group_seq) {
                        return Err(refuse(format!("part {index} of group {seq} out of order")));
                    }
                    group_seq = seq;
                    group_bytes += changes.iter().map(change_bytes).sum::<usize>();
                    if group_bytes > MAX_GROUP_BYTES {
                        return Err(refuse(format!(
                            "group {seq} holds more than {MAX_GROUP_BYTES} bytes"
                        )));
                    }
                    parts.push(changes);
                    if last {
                        let whole = std::mem::take(&mut parts);
                        group_bytes = 0;
                        if !check_chain(&prev, seq, &whole, &claimed) {
                            return Err(refuse(format!(
                                "group {seq}: its chain hash does not match its content"
                            )));
                        }
                        storer.store_all()?;
                        let all: Vec<Change> = whole.into_iter().flatten().collect();
                        let satellite = self.satellite.is_some();
                        let at = Some(at.nanos().max(0) as u64);
                        apply::apply_group(&st.kv, seq, &prev, &claimed, &all, satellite, at)?;
                        // This replica's own history window (`kvfs config REPLICA history=`).
                        let kept = crate::history::index(&st.kv);
                        if let Err(e) = kept.and_then(|_| crate::history::trim(&st.kv)) {
                            tracing::warn!(error = %e, "trimming history failed");
                        }
                        if let Err(e) = blocks::collect_garbage(&st.kv, 4096) {
                            tracing::warn!(error = %e, "freeing unreferenced blocks failed");
                        }
                        // Its satellites' group, before the acknowledgement: what the primary
                        // was told is here can be pulled from here (`relay::tend` retries a
                        // failed round).
                        if st.kv.tracks_changes() {
                            if let Err(e) = super::log::round(&st.kv) {
                                tracing::warn!(error = %e, "logging for the satellites failed");
                            }
                        }
                        wire::send(
                            io,
                            &Msg::Applied {
                                seq,
                                chain: claimed,
                            },
                        )?;
                    }
                }
                Msg::Fetch { hashes } if proto >= PROTO_FETCH => answer_fetch(&st.kv, io, hashes)?,
                Msg::CaughtUp { .. } if self.satellite.is_some() => {
                    if once {
                        let _ = wire::send(io, &Msg::Bye);
                        return Ok(());
                    }
                }
                Msg::Bye => return Ok(()),
                Msg::Refused { reason } => return Err(WireError::Refused(reason).into()),
                m => return Err(unexpected(&m)),
            }
        }
    }
}

/// Answer one `Fetch` from `store`: each block's stored value, or that it is not held here.
pub fn answer_fetch(
    store: &KvStore,
    io: &mut dyn Duplex,
    hashes: Vec<Hash>,
) -> Result<(), ReplicaError> {
    if hashes.len() > MAX_FETCH {
        return Err(refuse(format!("{} hashes in one fetch", hashes.len())));
    }
    for hash in hashes {
        let m = match store.get(Cf::Blocks, &ks::block_key(&hash))? {
            Some(value) => Msg::Content { hash, value },
            None => Msg::NotHeld { hash },
        };
        wire::send(io, &m)?;
    }
    Ok(())
}

/// Gathers received blocks and stores them on a thread of its own, so that the next ones are
/// received while a batch is written and synced (one batch queued, one in progress).
struct Storer {
    pending: Vec<Prepared>,
    pending_bytes: usize,
    /// Blocks added since the last [`Storer::store_all`].
    added: u64,
    tx: Option<crossbeam_channel::Sender<Vec<Prepared>>>,
    done: crossbeam_channel::Receiver<Result<(), ReplicaError>>,
    outstanding: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Storer {
    fn new(st: Arc<Opened>) -> Storer {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Prepared>>(1);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let thread = std::thread::spawn(move || {
            for batch in rx {
                let t0 = std::time::Instant::now();
                let r = apply::store_held(&st.kv, &batch);
                tracing::debug!(
                    blocks = batch.len(),
                    ms = t0.elapsed().as_millis() as u64,
                    "stored a batch of received blocks"
                );
                if done_tx.send(r).is_err() {
                    return;
                }
            }
        });
        Storer {
            pending: Vec::new(),
            pending_bytes: 0,
            added: 0,
            tx: Some(tx),
            done,
            outstanding: 0,
            thread: Some(thread),
        }
    }

    /// A verified block; a full batch goes to the thread.
    fn add(&mut self, b: Prepared) -> Result<(), ReplicaError> {
        self.pending_bytes += b.len as usize;
        self.pending.push(b);
        self.added += 1;
        if self.pending_bytes >= PENDING_BYTES {
            self.pending_bytes = 0;
            let batch = std::mem::take(&mut self.pending);
            self.submit(batch)?;
        }
        Ok(())
    }

    /// Every block added is stored and synced; how many since the last call.
    fn store_all(&mut self) -> Result<u64, ReplicaError> {
        self.pending_bytes = 0;
        let batch = std::mem::take(&mut self.pending);
        self.submit(batch)?;
        self.wait_all()?;
        Ok(std::mem::take(&mut self.added))
    }

    fn finished(&mut self, r: Result<(), ReplicaError>) -> Result<(), ReplicaError> {
        self.outstanding -= 1;
        r
    }

    fn submit(&mut self, batch: Vec<Prepared>) -> Result<(), ReplicaError> {
        while let Ok(r) = self.done.try_recv() {
            self.finished(r)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().expect("open until dropped");
        tx.send(batch)
            .map_err(|_| refuse("the block store thread ended".into()))?;
        self.outstanding += 1;
        Ok(())
    }

    /// Every batch submitted is stored and synced (or the first error).
    fn wait_all(&mut self) -> Result<(), ReplicaError> {
        while self.outstanding > 0 {
            let r = self
                .done
                .recv()
                .map_err(|_| refuse("the block store thread ended".into()))?;
            self.finished(r)?;
        }
        Ok(())
    }
}

impl Drop for Storer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn store_err(e: store::StoreError) -> ReplicaError {
    ReplicaError::Io {
        what: "replica store".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

pub fn refuse(reason: String) -> ReplicaError {
    ReplicaError::Refused {
        peer: "primary".into(),
        reason,
    }
}

fn unexpected(m: &Msg) -> ReplicaError {
    ReplicaError::Wire(WireError::Unexpected(wire::name(m).into()))
}

/// Verify the claimed chain of a whole group, part by part as the primary cut it.
pub fn check_chain(prev: &Hash, seq: u64, parts: &[Vec<Change>], claimed: &Hash) -> bool {
    matches!(chain(prev, seq, parts), Ok(c) if c == *claimed)
}

fn change_bytes(c: &Change) -> usize {
    match c {
        Change::Put { key, value, .. } => key.len() + value.len() + 8,
        Change::Delete { key, .. } => key.len() + 4,
        Change::Clear { start, end, .. } => start.len() + end.len() + 4,
    }
}
