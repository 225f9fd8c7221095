//! Namespace operations: lookup, create, link, unlink, rmdir, rename, readdir.
//!
//! Every change to a directory's entries also rewrites that directory's inode (mtime, ctime,
//! nlink), so two operations on one directory always conflict on its inode key, and an
//! emptiness scan (rmdir, rename over a directory) is covered by the inode it tracked.

use std::collections::HashMap;
use std::sync::Arc;

use super::acl;
use super::attr::Attr;
use super::{
    check_name, corrupt, drop_last_link, errno, load_dir, load_inode, lock, nlink_down, nlink_up,
    save_inode, Caller, FileState, Freeing, Fs, FsError, Result,
};
use crate::keyspace::records::{encode_xattr, Dirent, Inode, Kind};
use crate::keyspace::{self as ks, Ino, ROOT_INO};
use crate::kv::{Cf, Txn};
use crate::util::Timestamp;

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// What to create.
pub struct NewNode<'a> {
    pub kind: Kind,
    pub mode: u32,
    pub umask: u32,
    pub rdev: u32,
    pub target: &'a [u8],
}

fn get_dirent(t: &mut dyn Txn, parent: Ino, name: &[u8]) -> Result<Option<Dirent>> {
    let key = ks::dirent_key(parent, name);
    match t.get(Cf::Meta, &key)? {
        None => Ok(None),
        Some(v) => Dirent::decode(&v).map(Some).map_err(|e| corrupt(&key, e)),
    }
}

fn dir_is_empty(t: &mut dyn Txn, dir: Ino) -> Result<bool> {
    let (s, e) = ks::dirent_range(dir);
    Ok(t.scan(Cf::Meta, &s, &e, 1)?.is_empty())
}

/// Inodes a transaction reads and changes, written back once at the end (several roles of a
/// rename may be the same inode).
#[derive(Default)]
struct Touched {
    map: HashMap<Ino, Inode>,
}

impl Touched {
    fn get(&mut self, t: &mut dyn Txn, ino: Ino) -> Result<&mut Inode> {
        match self.map.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(load_inode(t, ino)?)),
        }
    }

    fn save(self, t: &mut dyn Txn) -> Result<()> {
        for (ino, i) in &self.map {
            save_inode(t, *ino, i)?;
        }
        Ok(())
    }
}

impl Fs {
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let (ino, inode) = self.look(|t| {
            // The entry first: only directories have entries, so the parent's own record is
            // needed just for "." and ".." and to tell ENOENT from ENOTDIR on a miss.
            let found = match name {
                b"." | b".." => None,
                _ => get_dirent(t, parent, name)?,
            };
            let ino = match found {
                Some(e) => e.ino,
                None => {
                    let d = load_inode(t, parent)?;
                    match name {
                        // "." of any node is the node: how the kernel resolves a file handle.
                        b"." => parent,
                        _ if d.kind != Kind::Dir => return errno(libc::ENOTDIR),
                        b".." => d.parent,
                        _ => return errno(libc::ENOENT),
                    }
                }
            };
            let key = ks::inode_key(ino);
            match load_inode(t, ino) {
                Err(FsError::Errno(libc::ENOENT)) => Err(FsError::Corrupt {
                    key: ks::describe_key(&ks::dirent_key(parent, name)),
                    reason: format!(
                        "entry points to missing inode {ino} ({})",
                        ks::describe_key(&key)
                    ),
                }),
                // "." of a node is how the kernel resolves a file handle: one whose last name
                // is gone is stale (ESTALE), as on ext4, even while a close of it is still on
                // its way here and keeps the inode for a moment.
                Ok(i) if name == b"." && i.nlink == 0 => errno(libc::ENOENT),
                r => r.map(|i| (ino, i)),
            }
        })?;
        if inode.kind == Kind::File {
            self.dir_ahead.looked_up(ino, parent, name);
        }
        Ok(self.overlay(ino, Attr::new(ino, &inode, self.bs)))
    }

    /// mknod, mkdir, symlink and create all come here.
    pub fn create_node(
        &self,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        who: Caller,
    ) -> Result<Attr> {
        let (ino, inode, _) = self.make_node(parent, name, node, who, false)?;
        Ok(Attr::new(ino, &inode, self.bs))
    }

    /// For tests: create and open the file `name` (0644) in the root as root.
    #[cfg(test)]
    pub(crate) fn create_test_file(&self, name: &[u8]) -> (super::Attr, u64) {
        let node = NewNode {
            kind: Kind::File,
            mode: 0o644,
            umask: 0,
            rdev: 0,
            target: b"",
        };
        let who = super::Caller {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        self.create_open(crate::keyspace::ROOT_INO, name, &node, who)
            .unwrap()
    }

    /// create(2): make a regular file and open it, counted open in the same transaction.
    pub fn create_open(
        &self,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        who: Caller,
    ) -> Result<(Attr, u64)> {
        let (ino, inode, fh) = self.make_node(parent, name, node, who, true)?;
        let fh = fh.expect("make_node registers the handle it is asked for");
        if self.keep_writing(ino, true) {
            lock(&self.handles).writers.insert(fh);
        }
        Ok((Attr::new(ino, &inode, self.bs), fh))
    }

    fn make_node(
        &self,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        who: Caller,
        open: bool,
    ) -> Result<(Ino, Inode, Option<u64>)> {
        self.writable()?;
        check_name(name)?;
        self.space.check(0)?;
        let ino = self.alloc_ino()?;
        // Opened (create(2)): a mount that alone changes its store registers the handle in
        // memory before the inode exists, so an unlink of the new name finds it open here;
        // elsewhere the transaction counts it in the keyspace.
        let lazy = open && self.alone();
        let early = lazy.then(|| self.register(ino, 0, false));
        let made = self.txn(|t| {
            let mut dir = load_dir(t, parent)?;
            if get_dirent(t, parent, name)?.is_some() {
                return errno(libc::EEXIST);
            }
            let now = Timestamp::now();
            let mut perm = (node.mode & !node.umask & 0o7777) as u16;
            // The directory's default ACL replaces the umask (posix_acl_create).
            let default = match node.kind {
                Kind::Symlink => None,
                _ => acl::get_xattr(t, parent, acl::DEFAULT)?,
            };
            if let Some(d) = &default {
                let mut a = acl::Acl::parse(d)?;
                perm = a.create_masq((node.mode & 0o7777) as u16);
                if !a.is_mode() {
                    t.put(
                        Cf::Meta,
                        &ks::xattr_key(ino, acl::ACCESS),
                        &encode_xattr(&a.encode()),
                    )?;
                }
                if node.kind == Kind::Dir {
                    t.put(
                        Cf::Meta,
                        &ks::xattr_key(ino, acl::DEFAULT),
                        &encode_xattr(d),
                    )?;
                }
            }
            let mut gid = who.gid;
            if dir.perm & libc::S_ISGID as u16 != 0 {
                gid = dir.gid;
                if node.kind == Kind::Dir {
                    perm |= libc::S_ISGID as u16;
                }
            }
            if node.kind == Kind::Symlink {
                perm = 0o777;
            }
            let inode = Inode {
                kind: node.kind,
                perm,
                uid: who.uid,
                gid,
                nlink: if node.kind == Kind::Dir { 2 } else { 1 },
                size: if node.kind == Kind::Symlink {
                    node.target.len() as u64
                } else {
                    0
                },
                alloc: 0,
                atime: now,
                mtime: now,
                ctime: now,
                btime: now,
                rdev: node.rdev,
                parent: if node.kind == Kind::Dir { parent } else { 0 },
                target: node.target.to_vec(),
            };
            save_inode(t, ino, &inode)?;
            t.put(
                Cf::Meta,
                &ks::dirent_key(parent, name),
                &Dirent {
                    ino,
                    kind: node.kind,
                }
                .encode()?,
            )?;
            if node.kind == Kind::Dir {
                nlink_up(parent, &mut dir)?;
            }
            dir.mtime = now;
            dir.ctime = now;
            save_inode(t, parent, &dir)?;
            if open && !lazy {
                self.count_open(t, ino)?;
            }
            Ok(inode)
        });
        let inode = match made {
            Ok(inode) => inode,
            Err(e) => {
                if let Some(fh) = early {
                    self.unregister(fh);
                }
                return Err(e);
            }
        };
        let fh = open.then(|| early.unwrap_or_else(|| self.register(ino, inode.size, true)));
        Ok((ino, inode, fh))
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        self.space.check(0)?;
        let inode = self.txn(|t| {
            let mut i = load_inode(t, ino)?;
            if i.kind == Kind::Dir {
                return errno(libc::EPERM);
            }
            if i.nlink == 0 {
                return errno(libc::ENOENT);
            }
            let mut dir = load_dir(t, parent)?;
            if get_dirent(t, parent, name)?.is_some() {
                return errno(libc::EEXIST);
            }
            let now = Timestamp::now();
            t.put(
                Cf::Meta,
                &ks::dirent_key(parent, name),
                &Dirent { ino, kind: i.kind }.encode()?,
            )?;
            nlink_up(ino, &mut i)?;
            i.ctime = now;
            save_inode(t, ino, &i)?;
            dir.mtime = now;
            dir.ctime = now;
            save_inode(t, parent, &dir)?;
            Ok(i)
        })?;
        Ok(self.overlay(ino, Attr::new(ino, &inode, self.bs)))
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        if name == b"." {
            return errno(libc::EINVAL);
        }
        if name == b".." {
            return errno(libc::ENOTEMPTY);
        }
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: Ino, name: &[u8], want_dir: bool) -> Result<()> {
        self.writable()?;
        check_name(name)?;
        let _ns = lock(&self.ns_lock);
        let mut freeing = (0, Freeing::Kept);
        let mut counted = None;
        self.txn(|t| {
            freeing = (0, Freeing::Kept);
            counted = None;
            let mut dir = load_dir(t, parent)?;
            let ent = get_dirent(t, parent, name)?.ok_or(FsError::Errno(libc::ENOENT))?;
            let mut child = load_inode(t, ent.ino)?;
            let now = Timestamp::now();
            match (want_dir, child.kind == Kind::Dir) {
                (false, true) => return errno(libc::EISDIR),
                (true, false) => return errno(libc::ENOTDIR),
                (true, true) => {
                    if ent.ino == ROOT_INO {
                        return errno(libc::EBUSY);
                    }
                    if !dir_is_empty(t, ent.ino)? {
                        return errno(libc::ENOTEMPTY);
                    }
                    nlink_down(parent, &mut dir)?;
                    child.nlink = 0;
                }
                (false, false) => child.nlink = child.nlink.saturating_sub(1),
            }
            t.delete(Cf::Meta, &ks::dirent_key(parent, name))?;
            child.ctime = now;
            if child.nlink == 0 {
                freeing = (
                    ent.ino,
                    self.drop_last_name(t, ent.ino, &child, &mut counted)?,
                );
            } else {
                save_inode(t, ent.ino, &child)?;
            }
            dir.mtime = now;
            dir.ctime = now;
            save_inode(t, parent, &dir)
        })?;
        Fs::counted_handles(counted);
        self.finish_freeing(freeing.0, freeing.1);
        Ok(())
    }

    /// [`drop_last_link`] in this mount: the handles it keeps on `ino` in memory are written to
    /// the keyspace's open count first ([`Fs::count_handles`]; `counted` holds them for
    /// [`Fs::counted_handles`] after the commit).
    fn drop_last_name(
        &self,
        t: &mut dyn Txn,
        ino: Ino,
        inode: &Inode,
        counted: &mut Option<(Arc<FileState>, u32)>,
    ) -> Result<Freeing> {
        *counted = self.count_handles(t, ino)?;
        drop_last_link(t, ino, inode)
    }

    /// Commit what is buffered for the files a rename moves (not one it replaces: that name
    /// goes), before the rename: a file written and closed is committed by its release, which
    /// may come after the rename, and a crash between the two would leave the new name on a
    /// file without its data (the save-to-temporary-then-rename pattern; ext4's auto_da_alloc
    /// does the same). A commit that fails (a full disk) leaves the data buffered and the
    /// rename goes on, as renames do on a full disk.
    fn commit_before_rename(&self, names: &[(Ino, &[u8])]) {
        if self.dirty_total.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        for &(parent, name) in names {
            if let Ok(Some(d)) = self.look(|t| get_dirent(t, parent, name)) {
                if let Err(e) = self.flush_ino(d.ino) {
                    tracing::warn!(ino = d.ino, error = %e, "committing a file before its rename failed; its writes stay buffered");
                }
            }
        }
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.writable()?;
        check_name(name)?;
        check_name(newname)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if (exchange && noreplace) || flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0
        {
            return errno(libc::EINVAL);
        }
        let moved: &[(Ino, &[u8])] = match exchange {
            true => &[(parent, name), (newparent, newname)],
            false => &[(parent, name)],
        };
        self.commit_before_rename(moved);
        let _ns = lock(&self.ns_lock);
        let mut freeing = (0, Freeing::Kept);
        let mut counted = None;
        self.txn(|t| {
            freeing = (0, Freeing::Kept);
            counted = None;
            let mut touched = Touched::default();
            let now = Timestamp::now();
            load_dir(t, parent)?;
            load_dir(t, newparent)?;
            let src = get_dirent(t, parent, name)?.ok_or(FsError::Errno(libc::ENOENT))?;
            let dst = get_dirent(t, newparent, newname)?;
            if exchange && dst.is_none() {
                return errno(libc::ENOENT);
            }
            if noreplace && dst.is_some() {
                return errno(libc::EEXIST);
            }
            if src.kind == Kind::Dir && parent != newparent {
                self.check_not_ancestor(t, src.ino, newparent)?;
            }
            if let (true, Some(d)) = (exchange, dst) {
                if d.kind == Kind::Dir && parent != newparent {
                    self.check_not_ancestor(t, d.ino, parent)?;
                }
            }
            if let Some(d) = dst {
                if d.ino == src.ino {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(());
                }
            }
            if exchange {
                let d = dst.ok_or(FsError::Errno(libc::ENOENT))?;
                t.put(Cf::Meta, &ks::dirent_key(parent, name), &d.encode()?)?;
                t.put(
                    Cf::Meta,
                    &ks::dirent_key(newparent, newname),
                    &src.encode()?,
                )?;
                if parent != newparent {
                    if src.kind == Kind::Dir {
                        touched.get(t, src.ino)?.parent = newparent;
                        nlink_down(parent, touched.get(t, parent)?)?;
                        nlink_up(newparent, touched.get(t, newparent)?)?;
                    }
                    if d.kind == Kind::Dir {
                        touched.get(t, d.ino)?.parent = parent;
                        nlink_down(newparent, touched.get(t, newparent)?)?;
                        nlink_up(parent, touched.get(t, parent)?)?;
                    }
                }
                touched.get(t, d.ino)?.ctime = now;
            } else {
                if let Some(d) = dst {
                    let victim = load_inode(t, d.ino)?;
                    match (src.kind == Kind::Dir, victim.kind == Kind::Dir) {
                        (true, false) => return errno(libc::ENOTDIR),
                        (false, true) => return errno(libc::EISDIR),
                        (true, true) => {
                            if !dir_is_empty(t, d.ino)? {
                                return errno(libc::ENOTEMPTY);
                            }
                            let mut v = victim;
                            v.nlink = 0;
                            v.ctime = now;
                            // Freed now, or when its last open handle closes.
                            freeing = (d.ino, self.drop_last_name(t, d.ino, &v, &mut counted)?);
                            nlink_down(newparent, touched.get(t, newparent)?)?;
                        }
                        (false, false) => {
                            let mut v = victim;
                            nlink_down(d.ino, &mut v)?;
                            v.ctime = now;
                            if v.nlink == 0 {
                                freeing = (d.ino, self.drop_last_name(t, d.ino, &v, &mut counted)?);
                            } else {
                                save_inode(t, d.ino, &v)?;
                            }
                        }
                    }
                }
                t.delete(Cf::Meta, &ks::dirent_key(parent, name))?;
                t.put(
                    Cf::Meta,
                    &ks::dirent_key(newparent, newname),
                    &src.encode()?,
                )?;
                if src.kind == Kind::Dir && parent != newparent {
                    touched.get(t, src.ino)?.parent = newparent;
                    nlink_down(parent, touched.get(t, parent)?)?;
                    nlink_up(newparent, touched.get(t, newparent)?)?;
                }
            }
            touched.get(t, src.ino)?.ctime = now;
            for p in [parent, newparent] {
                let d = touched.get(t, p)?;
                d.mtime = now;
                d.ctime = now;
            }
            touched.save(t)
        })?;
        Fs::counted_handles(counted);
        self.finish_freeing(freeing.0, freeing.1);
        Ok(())
    }

    /// EINVAL if `dir` is `target` or one of its ancestors (a directory may not move into its
    /// own subtree).
    fn check_not_ancestor(&self, t: &mut dyn Txn, dir: Ino, target: Ino) -> Result<()> {
        let mut cur = target;
        for _ in 0..4096 {
            if cur == dir {
                return errno(libc::EINVAL);
            }
            if cur == ROOT_INO {
                return Ok(());
            }
            cur = load_inode(t, cur)?.parent;
        }
        Err(FsError::Corrupt {
            key: ks::describe_key(&ks::inode_key(target)),
            reason: "parent chain does not reach the root".into(),
        })
    }

    /// Open a directory. Its listing is read at the first read from offset 0, and kept so
    /// later reads page through a stable list whatever changes meanwhile (as POSIX allows);
    /// a read from offset 0 again (`rewinddir`) reads it anew, so the stream then reflects
    /// the directory as it is (as POSIX requires).
    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let is_dir = |t: &mut dyn Txn| match load_inode(t, ino)?.kind {
            Kind::Dir => Ok(()),
            _ => errno(libc::ENOTDIR),
        };
        // Counted open like a file, so that a directory removed while open (rmdir, rename
        // over it) keeps its inode, nlink 0, until the last close: in memory on a mount that
        // alone changes its store (the removal writes the count, see `Fs::count_handles`;
        // `ns_lock` keeps the removal from passing between the check and the count), in the
        // keyspace elsewhere.
        if self.opts.read_only {
            self.look(is_dir)?;
        } else if self.alone() {
            let _ns = lock(&self.ns_lock);
            self.look(is_dir)?;
            self.hold(ino, 0, false);
        } else {
            self.txn(|t| {
                is_dir(t)?;
                self.count_open(t, ino)
            })?;
        }
        let mut h = lock(&self.handles);
        let fh = h.next;
        h.next += 1;
        h.dirs.insert(fh, (ino, None));
        Ok(fh)
    }

    /// The listing of directory handle `fh` for a read from `offset` (entries `.`, `..`, then
    /// the names; each entry's own offset is its position + 1).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        let (ino, kept) = lock(&self.handles)
            .dirs
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))?;
        if let Some(list) = kept.filter(|_| offset > 0) {
            return Ok(list);
        }
        let (list, due) = self.list_dir(ino)?;
        let files = list.iter().filter(|e| e.kind == Kind::File);
        self.dir_ahead
            .listed(ino, files.map(|e| (e.ino, e.name.as_slice())));
        let list = Arc::new(list);
        if let Some(d) = lock(&self.handles).dirs.get_mut(&fh) {
            d.1 = Some(list.clone());
        }
        if due {
            self.touch_atime(ino);
        }
        Ok(list)
    }

    /// The entries of `ino`, and whether listing it updates its access time.
    fn list_dir(&self, ino: Ino) -> Result<(Vec<DirEntry>, bool)> {
        self.look(|t| {
            let d = load_inode(t, ino)?;
            if d.kind != Kind::Dir {
                return errno(libc::ENOTDIR);
            }
            let due = self.atime_due(&d, true);
            let mut out = vec![
                DirEntry {
                    ino,
                    kind: Kind::Dir,
                    name: b".".to_vec(),
                },
                DirEntry {
                    ino: d.parent,
                    kind: Kind::Dir,
                    name: b"..".to_vec(),
                },
            ];
            let (s, e) = ks::dirent_range(ino);
            for (k, v) in t.scan(Cf::Meta, &s, &e, usize::MAX)? {
                let ent = Dirent::decode(&v).map_err(|e| corrupt(&k, e))?;
                out.push(DirEntry {
                    ino: ent.ino,
                    kind: ent.kind,
                    name: ks::dirent_name(&k).to_vec(),
                });
            }
            Ok((out, due))
        })
    }

    pub fn releasedir(&self, fh: u64) -> Result<()> {
        let Some((ino, _)) = lock(&self.handles).dirs.remove(&fh) else {
            return errno(libc::EBADF);
        };
        let _ns = lock(&self.ns_lock);
        if !self.alone() {
            return self.uncount_open(ino);
        }
        let mut files = lock(&self.files);
        let Some(st) = files.get(&ino).cloned() else {
            return Ok(());
        };
        let uncount = {
            let mut s = lock(&st.inner);
            let uncount = s.drop_handle();
            if s.unused() {
                files.remove(&ino);
            }
            uncount
        };
        drop(files);
        if uncount {
            self.uncount_open(ino)
        } else {
            Ok(())
        }
    }
}
