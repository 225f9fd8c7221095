//! `kvfs audit`, the fsck: walks the whole keyspace and checks every invariant kvfs relies on.
//!
//! Checks: every record decodes; every dirent names a live inode of the stated kind in a
//! directory; nlink equals the number of names (2 + subdirectories for directories); every
//! directory has one name, in the directory its `parent` says, and reaches the root; inodes
//! without names are pending garbage (`g`) and nothing else; block-map entries lie inside their
//! file, point to stored blocks of the right length, and add up to the inode's `alloc`; every
//! refcount equals the references; unreferenced blocks are marked for the sweeper; every
//! block's content matches its SHA-256 name and its parity is intact; open counts and locks
//! belong to known mounts; `M next_ino` is above every inode.
//!
//! Leftovers of dead mounts (process entries, their open counts and locks, garbage inodes
//! waiting for them) are what a crash leaves by design: they are reported as notes, not
//! problems, and the sweeper (`kvfs gc`) reaps them. With `repair`, each repairable problem is
//! fixed in its own transaction and the audit runs again to report what remains.
//!
//! One module per phase, in the order they run: [`records`], [`process`], [`namespace`],
//! [`blockmaps`], [`blockindex`], [`ahead`], [`content`]; [`repair`] applies the fixes.

mod ahead;
mod blockindex;
mod blockmaps;
mod content;
mod history;
mod namespace;
mod process;
mod records;
mod repair;
mod replication;
mod tiering;

use std::fmt;
use std::time::Duration;

use crate::fs::FsError;
use crate::gc;
use crate::kv::KvStore;
use repair::{apply, Fix};

type Result<T> = std::result::Result<T, FsError>;

/// One problem: the key it is about, what is wrong, and what repair did about it.
#[derive(Clone, Debug)]
pub struct Problem {
    pub key: String,
    pub what: String,
    pub repaired: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub keys: u64,
    pub inodes: u64,
    pub dirs: u64,
    pub files: u64,
    pub dirents: u64,
    pub fmap_entries: u64,
    pub blocks: u64,
    pub block_bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct AuditReport {
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
    pub counts: Counts,
}

impl AuditReport {
    pub fn unrepaired(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.repaired.is_none())
            .count()
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            match &p.repaired {
                Some(r) => writeln!(f, "problem: {}: {} [repaired: {r}]", p.key, p.what)?,
                None => writeln!(f, "problem: {}: {}", p.key, p.what)?,
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        let c = &self.counts;
        write!(
            f,
            "checked {} keys: {} inodes ({} directories, {} files), {} names, {} block-map entries, {} blocks ({} bytes verified)\n{} problem(s)",
            c.keys, c.inodes, c.dirs, c.files, c.dirents, c.fmap_entries, c.blocks, c.block_bytes,
            self.problems.len()
        )?;
        let fixed = self.problems.len() - self.unrepaired();
        if fixed > 0 {
            write!(f, ", {fixed} repaired")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default)]
pub struct AuditOptions {
    pub repair: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Heartbeat age that makes a mount dead (when the store is open read-only beside it).
    pub timeout: Option<Duration>,
    /// `--fetch`: fetch every evicted block from the replicas through this and check it.
    pub fetch: Option<Fetch>,
}

/// Where `audit --fetch` gets evicted blocks from.
#[derive(Clone)]
pub struct Fetch(pub std::sync::Arc<dyn crate::blocks::reader::Tiering>);

impl fmt::Debug for Fetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fetch")
    }
}

struct Ctx {
    report: AuditReport,
    fixes: Vec<(usize, Fix)>,
}

impl Ctx {
    fn problem(&mut self, key: impl Into<String>, what: impl Into<String>) {
        self.report.problems.push(Problem {
            key: key.into(),
            what: what.into(),
            repaired: None,
        });
    }

    fn fixable(&mut self, key: impl Into<String>, what: impl Into<String>, fix: Fix) {
        self.problem(key, what);
        self.fixes.push((self.report.problems.len() - 1, fix));
    }
}

fn bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({eta})",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    b
}

/// Audit `store` (open read-only unless `repair`).
pub fn audit(store: &KvStore, o: &AuditOptions) -> Result<AuditReport> {
    let first = check(store, o)?;
    if !o.repair || first.fixes.is_empty() {
        return Ok(first.report);
    }
    let mut report = first.report;
    for (i, fix) in first.fixes {
        match apply(store, &fix) {
            Ok(done) => report.problems[i].repaired = Some(done),
            Err(e) => report
                .notes
                .push(format!("repair of {} failed: {e}", report.problems[i].key)),
        }
    }
    store.sync()?;
    // What remains after the repairs is what counts.
    let again = check(
        store,
        &AuditOptions {
            repair: false,
            ..o.clone()
        },
    )?;
    for p in again.report.problems {
        report.problems.push(Problem {
            key: p.key,
            what: format!("still wrong after repair: {}", p.what),
            repaired: None,
        });
    }
    Ok(report)
}

fn check(store: &KvStore, o: &AuditOptions) -> Result<Ctx> {
    let mut cx = Ctx {
        report: AuditReport::default(),
        fixes: Vec::new(),
    };
    let r = records::check(store, &mut cx)?;
    let Some(format) = r.format.clone() else {
        cx.problem(
            "M format",
            "missing or undecodable: this is not a usable store",
        );
        return Ok(cx);
    };
    let mounts = process::check(store, &mut cx, o.timeout.unwrap_or(gc::DEFAULT_TIMEOUT))?;
    namespace::check(&mut cx, &r);
    process::check_owners(&mut cx, &r, &mounts);
    let mut refs = blockmaps::check(store, &mut cx, &r, format.block_size as u64)?;
    replication::check(store, &mut cx, &mut refs)?;
    history::check(store, &mut cx, &mut refs)?;
    let infos = blockindex::check(store, &mut cx, &refs)?;
    tiering::check(store, &mut cx, &infos, o.fetch.as_ref())?;
    let ahead = ahead::check(store, &mut cx)?;
    content::check(store, &mut cx, o, &format, &infos, &refs, &ahead)?;
    Ok(cx)
}
