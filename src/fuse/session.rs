//! The fuser session of a mount: mount options for the kernel, the session threads, and the
//! handle that unmounts it from another thread (the signal thread). Only `fuse/` knows fuser.

use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use super::KvFuse;
use crate::fs::Fs;

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
}

/// A mounted filesystem, not yet serving.
pub struct Mounted {
    session: Session<KvFuse>,
}

/// Unmounts a [`Mounted`] from any thread; its `run` then returns.
pub struct Unmounter(SessionUnmounter);

impl Unmounter {
    pub fn unmount(&mut self) -> std::io::Result<()> {
        self.0.unmount()
    }
}

impl Mounted {
    /// Mount `fs` (whose store lives in `store_dir`) on `mountpoint`.
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
        config.acl = match o.acl.as_deref() {
            Some("allow_root") => SessionACL::RootAndOwner,
            Some(_) => SessionACL::All,
            None if root => SessionACL::All,
            None => SessionACL::Owner,
        };
        config.n_threads = Some(o.threads.max(1));
        let session = Session::new(KvFuse::new(fs, store_dir), mountpoint, &config)?;
        Ok(Mounted { session })
    }

    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.session.unmount_callable())
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
