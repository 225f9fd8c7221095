//! Readahead across the files of a directory read in order. `tar c`, `cp -r`, `grep -r` and
//! backups look up and open a directory's files one after the other, in the order readdir
//! gave (name order here), and read each small file whole: the sequential readahead of one
//! file never starts, and every file waits for its first block (a disk read when cold, a round
//! trip to a replica when evicted). Once two files of a directory have been opened in name
//! order (or its first file was, right after the directory was listed: the way `tar` and
//! `cp -r` walk; a file opened after `ls` is seldom the first), the first
//! blocks of the files after them are handed to the prefetcher, a window at a time, from a
//! thread of their own. A lookup alone (`ls -l`, `stat`) starts nothing: only a lookup
//! followed by an open of the same file counts, so listing a directory of evicted files
//! fetches nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::blocks::prefetch::PrefetchHandle;
use crate::keyspace::records::{Dirent, FmapEntry, Kind};
use crate::keyspace::{self as ks, Ino};
use crate::kv::{Cf, KvStore};
use crate::util::lock;

/// Files looked up lately, remembered to learn where an opened file sits.
const RECENT: usize = 64;
/// Regular files of the directories listed lately (readdirplus gives the kernel their
/// attributes, so no lookup tells where they sit); the table starts over past this.
const LISTED_FILES: usize = 1 << 16;
/// Directories followed at once (past that the table starts over).
const DIRS: usize = 64;
/// Entries looked at per window, and content bytes asked for per window.
const WINDOW_FILES: usize = 32;
const WINDOW_BYTES: u64 = 4 << 20;
/// Content bytes asked for per file (a large file's own readahead takes over once read).
const FILE_BYTES: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct DirAhead {
    /// Regular files looked up lately, newest last: file, directory, name.
    recent: Mutex<VecDeque<(Ino, Ino, Vec<u8>)>>,
    /// Directories listed lately (readdir), newest last, with their first regular file.
    listed: Mutex<VecDeque<(Ino, Vec<u8>)>>,
    /// Where the regular files of those listings sit: directory and name.
    listed_files: Mutex<HashMap<Ino, (Ino, Vec<u8>)>>,
    dirs: Arc<Mutex<HashMap<Ino, Scan>>>,
}

/// How a directory is being read.
#[derive(Default)]
struct Scan {
    /// The name opened last, and how many opens in a row came in name order.
    last: Vec<u8>,
    run: u32,
    /// The last name a window reached (`None`: at the directory's end), and the name whose
    /// open starts the next window.
    end: Option<Vec<u8>>,
    refill_at: Option<Vec<u8>>,
    /// A window is being scanned.
    busy: bool,
}

impl DirAhead {
    /// A lookup found regular file `ino` as `name` in `parent`.
    pub(super) fn looked_up(&self, ino: Ino, parent: Ino, name: &[u8]) {
        let mut r = lock(&self.recent);
        if r.len() >= RECENT {
            r.pop_front();
        }
        r.push_back((ino, parent, name.to_vec()));
    }

    /// Directory `ino` was listed: its regular files, in order.
    pub(super) fn listed<'a>(&self, ino: Ino, mut files: impl Iterator<Item = (Ino, &'a [u8])>) {
        let Some((f0, first)) = files.next() else {
            return;
        };
        {
            let mut m = lock(&self.listed_files);
            if m.len() >= LISTED_FILES {
                m.clear();
            }
            m.insert(f0, (ino, first.to_vec()));
            for (f, name) in files {
                m.insert(f, (ino, name.to_vec()));
            }
        }
        let mut l = lock(&self.listed);
        if l.back().is_some_and(|(i, _)| *i == ino) {
            return;
        }
        if l.len() >= RECENT {
            l.pop_front();
        }
        l.push_back((ino, first.to_vec()));
    }

    /// File `ino` was opened for reading: when it continues a scan of its directory in name
    /// order and the window ahead runs short, ask for the next window's blocks.
    pub(super) fn opened(
        &self,
        ino: Ino,
        store: &Arc<KvStore>,
        prefetch: impl FnOnce() -> PrefetchHandle,
        bs: u64,
    ) {
        let looked_up = lock(&self.recent)
            .iter()
            .rev()
            .find(|(i, _, _)| *i == ino)
            .map(|(_, p, n)| (*p, n.clone()));
        let Some((parent, name)) =
            looked_up.or_else(|| lock(&self.listed_files).get(&ino).cloned())
        else {
            return;
        };
        let first_of_listing = lock(&self.listed)
            .iter()
            .any(|(d, first)| *d == parent && *first == name);
        let from = {
            let mut dirs = lock(&self.dirs);
            if dirs.len() >= DIRS && !dirs.contains_key(&parent) {
                dirs.clear();
            }
            let s = dirs.entry(parent).or_default();
            if name > s.last {
                s.run += 1;
            } else {
                *s = Scan::default();
            }
            s.last = name.clone();
            let due = s.refill_at.as_ref().is_none_or(|r| name >= *r);
            let needed = if first_of_listing { 1 } else { 2 };
            if s.run < needed || s.busy || !due {
                return;
            }
            let from = match &s.end {
                Some(e) if *e > name => e.clone(),
                // The window ended at the directory's end: nothing more to ask for.
                None if s.refill_at.is_some() => return,
                _ => name,
            };
            s.busy = true;
            from
        };
        let (store, dirs, handle) = (store.clone(), self.dirs.clone(), prefetch());
        let spawned = std::thread::Builder::new()
            .name("kvfs-dir-ahead".into())
            .spawn(move || {
                let w = window(&store, parent, &from, &handle, bs);
                let mut dirs = lock(&dirs);
                if let Some(s) = dirs.get_mut(&parent) {
                    s.busy = false;
                    if let Ok((end, refill_at)) = w {
                        s.end = end;
                        s.refill_at = Some(refill_at.unwrap_or_else(|| from.clone()));
                    }
                }
            });
        if spawned.is_err() {
            if let Some(s) = lock(&self.dirs).get_mut(&parent) {
                s.busy = false;
            }
        }
    }
}

/// Ask for the first blocks of the regular files after `from` in `parent`. Returns the last
/// name looked at (`None` at the directory's end) and the name halfway through the window.
type Window = (Option<Vec<u8>>, Option<Vec<u8>>);

fn window(
    store: &KvStore,
    parent: Ino,
    from: &[u8],
    prefetch: &PrefetchHandle,
    bs: u64,
) -> Result<Window, crate::kv::KvError> {
    let mut start = ks::dirent_key(parent, from);
    start.push(0);
    let (_, end) = ks::dirent_range(parent);
    store.read(|t| {
        let entries = t.scan(Cf::Meta, &start, &end, WINDOW_FILES)?;
        let mut bytes = 0u64;
        let mut half = None;
        for (i, (k, v)) in entries.iter().enumerate() {
            if i == entries.len() / 2 {
                half = Some(ks::dirent_name(k).to_vec());
            }
            let Ok(d) = Dirent::decode(v) else { continue };
            if d.kind != Kind::File || bytes >= WINDOW_BYTES {
                continue;
            }
            let (a, b) = ks::fmap_range(d.ino, 0, FILE_BYTES.div_ceil(bs));
            for (_, fv) in t.scan(Cf::Fmap, &a, &b, usize::MAX)? {
                if let Ok(e) = FmapEntry::decode(&fv) {
                    bytes += e.len as u64;
                    prefetch.want(e.hash, e.len, true);
                }
            }
        }
        tracing::debug!(
            dir = parent,
            entries = entries.len(),
            bytes,
            "prefetching the files ahead of a scan"
        );
        let last = match entries.len() {
            n if n < WINDOW_FILES => None,
            _ => entries.last().map(|(k, _)| ks::dirent_name(k).to_vec()),
        };
        Ok((last, half))
    })
}
