//! POSIX record locks (F_GETLK, F_SETLK, F_SETLKW and their OFD forms) kept in the keyspace,
//! for mounts that share their store. A mount alone with its store does not ask FUSE for
//! them: the kernel's own lock table keeps its locks (see `fuse::init`), and none come here.
//!
//! A lock is `i ino \x00 mount-id owner start` → `LockRecord { end, write, pid }`, byte range
//! `start..=end`. The kernel names the owner: the process's file table for POSIX locks, the open
//! file description for OFD locks; both arrive the same way. Locks of one (mount, owner) pair
//! never overlap: a new lock replaces what the owner held in its range, splitting ranges it cuts
//! and merging with adjacent ranges of the same type, as POSIX says. Every lock change reads
//! (tracked) and writes the inode's `i ino \xfe 'l'` pseudo-key, so the untracked scan of the
//! lock table cannot miss a concurrent change from any mount. The pseudo-key's value is a fresh
//! random version at each change, so a mount that knows the table at that version (it read or
//! wrote it last) skips the scan: one point read instead of a seek through every level and every
//! deleted lock the memtable still holds (SQLite takes and drops six locks per transaction, and
//! that scan was a third of the mount's work under it).
//!
//! Release: closing any descriptor of a file releases its process's POSIX locks on it (the
//! kernel's FUSE flush carries the owner); the last close of an open file description releases
//! the locks taken through it (OFD); a mount's clean exit drops its locks, and the sweeper drops
//! those of a dead mount. Blocking waits ([`Fs::setlk`] with `wait`) poll the table, woken early
//! by any change in this mount, and give up with EINTR when the waiting process has a signal
//! pending (the kernel cannot interrupt a FUSE request on its own).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{corrupt, errno, load_inode, lock, Fs, FsError, Result};
use crate::keyspace::records::LockRecord;
use crate::keyspace::{self as ks, Ino, MountId};
use crate::kv::{Cf, Txn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A lock request or a lock found: owner, inclusive byte range, kind, process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockSpec {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
}

/// The answer to F_GETLK: the first conflicting lock, or none.
pub type LockQuery = Option<LockSpec>;

/// This mount's view: which inodes it holds locks on, which owners used which handle, and the
/// condition variable blocked waiters sleep on.
#[derive(Default)]
pub struct LockTable {
    held: Mutex<HashSet<Ino>>,
    by_handle: Mutex<HashMap<u64, HashSet<u64>>>,
    changed: Condvar,
    gen: Mutex<u64>,
    /// Lock tables as they were at a version of their pseudo-key.
    known: Mutex<HashMap<Ino, (u64, Table)>>,
}

/// An inode's locks, shared between the remembered tables and their readers.
type Table = Arc<Vec<Held>>;

/// Lock tables remembered at most (the map starts over past this).
const KNOWN_TABLES: usize = 4096;

impl LockTable {
    pub fn inodes(&self) -> Vec<Ino> {
        lock(&self.held).iter().copied().collect()
    }

    fn notify(&self) {
        *lock(&self.gen) += 1;
        self.changed.notify_all();
    }

    fn wait(&self, d: Duration) {
        let g = lock(&self.gen);
        let _ = self.changed.wait_timeout(g, d);
    }

    fn remember(&self, ino: Ino, version: u64, locks: Table) {
        let mut k = lock(&self.known);
        if k.len() >= KNOWN_TABLES && !k.contains_key(&ino) {
            k.clear();
        }
        k.insert(ino, (version, locks));
    }
}

/// One held lock as read from the table.
#[derive(Clone, Copy, Debug)]
struct Held {
    mount: MountId,
    owner: u64,
    start: u64,
    rec: LockRecord,
}

/// Mark `ino`'s lock table changed: its pseudo-key gets a fresh version, returned.
fn bump_lock_version(t: &mut dyn Txn, ino: Ino) -> Result<u64> {
    let v = crate::util::rand_u64();
    t.put(
        Cf::Meta,
        &ks::lock_pseudo_key(ino),
        &ks::lock_version_value(v),
    )?;
    Ok(v)
}

/// `ino`'s lock table, read with its pseudo-key (tracked); from `known` when it holds the
/// table at the version read, else scanned (and remembered at that version). A table
/// scanned just after another change committed is remembered under the version read before
/// it; harmless, since versions are random and that one never comes back.
fn read_locks(t: &mut dyn Txn, ino: Ino, known: &LockTable) -> Result<Table> {
    let version = t
        .get(Cf::Meta, &ks::lock_pseudo_key(ino))?
        .and_then(|v| ks::lock_version(&v));
    if let Some(v) = version {
        if let Some((kv, locks)) = lock(&known.known).get(&ino) {
            if *kv == v {
                return Ok(locks.clone());
            }
        }
    }
    let out = Arc::new(scan_locks(t, ino)?);
    if let Some(v) = version {
        known.remember(ino, v, out.clone());
    }
    Ok(out)
}

/// Every lock on `ino`, from the keys (untracked: read the pseudo-key first).
fn scan_locks(t: &mut dyn Txn, ino: Ino) -> Result<Vec<Held>> {
    let (s, e) = ks::lock_range(ino);
    let mut out = Vec::new();
    for (k, v) in t.scan(Cf::Meta, &s, &e, usize::MAX)? {
        let (mount, owner, start) = ks::parse_lock_key(&k).ok_or_else(|| FsError::Corrupt {
            key: ks::describe_key(&k),
            reason: "malformed lock key".into(),
        })?;
        let rec = LockRecord::decode(&v).map_err(|e| corrupt(&k, e))?;
        out.push(Held {
            mount,
            owner,
            start,
            rec,
        });
    }
    Ok(out)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// New ranges of one owner after applying `(start, end, kind)` to its current ranges.
fn apply(
    mut own: Vec<(u64, u64, bool)>,
    start: u64,
    end: u64,
    kind: LockKind,
) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::with_capacity(own.len() + 2);
    for (a, b, w) in own.drain(..) {
        if !overlaps((a, b), (start, end)) {
            out.push((a, b, w));
            continue;
        }
        if a < start {
            out.push((a, start - 1, w));
        }
        if b > end {
            out.push((end + 1, b, w));
        }
    }
    if kind != LockKind::Unlock {
        out.push((start, end, kind == LockKind::Write));
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(l) if l.2 == r.2 && l.1.checked_add(1).is_none_or(|n| n >= r.0) => {
                l.1 = l.1.max(r.1)
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// Rewrite one owner's locks on `ino`; returns the table's new version.
fn set_owner_locks(
    t: &mut dyn Txn,
    ino: Ino,
    mount: MountId,
    owner: u64,
    old: &[Held],
    new: &[(u64, u64, bool)],
    pid: u32,
) -> Result<(u64, Vec<Held>)> {
    for h in old {
        if !new.iter().any(|n| n.0 == h.start) {
            t.delete(Cf::Meta, &ks::lock_key(ino, mount, owner, h.start))?;
        }
    }
    let held = owner_locks(mount, owner, old, new, pid);
    for h in &held {
        if !old.iter().any(|o| o.start == h.start && o.rec == h.rec) {
            t.put(
                Cf::Meta,
                &ks::lock_key(ino, mount, owner, h.start),
                &h.rec.encode()?,
            )?;
        }
    }
    Ok((bump_lock_version(t, ino)?, held))
}

/// One owner's locks as `new` ranges, given its `old` ones: a range that stays as it was keeps
/// the pid that took it (F_GETLK reports that one).
fn owner_locks(
    mount: MountId,
    owner: u64,
    old: &[Held],
    new: &[(u64, u64, bool)],
    pid: u32,
) -> Vec<Held> {
    new.iter()
        .map(|&(start, end, write)| {
            let pid = old
                .iter()
                .find(|h| h.start == start && h.rec.end == end && h.rec.write == write)
                .map_or(pid, |h| h.rec.pid);
            Held {
                mount,
                owner,
                start,
                rec: LockRecord { end, write, pid },
            }
        })
        .collect()
}

/// A lock request's effect on its owner: the owner's locks before and its ranges after.
type Change = Option<(Vec<Held>, Vec<(u64, u64, bool)>)>;

/// What `want` makes of `locks` (an inode's table, holding `me`'s locks among others): EAGAIN
/// when another owner's lock is in the way; `None` when it changes nothing; else `want`'s
/// owner's locks before and its ranges after.
fn change(locks: &[Held], me: MountId, want: &LockSpec) -> Result<Change> {
    if want.kind != LockKind::Unlock && conflict(locks, me, want).is_some() {
        return errno(libc::EAGAIN);
    }
    let mine: Vec<Held> = locks
        .iter()
        .filter(|h| h.mount == me && h.owner == want.owner)
        .copied()
        .collect();
    let ranges = mine
        .iter()
        .map(|h| (h.start, h.rec.end, h.rec.write))
        .collect();
    let new = apply(ranges, want.start, want.end, want.kind);
    Ok((!mine.is_empty() || !new.is_empty()).then_some((mine, new)))
}

/// Delete the locks on `ino` that `which` picks; how many went.
fn remove_locks(t: &mut dyn Txn, ino: Ino, which: impl Fn(&Held) -> bool) -> Result<u64> {
    t.get(Cf::Meta, &ks::lock_pseudo_key(ino))?;
    let mut n = 0;
    for h in scan_locks(t, ino)? {
        if which(&h) {
            t.delete(Cf::Meta, &ks::lock_key(ino, h.mount, h.owner, h.start))?;
            n += 1;
        }
    }
    if n > 0 {
        bump_lock_version(t, ino)?;
    }
    Ok(n)
}

/// Drop every lock `mount` holds on `ino` (clean exit).
pub fn drop_mount_locks(t: &mut dyn Txn, ino: Ino, mount: MountId) -> Result<u64> {
    remove_locks(t, ino, |h| h.mount == mount)
}

fn conflict(locks: &[Held], me: MountId, want: &LockSpec) -> Option<LockSpec> {
    let write = want.kind == LockKind::Write;
    locks
        .iter()
        .find(|h| {
            !(h.mount == me && h.owner == want.owner)
                && (write || h.rec.write)
                && overlaps((h.start, h.rec.end), (want.start, want.end))
        })
        .map(|h| LockSpec {
            owner: h.owner,
            start: h.start,
            end: h.rec.end,
            kind: if h.rec.write {
                LockKind::Write
            } else {
                LockKind::Read
            },
            pid: h.rec.pid,
        })
}

/// Whether thread `tid` has a signal pending that it does not block (its own or its
/// process's): a blocked F_SETLKW must then give up with EINTR, as on a local filesystem.
fn signal_pending(tid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // The process is gone: nobody is waiting any more.
        return true;
    };
    let mask = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

impl Fs {
    /// F_GETLK: the first lock that would block `want`.
    pub fn getlk(&self, ino: Ino, want: &LockSpec) -> Result<LockQuery> {
        self.look(|t| {
            load_inode(t, ino)?;
            let locks = read_locks(t, ino, &self.locks)?;
            Ok(conflict(&locks, self.mount_id, want))
        })
    }

    /// One attempt at F_SETLK: EAGAIN when another owner's lock is in the way.
    fn try_setlk(&self, ino: Ino, fh: u64, want: &LockSpec) -> Result<()> {
        if want.start > want.end {
            return errno(libc::EINVAL);
        }
        let is_mine = |h: &&Held| h.mount == self.mount_id && h.owner == want.owner;
        let changed = self.txn(|t| {
            load_inode(t, ino)?;
            let locks = read_locks(t, ino, &self.locks)?;
            let Some((mine, new)) = change(&locks, self.mount_id, want)? else {
                return Ok(None);
            };
            let (version, held) =
                set_owner_locks(t, ino, self.mount_id, want.owner, &mine, &new, want.pid)?;
            let mut table: Vec<Held> = locks.iter().filter(|h| !is_mine(h)).copied().collect();
            table.extend(held);
            Ok(Some((version, table, !new.is_empty())))
        })?;
        // Committed: the table at its new version is known without a scan.
        let holds = match changed {
            Some((version, table, holds)) => {
                self.locks.remember(ino, version, Arc::new(table));
                holds
            }
            None => false,
        };
        tracing::debug!(ino, fh, ?want, holds, "lock set");
        if holds {
            lock(&self.locks.held).insert(ino);
            lock(&self.locks.by_handle)
                .entry(fh)
                .or_default()
                .insert(want.owner);
        }
        if want.kind == LockKind::Unlock {
            self.locks.notify();
        }
        Ok(())
    }

    /// F_SETLK / F_SETLKW. With `wait = Some(thread)`, blocks until the lock is granted or
    /// that thread (the caller's, from the request header) has a signal pending (EINTR). Call
    /// it waiting off a FUSE worker thread: a waiter must not hold one of the threads that
    /// would serve the unlock.
    pub fn setlk(&self, ino: Ino, fh: u64, want: &LockSpec, wait: Option<u32>) -> Result<()> {
        if want.kind != LockKind::Unlock {
            self.writable_or_locks_ok()?;
        }
        loop {
            let waiter = match (self.try_setlk(ino, fh, want), wait) {
                (Err(FsError::Errno(libc::EAGAIN)), Some(w)) => w,
                (r, _) => return r,
            };
            self.locks.wait(Duration::from_millis(50));
            if signal_pending(waiter) {
                return errno(libc::EINTR);
            }
        }
    }

    /// The kernel's flush on close carries the closing process's lock owner: POSIX says any
    /// close of the file drops that process's locks on it.
    pub fn unlock_owner(&self, ino: Ino, owner: u64) -> Result<()> {
        if !lock(&self.locks.held).contains(&ino) {
            return Ok(());
        }
        let n =
            self.txn(|t| remove_locks(t, ino, |h| h.mount == self.mount_id && h.owner == owner))?;
        if n > 0 {
            self.locks.notify();
        }
        Ok(())
    }

    /// The last close of an open file description drops the locks taken through it (OFD).
    pub(crate) fn unlock_handle(&self, ino: Ino, fh: u64) -> Result<()> {
        let owners = lock(&self.locks.by_handle).remove(&fh);
        tracing::debug!(ino, fh, ?owners, "last close of a handle: its OFD locks go");
        for owner in owners.into_iter().flatten() {
            self.unlock_owner(ino, owner)?;
        }
        Ok(())
    }

    /// Locks are advisory state, allowed on read-only opens, but not on a read-only mount
    /// (they would be writes to the store).
    fn writable_or_locks_ok(&self) -> Result<()> {
        if self.opts.read_only {
            // Shared state cannot be recorded; behave like a local fs without lock support.
            return errno(libc::ENOLCK);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_splits_merges_and_converts() {
        let w = LockKind::Write;
        let r = LockKind::Read;
        let v = apply(vec![], 10, 19, w);
        assert_eq!(v, vec![(10, 19, true)]);
        let v = apply(v, 20, 29, w);
        assert_eq!(v, vec![(10, 29, true)], "adjacent same type merges");
        let v = apply(v, 15, 16, LockKind::Unlock);
        assert_eq!(v, vec![(10, 14, true), (17, 29, true)], "unlock splits");
        let v = apply(v, 12, 20, r);
        assert_eq!(
            v,
            vec![(10, 11, true), (12, 20, false), (21, 29, true)],
            "conversion replaces the middle"
        );
        let v = apply(v, 0, u64::MAX, LockKind::Unlock);
        assert!(v.is_empty());
        let v = apply(vec![(0, u64::MAX, false)], 5, u64::MAX, r);
        assert_eq!(v, vec![(0, u64::MAX, false)]);
    }
}

#[cfg(test)]
mod shared_tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::FsOptions;
    use crate::kv::mem::MemEngine;
    use crate::kv::KvStore;

    fn spec(owner: u64, start: u64, end: u64, kind: LockKind) -> LockSpec {
        LockSpec {
            owner,
            start,
            end,
            kind,
            pid: owner as u32,
        }
    }

    /// A store several mounts may share, and how to open it again.
    fn shared_store() -> (impl Fn() -> KvStore, crate::keyspace::records::FormatRecord) {
        let engine = Arc::new(MemEngine::shared());
        let kv = move || KvStore::with_engine(engine.clone());
        let format = crate::store::init(&kv(), &Default::default()).unwrap();
        (kv, format)
    }

    /// Two mounts of one store: each remembers the lock table at the version it last saw,
    /// and every change by the other (or by the sweeper, which writes no version) must show.
    #[test]
    fn a_remembered_lock_table_never_hides_another_mounts_change() {
        let (kv, format) = shared_store();
        let a = Fs::new(kv(), format.clone(), FsOptions::default());
        let b = Fs::new(kv(), format, FsOptions::default());
        let (attr, fa) = a.create_test_file(b"db");
        let ino = attr.ino;
        let fb = b.open(ino, true).unwrap();
        let (w, r, u) = (LockKind::Write, LockKind::Read, LockKind::Unlock);
        for round in 0..3 {
            // a locks; b, which knows the table from its last look, must see it.
            a.setlk(ino, fa, &spec(1, 0, 9, w), None).unwrap();
            assert!(
                b.getlk(ino, &spec(2, 5, 5, r)).unwrap().is_some(),
                "round {round}"
            );
            assert!(matches!(
                b.setlk(ino, fb, &spec(2, 5, 5, r), None),
                Err(FsError::Errno(libc::EAGAIN))
            ));
            // a unlocks: b's next try, from the table it remembered with a's lock in it,
            // must see the lock gone.
            a.setlk(ino, fa, &spec(1, 0, 9, u), None).unwrap();
            b.setlk(ino, fb, &spec(2, 5, 5, w), None).unwrap();
            assert!(a.getlk(ino, &spec(1, 0, 0, w)).unwrap().is_none());
            assert_eq!(
                a.getlk(ino, &spec(1, 5, 5, r)).unwrap().map(|l| l.owner),
                Some(2)
            );
            b.setlk(ino, fb, &spec(2, 5, 5, u), None).unwrap();
        }
        // A change that writes no version (the sweeper's, a 5.1 build's) is seen too.
        a.setlk(ino, fa, &spec(1, 0, 0, w), None).unwrap();
        assert!(b.getlk(ino, &spec(2, 0, 0, w)).unwrap().is_some());
        let k = ks::lock_key(ino, a.mount_id(), 1, 0);
        b.store()
            .transact(|t| {
                t.delete(Cf::Meta, &k)?;
                t.put(Cf::Meta, &ks::lock_pseudo_key(ino), &[1])
            })
            .unwrap();
        assert!(b.getlk(ino, &spec(2, 0, 0, w)).unwrap().is_none());
        assert!(a.getlk(ino, &spec(2, 0, 0, w)).unwrap().is_none());
    }

    /// Mounts sharing a store keep locks in the keyspace: a dead one's are dropped by the
    /// sweep, and the lock is free at once.
    #[test]
    fn a_dead_sharing_mounts_locks_go_with_the_sweep() {
        let (kv, format) = shared_store();
        let a = Fs::new(kv(), format.clone(), FsOptions::default());
        crate::gc::register(a.store(), a.mount_id()).unwrap();
        let (attr, fa) = a.create_test_file(b"db");
        a.setlk(attr.ino, fa, &spec(1, 0, 9, LockKind::Write), None)
            .unwrap();
        drop(a); // dies holding it (no clean exit), its heartbeat stops
        let b = Fs::new(kv(), format, FsOptions::default());
        let fb = b.open(attr.ino, true).unwrap();
        let want = spec(2, 0, 0, LockKind::Write);
        assert!(matches!(
            b.setlk(attr.ino, fb, &want, None),
            Err(FsError::Errno(libc::EAGAIN))
        ));
        crate::gc::register(b.store(), b.mount_id()).unwrap();
        // Heartbeats count in whole seconds: a's is a second old after this.
        std::thread::sleep(Duration::from_millis(1100));
        let o = crate::gc::SweepOptions {
            own: Some(b.mount_id()),
            timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let r = crate::gc::sweep(b.store(), &o).unwrap();
        assert_eq!((r.dead_mounts, r.locks), (1, 1), "{r:?}");
        b.setlk(attr.ino, fb, &want, None).unwrap();
    }
}
