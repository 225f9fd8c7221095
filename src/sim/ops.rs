//! The simulation's operations: each picks its arguments from the seed, applies its effect
//! to the model and calls the filesystem; [`Sim::step`](super::Sim) checks the outcome.

use super::model::{node, patch};
use super::{Sim, BS, NAMES, WHO};
use crate::fs::{FsError, LockKind, LockSpec, NewNode};
use crate::keyspace::records::Kind;
use crate::keyspace::{Ino, ROOT_INO};

impl Sim {
    pub(super) fn new_data(&mut self, len: usize) -> Vec<u8> {
        let b = self.rng.next() as u8;
        (0..len)
            .map(|i| b.wrapping_add((i / 512) as u8) | 1)
            .collect()
    }

    pub(super) fn pick_dir(&mut self) -> Ino {
        let dirs = self.model.dirs();
        *self.rng.pick(&dirs).unwrap_or(&ROOT_INO)
    }

    pub(super) fn pick_name(&mut self) -> Vec<u8> {
        NAMES[self.rng.below(NAMES.len() as u64) as usize].to_vec()
    }

    pub(super) fn op_create(&mut self, kind: Kind) -> Result<(), FsError> {
        let (dir, name) = (self.pick_dir(), self.pick_name());
        let target = b"some/target".to_vec();
        let n = NewNode {
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            umask: 0,
            rdev: 0,
            target: &target,
        };
        self.args = format!("{dir}/{}", String::from_utf8_lossy(&name));
        let fs = self.fs.as_ref().expect("mounted");
        let ino = if kind == Kind::File {
            let (a, fh) = fs.create_open(dir, &name, &n, WHO)?;
            self.handles.push((fh, a.ino));
            a.ino
        } else {
            fs.create_node(dir, &name, &n, WHO)?.ino
        };
        let data = if kind == Kind::Symlink {
            target
        } else {
            Vec::new()
        };
        self.model.nodes.insert(ino, node(kind, data));
        self.model.entries.insert((dir, name), ino);
        Ok(())
    }

    pub(super) fn op_open(&mut self) -> Result<(), FsError> {
        let files = self.model.files();
        let Some(&ino) = self.rng.pick(&files) else {
            return Ok(());
        };
        let fh = self.fs().open(ino, true)?;
        self.args = format!("ino {ino} as fh {fh}");
        self.handles.push((fh, ino));
        Ok(())
    }

    pub(super) fn op_write(&mut self, big: bool) -> Result<(), FsError> {
        let Some(&(fh, ino)) = self.rng.pick(&self.handles.clone()) else {
            return Ok(());
        };
        let (off, len) = if big {
            (0, (4 << 20) + (self.rng.below(8) << 16) as usize)
        } else {
            (
                self.rng.below(3 * BS as u64) as usize,
                1 + self.rng.below(2 * BS as u64) as usize,
            )
        };
        let data = self.new_data(len);
        self.args = format!("fh {fh} ino {ino} at {off} len {len}");
        self.touched.insert(ino);
        self.durable.remove(&ino);
        // The model takes the write first: a write the buffer accepted stays even when its
        // room-making flush fails (the data is retried at the next flush).
        if let Some(n) = self.model.nodes.get_mut(&ino) {
            n.change(|d| patch(d, off, &data));
        }
        self.fs().write(fh, off as u64, &data).map(|_| ())
    }

    pub(super) fn op_truncate(&mut self) -> Result<(), FsError> {
        let files = self.model.files();
        let Some(&ino) = self.rng.pick(&files) else {
            return Ok(());
        };
        let size = self.rng.below(4 * BS as u64);
        self.args = format!("ino {ino} to {size}");
        self.touched.insert(ino);
        self.fs().truncate(ino, size)?;
        self.durable.remove(&ino);
        if let Some(n) = self.model.nodes.get_mut(&ino) {
            n.change(|d| d.resize(size as usize, 0));
        }
        Ok(())
    }

    pub(super) fn op_rename(&mut self) -> Result<(), FsError> {
        let names = self.model.names();
        let Some(from) = self.rng.pick(&names).cloned() else {
            return Ok(());
        };
        let to = (self.pick_dir(), self.pick_name());
        let flags = match self.rng.below(6) {
            0 => libc::RENAME_NOREPLACE,
            1 => libc::RENAME_EXCHANGE,
            _ => 0,
        };
        self.args = format!(
            "{}/{} -> {}/{} flags {flags}",
            from.0,
            String::from_utf8_lossy(&from.1),
            to.0,
            String::from_utf8_lossy(&to.1)
        );
        self.fs().rename(from.0, &from.1, to.0, &to.1, flags)?;
        self.model.rename(from, to, flags == libc::RENAME_EXCHANGE);
        self.forget_unreachable();
        Ok(())
    }

    pub(super) fn op_link(&mut self) -> Result<(), FsError> {
        let files = self.model.files();
        let Some(&ino) = self.rng.pick(&files) else {
            return Ok(());
        };
        let to = (self.pick_dir(), self.pick_name());
        self.args = format!("ino {ino} as {}/{}", to.0, String::from_utf8_lossy(&to.1));
        self.fs().link(ino, to.0, &to.1)?;
        self.model.entries.insert(to, ino);
        Ok(())
    }

    pub(super) fn op_unlink(&mut self, dir: bool) -> Result<(), FsError> {
        let names = self.model.names();
        let Some(at) = self.rng.pick(&names).cloned() else {
            return Ok(());
        };
        if dir {
            self.fs().rmdir(at.0, &at.1)?;
        } else {
            self.fs().unlink(at.0, &at.1)?;
        }
        let ino = self.model.entries.remove(&at);
        if let Some(ino) = ino.filter(|_| dir) {
            self.model.nodes.remove(&ino);
        }
        self.forget_unreachable();
        Ok(())
    }

    /// Files no name reaches any more are not checked for durability (a crash may or may not
    /// keep their last unlink).
    pub(super) fn forget_unreachable(&mut self) {
        let m = &self.model;
        self.durable.retain(|ino, _| m.reachable(*ino));
    }

    pub(super) fn op_xattr(&mut self) -> Result<(), FsError> {
        let names = self.model.names();
        let Some(at) = self.rng.pick(&names).cloned() else {
            return Ok(());
        };
        let ino = self.model.entries[&at];
        let name = [b"user.".as_slice(), &self.pick_name()].concat();
        if self.rng.pct(70) {
            let len = 1 + self.rng.below(100) as usize;
            let v = self.new_data(len);
            self.fs().setxattr(ino, &name, &v, 0, WHO)?;
            if let Some(n) = self.model.nodes.get_mut(&ino) {
                n.xattrs.insert(name, v);
            }
        } else {
            self.fs().removexattr(ino, &name)?;
            if let Some(n) = self.model.nodes.get_mut(&ino) {
                n.xattrs.remove(&name);
            }
        }
        Ok(())
    }

    /// Take a write lock through one handle, see it from another owner, drop it.
    pub(super) fn op_lock(&mut self) -> Result<(), FsError> {
        let Some(&(fh, ino)) = self.rng.pick(&self.handles.clone()) else {
            return Ok(());
        };
        let spec = |owner: u64, kind: LockKind| LockSpec {
            owner,
            start: 0,
            end: u64::MAX,
            kind,
            pid: 1,
        };
        let fs = self.fs();
        fs.setlk(ino, fh, &spec(fh, LockKind::Write), None)?;
        let seen = fs.getlk(ino, &spec(u64::MAX, LockKind::Write))?;
        if seen.map(|l| l.owner) != Some(fh) {
            self.fail(format!(
                "a lock held by {fh} on {ino} is not seen by another owner: {seen:?}"
            ));
        }
        fs.setlk(ino, fh, &spec(fh, LockKind::Unlock), None)?;
        if let Some(l) = fs.getlk(ino, &spec(u64::MAX, LockKind::Write))? {
            self.fail(format!("a released lock is still seen: {l:?}"));
        }
        Ok(())
    }

    pub(super) fn op_fsync(&mut self) -> Result<(), FsError> {
        let Some(&(fh, ino)) = self.rng.pick(&self.handles.clone()) else {
            return Ok(());
        };
        self.args = format!("fh {fh} ino {ino}");
        self.fs().fsync(fh)?;
        if self.model.reachable(ino) {
            self.durable
                .insert(ino, self.model.nodes[&ino].data.to_vec());
        }
        Ok(())
    }

    pub(super) fn op_syncfs(&mut self) -> Result<(), FsError> {
        self.fs().sync_all()?;
        for ino in self.model.files() {
            self.durable
                .insert(ino, self.model.nodes[&ino].data.to_vec());
        }
        self.clean_since_sync = true;
        Ok(())
    }

    pub(super) fn op_close(&mut self) -> Result<(), FsError> {
        if self.handles.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.handles.len() as u64) as usize;
        let (fh, ino) = self.handles.remove(i);
        self.args = format!("fh {fh} ino {ino}");
        self.fs().release(fh)
    }

    pub(super) fn op_read(&mut self) -> Result<(), FsError> {
        let Some(&(fh, ino)) = self.rng.pick(&self.handles.clone()) else {
            return Ok(());
        };
        let off = self.rng.below(4 * BS as u64);
        let len = 1 + self.rng.below(2 * BS as u64) as u32;
        let got = self.fs().read(fh, off, len)?;
        let data = &self.model.nodes[&ino].data;
        let from = (off as usize).min(data.len());
        let to = (off as usize + len as usize).min(data.len());
        if got[..] != data[from..to] {
            self.fail(format!(
                "read of {ino} at {off}+{len} differs from the model"
            ));
        }
        Ok(())
    }
}
