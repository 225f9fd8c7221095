//! `kvfs pin` / `unpin`: keep a subtree's content resident. Pinning adds one to the pin count
//! of every block its files name now (fetching the evicted ones), which takes them out of the
//! last-use index; unpinning takes the one away. The pinned roots are kept in `M pins`, so a
//! root is pinned once and unpinned only if pinned; nested pins add up.

use std::collections::HashSet;

use crate::blocks::reader::Tiering;
use crate::blocks::resident;
use crate::keyspace::records::{decode_v1, encode_v1, Dirent, FmapEntry, Kind};
use crate::keyspace::{self as ks, Hash, Ino, ROOT_INO};
use crate::kv::{Cf, KvError, KvStore};

/// What a pin or unpin did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    pub files: u64,
    pub blocks: u64,
    /// Stored bytes of the blocks.
    pub bytes: u64,
    /// Blocks fetched back from replicas.
    pub fetched: u64,
    /// Evicted blocks that could not be fetched now (replicas unreachable).
    pub unfetched: u64,
}

impl std::fmt::Display for PinReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} file(s), {} block(s), {} bytes stored ({} fetched back",
            self.files, self.blocks, self.bytes, self.fetched
        )?;
        if self.unfetched > 0 {
            write!(
                f,
                "; {} could not be fetched now: each is fetched when read, and then stays",
                self.unfetched
            )?;
        }
        write!(f, ")")
    }
}

/// The pinned roots.
pub fn roots(store: &KvStore) -> Result<Vec<Ino>, KvError> {
    decode_roots(store.get(Cf::Meta, ks::META_PINS)?)
}

fn decode_roots(v: Option<Vec<u8>>) -> Result<Vec<Ino>, KvError> {
    Ok(match v {
        Some(v) => decode_v1("pins", &v)?,
        None => Vec::new(),
    })
}

/// The inode at `path` (from the filesystem's root, `/` separated).
pub fn resolve(store: &KvStore, path: &str) -> Result<Ino, KvError> {
    let mut ino = ROOT_INO;
    for name in path.split('/').filter(|n| !n.is_empty() && *n != ".") {
        let v = store
            .get(Cf::Meta, &ks::dirent_key(ino, name.as_bytes()))?
            .ok_or_else(|| KvError::Other(format!("{path}: no such file or directory")))?;
        ino = Dirent::decode(&v)?.ino;
    }
    Ok(ino)
}

/// Every block the files under `root` name now, with their content lengths, and the files.
fn blocks_under(store: &KvStore, root: Ino) -> Result<(Vec<(Hash, u32)>, u64), KvError> {
    let mut seen_ino = HashSet::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut files = 0;
    let mut todo = vec![root];
    while let Some(ino) = todo.pop() {
        if !seen_ino.insert(ino) {
            continue;
        }
        let (a, b) = ks::dirent_range(ino);
        store.for_each(Cf::Meta, &a, &b, |_, v| {
            if let Ok(d) = Dirent::decode(v) {
                if matches!(d.kind, Kind::Dir | Kind::File) {
                    todo.push(d.ino);
                }
            }
            true
        })?;
        let (a, b) = ks::fmap_range(ino, 0, u64::MAX);
        let mut any = false;
        store.for_each(Cf::Fmap, &a, &b, |_, v| {
            any = true;
            if let Ok(e) = FmapEntry::decode(v) {
                if seen.insert(e.hash) {
                    out.push((e.hash, e.len));
                }
            }
            true
        })?;
        files += any as u64;
    }
    Ok((out, files))
}

/// Pin (`up`) or unpin the subtree at `root`. Evicted blocks are fetched through `hook`.
pub fn pin(store: &KvStore, hook: &dyn Tiering, root: Ino, up: bool) -> Result<PinReport, KvError> {
    let pinned = roots(store)?;
    if up == pinned.contains(&root) {
        return Err(KvError::Other(if up {
            format!("inode {root} is pinned already")
        } else {
            format!("inode {root} is not pinned")
        }));
    }
    let (blocks, files) = blocks_under(store, root)?;
    let mut r = PinReport {
        files,
        ..Default::default()
    };
    for chunk in blocks.chunks(256) {
        let infos = store.transact(|t| {
            let mut infos = Vec::new();
            for (h, len) in chunk {
                if let Some(i) = resident::pin(t, h, up)? {
                    infos.push((*h, *len, i));
                }
            }
            Ok::<_, KvError>(infos)
        })?;
        for (h, _, i) in &infos {
            r.blocks += 1;
            r.bytes += i.stored as u64;
            if up && i.evicted {
                hook.prefetch(h, i.len, true);
            }
        }
        if up {
            // A block that cannot be fetched now stays pinned (and evicted): a read fetches it
            // and it stays. The pin is recorded either way.
            for (h, len, i) in infos {
                if i.evicted {
                    match hook.fetch(&h, len, true) {
                        Ok(_) => r.fetched += 1,
                        Err(e) => {
                            r.unfetched += 1;
                            tracing::warn!(error = %e, "pinned block not fetched now");
                        }
                    }
                }
            }
        }
    }
    store.transact(|t| {
        let mut list = decode_roots(t.get(Cf::Meta, ks::META_PINS)?)?;
        list.retain(|&i| i != root);
        if up {
            list.push(root);
        }
        t.put(Cf::Meta, ks::META_PINS, &encode_v1(&list)?)?;
        Ok::<_, KvError>(())
    })?;
    store.sync()?;
    Ok(r)
}
