//! The fuser session of a mount: mount options for the kernel, the session threads, and the
//! handle that unmounts it from another thread (the signal thread). Only `fuse/` knows fuser.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, InitFlags, KernelConfig, MountOption, Session, SessionACL, SessionUnmounter};

use super::KvFuse;
use crate::fs::{Atime, AtimeMode, Fs};

/// What kvfs asks of the kernel when it connects (FUSE INIT). True if the kernel left
/// clearing set-id bits to us (the write, truncate and chown of [`super::KvFuse`]).
pub(super) fn negotiate(fs: &Fs, config: &mut KernelConfig) -> bool {
    let _ = config.set_max_write(1 << 20);
    // Let the kernel gather small writes in its page cache and send them in large
    // pieces (up to max_write) at writeback, fsync and close. Not where the store changes
    // under the mount (a followed replica): in writeback mode the kernel trusts its own
    // file sizes over ours.
    if !fs.follows() {
        match config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
            Ok(()) => fs.set_kernel_times(),
            Err(_) => tracing::warn!(
                "kernel lacks FUSE_WRITEBACK_CACHE; writes arrive as the caller makes them"
            ),
        }
    }
    // Listings carry attributes (the kernel decides when they pay off).
    let _ =
        config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
    // File handles (name_to_handle_at, open_by_handle_at, NFS export): inode numbers are
    // never reused, so a handle resolves by number (LOOKUP of "." in the node itself).
    if config
        .add_capabilities(InitFlags::FUSE_EXPORT_SUPPORT)
        .is_err()
    {
        tracing::warn!("kernel lacks FUSE_EXPORT_SUPPORT; file handles give ESTALE");
    }
    // Record locks: on a mount alone with its store every process that can see them
    // comes through this kernel mount, so the kernel's own lock table (ext4's code) keeps
    // them, without a round trip to us per fcntl (SQLite takes six per transaction).
    // Where others share the store they go to us, and so into the keyspace.
    if fs.alone() {
        tracing::debug!("record locks kept by the kernel (this mount alone changes its store)");
    } else if config
        .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
        .is_err()
    {
        tracing::warn!("kernel lacks FUSE_POSIX_LOCKS; record locks stay local to the kernel");
    }
    // POSIX ACLs: the kernel enforces and caches them; we keep the mode and the ACL
    // xattrs in step and inherit default ACLs (fs/acl.rs), so the kernel must hand us
    // the create mode without the umask applied (DONT_MASK; we apply it when no default
    // ACL replaces it).
    if config
        .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
        .is_err()
    {
        tracing::warn!("kernel lacks FUSE_POSIX_ACL; ACLs are stored but not enforced");
    }
    // Set-id bits: left to the kernel, it asks us for `security.capability` before every
    // write(2) to see whether one must go (a GETXATTR round trip per write: 4 KiB random
    // writes ran at 33-34k IOPS, 430-450k without it). With KILLPRIV_V2 it asks only after
    // an inode's attributes changed, and we clear the set-user-ID and set-group-ID bits
    // when it says so (a write's flag) or when a chown, truncate or a bare SETATTR says so
    // (`KvFuse::setattr`); capabilities it still removes itself.
    if fs.follows() {
        return false;
    }
    match config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
        Ok(()) => true,
        Err(_) => {
            tracing::debug!("kernel lacks FUSE_HANDLE_KILLPRIV_V2; it clears set-id bits itself");
            false
        }
    }
}

/// What the kernel is told at mount time.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub read_only: bool,
    /// `allow_other` (default when mounting as root) or `allow_root`.
    pub acl: Option<String>,
    /// FUSE worker threads.
    pub threads: usize,
    /// Device nodes may be opened / set-id bits honoured (asked for with `-o dev` / `-o suid`;
    /// only root's mounts get them, as the kernel lets no one else).
    pub dev: bool,
    pub suid: bool,
    pub noexec: bool,
    /// Shown by the kernel's mount table and kept by a remount; kvfs applies it itself.
    pub atime: Atime,
}

impl SessionOptions {
    /// The mount(2) flags of these options.
    pub fn flags(&self) -> libc::c_ulong {
        let mut f = 0;
        for (on, flag) in [
            (self.read_only, libc::MS_RDONLY),
            (!self.dev, libc::MS_NODEV),
            (!self.suid, libc::MS_NOSUID),
            (self.noexec, libc::MS_NOEXEC),
            (self.atime.nodir, libc::MS_NODIRATIME),
        ] {
            if on {
                f |= flag;
            }
        }
        f | match self.atime.mode {
            AtimeMode::Relatime => libc::MS_RELATIME,
            AtimeMode::Strict => libc::MS_STRICTATIME,
            AtimeMode::Never => libc::MS_NOATIME,
        }
    }
}

/// A mounted filesystem, not yet serving.
pub struct Mounted {
    session: Session<KvFuse>,
    /// Set when kvfs mounted it itself (as root), so it unmounts it itself too.
    own: Option<PathBuf>,
}

/// Unmounts a [`Mounted`] from any thread; its `run` then returns.
pub enum Unmounter {
    Fuser(SessionUnmounter),
    Own(PathBuf),
}

impl Unmounter {
    pub fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            Unmounter::Fuser(u) => u.unmount(),
            Unmounter::Own(path) => {
                let c = c_path(path)?;
                // SAFETY: a valid C string.
                check(unsafe { libc::umount2(c.as_ptr(), 0) })
            }
        }
    }
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

/// A system call's result: 0, or the errno.
fn check(r: libc::c_int) -> std::io::Result<()> {
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Mount `/dev/fuse` on `mountpoint` as type `fuse.kvfs` with source `store_dir` (root only):
/// fuser's own mount names the type plain `fuse` and drops the subtype, and then
/// `mount -o remount` runs `mount.fuse`, which does not know kvfs. Returns the device.
fn kernel_mount(
    store_dir: &Path,
    mountpoint: &Path,
    o: &SessionOptions,
    allow_other: bool,
) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: a valid C string; the descriptor is owned from here on.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is not owned elsewhere.
    let dev = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut data = format!("fd={fd},rootmode={mode:o},user_id=0,group_id=0,default_permissions");
    if allow_other {
        data.push_str(",allow_other");
    }
    let (src, dst) = (c_path(store_dir)?, c_path(mountpoint)?);
    let data = CString::new(data)?;
    // SAFETY: valid C strings that outlive the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"fuse.kvfs".as_ptr(),
            o.flags(),
            data.as_ptr().cast(),
        )
    })?;
    Ok(dev)
}

/// Change the kernel's flags of the kvfs mount on `mountpoint` (mount(2) with `MS_REMOUNT`):
/// read-only or writable, the atime options, dev/suid/exec. The kernel refuses going
/// read-only with EBUSY while a file is open for writing, and anyone but root with EPERM.
pub fn remount(mountpoint: &Path, o: &SessionOptions) -> std::io::Result<()> {
    let dst = c_path(mountpoint)?;
    // SAFETY: a valid C string; the other pointers may be null for a remount.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | o.flags(),
            std::ptr::null(),
        )
    })
}

impl Mounted {
    /// Mount `fs` (whose store lives in `store_dir`) on `mountpoint`, a canonical path.
    pub fn new(
        fs: Arc<Fs>,
        store_dir: &Path,
        mountpoint: &Path,
        o: &SessionOptions,
    ) -> std::io::Result<Mounted> {
        let mut config = Config::default();
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        config.mount_options = vec![
            MountOption::FSName(store_dir.display().to_string()),
            MountOption::Subtype("kvfs".into()),
            MountOption::DefaultPermissions,
            if o.dev && root {
                MountOption::Dev
            } else {
                MountOption::NoDev
            },
            if o.suid && root {
                MountOption::Suid
            } else {
                MountOption::NoSuid
            },
        ];
        if o.read_only {
            config.mount_options.push(MountOption::RO);
        }
        if o.noexec {
            config.mount_options.push(MountOption::NoExec);
        }
        if o.atime.mode == AtimeMode::Never {
            config.mount_options.push(MountOption::NoAtime);
        }
        config.acl = match o.acl.as_deref() {
            Some("allow_root") => SessionACL::RootAndOwner,
            Some(_) => SessionACL::All,
            None if root => SessionACL::All,
            None => SessionACL::Owner,
        };
        config.n_threads = Some(o.threads.max(1));
        let fs = KvFuse::new(fs, store_dir);
        if !root {
            // fusermount3 mounts it, as type `fuse.kvfs`.
            let session = Session::new(fs, mountpoint, &config)?;
            return Ok(Mounted { session, own: None });
        }
        let dev = kernel_mount(store_dir, mountpoint, o, config.acl != SessionACL::Owner)?;
        let acl = config.acl;
        match Session::from_fd(fs, dev, acl, config) {
            Ok(session) => Ok(Mounted {
                session,
                own: Some(mountpoint.to_path_buf()),
            }),
            Err(e) => {
                let _ = Unmounter::Own(mountpoint.to_path_buf()).unmount();
                Err(e)
            }
        }
    }

    pub fn unmounter(&mut self) -> Unmounter {
        match &self.own {
            Some(path) => Unmounter::Own(path.clone()),
            None => Unmounter::Fuser(self.session.unmount_callable()),
        }
    }

    /// Serve requests until the filesystem is unmounted.
    pub fn run(self) -> std::io::Result<()> {
        match self.session.run() {
            // A lazy (`umount -l`) or forced unmount ends the connection with an abort once
            // the last user lets go: an ordinary end.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r,
        }
    }
}
