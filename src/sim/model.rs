//! The simulation's model: what the filesystem must show (nodes by inode, names by
//! directory), seen as a tree of paths with content digests, and the seeded generator.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::keyspace::records::Kind;
use crate::keyspace::{Ino, ROOT_INO};

pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(super) fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub(super) fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len() as u64) as usize])
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Node {
    pub(super) kind: Kind,
    /// File content or symlink target (shared: the model is cloned before every step).
    pub(super) data: Arc<Vec<u8>>,
    /// [`digest`] of `data`, kept current by [`Node::change`].
    pub(super) dg: (usize, u64),
    pub(super) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What the filesystem must show: nodes by inode and names by (directory, name).
#[derive(Clone, Debug, Default)]
pub(super) struct Model {
    pub(super) nodes: BTreeMap<Ino, Node>,
    pub(super) entries: BTreeMap<(Ino, Vec<u8>), Ino>,
}

/// What one name shows: (inode, kind, nlink, content or target as (length, xxh3), xattrs).
pub(super) type Seen = (Ino, Kind, u32, (usize, u64), BTreeMap<Vec<u8>, Vec<u8>>);

pub(super) fn digest(data: &[u8]) -> (usize, u64) {
    (data.len(), xxhash_rust::xxh3::xxh3_64(data))
}
/// The tree as seen from the root, by path.
pub(super) type View = BTreeMap<Vec<u8>, Seen>;

impl Model {
    pub(super) fn new() -> Model {
        let mut m = Model::default();
        m.nodes.insert(ROOT_INO, node(Kind::Dir, Vec::new()));
        m
    }

    pub(super) fn children(&self, dir: Ino) -> Vec<(Vec<u8>, Ino)> {
        self.entries
            .range((dir, Vec::new())..(dir + 1, Vec::new()))
            .map(|((_, n), i)| (n.clone(), *i))
            .collect()
    }

    pub(super) fn nlink(&self, ino: Ino) -> u32 {
        match self.nodes.get(&ino).map(|n| n.kind) {
            Some(Kind::Dir) => {
                2 + self
                    .children(ino)
                    .iter()
                    .filter(|(_, c)| self.nodes[c].kind == Kind::Dir)
                    .count() as u32
            }
            _ => self.entries.values().filter(|i| **i == ino).count() as u32,
        }
    }

    pub(super) fn view(&self) -> View {
        let mut out = View::new();
        let mut stack = vec![(b"/".to_vec(), ROOT_INO)];
        while let Some((path, dir)) = stack.pop() {
            for (name, ino) in self.children(dir) {
                let n = &self.nodes[&ino];
                let mut p = path.clone();
                p.extend_from_slice(&name);
                out.insert(
                    p.clone(),
                    (ino, n.kind, self.nlink(ino), n.dg, n.xattrs.clone()),
                );
                if n.kind == Kind::Dir {
                    p.push(b'/');
                    stack.push((p, ino));
                }
            }
        }
        out
    }

    /// Directories reachable from the root (the root first).
    pub(super) fn dirs(&self) -> Vec<Ino> {
        let mut out = vec![ROOT_INO];
        let mut i = 0;
        while i < out.len() {
            let d = out[i];
            out.extend(
                self.children(d)
                    .into_iter()
                    .map(|(_, c)| c)
                    .filter(|c| self.nodes[c].kind == Kind::Dir),
            );
            i += 1;
        }
        out
    }

    pub(super) fn names(&self) -> Vec<(Ino, Vec<u8>)> {
        self.entries.keys().cloned().collect()
    }

    pub(super) fn files(&self) -> Vec<Ino> {
        let mut v: Vec<Ino> = self
            .entries
            .values()
            .copied()
            .filter(|i| self.nodes[i].kind == Kind::File)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub(super) fn reachable(&self, ino: Ino) -> bool {
        ino == ROOT_INO || self.entries.values().any(|i| *i == ino)
    }

    /// The model after a successful rename.
    pub(super) fn rename(&mut self, from: (Ino, Vec<u8>), to: (Ino, Vec<u8>), exchange: bool) {
        let src = self.entries[&from];
        if exchange {
            let dst = self.entries[&to];
            self.entries.insert(from, dst);
            self.entries.insert(to, src);
            return;
        }
        if let Some(dst) = self.entries.get(&to).copied() {
            if dst == src {
                return;
            }
            if self.nodes[&dst].kind == Kind::Dir {
                self.nodes.remove(&dst);
            }
        }
        self.entries.remove(&from);
        self.entries.insert(to, src);
    }
}

/// The names whose entries differ, one line each: what the filesystem has, what the model has.
pub(super) fn diff(got: &View, want: &View) -> String {
    let short = |v: Option<&Seen>| match v {
        None => "absent".to_string(),
        Some((ino, kind, nlink, (len, h), x)) => format!(
            "ino {ino} {kind:?} nlink {nlink} {len} bytes (xxh3 {h:016x}) xattrs {:?}",
            x.keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>()
        ),
    };
    let mut out = String::new();
    for p in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, w) = (got.get(p), want.get(p));
        if g != w {
            out += &format!(
                "  {}: fs {} / model {}\n",
                String::from_utf8_lossy(p),
                short(g),
                short(w)
            );
        }
    }
    out
}

impl Node {
    pub(super) fn change(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        f(Arc::make_mut(&mut self.data));
        self.dg = digest(&self.data);
    }
}

pub(super) fn node(kind: Kind, data: Vec<u8>) -> Node {
    Node {
        kind,
        dg: digest(&data),
        data: Arc::new(data),
        xattrs: BTreeMap::new(),
    }
}

pub(super) fn patch(data: &mut Vec<u8>, off: usize, bytes: &[u8]) {
    if data.len() < off + bytes.len() {
        data.resize(off + bytes.len(), 0);
    }
    data[off..off + bytes.len()].copy_from_slice(bytes);
}
