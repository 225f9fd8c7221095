//! The seeded simulation: the real [`Fs`] (no FUSE) on the fault-injecting in-memory engine,
//! driven by random operations from a seed, checked against a model after every step.
//!
//! Operations ([`ops`]): create, mkdir, symlink, write at random offsets (and now and then a write big
//! enough to take the write-ahead path), truncate, rename (over files and directories,
//! `RENAME_NOREPLACE`, `RENAME_EXCHANGE`), link, unlink (also of open files), rmdir, xattrs,
//! record locks, fsync, syncfs, close, reads, and crashes. The engine fails commits with I/O
//! errors and conflicts on a seeded schedule, and a crash drops what was never synced
//! (keeping a random prefix of the rest).
//!
//! Checks: after every operation the filesystem's tree (names, inode numbers, kinds, link
//! counts, sizes, content, xattrs, symlink targets) equals the model's; an operation that
//! failed on an injected fault left the tree either as before or as after it, never between.
//! After every crash and recovery (the mount's own start-up sweep): `audit` finds no problem,
//! every file fsynced and not changed since reads back exactly, and a crash right after a
//! syncfs loses nothing at all. A failure panics with the seed, so `KVFS_SIM_SEED=N` replays it.

mod model;
mod ops;
mod replicate;
#[cfg(test)]
mod tests;
mod tier;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::audit::{audit, AuditOptions};
use crate::fs::{Caller, Fs, FsError, FsOptions, NewNode, XattrReply};
use crate::gc::{self, SweepOptions};
use crate::keyspace::records::{FormatRecord, Kind};
use crate::keyspace::{Ino, ROOT_INO};
use crate::kv::mem::{Faults, MemEngine};
use crate::kv::{KvError, KvStore};
use crate::store::{self, FormatOptions};
use model::{diff, digest, node, Model, Rng, View};

/// Small blocks, so that small files span several.
const BS: u32 = 4096;
const NAMES: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
const WHO: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
};

/// Counters a run prints at its end.
#[derive(Debug, Default)]
pub struct Stats {
    pub seeds: u64,
    pub ops: u64,
    pub faults: u64,
    pub failed_ops: u64,
    pub crashes: u64,
    /// Shipments to the replica that went through whole (and were compared).
    pub shipments: u64,
    /// The same for the satellite.
    pub satellite_shipments: u64,
    /// The same for the replica's satellite, from the replica's own log.
    pub relayed_shipments: u64,
    /// Blocks evicted from the primary (their content then read from the replica).
    pub evicted: u64,
    /// Evicted blocks read back through the simulated remote.
    pub fetched: u64,
    /// Past moments compared with the tree they had.
    pub moments: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    engine: Arc<MemEngine>,
    format: FormatRecord,
    fs: Option<Fs>,
    model: Model,
    /// Open handles: handle -> inode.
    handles: Vec<(u64, Ino)>,
    /// Content each file had when it was last made durable and not changed since.
    durable: HashMap<Ino, Vec<u8>>,
    /// Nothing was committed since the last successful syncfs.
    clean_since_sync: bool,
    stats: Stats,
    /// Chances (per mille) of an I/O error and a conflict per commit.
    faults: (u32, u32),
    /// The last steps with their arguments and results, printed with a failure.
    history: std::collections::VecDeque<String>,
    /// Arguments of the step under way.
    args: String,
    /// Files whose content the step under way may have changed.
    touched: std::collections::HashSet<Ino>,
    /// The in-memory replica the primary ships to.
    replica: Option<replicate::SimReplica>,
    /// An in-memory satellite, shipped groups without blocks now and then (it lags).
    satellite: Option<replicate::SimReplica>,
    /// A satellite of the replica, shipped from the replica's own log now and then.
    relayed: Option<replicate::SimReplica>,
    /// The "mount's" logger (one per mount: its scan positions follow its change tracker).
    logger: crate::replica::log::Logger,
    /// Where evicted blocks come back from (the replica's engine), once there is one.
    remote: Option<Arc<tier::SimRemote>>,
    /// Even seeds keep history: moments taken right after a syncfs, with the tree then.
    moments: Option<Vec<(u64, View)>>,
}

fn is_injected(e: &FsError) -> bool {
    match e {
        FsError::Kv(KvError::Other(m)) => m.contains("injected"),
        // A fetch of an evicted block that the simulated remote failed on purpose.
        FsError::Corrupt { reason, .. } => reason.contains("injected fetch failure"),
        _ => false,
    }
}

impl Sim {
    fn new(seed: u64, faults: (u32, u32)) -> Sim {
        let engine = MemEngine::new();
        engine.set_faults(Faults::seeded(seed));
        let kv = KvStore::with_engine(Arc::new(engine.clone()));
        let format = store::init(
            &kv,
            &FormatOptions {
                block_size: BS,
                ..Default::default()
            },
        )
        .expect("init");
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            engine,
            format,
            fs: None,
            model: Model::new(),
            handles: Vec::new(),
            durable: HashMap::new(),
            clean_since_sync: false,
            stats: Stats::default(),
            faults,
            history: Default::default(),
            args: String::new(),
            touched: Default::default(),
            replica: None,
            satellite: None,
            relayed: None,
            logger: Default::default(),
            remote: None,
            moments: (seed % 2 == 0).then(Vec::new),
        };
        sim.init_replica(seed);
        sim.start();
        sim
    }

    /// Evicted blocks the simulated remote gave back so far.
    fn fetched(&self) -> u64 {
        self.remote
            .as_ref()
            .map_or(0, |r| r.fetched.load(Ordering::Relaxed))
    }

    fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("mounted")
    }

    fn fail(&self, what: String) -> ! {
        eprintln!("last steps of seed {}:", self.seed);
        for h in &self.history {
            eprintln!("  {h}");
        }
        panic!("simulation seed {} failed: {what} (replay: KVFS_SIM_SEED={} cargo test --lib sim::tests::replay -- --ignored --nocapture)", self.seed, self.seed)
    }

    /// Start a "mount" as `kvfs mount` does: register, sweep what earlier ones left, recover
    /// written-ahead blocks. Faults are off while it starts and while it is checked.
    fn start(&mut self) {
        self.faults_off();
        let fs = Fs::new(
            KvStore::with_engine(Arc::new(self.engine.clone())),
            self.format.clone(),
            // Whether a read updates atime depends on the clock: off, so a seed replays exactly.
            // (KVFS_SIM_ATIME=1 turns it on, for a run that needs it.)
            FsOptions {
                atime: crate::fs::Atime {
                    mode: if std::env::var_os("KVFS_SIM_ATIME").is_some() {
                        crate::fs::AtimeMode::Relatime
                    } else {
                        crate::fs::AtimeMode::Never
                    },
                    nodir: false,
                },
                ..Default::default()
            },
        );
        crate::replica::track_if_replicated(fs.store())
            .unwrap_or_else(|e| self.fail(format!("change tracking: {e}")));
        if self.moments.is_some() {
            let h = [("history".to_string(), "7d".to_string())];
            crate::tier::config::write(fs.store(), &h)
                .and_then(|_| crate::history::install(fs.store()))
                .unwrap_or_else(|e| self.fail(format!("history: {e}")));
        }
        if let Some(r) = &self.remote {
            fs.set_tiering(r.clone(), None);
        }
        self.logger = Default::default();
        gc::register(fs.store(), fs.mount_id())
            .unwrap_or_else(|e| self.fail(format!("register: {e}")));
        gc::sweep(fs.store(), &SweepOptions::by_mount(fs.mount_id(), true))
            .unwrap_or_else(|e| self.fail(format!("start-up sweep: {e}")));
        if fs.alone() {
            fs.replay_pending()
                .unwrap_or_else(|e| self.fail(format!("applying pending writes: {e}")));
        }
        self.fs = Some(fs);
        self.faults_on();
    }

    fn faults_off(&self) {
        if let Some(r) = &self.remote {
            r.faults.store(false, Ordering::Relaxed);
        }
        let mut f = self.engine.faults();
        f.commit_error = 0;
        f.conflict = 0;
        f.bulk_error = 0;
        self.engine.set_faults(f);
    }

    fn faults_on(&self) {
        if let Some(r) = &self.remote {
            r.faults.store(true, Ordering::Relaxed);
        }
        let mut f = self.engine.faults();
        f.commit_error = self.faults.0;
        f.conflict = self.faults.1;
        f.bulk_error = self.faults.0;
        self.engine.set_faults(f);
    }

    /// The filesystem's tree as [`Model::view`] shows the model's. File content is read for
    /// every file when `all`, else only for the files the step touched; the others are
    /// taken as the model has them if their size agrees.
    fn fs_view(&self, all: bool) -> View {
        self.view_of(self.fs(), all, false)
    }

    /// The tree of `fs` (the mount's, or a `past` one over a moment of its history, which
    /// shares no handles with the simulation).
    fn view_of(&self, fs: &Fs, all: bool, past: bool) -> View {
        let mut out = View::new();
        let mut stack = vec![(b"/".to_vec(), ROOT_INO)];
        while let Some((path, dir)) = stack.pop() {
            let dh = fs
                .opendir(dir)
                .unwrap_or_else(|e| self.fail(format!("opendir {dir}: {e}")));
            let list = fs
                .readdir(dh, 0)
                .unwrap_or_else(|e| self.fail(format!("readdir: {e}")));
            fs.releasedir(dh)
                .unwrap_or_else(|e| self.fail(format!("releasedir: {e}")));
            for ent in list.iter().filter(|e| e.name != b"." && e.name != b"..") {
                let a = fs
                    .getattr(ent.ino)
                    .unwrap_or_else(|e| self.fail(format!("getattr {}: {e}", ent.ino)));
                let unread = (!all && !self.touched.contains(&ent.ino))
                    .then(|| self.model.nodes.get(&ent.ino))
                    .flatten()
                    .filter(|n| n.data.len() as u64 == a.size);
                let seen = match (a.kind, unread) {
                    (Kind::File, Some(n)) if !past => n.dg,
                    (Kind::File, _) => digest(&self.content_of(fs, ent.ino, a.size, past)),
                    (Kind::Symlink, _) => digest(
                        &fs.readlink(ent.ino)
                            .unwrap_or_else(|e| self.fail(format!("readlink: {e}"))),
                    ),
                    _ => digest(&[]),
                };
                let mut xattrs = BTreeMap::new();
                if let Ok(XattrReply::Data(names)) = fs.listxattr(ent.ino, 65536) {
                    for n in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                        if let Ok(XattrReply::Data(v)) = fs.getxattr(ent.ino, n, 65536) {
                            xattrs.insert(n.to_vec(), v);
                        }
                    }
                }
                let mut p = path.clone();
                p.extend_from_slice(&ent.name);
                out.insert(p.clone(), (ent.ino, a.kind, a.nlink, seen, xattrs));
                if a.kind == Kind::Dir {
                    p.push(b'/');
                    stack.push((p, ent.ino));
                }
            }
        }
        out
    }

    /// A file's content, through a handle the simulation holds if there is one (a temporary
    /// handle's close would flush the shared buffer).
    fn content(&self, ino: Ino, size: u64) -> Vec<u8> {
        self.content_of(self.fs(), ino, size, false)
    }

    fn content_of(&self, fs: &Fs, ino: Ino, size: u64, past: bool) -> Vec<u8> {
        let held = self
            .handles
            .iter()
            .find(|(_, i)| *i == ino && !past)
            .map(|(h, _)| *h);
        let fh = match held {
            Some(h) => h,
            None => fs
                .open(ino, false)
                .unwrap_or_else(|e| self.fail(format!("open {ino}: {e}"))),
        };
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            let chunk = fs
                .read(fh, out.len() as u64, 1 << 20)
                .unwrap_or_else(|e| self.fail(format!("read {ino}: {e}")));
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        if held.is_none() {
            fs.release(fh)
                .unwrap_or_else(|e| self.fail(format!("release {ino}: {e}")));
        }
        out
    }

    /// The tree equals the model's; every file's content is compared when `all`, else that
    /// of the files the step touched.
    fn check_tree(&self, what: &str, all: bool) {
        self.faults_off();
        let got = self.fs_view(all);
        let want = self.model.view();
        if got != want {
            self.fail(format!(
                "after {what}: the tree differs from the model:\n{}",
                diff(&got, &want)
            ));
        }
        self.faults_on();
    }

    /// One random operation, checked.
    fn step(&mut self) {
        self.stats.ops += 1;
        self.touched.clear();
        let before = self.model.clone();
        let roll = self.rng.below(100);
        let (what, res): (&str, Result<(), FsError>) = match roll {
            0..=9 => ("create", self.op_create(Kind::File)),
            10..=13 => ("mkdir", self.op_create(Kind::Dir)),
            14..=15 => ("symlink", self.op_create(Kind::Symlink)),
            16..=17 => ("open", self.op_open()),
            18..=35 => ("write", self.op_write(false)),
            36 => ("big write", self.op_write(true)),
            37..=41 => ("truncate", self.op_truncate()),
            42..=51 => ("rename", self.op_rename()),
            52..=55 => ("link", self.op_link()),
            56..=62 => ("unlink", self.op_unlink(false)),
            63..=65 => ("rmdir", self.op_unlink(true)),
            66..=70 => ("xattr", self.op_xattr()),
            71..=73 => ("lock", self.op_lock()),
            74..=79 => ("fsync", self.op_fsync()),
            80..=81 => ("syncfs", self.op_syncfs()),
            82..=89 => ("close", self.op_close()),
            90..=96 => ("read", self.op_read()),
            97 => {
                self.op_replicate();
                return;
            }
            _ => {
                self.crash();
                return;
            }
        };
        let line = format!("step {}: {what} {} -> {res:?}", self.stats.ops, self.args);
        self.args.clear();
        if std::env::var_os("KVFS_SIM_TRACE").is_some() {
            eprintln!("seed {} {line}", self.seed);
        }
        if self.history.len() >= 60 {
            self.history.pop_front();
        }
        self.history.push_back(line);
        match res {
            Ok(()) => {
                self.check_tree(what, self.stats.ops % 10 == 0);
                if what == "syncfs" {
                    self.note_moment();
                }
            }
            Err(e) if is_injected(&e) => {
                self.stats.failed_ops += 1;
                // Either wholly done or not at all: the model may hold the op's effect (when
                // the op applies it before its commit, as a buffered write does) or not.
                let after = self.model.clone();
                self.model = before;
                self.faults_off();
                let got = self.fs_view(true);
                // Files the op changed in the model that no path reaches (unlinked, still
                // open) are not in the views: their content decides too, read by handle.
                let unseen: Vec<Ino> = self
                    .touched
                    .iter()
                    .copied()
                    .filter(|i| match (self.model.nodes.get(i), after.nodes.get(i)) {
                        (Some(b), Some(a)) => b.kind == Kind::File && b.dg != a.dg,
                        _ => false,
                    })
                    .collect();
                let now: Vec<(Ino, Vec<u8>)> = unseen
                    .iter()
                    .map(|&i| {
                        let size = self.fs().getattr(i).map_or(0, |a| a.size);
                        (i, self.content(i, size))
                    })
                    .collect();
                self.faults_on();
                let like = |m: &Model| now.iter().all(|(i, d)| m.nodes[i].data[..] == d[..]);
                if got == after.view() && like(&after) {
                    self.model = after;
                } else {
                    if !like(&self.model) {
                        self.fail(format!(
                            "{what} failed on an injected fault ({e}) and left an open file neither as before nor as after"
                        ));
                    }
                    self.check_tree(&format!("{what} failed on an injected fault ({e})"), true);
                }
            }
            Err(FsError::Errno(_)) => self.check_tree(what, false),
            Err(e) => self.fail(format!("{what}: {e}")),
        }
        if !matches!(what, "read" | "syncfs") {
            self.clean_since_sync = false;
        }
        let f = self.engine.faults();
        self.stats.faults = f.errors_injected + f.conflicts_injected;
        if std::env::var_os("KVFS_SIM_AUDIT_EACH").is_some() {
            self.audit_clean(what);
        }
    }

    /// `audit` finds no problem (faults off meanwhile).
    fn audit_clean(&self, after: &str) {
        self.faults_off();
        let report = audit(self.fs().store(), &AuditOptions::default())
            .unwrap_or_else(|e| self.fail(format!("audit after {after}: {e}")));
        if !report.problems.is_empty() {
            self.fail(format!("audit after {after}:\n{report}"));
        }
        self.faults_on();
    }

    /// Kill the "process" (drop the Fs without any clean-up), lose what the engine never
    /// synced, start again, and check what must have survived.
    fn crash(&mut self) {
        self.stats.crashes += 1;
        let exact = self.clean_since_sync && self.rng.pct(50);
        let extra = if exact {
            0
        } else {
            self.rng.below(self.engine.unsynced() as u64 + 1) as usize
        };
        self.history.push_back(format!(
            "crash keeping {extra} of {} unsynced commits",
            self.engine.unsynced()
        ));
        self.fs = None;
        self.handles.clear();
        self.engine.crash(extra);
        self.start();
        self.audit_clean("a crash");
        self.check_moments();
        self.faults_off();
        let fs = self.fs();
        for (ino, want) in &self.durable {
            let a = fs
                .getattr(*ino)
                .unwrap_or_else(|e| self.fail(format!("fsynced file {ino} lost in a crash: {e}")));
            if self.content(*ino, a.size) != *want {
                self.fail(format!("fsynced content of {ino} changed in a crash"));
            }
        }
        if exact {
            self.check_tree("a crash right after syncfs", true);
        } else {
            self.model = self.model_from_fs();
        }
        self.clean_since_sync = false;
        self.faults_on();
    }

    /// Right after a syncfs (everything committed and durable, the tree equal to the model):
    /// remember this moment and the tree, which a past view must show from now on.
    fn note_moment(&mut self) {
        if self.moments.is_some() && self.rng.pct(50) {
            // Half the moments get indexed as the mount's maintenance would (the rest stay
            // pending until a later round or never): a past view reads both.
            self.faults_off();
            crate::history::index(self.fs().store())
                .unwrap_or_else(|e| self.fail(format!("indexing history: {e}")));
            self.faults_on();
        }
        let at = self.fs().store().history_now();
        let view = self.model.view();
        if let Some(m) = &mut self.moments {
            m.push((at, view));
        }
    }

    /// Every moment noted shows, through a read-only `Fs` over its history view, exactly the
    /// tree it had (names, inodes, kinds, link counts, content, xattrs).
    fn check_moments(&mut self) {
        let Some(moments) = self.moments.take() else {
            return;
        };
        self.faults_off();
        for (at, want) in &moments {
            let view = crate::history::view::View::new(Arc::new(self.engine.clone()), *at)
                .unwrap_or_else(|e| self.fail(format!("view of moment {at}: {e}")));
            let past = Fs::new(
                KvStore::with_engine(Arc::new(view)),
                self.format.clone(),
                FsOptions {
                    read_only: true,
                    ..Default::default()
                },
            );
            if let Some(r) = &self.remote {
                past.set_tiering(r.clone(), None);
            }
            let got = self.view_of(&past, true, true);
            if got != *want {
                self.fail(format!(
                    "the state at moment {at} differs from the tree then:\n{}",
                    diff(&got, want)
                ));
            }
            self.stats.moments += 1;
        }
        self.faults_on();
        self.moments = Some(moments);
    }

    /// After a crash that kept an unknown prefix, the model learns what survived.
    fn model_from_fs(&self) -> Model {
        let mut m = Model::new();
        let view = self.fs_view(true);
        for (path, (ino, kind, _, _, xattrs)) in &view {
            let cut = path.iter().rposition(|b| *b == b'/').unwrap_or(0);
            let parent = if cut == 0 {
                ROOT_INO
            } else {
                view.get(&path[..cut])
                    .map(|p| p.0)
                    .unwrap_or_else(|| self.fail(format!("parent of {path:?} not in the tree")))
            };
            let data = match kind {
                Kind::File => {
                    let size = self.fs().getattr(*ino).map(|a| a.size).unwrap_or(0);
                    self.content(*ino, size)
                }
                Kind::Symlink => self.fs().readlink(*ino).unwrap_or_default(),
                _ => Vec::new(),
            };
            let mut n = node(*kind, data);
            n.xattrs = xattrs.clone();
            m.nodes.insert(*ino, n);
            m.entries.insert((parent, path[cut + 1..].to_vec()), *ino);
        }
        m
    }
}

/// Run `seeds` seeds from `first`, `ops` operations each.
pub fn run(first: u64, seeds: u64, ops: u64, faults: (u32, u32)) -> Stats {
    let mut total = Stats::default();
    for seed in first..first + seeds {
        let mut sim = Sim::new(seed, faults);
        for _ in 0..ops {
            sim.step();
        }
        sim.crash();
        total.seeds += 1;
        total.ops += sim.stats.ops;
        total.faults += sim.stats.faults;
        total.failed_ops += sim.stats.failed_ops;
        total.crashes += sim.stats.crashes;
        total.shipments += sim.stats.shipments;
        total.satellite_shipments += sim.stats.satellite_shipments;
        total.relayed_shipments += sim.stats.relayed_shipments;
        total.evicted += sim.stats.evicted;
        total.fetched += sim.fetched();
        total.moments += sim.stats.moments;
    }
    total
}
