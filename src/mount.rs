//! Running a mount: open the store, recover what a previous mount left, serve FUSE requests
//! on several threads, flush on a timer, and end cleanly (everything flushed and synced) on
//! unmount, SIGTERM, SIGINT or SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::fs::{Fs, FsOptions};
use crate::fuse::KvFuse;
use crate::store;

/// `-o` options of `kvfs mount`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOpts {
    pub read_only: bool,
    pub noatime: bool,
    /// `allow_other` (default when mounting as root) or `allow_root`.
    pub acl: Option<String>,
    pub threads: Option<usize>,
}

impl MountOpts {
    /// Parse a comma-separated `-o` list. Options `mount(8)` passes along (rw, dev, suid, exec,
    /// auto, nofail, _netdev, defaults) are accepted and ignored.
    pub fn parse(s: &str) -> Result<MountOpts, String> {
        let mut o = MountOpts::default();
        for opt in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            match opt {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "noatime" => o.noatime = true,
                "atime" | "relatime" => o.noatime = false,
                "allow_other" | "allow_root" => o.acl = Some(opt.to_string()),
                "default_permissions"
                | "defaults"
                | "dev"
                | "suid"
                | "exec"
                | "auto"
                | "noauto"
                | "nofail"
                | "_netdev"
                | "user"
                | "nouser"
                | "nodev"
                | "nosuid"
                | "noexec" => {}
                _ => match opt.split_once('=') {
                    Some(("threads", n)) => {
                        o.threads = Some(
                            n.parse()
                                .ok()
                                .filter(|&n| (1..=64).contains(&n))
                                .ok_or_else(|| format!("bad threads value {n:?} (1..=64)"))?,
                        )
                    }
                    _ => return Err(format!("unknown mount option {opt:?}")),
                },
            }
        }
        Ok(o)
    }
}

/// Block the termination signals in the calling thread; threads spawned later inherit the
/// mask, so only the signal thread ever receives them. Call first thing in `main`.
pub fn block_signals() {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_signal() -> i32 {
    // SAFETY: as above; sigwait fills `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

/// Mount `store_dir` on `mountpoint` and serve until unmounted. `ready` is called once the
/// kernel has the mount.
pub fn run(
    store_dir: &Path,
    mountpoint: &Path,
    opts: &MountOpts,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    if !store_dir.is_dir() {
        return Err(store::StoreError::Missing(store_dir.to_path_buf()).into());
    }
    let store_dir: PathBuf = std::fs::canonicalize(store_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", store_dir.display()))?;
    if !mountpoint.is_dir() {
        anyhow::bail!("{}: mount point is not a directory", mountpoint.display());
    }
    let (kv, format) = store::open(&store_dir)?;
    let fs = Arc::new(Fs::new(
        kv,
        format,
        FsOptions {
            read_only: opts.read_only,
            noatime: opts.noatime,
            ..Default::default()
        },
    ));
    if !opts.read_only {
        let (inodes, blocks) = fs.recover()?;
        if inodes + blocks > 0 {
            tracing::info!(inodes, blocks, "freed what the previous mount left behind");
        }
    }

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(store_dir.display().to_string()),
        MountOption::Subtype("kvfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if opts.read_only {
        config.mount_options.push(MountOption::RO);
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    config.acl = match opts.acl.as_deref() {
        Some("allow_root") => SessionACL::RootAndOwner,
        Some(_) => SessionACL::All,
        None if root => SessionACL::All,
        None => SessionACL::Owner,
    };
    config.n_threads = Some(opts.threads.unwrap_or(4));

    let mut session = Session::new(KvFuse::new(fs.clone(), &store_dir), mountpoint, &config)
        .map_err(|e| anyhow::anyhow!("{}: cannot mount: {e}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("kvfs-signals".into())
        .spawn(move || {
            let sig = wait_for_signal();
            tracing::info!(sig, "signal received; unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!(error = %e, "unmount failed");
            }
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let fs = fs.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kvfs-flusher".into())
            .spawn(move || maintenance(&fs, &stop))?
    };
    tracing::info!(store = %store_dir.display(), mountpoint = %mountpoint.display(), "mounted");
    ready();
    let served = session.run();
    stop.store(true, Ordering::Relaxed);
    let _ = flusher.join();
    fs.sync_all()?;
    if !opts.read_only {
        fs.collect_garbage()?;
        fs.store().flush_all()?;
    }
    tracing::info!("unmounted cleanly");
    served.map_err(|e| anyhow::anyhow!("FUSE session ended with an error: {e}"))
}

/// The timer of the write-back buffer and the block sweeper.
fn maintenance(fs: &Fs, stop: &AtomicBool) {
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        tick += 1;
        if tick % 5 == 0 {
            if let Err(e) = fs.flush_older(Duration::from_secs(2)) {
                tracing::error!(error = %e, "timed flush failed");
            }
        }
        if tick % 25 == 0 && !fs.read_only() {
            if let Err(e) = fs.collect_garbage() {
                tracing::error!(error = %e, "block sweep failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse() {
        let o = MountOpts::parse("ro,noatime,allow_other,threads=8,defaults").unwrap();
        assert!(o.read_only && o.noatime);
        assert_eq!(o.acl.as_deref(), Some("allow_other"));
        assert_eq!(o.threads, Some(8));
        assert!(MountOpts::parse("bogus").is_err());
        assert!(MountOpts::parse("threads=0").is_err());
    }
}
