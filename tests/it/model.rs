//! Randomized model test: the same random operations go to the mount and to an in-memory model
//! of POSIX semantics; every result (errno or bytes) must agree, and the whole tree is compared
//! after remounts in between.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

#[derive(Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
}

fn parent(p: &str) -> Option<&str> {
    p.rfind('/').map(|i| &p[..i])
}

impl Model {
    fn get(&self, p: &str) -> Option<&Node> {
        self.nodes.get(p)
    }

    /// errno of resolving `p`'s parent directory.
    fn parent_err(&self, p: &str) -> i32 {
        let Some(d) = parent(p) else { return 0 };
        let e = self.parent_err(d);
        if e != 0 {
            return e;
        }
        match self.get(d) {
            None => libc::ENOENT,
            Some(Node::File(_)) => libc::ENOTDIR,
            Some(Node::Dir) => 0,
        }
    }

    fn children(&self, p: &str) -> Vec<String> {
        let pre = format!("{p}/");
        self.nodes
            .keys()
            .filter(|k| k.starts_with(&pre))
            .cloned()
            .collect()
    }

    fn write(&mut self, p: &str, off: usize, data: &[u8], create: bool) -> i32 {
        let e = self.parent_err(p);
        if e != 0 {
            return e;
        }
        match self.nodes.get_mut(p) {
            Some(Node::Dir) => libc::EISDIR,
            None if !create => libc::ENOENT,
            None => {
                let mut v = vec![0; off];
                v.extend_from_slice(data);
                self.nodes.insert(p.into(), Node::File(v));
                0
            }
            Some(Node::File(v)) => {
                if v.len() < off + data.len() {
                    v.resize(off + data.len(), 0);
                }
                v[off..off + data.len()].copy_from_slice(data);
                0
            }
        }
    }

    fn truncate(&mut self, p: &str, len: usize) -> i32 {
        let e = self.parent_err(p);
        if e != 0 {
            return e;
        }
        match self.nodes.get_mut(p) {
            None => libc::ENOENT,
            Some(Node::Dir) => libc::EISDIR,
            Some(Node::File(v)) => {
                v.resize(len, 0);
                0
            }
        }
    }

    fn mkdir(&mut self, p: &str) -> i32 {
        let e = self.parent_err(p);
        if e != 0 {
            return e;
        }
        if self.nodes.contains_key(p) {
            return libc::EEXIST;
        }
        self.nodes.insert(p.into(), Node::Dir);
        0
    }

    fn unlink(&mut self, p: &str) -> i32 {
        let e = self.parent_err(p);
        if e != 0 {
            return e;
        }
        match self.get(p) {
            None => libc::ENOENT,
            Some(Node::Dir) => libc::EISDIR,
            Some(Node::File(_)) => {
                self.nodes.remove(p);
                0
            }
        }
    }

    fn rmdir(&mut self, p: &str) -> i32 {
        let e = self.parent_err(p);
        if e != 0 {
            return e;
        }
        match self.get(p) {
            None => libc::ENOENT,
            Some(Node::File(_)) => libc::ENOTDIR,
            Some(Node::Dir) if !self.children(p).is_empty() => libc::ENOTEMPTY,
            Some(Node::Dir) => {
                self.nodes.remove(p);
                0
            }
        }
    }

    fn rename(&mut self, a: &str, b: &str) -> i32 {
        for p in [a, b] {
            let e = self.parent_err(p);
            if e != 0 {
                return e;
            }
        }
        let Some(src) = self.get(a).cloned() else {
            return libc::ENOENT;
        };
        if a == b {
            return 0;
        }
        if src == Node::Dir && b.starts_with(&format!("{a}/")) {
            return libc::EINVAL;
        }
        if let Some(dst) = self.get(b).cloned() {
            if a.starts_with(&format!("{b}/")) {
                return libc::ENOTEMPTY;
            }
            match (&src, &dst) {
                (Node::Dir, Node::File(_)) => return libc::ENOTDIR,
                (Node::File(_), Node::Dir) => return libc::EISDIR,
                (Node::Dir, Node::Dir) if !self.children(b).is_empty() => return libc::ENOTEMPTY,
                _ => {}
            }
        }
        let moved: Vec<String> = self.children(a);
        self.nodes.remove(b);
        self.nodes.remove(a);
        self.nodes.insert(b.into(), src);
        for k in moved {
            let v = self.nodes.remove(&k).unwrap();
            self.nodes.insert(format!("{b}{}", &k[a.len()..]), v);
        }
        0
    }
}

fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
    for e in fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if e.file_type().unwrap().is_dir() {
            out.insert(r.clone(), Node::Dir);
            walk(root, &r, out);
        } else {
            out.insert(r.clone(), Node::File(fs::read(root.join(&r)).unwrap()));
        }
    }
}

fn random_path(r: &mut Rng) -> String {
    const N: [&str; 4] = ["a", "b", "c", "d"];
    let depth = 1 + r.below(3);
    (0..depth)
        .map(|_| N[r.below(4) as usize])
        .collect::<Vec<_>>()
        .join("/")
}

fn check_tree(m: &Mounted, model: &Model, when: &str) {
    let mut got = BTreeMap::new();
    walk(&m.mnt, "", &mut got);
    if got != model.nodes {
        let gk: Vec<_> = got.keys().collect();
        let mk: Vec<_> = model.nodes.keys().collect();
        panic!("tree differs {when}\nmount: {gk:?}\nmodel: {mk:?}");
    }
}

#[test]
fn random_operations_match_the_model_across_remounts() {
    let seed = std::env::var("KVFS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let ops: usize = std::env::var("KVFS_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    // A small block size so files span many blocks.
    let Some(mut m) = mount_with("4K", "") else {
        return;
    };
    let mut r = Rng(seed | 1);
    let mut model = Model::default();
    for step in 0..ops {
        let p = random_path(&mut r);
        let full = m.path(&p);
        let (what, got, want) = match r.below(20) {
            0..=4 => {
                let off = r.below(20_000) as usize;
                let data = pattern(r.next(), r.below(10_000) as usize + 1);
                let res = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&full);
                let got = match res {
                    Ok(f) => errno(f.write_all_at(&data, off as u64)),
                    Err(e) => e.raw_os_error().unwrap(),
                };
                ("write", got, model.write(&p, off, &data, true))
            }
            5..=6 => {
                let len = r.below(30_000) as usize;
                let got = match OpenOptions::new().write(true).open(&full) {
                    Ok(f) => errno(f.set_len(len as u64)),
                    Err(e) => e.raw_os_error().unwrap(),
                };
                ("truncate", got, model.truncate(&p, len))
            }
            7..=9 => ("mkdir", errno(fs::create_dir(&full)), model.mkdir(&p)),
            10..=11 => ("unlink", errno(fs::remove_file(&full)), model.unlink(&p)),
            12 => ("rmdir", errno(fs::remove_dir(&full)), model.rmdir(&p)),
            13..=16 => {
                let q = random_path(&mut r);
                let got = errno(fs::rename(&full, m.path(&q)));
                let want = model.rename(&p, &q);
                assert_eq!(got, want, "step {step}: rename {p} -> {q}");
                ("rename", got, want)
            }
            17..=18 => {
                let got = fs::read(&full);
                let want = match (model.parent_err(&p), model.get(&p)) {
                    (e, _) if e != 0 => Err(e),
                    (_, None) => Err(libc::ENOENT),
                    (_, Some(Node::Dir)) => Err(libc::EISDIR),
                    (_, Some(Node::File(v))) => Ok(v.clone()),
                };
                match (got, want) {
                    (Ok(a), Ok(b)) => assert!(a == b, "step {step}: content of {p} differs"),
                    (Err(e), Err(w)) => {
                        assert_eq!(e.raw_os_error().unwrap(), w, "step {step}: read {p}")
                    }
                    (g, w) => panic!(
                        "step {step}: read {p}: got {:?} want {:?}",
                        g.map(|v| v.len()),
                        w.map(|v| v.len())
                    ),
                }
                ("read", 0, 0)
            }
            _ if r.below(3) == 0 => {
                m.remount();
                check_tree(&m, &model, &format!("after remount at step {step}"));
                ("remount", 0, 0)
            }
            _ => {
                check_tree(&m, &model, &format!("at step {step}"));
                ("tree", 0, 0)
            }
        };
        assert_eq!(got, want, "step {step}: {what} {p} (seed {seed})");
    }
    check_tree(&m, &model, "at the end");
    m.remount();
    check_tree(&m, &model, "after the final remount");
}
