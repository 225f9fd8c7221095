//! Phase 3: the namespace. Every name points to a live inode of its kind in a directory; link
//! counts equal names (2 + subdirectories for directories); every directory has one name, in
//! the directory its `parent` says, and reaches the root; inodes without names are pending
//! garbage (`g`) and nothing else; `M next_ino` is above every inode.

use std::collections::HashMap;

use super::records::Records;
use super::repair::Fix;
use super::Ctx;
use crate::keyspace::records::Kind;
use crate::keyspace::{self as ks, Ino, ROOT_INO};
use crate::kv::Cf;

pub(super) fn check(cx: &mut Ctx, r: &Records) {
    let (inodes, dirents, garbage, next_ino) = (&r.inodes, &r.dirents, &r.garbage, r.next_ino);
    cx.report.counts.inodes = inodes.len() as u64;
    cx.report.counts.dirents = dirents.len() as u64;
    let mut names: HashMap<Ino, u32> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut dir_names: HashMap<Ino, Vec<Ino>> = HashMap::new();
    for (k, parent, d) in dirents {
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
    for (&ino, i) in inodes {
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
    for (&ino, i) in inodes {
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
    for &ino in garbage {
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
    let waiting = garbage
        .iter()
        .filter(|i| inodes.get(i).is_some_and(|x| x.nlink == 0))
        .count();
    if waiting > 0 {
        cx.report.notes.push(format!(
            "{waiting} unlinked inode(s) wait for their last close or the sweeper"
        ));
    }
}
