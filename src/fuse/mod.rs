//! The FUSE adapter: the only code that knows fuser. It translates requests into [`Fs`] calls
//! and results into replies; [`errno`] is the one mapping from errors to errno values, and the
//! one place that logs store failures (key and reason) before answering EIO or ENOSPC.

pub mod session;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{
    Attr, Caller, Fs, FsError, KillSetid, LockKind, LockSpec, NewNode, SetAttr, SetTime, XattrReply,
};
use crate::keyspace::records::Kind;
use crate::util::Timestamp;

/// How long the kernel may cache attributes and entries. Every change goes through this
/// mount, and the kernel updates its cache from our replies, so a short TTL is safe.
const TTL: Duration = Duration::from_secs(1);

/// The one mapping from errors to errno.
pub fn errno(op: &str, e: &FsError) -> Errno {
    match e {
        FsError::Errno(n) => Errno::from_i32(*n),
        FsError::Corrupt { key, reason } => {
            tracing::error!(op, key = %key, reason = %reason, "corrupt record; answering EIO");
            Errno::EIO
        }
        e if e.is_no_space() => {
            tracing::error!(op, reason = %e, "store disk full; answering ENOSPC");
            Errno::ENOSPC
        }
        e if e.is_read_only() => Errno::EROFS,
        e => {
            tracing::error!(op, reason = %e, "store error; answering EIO");
            Errno::EIO
        }
    }
}

pub struct KvFuse {
    fs: Arc<Fs>,
    store_dir: PathBuf,
    /// The kernel left clearing set-id bits on write, truncate and chown to us
    /// (FUSE_HANDLE_KILLPRIV_V2, [`session::negotiate`]).
    kill_setid: bool,
}

impl KvFuse {
    pub fn new(fs: Arc<Fs>, store_dir: &Path) -> KvFuse {
        KvFuse {
            fs,
            store_dir: store_dir.to_path_buf(),
            kill_setid: false,
        }
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.btime.to_system(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(Timestamp::from_system(s)),
    }
}

fn lock_spec(owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32) -> Option<LockSpec> {
    let kind = match typ {
        libc::F_RDLCK => LockKind::Read,
        libc::F_WRLCK => LockKind::Write,
        libc::F_UNLCK => LockKind::Unlock,
        _ => return None,
    };
    Some(LockSpec {
        owner: owner.0,
        start,
        end,
        kind,
        pid,
    })
}

fn lock_type(k: LockKind) -> i32 {
    match k {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    }
}

macro_rules! try_reply {
    ($reply:expr, $op:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(errno($op, &e)),
        }
    };
}

impl KvFuse {
    fn entry(&self, reply: ReplyEntry, op: &str, r: Result<Attr, FsError>) {
        match r {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(op, &e)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, op: &str, r: Result<(), FsError>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(op, &e)),
        }
    }

    fn xattr(&self, reply: ReplyXattr, op: &str, r: Result<XattrReply, FsError>) {
        match r {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno(op, &e)),
        }
    }

    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, node: NewNode, reply: ReplyEntry) {
        let r = self
            .fs
            .create_node(parent.0, name.as_bytes(), &node, caller(req));
        self.entry(reply, "create", r)
    }
}

impl Filesystem for KvFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.kill_setid = session::negotiate(&self.fs, config);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.sync_all() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            // A name that is not there, kept by the kernel for TTL (node 0: a negative entry)
            // where names appear only through it: SQLite looks for its rollback journal before
            // each transaction and creates it under the same name.
            Err(FsError::Errno(libc::ENOENT)) if self.fs.alone() => {
                let t = SystemTime::UNIX_EPOCH;
                let none = FileAttr {
                    ino: INodeNo(0),
                    size: 0,
                    blocks: 0,
                    atime: t,
                    mtime: t,
                    ctime: t,
                    crtime: t,
                    kind: FileType::RegularFile,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 0,
                    flags: 0,
                };
                reply.entry(&TTL, &none, Generation(0))
            }
            r => self.entry(reply, "lookup", r),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let a = try_reply!(reply, "getattr", self.fs.getattr(ino.0));
        reply.attr(&TTL, &attr(&a))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Where the kernel leaves set-id bits to us it strips the mode change it computed
        // and sends the bare request: a chown (even to -1, -1) or a write's privilege kill
        // arrives without mode, size or times. fuser does not pass FATTR_KILL_SUIDGID.
        let kill_setid = if !self.kill_setid || mode.is_some() {
            KillSetid::No
        } else if size.is_some() {
            KillSetid::UnlessCapable(caller(req))
        } else if uid.is_some() || gid.is_some() || (atime.is_none() && mtime.is_none()) {
            KillSetid::Always(caller(req))
        } else {
            KillSetid::No
        };
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(Timestamp::from_system),
            kill_setid,
        };
        let a = try_reply!(reply, "setattr", self.fs.setattr(ino.0, &set));
        reply.attr(&TTL, &attr(&a))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let t = try_reply!(reply, "readlink", self.fs.readlink(ino.0));
        reply.data(&t)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(k) = Kind::from_mode(mode).filter(|k| *k != Kind::Dir && *k != Kind::Symlink)
        else {
            return reply.error(Errno::EINVAL);
        };
        let node = NewNode {
            kind: k,
            mode,
            umask,
            rdev,
            target: &[],
        };
        self.make(req, parent, name, node, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let node = NewNode {
            kind: Kind::Dir,
            mode,
            umask,
            rdev: 0,
            target: &[],
        };
        self.make(req, parent, name, node, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, "unlink", self.fs.unlink(parent.0, name.as_bytes()))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, "rmdir", self.fs.rmdir(parent.0, name.as_bytes()))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let node = NewNode {
            kind: Kind::Symlink,
            mode: 0o777,
            umask: 0,
            rdev: 0,
            target: target.as_os_str().as_bytes(),
        };
        self.make(req, parent, link_name, node, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        self.empty(reply, "rename", r)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            "link",
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let fh = try_reply!(reply, "open", self.fs.open(ino.0, write));
        // Keep the page cache across opens: every change to a file's data passes through this
        // kernel (one mount owns a store; read-only mounts see a fixed past state), so what it
        // holds cannot be stale. ext4 serves a re-read from memory too. Not on a mount that
        // follows a replica: its files change under it.
        let keep = if self.fs.follows() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), keep)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let d = try_reply!(reply, "read", self.fs.read(fh.0, offset, size));
        reply.data(&d)
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            try_reply!(reply, "write", self.fs.kill_setid(ino.0, caller(req)));
        }
        // The kernel already resolved O_APPEND into the offset.
        let n = try_reply!(reply, "write", self.fs.write(fh.0, offset, data));
        reply.written(n)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let n = try_reply!(
            reply,
            "copy_file_range",
            self.fs
                .copy_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        );
        // At most 1 GiB per call (Fs::copy_range), so it fits.
        reply.written(n as u32)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(
            reply,
            "fallocate",
            self.fs.fallocate(fh.0, offset, length, mode),
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // The kernel answers SEEK_SET/CUR/END itself; only SEEK_DATA and SEEK_HOLE come here.
        if offset < 0 || !matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE) {
            return reply.error(Errno::EINVAL);
        }
        let at = try_reply!(
            reply,
            "lseek",
            self.fs.seek_data(fh.0, offset as u64, whence)
        );
        reply.offset(at as i64)
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close: POSIX drops the closing process's record locks on the file.
        let unlocked = self.fs.unlock_owner(ino.0, lock_owner.0);
        self.empty(reply, "flush", self.fs.flush_on_close(fh.0).and(unlocked))
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let Some(want) = lock_spec(lock_owner, start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        match self.fs.getlk(ino.0, &want) {
            Ok(Some(l)) => reply.locked(l.start, l.end, lock_type(l.kind), l.pid),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno("getlk", &e)),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(want) = lock_spec(lock_owner, start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        match self.fs.setlk(ino.0, fh.0, &want, None) {
            Err(FsError::Errno(libc::EAGAIN)) if sleep => {
                // Wait off the worker threads: they must stay free to serve the unlock.
                let fs = self.fs.clone();
                let thread = req.pid();
                let spawned = std::thread::Builder::new()
                    .name("kvfs-lockwait".into())
                    .spawn(move || {
                        let r = fs.setlk(ino.0, fh.0, &want, Some(thread));
                        match r {
                            Ok(()) => reply.ok(),
                            Err(e) => reply.error(errno("setlk", &e)),
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a lock waiter");
                }
            }
            r => self.empty(reply, "setlk", r),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, "release", self.fs.release(fh.0))
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, "fsync", self.fs.fsync(fh.0))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = try_reply!(reply, "opendir", self.fs.opendir(ino.0));
        reply.opened(FileHandle(fh), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = try_reply!(reply, "readdir", self.fs.readdir(fh.0, offset));
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let name = OsStr::from_bytes(&e.name);
            if reply.add(INodeNo(e.ino), i as u64 + 1, kind(e.kind), name) {
                break;
            }
        }
        reply.ok()
    }

    /// Entries with their attributes, so `ls -l`, `find` and `tar c` need no LOOKUP per name.
    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = try_reply!(reply, "readdirplus", self.fs.readdir(fh.0, offset));
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let a = match self.fs.getattr(e.ino) {
                Ok(a) => a,
                // Removed since the listing was taken: POSIX lets it go unreported.
                Err(FsError::Errno(libc::ENOENT)) => continue,
                Err(err) => return reply.error(errno("readdirplus", &err)),
            };
            let name = OsStr::from_bytes(&e.name);
            if reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                name,
                &TTL,
                &attr(&a),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, "releasedir", self.fs.releasedir(fh.0))
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A directory's changes are committed when made: syncing the store makes them
        // durable. Its files' buffered writes are not part of it (as on ext4).
        self.empty(reply, "fsyncdir", self.fs.sync_store())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = try_reply!(reply, "statfs", self.fs.statfs(&self.store_dir));
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        )
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .fs
            .setxattr(ino.0, name.as_bytes(), value, flags, caller(req));
        self.empty(reply, "setxattr", r)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr(
            reply,
            "getxattr",
            self.fs.getxattr(ino.0, name.as_bytes(), size),
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr(reply, "listxattr", self.fs.listxattr(ino.0, size))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            reply,
            "removexattr",
            self.fs.removexattr(ino.0, name.as_bytes()),
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.fs.access(ino.0, mask.bits(), caller(req));
        self.empty(reply, "access", r)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = NewNode {
            kind: Kind::File,
            mode,
            umask,
            rdev: 0,
            target: &[],
        };
        let (a, fh) = try_reply!(
            reply,
            "create",
            self.fs
                .create_open(parent.0, name.as_bytes(), &node, caller(req))
        );
        reply.created(
            &TTL,
            &attr(&a),
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE,
        )
    }
}
