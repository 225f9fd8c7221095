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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use crate::blocks::{self, encode};
use crate::dump::describe_value;
use crate::fs::{self as fsops, FsError};
use crate::gc;
use crate::keyspace::records::{
    decode_counter, encode_counter, BlockInfo, Dirent, FmapEntry, FormatRecord, Inode, Kind,
};
use crate::keyspace::{self as ks, Hash, Ino, InodeKey, MountId, Prefix, REF_SHARDS, ROOT_INO};
use crate::kv::{decode_i64, Cf, KvStore, Txn};
use crate::util::Timestamp;

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
}

/// A repair: done in its own transaction after the checks.
enum Fix {
    SetNlink(Ino, u32),
    SetAlloc(Ino, u64),
    ToLostFound(Ino),
    DeleteDirent(Vec<u8>),
    DeleteKey(Cf, Vec<u8>),
    DropFmap(Vec<u8>, Hash),
    SetRefcount(Hash, i64),
    MarkGarbageBlock(Hash),
    RewriteBlock(Hash, Vec<u8>),
    SetNextIno(u64),
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

#[derive(Clone, Debug)]
struct InodeInfo {
    kind: Kind,
    nlink: u32,
    size: u64,
    alloc: u64,
    parent: Ino,
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
    // --- every record decodes, and the metadata family in one pass ---
    let mut format: Option<FormatRecord> = None;
    let mut next_ino = None;
    let mut inodes: HashMap<Ino, InodeInfo> = HashMap::new();
    let mut dirents: Vec<(Vec<u8>, Ino, Dirent)> = Vec::new();
    let mut garbage: HashSet<Ino> = HashSet::new();
    let mut subkeys: Vec<(Vec<u8>, Ino, Option<MountId>)> = Vec::new();
    for cf in [Cf::Meta, Cf::Fmap, Cf::Bidx] {
        store.for_each(cf, &[0x00], &[0xff], |k, v| {
            cx.report.counts.keys += 1;
            let key = ks::describe_key(k);
            let wrong_family = Prefix::from_byte(k[0]).is_none_or(|p| p.cf() != cf);
            if wrong_family {
                cx.problem(
                    key,
                    format!("key in the wrong column family ({})", cf.name()),
                );
                return true;
            }
            if let Err(why) = describe_value(k, v) {
                cx.problem(key, format!("does not decode: {why}"));
                return true;
            }
            match Prefix::from_byte(k[0]) {
                Some(Prefix::Meta) if k == ks::META_FORMAT => format = FormatRecord::decode(v).ok(),
                Some(Prefix::Meta) if k == ks::META_NEXT_INO => next_ino = decode_counter(v).ok(),
                Some(Prefix::Inode) => match ks::parse_inode_key(k) {
                    InodeKey::Record(ino) => {
                        if let Ok(i) = Inode::decode(v) {
                            inodes.insert(
                                ino,
                                InodeInfo {
                                    kind: i.kind,
                                    nlink: i.nlink,
                                    size: i.size,
                                    alloc: i.alloc,
                                    parent: i.parent,
                                },
                            );
                        }
                    }
                    InodeKey::Lock(ino, m, _, _) | InodeKey::Open(ino, m) => {
                        subkeys.push((k.to_vec(), ino, Some(m)))
                    }
                    InodeKey::Xattr(ino, _) | InodeKey::Pseudo(ino, _) => {
                        subkeys.push((k.to_vec(), ino, None))
                    }
                    InodeKey::Unknown => {}
                },
                Some(Prefix::Dirent) => {
                    if let (Some(p), Ok(d)) = (ks::key_ino(k), Dirent::decode(v)) {
                        dirents.push((k.to_vec(), p, d));
                    }
                }
                Some(Prefix::Garbage) => {
                    if let Some(i) = ks::key_ino(k) {
                        garbage.insert(i);
                    }
                }
                _ => {}
            }
            true
        })?;
    }
    let Some(format) = format else {
        cx.problem(
            "M format",
            "missing or undecodable: this is not a usable store",
        );
        return Ok(cx);
    };
    let bs = format.block_size as u64;

    // --- process table ---
    let own = None;
    let timeout = o.timeout.unwrap_or(gc::DEFAULT_TIMEOUT);
    let table = gc::mounts(store, timeout, own)?;
    let known: HashSet<MountId> = table.iter().map(|m| m.id).collect();
    let dead: HashSet<MountId> = table.iter().filter(|m| !m.alive).map(|m| m.id).collect();
    if !dead.is_empty() {
        cx.report.notes.push(format!(
            "{} dead mount(s) in the process table; `kvfs gc` reaps them with their open counts and locks",
            dead.len()
        ));
    }

    // --- inodes, names, directories ---
    cx.report.counts.inodes = inodes.len() as u64;
    cx.report.counts.dirents = dirents.len() as u64;
    let mut names: HashMap<Ino, u32> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut dir_names: HashMap<Ino, Vec<Ino>> = HashMap::new();
    for (k, parent, d) in &dirents {
        let key = ks::describe_key(k);
        match inodes.get(parent) {
            Some(p) if p.kind == Kind::Dir => {}
            Some(_) => {
                cx.fixable(
                    key,
                    "entry in an inode that is not a directory",
                    Fix::DeleteDirent(k.clone()),
                );
                continue;
            }
            None => {
                cx.fixable(
                    key,
                    format!("entry in missing directory {parent}"),
                    Fix::DeleteDirent(k.clone()),
                );
                continue;
            }
        }
        let Some(child) = inodes.get(&d.ino) else {
            cx.fixable(
                key,
                format!("names missing inode {}", d.ino),
                Fix::DeleteDirent(k.clone()),
            );
            continue;
        };
        if child.kind != d.kind {
            cx.problem(
                key,
                format!("says {:?} but inode {} is {:?}", d.kind, d.ino, child.kind),
            );
        }
        *names.entry(d.ino).or_default() += 1;
        if child.kind == Kind::Dir {
            *subdirs.entry(*parent).or_default() += 1;
            dir_names.entry(d.ino).or_default().push(*parent);
        }
    }
    let mut orphans_with_links = Vec::new();
    for (&ino, i) in &inodes {
        let key = ks::describe_key(&ks::inode_key(ino));
        let n = names.get(&ino).copied().unwrap_or(0);
        match i.kind {
            Kind::Dir => {
                cx.report.counts.dirs += 1;
                let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                let parents = dir_names.get(&ino).cloned().unwrap_or_default();
                if ino == ROOT_INO {
                    if !parents.is_empty() || i.parent != ROOT_INO {
                        cx.problem(
                            key.clone(),
                            "the root has a name or a parent other than itself",
                        );
                    }
                } else if parents.len() > 1 {
                    cx.problem(
                        key.clone(),
                        format!("directory has {} names", parents.len()),
                    );
                } else if parents.len() == 1 && parents[0] != i.parent {
                    cx.problem(
                        key.clone(),
                        format!("named in {} but its parent says {}", parents[0], i.parent),
                    );
                }
                if i.nlink == 0 {
                    if !garbage.contains(&ino) {
                        cx.problem(key.clone(), "removed directory left without a garbage mark");
                    }
                } else if parents.is_empty() && ino != ROOT_INO {
                    orphans_with_links.push(ino);
                    cx.fixable(
                        key.clone(),
                        "directory with no name (orphan)",
                        Fix::ToLostFound(ino),
                    );
                } else if i.nlink != want {
                    cx.fixable(
                        key.clone(),
                        format!(
                            "nlink {} but {} expected (2 + subdirectories)",
                            i.nlink, want
                        ),
                        Fix::SetNlink(ino, want),
                    );
                }
            }
            _ => {
                if i.kind == Kind::File {
                    cx.report.counts.files += 1;
                }
                if n == 0 && i.nlink > 0 {
                    orphans_with_links.push(ino);
                    cx.fixable(
                        key.clone(),
                        format!("nlink {} but no name (orphan)", i.nlink),
                        Fix::ToLostFound(ino),
                    );
                } else if n == 0 && !garbage.contains(&ino) {
                    cx.problem(
                        key.clone(),
                        "unlinked inode without a garbage mark (leaked)",
                    );
                } else if n > 0 && i.nlink != n {
                    cx.fixable(
                        key.clone(),
                        format!("nlink {} but {n} name(s)", i.nlink),
                        Fix::SetNlink(ino, n),
                    );
                }
            }
        }
        if ino >= next_ino.unwrap_or(0) {
            let want = inodes.keys().max().copied().unwrap_or(ROOT_INO) + 1;
            if !cx
                .fixes
                .iter()
                .any(|(_, f)| matches!(f, Fix::SetNextIno(_)))
            {
                cx.fixable(
                    "M next_ino",
                    format!("{:?} is not above inode {ino}", next_ino),
                    Fix::SetNextIno(want),
                );
            }
        }
    }
    if !inodes.contains_key(&ROOT_INO) {
        cx.problem(
            ks::describe_key(&ks::inode_key(ROOT_INO)),
            "the root directory is missing",
        );
    }
    // Reachability: walk each directory's parent chain up to the root.
    let mut reaches: HashMap<Ino, bool> = HashMap::from([(ROOT_INO, true)]);
    for (&ino, i) in &inodes {
        if i.kind != Kind::Dir || i.nlink == 0 || orphans_with_links.contains(&ino) {
            continue;
        }
        let mut chain = vec![];
        let mut cur = ino;
        let ok = loop {
            if let Some(&r) = reaches.get(&cur) {
                break r;
            }
            if chain.contains(&cur) || chain.len() > 100_000 {
                break false;
            }
            chain.push(cur);
            match inodes.get(&cur) {
                Some(d)
                    if d.kind == Kind::Dir
                        && dir_names.get(&cur).is_some_and(|p| p.contains(&d.parent)) =>
                {
                    cur = d.parent
                }
                _ => break false,
            }
        };
        for c in chain {
            reaches.insert(c, ok);
        }
        if !ok {
            cx.problem(
                ks::describe_key(&ks::inode_key(ino)),
                "directory does not reach the root",
            );
        }
    }
    for &ino in &garbage {
        match inodes.get(&ino) {
            None => cx.fixable(
                ks::describe_key(&ks::garbage_key(ino)),
                "garbage mark of a missing inode",
                Fix::DeleteKey(Cf::Meta, ks::garbage_key(ino)),
            ),
            Some(i) if i.nlink > 0 => cx.fixable(
                ks::describe_key(&ks::garbage_key(ino)),
                format!("garbage mark but nlink {}", i.nlink),
                Fix::DeleteKey(Cf::Meta, ks::garbage_key(ino)),
            ),
            Some(_) => {}
        }
    }
    let mut pending = 0;
    for (k, ino, mount) in &subkeys {
        let key = ks::describe_key(k);
        if !inodes.contains_key(ino) {
            cx.fixable(
                key,
                "belongs to a missing inode",
                Fix::DeleteKey(Cf::Meta, k.clone()),
            );
            continue;
        }
        if let Some(m) = mount {
            if !known.contains(m) {
                cx.fixable(
                    key,
                    format!("held by mount {m:016x}, which is not in the process table"),
                    Fix::DeleteKey(Cf::Meta, k.clone()),
                );
            } else if dead.contains(m) {
                pending += 1;
            }
        }
    }
    if pending > 0 {
        cx.report.notes.push(format!(
            "{pending} open count(s)/lock(s) of dead mounts await the sweeper"
        ));
    }
    let waiting = garbage
        .iter()
        .filter(|i| inodes.get(i).is_some_and(|x| x.nlink == 0))
        .count();
    if waiting > 0 {
        cx.report.notes.push(format!(
            "{waiting} unlinked inode(s) wait for their last close or the sweeper"
        ));
    }

    // --- block maps ---
    let mut refs: HashMap<Hash, (u64, u32)> = HashMap::new();
    let mut alloc: HashMap<Ino, u64> = HashMap::new();
    let (s, e) = Prefix::Fmap.range();
    store.for_each(Cf::Fmap, &s, &e, |k, v| {
        let Ok(ent) = FmapEntry::decode(v) else {
            return true;
        };
        cx.report.counts.fmap_entries += 1;
        let key = ks::describe_key(k);
        let (Some(ino), Some(bn)) = (ks::key_ino(k), ks::fmap_blockno(k)) else {
            cx.problem(key, "malformed block-map key");
            return true;
        };
        match inodes.get(&ino) {
            Some(i) if i.kind == Kind::File => {
                if bn.saturating_mul(bs) >= i.size {
                    cx.fixable(
                        key,
                        format!("block lies past the file's size {}", i.size),
                        Fix::DropFmap(k.to_vec(), ent.hash),
                    );
                    return true;
                }
                if ent.len as u64 > bs || ent.len == 0 {
                    cx.problem(
                        key.clone(),
                        format!("content length {} impossible for block size {bs}", ent.len),
                    );
                }
                *alloc.entry(ino).or_default() += fsops::charge(ent.len);
            }
            _ => {
                cx.fixable(
                    key,
                    "block map of a missing or non-file inode",
                    Fix::DropFmap(k.to_vec(), ent.hash),
                );
                return true;
            }
        }
        let r = refs.entry(ent.hash).or_insert((0, ent.len));
        r.0 += 1;
        if r.1 != ent.len {
            cx.problem(
                key,
                format!(
                    "length {} differs from another reference's {}",
                    ent.len, r.1
                ),
            );
        }
        true
    })?;
    for (&ino, i) in &inodes {
        if i.kind != Kind::File {
            continue;
        }
        let want = alloc.get(&ino).copied().unwrap_or(0);
        if i.alloc != want {
            cx.fixable(
                ks::describe_key(&ks::inode_key(ino)),
                format!("alloc {} but its blocks add up to {want}", i.alloc),
                Fix::SetAlloc(ino, want),
            );
        }
    }

    // --- block index: info, refcounts, garbage marks ---
    let mut infos: HashMap<Hash, BlockInfo> = HashMap::new();
    let mut counts: HashMap<Hash, i64> = HashMap::new();
    let mut marked: HashSet<Hash> = HashSet::new();
    let (s, e) = (vec![0u8], vec![0xffu8]);
    store.for_each(Cf::Bidx, &s, &e, |k, v| {
        let Some(h) = ks::key_hash(k) else {
            return true;
        };
        match Prefix::from_byte(k[0]) {
            Some(Prefix::BlockInfo) => {
                if let Ok(i) = BlockInfo::decode(v) {
                    infos.insert(h, i);
                }
            }
            Some(Prefix::Refcount) => *counts.entry(h).or_default() += decode_i64(v),
            Some(Prefix::BlockGarbage) => {
                marked.insert(h);
            }
            _ => {}
        }
        true
    })?;
    for (h, (n, len)) in &refs {
        let key = ks::describe_key(&ks::block_info_key(h));
        match infos.get(h) {
            None => cx.problem(
                key.clone(),
                format!("referenced {n} time(s) but not stored (data lost)"),
            ),
            Some(i) if i.len != *len => cx.problem(
                key.clone(),
                format!("stored length {} but referenced as {len}", i.len),
            ),
            _ => {}
        }
        let c = counts.get(h).copied().unwrap_or(0);
        if c != *n as i64 {
            cx.fixable(
                key,
                format!("refcount {c} but {n} reference(s)"),
                Fix::SetRefcount(*h, *n as i64),
            );
        }
    }
    let mut unreferenced = 0;
    for (h, c) in &counts {
        if refs.contains_key(h) {
            continue;
        }
        let key = ks::describe_key(&ks::block_info_key(h));
        if *c != 0 {
            cx.fixable(
                key.clone(),
                format!("refcount {c} but no references"),
                Fix::SetRefcount(*h, 0),
            );
        } else if !marked.contains(h) && infos.contains_key(h) {
            cx.fixable(
                key.clone(),
                "unreferenced block not marked for the sweeper (leaked)",
                Fix::MarkGarbageBlock(*h),
            );
        } else {
            unreferenced += 1;
        }
    }
    for h in infos.keys() {
        if !refs.contains_key(h) && !counts.contains_key(h) {
            if marked.contains(h) {
                unreferenced += 1;
            } else {
                cx.fixable(
                    ks::describe_key(&ks::block_info_key(h)),
                    "unreferenced block not marked for the sweeper (leaked)",
                    Fix::MarkGarbageBlock(*h),
                );
            }
        }
    }
    if unreferenced > 0 {
        cx.report.notes.push(format!(
            "{unreferenced} unreferenced block(s) await the sweeper"
        ));
    }

    // --- blocks written ahead by flushes that have not committed (or never will) ---
    let (s, e) = Prefix::WrittenAhead.range();
    let mut ahead: HashSet<Hash> = HashSet::new();
    store.for_each(Cf::Blocks, &s, &e, |k, v| {
        cx.report.counts.keys += 1;
        let key = ks::describe_key(k);
        match ks::key_hash(k).filter(|_| k.len() == 33) {
            Some(h) if v.len() == 8 => {
                ahead.insert(h);
            }
            Some(_) => cx.problem(key, format!("token is {} bytes, expected 8", v.len())),
            None => cx.problem(key, "malformed written-ahead key"),
        }
        true
    })?;
    if !ahead.is_empty() {
        cx.report.notes.push(format!(
            "{} block(s) written ahead await their commit or the recovery at the next mount \
             or `kvfs gc`",
            ahead.len()
        ));
    }

    // --- every block's content ---
    let total: u64 = infos.values().map(|i| i.stored as u64).sum();
    let pb = bar(o.progress, total, "blocks");
    let (s, e) = Prefix::Block.range();
    let mut seen: HashSet<Hash> = HashSet::new();
    store.for_each(Cf::Blocks, &s, &e, |k, v| {
        cx.report.counts.keys += 1;
        cx.report.counts.blocks += 1;
        cx.report.counts.block_bytes += v.len() as u64;
        pb.inc(v.len() as u64);
        let key = ks::describe_key(k);
        let Some(h) = ks::key_hash(k).filter(|_| k.len() == 33) else {
            cx.problem(key, "malformed block key");
            return true;
        };
        seen.insert(h);
        let Some(info) = infos.get(&h) else {
            if ahead.contains(&h) {
                // Named by no commit yet: the recovery drops it (or a commit names it).
                return true;
            }
            cx.fixable(
                key,
                "stored block without block info",
                Fix::MarkGarbageBlock(h),
            );
            return true;
        };
        if info.stored as usize != v.len() {
            cx.problem(
                key.clone(),
                format!(
                    "{} bytes stored but block info says {}",
                    v.len(),
                    info.stored
                ),
            );
        }
        match encode::decode_with(v, &h, info.len, encode::Check::Strong) {
            Ok(d) => {
                if let Some((sector, healed)) = d.repaired {
                    cx.fixable(
                        key,
                        format!("damaged in sector {sector}; parity rebuilds it"),
                        Fix::RewriteBlock(h, healed),
                    );
                } else if let Err(why) = encode::check_parity(v) {
                    // Content is right; rebuild the parity from it.
                    let healed = encode::encode(
                        &blocks::Codec {
                            compression: info.encoding & !encode::INFO_PARITY,
                            level: format.level.max(1),
                            parity: true,
                        },
                        &d.content,
                    );
                    cx.fixable(
                        key,
                        format!("content fine but {why}"),
                        Fix::RewriteBlock(h, healed.value),
                    );
                }
            }
            Err(why) => cx.problem(key, format!("corrupt: {why}")),
        }
        true
    })?;
    pb.finish_and_clear();
    for h in infos.keys() {
        if !seen.contains(h) && refs.contains_key(h) {
            cx.problem(
                ks::describe_key(&ks::block_key(h)),
                "block info present but the block is missing (data lost)",
            );
        }
    }
    Ok(cx)
}

fn lost_found(t: &mut dyn Txn) -> Result<Ino> {
    let key = ks::dirent_key(ROOT_INO, b"lost+found");
    if let Some(v) = t.get(Cf::Meta, &key)? {
        let d = Dirent::decode(&v).map_err(|e| fsops::FsError::Corrupt {
            key: ks::describe_key(&key),
            reason: e.to_string(),
        })?;
        if d.kind == Kind::Dir {
            return Ok(d.ino);
        }
        return Err(FsError::Errno(libc::EEXIST));
    }
    let ino = fsops::take_inode_numbers(t, 1)?;
    let dir = Inode::new_dir(0o700, 0, 0, ROOT_INO, Timestamp::now());
    fsops::save_inode(t, ino, &dir)?;
    t.put(
        Cf::Meta,
        &key,
        &Dirent {
            ino,
            kind: Kind::Dir,
        }
        .encode(),
    )?;
    let mut root = fsops::load_inode(t, ROOT_INO)?;
    root.nlink += 1;
    fsops::save_inode(t, ROOT_INO, &root)?;
    Ok(ino)
}

fn apply(store: &KvStore, fix: &Fix) -> Result<String> {
    store.transact(|t| -> Result<String> {
        Ok(match fix {
            Fix::SetNlink(ino, n) => {
                let mut i = fsops::load_inode(t, *ino)?;
                i.nlink = *n;
                fsops::save_inode(t, *ino, &i)?;
                format!("nlink set to {n}")
            }
            Fix::SetAlloc(ino, a) => {
                let mut i = fsops::load_inode(t, *ino)?;
                i.alloc = *a;
                fsops::save_inode(t, *ino, &i)?;
                format!("alloc set to {a}")
            }
            Fix::ToLostFound(ino) => {
                let lf = lost_found(t)?;
                let mut i = fsops::load_inode(t, *ino)?;
                let name = format!("#{ino}");
                t.put(
                    Cf::Meta,
                    &ks::dirent_key(lf, name.as_bytes()),
                    &Dirent {
                        ino: *ino,
                        kind: i.kind,
                    }
                    .encode(),
                )?;
                let mut d = fsops::load_inode(t, lf)?;
                if i.kind == Kind::Dir {
                    i.parent = lf;
                    d.nlink += 1;
                } else {
                    i.nlink = 1;
                }
                d.mtime = Timestamp::now();
                d.ctime = d.mtime;
                fsops::save_inode(t, lf, &d)?;
                fsops::save_inode(t, *ino, &i)?;
                format!("linked as /lost+found/{name}")
            }
            Fix::DeleteDirent(k) => {
                t.delete(Cf::Meta, k)?;
                "entry removed".into()
            }
            Fix::DeleteKey(cf, k) => {
                t.delete(*cf, k)?;
                "key removed".into()
            }
            Fix::DropFmap(k, h) => {
                t.delete(Cf::Fmap, k)?;
                blocks::drop_ref(t, h)?;
                "block-map entry removed".into()
            }
            Fix::SetRefcount(h, n) => {
                for s in 0..REF_SHARDS {
                    t.delete(Cf::Bidx, &ks::refcount_key(h, s))?;
                }
                if *n != 0 {
                    t.put(Cf::Bidx, &ks::refcount_key(h, 0), &n.to_le_bytes())?;
                } else {
                    t.put(Cf::Bidx, &ks::block_garbage_key(h, 0), &[])?;
                }
                format!("refcount set to {n}")
            }
            Fix::MarkGarbageBlock(h) => {
                t.put(Cf::Bidx, &ks::block_garbage_key(h, 0), &[])?;
                if t.get(Cf::Bidx, &ks::block_info_key(h))?.is_none() {
                    // A block without info: give it one so the sweeper can free it.
                    if let Some(v) = t.get_untracked(Cf::Blocks, &ks::block_key(h))? {
                        let info = BlockInfo {
                            len: 0,
                            stored: v.len() as u32,
                            encoding: 0,
                        };
                        t.put(Cf::Bidx, &ks::block_info_key(h), &info.encode())?;
                    }
                }
                "marked for the sweeper".into()
            }
            Fix::RewriteBlock(h, v) => {
                t.put(Cf::Blocks, &ks::block_key(h), v)?;
                let ik = ks::block_info_key(h);
                if let Some(raw) = t.get(Cf::Bidx, &ik)? {
                    if let Ok(mut info) = BlockInfo::decode(&raw) {
                        info.stored = v.len() as u32;
                        t.put(Cf::Bidx, &ik, &info.encode())?;
                    }
                }
                "block rewritten from parity".into()
            }
            Fix::SetNextIno(n) => {
                t.put(Cf::Meta, ks::META_NEXT_INO, &encode_counter(*n))?;
                format!("set to {n}")
            }
        })
    })
}
