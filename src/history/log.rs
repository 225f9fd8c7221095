//! `kvfs log STORE PATH`: when PATH changed within the history window. It resolves PATH at
//! the oldest moment kept, then walks the recorded moments in order; a moment that wrote a
//! name on PATH's way or the inode PATH names (its record, xattrs or block map) resolves PATH
//! again in the state after it and reports what differs: created, deleted, renamed here or
//! away, replaced (a rename over it), written, truncated, attributes.

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::view::View;
use super::when;
use crate::keyspace::past::parse_moment_key;
use crate::keyspace::records::{Dirent, FmapEntry, Inode, Kind};
use crate::keyspace::{self as ks, Ino, Prefix, ROOT_INO};
use crate::kv::{Cf, KvError, KvStore};

/// What PATH was at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// (parent, name) -> inode along the way, the last one PATH's.
    chain: Vec<(Ino, Vec<u8>)>,
    ino: Ino,
    inode: Inode,
    /// SHA-256 over the block map (block number, name, length) and the size: equal iff the
    /// content is (for one block size).
    content: [u8; 32],
}

/// One line of the log.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub at: String,
    pub what: &'static str,
    pub ino: Option<Ino>,
    pub size: Option<u64>,
    pub content: Option<String>,
}

fn resolve(kv: &KvStore, names: &[&[u8]]) -> Result<Option<Seen>, KvError> {
    let mut ino = ROOT_INO;
    let mut chain = Vec::new();
    for name in names {
        let Some(v) = kv.get(Cf::Meta, &ks::dirent_key(ino, name))? else {
            return Ok(None);
        };
        chain.push((ino, name.to_vec()));
        ino = Dirent::decode(&v)?.ino;
    }
    let Some(v) = kv.get(Cf::Meta, &ks::inode_key(ino))? else {
        return Ok(None);
    };
    let inode = Inode::decode(&v)?;
    let mut h = Sha256::new();
    h.update(inode.size.to_le_bytes());
    if inode.kind == Kind::File {
        let (a, b) = ks::fmap_range(ino, 0, u64::MAX);
        let mut bad = None;
        kv.for_each(Cf::Fmap, &a, &b, |k, v| {
            match FmapEntry::decode(v) {
                Ok(e) => {
                    h.update(&k[9..]);
                    h.update(e.hash);
                    h.update(e.len.to_le_bytes());
                }
                Err(e) => bad = Some(e),
            }
            true
        })?;
        if let Some(e) = bad {
            return Err(e.into());
        }
    } else {
        h.update(&inode.target);
    }
    Ok(Some(Seen {
        chain,
        ino,
        inode,
        content: h.finalize().into(),
    }))
}

/// Whether a moment that wrote `keys` may have changed what `seen` resolved.
fn touches(keys: &[(u8, Vec<u8>)], names: &[&[u8]], seen: &Option<Seen>) -> bool {
    keys.iter().any(
        |(cf, k)| match (cf, k.first().copied().and_then(Prefix::from_byte)) {
            // Any name on the way (which inode is the parent at each step is known only when
            // resolved, so every `d` key ending in a component of the path counts).
            (0, Some(Prefix::Dirent)) => names.contains(&ks::dirent_name(k)),
            (0, Some(Prefix::Inode)) | (1, Some(Prefix::Fmap)) => {
                seen.as_ref().is_some_and(|s| ks::key_ino(k) == Some(s.ino))
            }
            _ => false,
        },
    )
}

fn event(at: u64, what: &'static str, s: Option<&Seen>) -> Event {
    Event {
        at: when::show(at),
        what,
        ino: s.map(|s| s.ino),
        size: s.map(|s| s.inode.size),
        content: s.map(|s| ks::hex(&s.content[..8])),
    }
}

/// What happened between `before` and `after`, if anything a user sees.
fn what(
    view_before: &KvStore,
    before: &Option<Seen>,
    after: &Option<Seen>,
) -> Option<&'static str> {
    match (before, after) {
        (None, None) => None,
        (None, Some(a)) => {
            // An inode that existed before under another name was renamed here.
            let existed = view_before
                .get(Cf::Meta, &ks::inode_key(a.ino))
                .ok()
                .flatten()
                .is_some();
            Some(if existed { "renamed here" } else { "created" })
        }
        (Some(_), None) => Some("deleted or renamed away"),
        (Some(b), Some(a)) if b.ino != a.ino => Some("replaced"),
        (Some(b), Some(a)) if b.content != a.content => Some(if a.inode.size < b.inode.size {
            "truncated"
        } else {
            "written"
        }),
        (Some(b), Some(a)) if b.chain != a.chain => Some("moved with a parent"),
        (Some(b), Some(a)) => {
            let (x, y) = (&b.inode, &a.inode);
            let attrs = x.perm != y.perm
                || x.uid != y.uid
                || x.gid != y.gid
                || x.mtime != y.mtime
                || x.nlink != y.nlink;
            attrs.then_some("attributes")
        }
    }
}

/// The log of `path` (inside the filesystem: `/dir/file`) in `kv`'s history.
pub fn log(kv: &KvStore, path: &str) -> Result<Vec<Event>, KvError> {
    let st = super::state(kv)?;
    let Some(oldest) = st.oldest() else {
        return Err(KvError::Other(
            "this store keeps no history (`kvfs config STORE history=7d` starts it)".into(),
        ));
    };
    let names: Vec<&[u8]> = path
        .split('/')
        .filter(|n| !n.is_empty() && *n != ".")
        .map(str::as_bytes)
        .collect();
    let engine = kv.engine();
    let at = |m: u64| -> Result<KvStore, KvError> {
        Ok(KvStore::with_engine(Arc::new(View::new(
            engine.clone(),
            m,
        )?)))
    };
    let mut out = Vec::new();
    let mut cur = resolve(&at(oldest)?, &names)?;
    if let Some(s) = &cur {
        out.push(event(oldest, "present at the window's start", Some(s)));
    }
    let mut moments = Vec::new();
    let (_, end) = Prefix::Moment.range();
    kv.for_each(
        Cf::Meta,
        &crate::keyspace::past::moment_key(oldest),
        &end,
        |k, v| {
            if let (Some(m), Ok(moment)) = (parse_moment_key(k), super::decode_moment(v)) {
                moments.push((m, moment.keys));
            }
            true
        },
    )?;
    for (m, keys) in moments {
        if !touches(&keys, &names, &cur) {
            continue;
        }
        let before = at(m - 1)?;
        let next = resolve(&at(m)?, &names)?;
        if let Some(w) = what(&before, &cur, &next) {
            out.push(event(m, w, next.as_ref().or(cur.as_ref())));
        }
        cur = next;
    }
    Ok(out)
}
