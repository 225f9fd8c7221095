//! Running a mount: parse its options, open the store, register in the process table and
//! sweep what dead mounts left, serve FUSE requests ([`crate::fuse::session`]), flush on a
//! timer, beat the heartbeat, sweep in the background, answer the tools
//! ([`crate::control`]), and end cleanly (everything flushed and synced, open counts and locks
//! dropped, process entry removed) on unmount, SIGTERM, SIGINT or SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::control;
use crate::fs::{Atime, AtimeMode, Fs, FsOptions};
use crate::fuse::session::{Mounted, SessionOptions};
use crate::gc::{self, SweepOptions};
use crate::keyspace::records::FormatRecord;
use crate::store;
use crate::util::Timestamp;

/// `-o` options of `kvfs mount`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOpts {
    pub read_only: bool,
    /// `relatime` (default), `strictatime`, `noatime`; `nodiratime`.
    pub atime: Atime,
    /// `dev` / `suid`: device nodes and set-id bits work (root only; the default is off).
    pub dev: bool,
    pub suid: bool,
    /// `allow_other` (default when mounting as root) or `allow_root`.
    pub acl: Option<String>,
    /// `noexec`: programs on the mount cannot be executed.
    pub noexec: bool,
    /// `remount`: change the options of the mount already there (mount(8) passes it to the
    /// helper; see [`crate::control`]).
    pub remount: bool,
    pub threads: Option<usize>,
    /// `max_dirty=SIZE`: how much written data the kernel may hold in its page cache for this
    /// mount before writers wait (`0`: leave the kernel's default). See [`DEFAULT_MAX_DIRTY`].
    pub max_dirty: Option<u64>,
    /// `cache_size=`, `min_copies=`, `fetch_timeout=`: tiering settings for this mount,
    /// over the store's own (`kvfs config`).
    pub tier: Vec<(String, String)>,
    /// `listen=ADDR`: serve this store's satellites (mutual TLS) on ADDR.
    pub listen: Option<String>,
    /// `--at MOMENT` (or `at=`): mount the state at that moment, read-only (history).
    pub at: Option<String>,
}

/// The kernel lets a FUSE mount hold only 1% of the dirty-page budget (about 47 MiB on this
/// 24 GiB machine) because an untrusted FUSE server could pin it. A random writer then waits
/// on every page the daemon has not yet taken: random 4 KiB writes over a 256 MiB file ran
/// at 10k IOPS with the default and 23-29k with 0.5-4.6 GiB allowed (fio, `tools/bench`).
/// The kernel still caps it at its global dirty limit. The daemon is trusted (root), so it
/// raises its own mount's share.
pub const DEFAULT_MAX_DIRTY: u64 = 1 << 30;

impl MountOpts {
    /// The kernel's flags for these options.
    pub fn session(&self) -> SessionOptions {
        SessionOptions {
            read_only: self.read_only,
            acl: self.acl.clone(),
            threads: self.threads.unwrap_or(4),
            dev: self.dev,
            suid: self.suid,
            noexec: self.noexec,
            atime: self.atime,
        }
    }

    /// Parse a comma-separated `-o` list. Options `mount(8)` passes along (rw, dev, suid, exec,
    /// auto, nofail, _netdev, defaults) are accepted and ignored.
    pub fn parse(s: &str) -> Result<MountOpts, String> {
        let mut o = MountOpts::default();
        for opt in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            match opt {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "noatime" => o.atime.mode = AtimeMode::Never,
                "atime" | "relatime" => o.atime.mode = AtimeMode::Relatime,
                "strictatime" => o.atime.mode = AtimeMode::Strict,
                "nodiratime" => o.atime.nodir = true,
                "diratime" => o.atime.nodir = false,
                "noexec" => o.noexec = true,
                "exec" => o.noexec = false,
                "remount" => o.remount = true,
                "dev" => o.dev = true,
                "nodev" => o.dev = false,
                "suid" => o.suid = true,
                "nosuid" => o.suid = false,
                "allow_other" | "allow_root" => o.acl = Some(opt.to_string()),
                "default_permissions"
                | "defaults"
                | "auto"
                | "noauto"
                | "nofail"
                | "_netdev"
                | "user"
                | "nouser" => {}
                // The kernel's own FUSE options, which mount(8) passes back on a remount.
                _ if [
                    "user_id=",
                    "group_id=",
                    "rootmode=",
                    "fd=",
                    "blksize=",
                    "max_read=",
                ]
                .iter()
                .any(|p| opt.starts_with(p)) => {}
                _ => match opt.split_once('=') {
                    Some(("max_dirty", n)) => {
                        o.max_dirty = Some(crate::util::parse_size(n).map_err(|e| {
                            format!("bad max_dirty value: {e} (a size such as 512M, or 0)")
                        })?)
                    }
                    Some((k @ ("cache_size" | "min_copies" | "fetch_timeout"), v)) => {
                        crate::tier::config::check(k, v)?;
                        o.tier.push((k.to_string(), v.to_string()));
                    }
                    Some(("listen", a)) if !a.is_empty() => o.listen = Some(a.to_string()),
                    Some(("at", a)) if !a.is_empty() => o.at = Some(a.to_string()),
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

/// Change the kernel's flags of the mount on `mountpoint` to `o` (the mount's own process
/// does this for a writable mount, see [`crate::control`]).
pub fn remount_kernel(mountpoint: &Path, o: &MountOpts) -> std::io::Result<()> {
    crate::fuse::session::remount(mountpoint, &o.session())
}

/// Cap glibc's malloc arenas. By default every thread that allocates may get its own arena
/// (up to 8 per core), and block-sized buffers freed in one arena are not reused by another:
/// a 1 GiB sequential write grew the daemon to 520 MiB with the default and to 280 MiB with
/// one arena, and no slower (two arenas: 390 MiB). Call first, before threads start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
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

pub(crate) fn wait_for_signal() -> i32 {
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

/// Start a named thread of the mount.
pub(crate) fn spawn(
    name: &str,
    f: Box<dyn FnOnce() + Send>,
) -> Result<std::thread::JoinHandle<()>, MountError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(MountError::Thread)
}

/// The thread that unmounts `session` at SIGTERM, SIGINT or SIGHUP.
pub(crate) fn unmount_on_signal(session: &mut Mounted) -> Result<(), MountError> {
    let mut unmounter = session.unmounter();
    spawn(
        "kvfs-signals",
        Box::new(move || {
            let sig = wait_for_signal();
            tracing::info!(sig, "signal received; unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!(error = %e, "unmount failed");
            }
        }),
    )?;
    Ok(())
}

/// The tiering settings a mount of `kv` runs with: the store's, with the mount's own
/// (`-o cache_size=` ...) over them.
pub(crate) fn tier_settings(
    kv: &crate::kv::KvStore,
    opts: &MountOpts,
) -> Result<crate::tier::config::TierSettings, MountError> {
    crate::tier::config::TierSettings::resolve(
        &crate::tier::config::read(kv)?,
        &opts.tier.iter().cloned().collect(),
    )
    .map_err(MountError::Settings)
}

/// Why a mount could not start or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{path}: {source}")]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: mount point is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path}: cannot mount: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FUSE session ended with an error: {0}")]
    Session(std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
    #[error("settings: {0}")]
    Settings(String),
    #[error("cannot apply the writes an earlier mount made durable: {0} (the store is as it was; `kvfs audit` shows its pending-write keys)")]
    Pending(String),
}

/// Mount `store_dir` on `mountpoint` and serve until unmounted. `ready` is called once the
/// kernel has the mount.
pub fn run(
    store_dir: &Path,
    mountpoint: &Path,
    opts: &MountOpts,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    if !store_dir.is_dir() {
        return Err(store::StoreError::Missing(store_dir.to_path_buf()).into());
    }
    let store_dir: PathBuf =
        std::fs::canonicalize(store_dir).map_err(|source| MountError::Path {
            path: store_dir.to_path_buf(),
            source,
        })?;
    if !mountpoint.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.to_path_buf()));
    }
    // Resolved now: once mounted, a lookup of the path would ask this very process.
    let mnt = std::fs::canonicalize(mountpoint).map_err(|source| MountError::Path {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    if let Some(at) = &opts.at {
        return crate::history::mount::run(&store_dir, &mnt, opts, at, ready);
    }
    let (kv, format, role) = open_store(&store_dir)?;
    let read_only = opts.read_only || role != Role::Primary;
    if read_only && !opts.read_only {
        let kind = if role == Role::Satellite {
            "satellite"
        } else {
            "replica"
        };
        tracing::info!("{} is a {kind}: mounted read-only", store_dir.display());
    }
    let satellite = role == Role::Satellite;
    // Bound now: a taken port is an error of the mount command, not a line in its log.
    let listener = match &opts.listen {
        Some(_) if role != Role::Primary || read_only => {
            return Err(MountError::Settings(
                "listen=: only a read-write primary serves satellites".into(),
            ))
        }
        Some(addr) => Some(listen_on(addr, &store_dir)?),
        None => None,
    };
    if !read_only {
        // Before the first operation: every commit from now on records what it changed,
        // and its past if history is kept.
        crate::replica::track_if_replicated(&kv)?;
        crate::history::install(&kv)?;
    }
    let mut opts = opts.clone();
    opts.read_only = read_only;
    let opts = &opts;
    let fs = Arc::new(Fs::new(
        kv,
        format.clone(),
        FsOptions {
            // A satellite's pull changes its store under the mount as a replica's server does.
            follow: role != Role::Primary,
            read_only: opts.read_only,
            atime: opts.atime,
            space_path: Some(store_dir.clone()),
            ..Default::default()
        },
    ));
    let started = Timestamp::now();
    if !opts.read_only {
        gc::register(fs.store(), fs.mount_id())?;
        let report = gc::sweep(fs.store(), &SweepOptions::by_mount(fs.mount_id(), true))?;
        if !report.is_empty() {
            tracing::info!(
                dead_mounts = report.dead_mounts,
                open_counts = report.open_counts,
                locks = report.locks,
                inodes = report.inodes_freed,
                blocks = report.blocks_freed,
                written_ahead = report.written_ahead,
                "swept what earlier mounts left behind"
            );
        }
    }
    let mut fetcher = None;
    let mut tier_worker = None;
    // KVFS_NO_TIERING=1: no last-use tracking, no fetching (tools/bench-tier measures what
    // tracking costs resident reads against this).
    let tiering = std::env::var_os("KVFS_NO_TIERING").is_none();
    if (!opts.read_only || satellite) && tiering {
        let settings = tier_settings(fs.store(), opts)?;
        let tier = Arc::new(crate::tier::Tier::new(settings, opts.tier.clone()));
        let f = Arc::new(crate::tier::fetch::Fetcher::new(
            fs.store_arc(),
            &format,
            store_dir.clone(),
            settings.fetch_timeout,
            tier.clone(),
        ));
        fs.set_tiering(f.clone(), Some(tier.clone()));
        if let Some(size) = settings.cache_size {
            tracing::info!(
                cache_size = size,
                min_copies = settings.min_copies,
                "tiering: resident blocks kept under the cache size"
            );
        }
        fetcher = Some(f.clone());
        tier_worker = Some((tier, f));
    } else if tiering {
        // A read-only mount of a store with evicted blocks fetches them too, without storing
        // them (the store is open read-only): a primary mounted `ro`, or a satellite followed
        // while `kvfs serve` keeps it pulling.
        let timeout = tier_settings(fs.store(), opts)?.fetch_timeout;
        let f = Arc::new(crate::tier::fetch::Fetcher::checking(
            fs.store_arc(),
            &format,
            store_dir.clone(),
            timeout,
        ));
        fs.set_tiering(f.clone(), None);
        fetcher = Some(f);
    }
    if fs.alone() {
        // Writes an earlier mount made durable (fsync) without committing their blocks;
        // after tiering is set up, as a block they apply to may be evicted. This mount's
        // fsyncs use the fsync log from here on.
        fs.replay_with_log(&store_dir)
            .map_err(|e| MountError::Pending(e.to_string()))?;
    } else if !store::in_use(&store_dir) {
        // No read-write mount is running: records left are a crashed mount's, in the keyspace
        // (`J`) or in the fsync log (those not in their blocks yet).
        let logged = fs.unapplied_log_records(&store_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the fsync log cannot be read");
            0
        });
        let keyed = fs.pending_records()?;
        if logged + keyed > 0 {
            tracing::warn!(
                keyed,
                logged,
                "this store holds writes an fsync made durable that a crashed mount did not \
                 commit; a read-only mount shows the files without them (a read-write mount \
                 applies them)"
            );
        }
    }

    let mut session =
        Mounted::new(fs.clone(), &store_dir, &mnt, &opts.session()).map_err(|source| {
            MountError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            }
        })?;
    if !opts.read_only {
        let max = opts.max_dirty.unwrap_or(DEFAULT_MAX_DIRTY);
        if max > 0 {
            raise_dirty_limit(&mnt, max);
        }
    }
    unmount_on_signal(&mut session)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    {
        let (fs, stop) = (fs.clone(), stop.clone());
        workers.push(spawn(
            "kvfs-maint",
            Box::new(move || crate::maintenance::run(&fs, &stop, started, satellite)),
        )?);
    }
    if let Some((tier, f)) = tier_worker {
        let (fs, stop) = (fs.clone(), stop.clone());
        workers.push(spawn(
            "kvfs-tier",
            Box::new(move || crate::tier::run(fs.store(), &tier, &f, &stop)),
        )?);
    }
    if !opts.read_only {
        let (fs, stop, dir, format) = (fs.clone(), stop.clone(), store_dir.clone(), format.clone());
        workers.push(spawn(
            "kvfs-replicate",
            Box::new(move || {
                let fetch = fs.tiering_hook();
                crate::replica::thread::run(fs.store(), &format, &dir, &stop, fetch)
            }),
        )?);
    }
    if role == Role::Follower {
        let (fs, stop) = (fs.clone(), stop.clone());
        workers.push(spawn("kvfs-follow", Box::new(move || follow(&fs, &stop)))?);
    }
    if satellite {
        let (fs, stop, dir, format) = (fs.clone(), stop.clone(), store_dir.clone(), format.clone());
        workers.push(spawn(
            "kvfs-pull",
            Box::new(move || crate::replica::satellite::run(fs.store_arc(), &format, &dir, &stop)),
        )?);
    }
    if let Some(l) = listener {
        let (fs, stop, dir, format) = (fs.clone(), stop.clone(), store_dir.clone(), format.clone());
        workers.push(spawn(
            "kvfs-listen",
            Box::new(move || crate::replica::listen::run(fs.store(), &format, &dir, l, &stop)),
        )?);
    }
    let sock = store::control_socket(&store_dir);
    if !opts.read_only || satellite {
        match control::bind(&sock) {
            Ok(listener) => {
                let (fs, stop, mnt) = (fs.clone(), stop.clone(), mnt.clone());
                workers.push(spawn(
                    "kvfs-control",
                    Box::new(move || control::serve(&fs, &mnt, listener, &stop)),
                )?);
            }
            Err(e) => tracing::warn!(
                socket = %sock.display(),
                error = %e,
                "no control socket; `kvfs gc` cannot reach this mount"
            ),
        }
    }
    tracing::info!(store = %store_dir.display(), mountpoint = %mountpoint.display(), "mounted");
    ready();
    let served = session.run();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    drop(fetcher);
    fs.sync_all()?;
    if satellite {
        let _ = std::fs::remove_file(&sock);
        fs.store().sync()?;
        fs.store().checkpoint()?;
    }
    if !opts.read_only {
        let _ = std::fs::remove_file(&sock);
        fs.release_all()?;
        // The last changes become a group now, shipped at the next mount or `replica sync`.
        if let Err(e) = crate::replica::log::round(fs.store()) {
            tracing::error!(error = %e, "logging the last changes for the replicas failed");
        }
        gc::sweep(fs.store(), &SweepOptions::by_mount(fs.mount_id(), true))?;
        if let Err(e) = crate::history::index(fs.store()) {
            tracing::error!(error = %e, "indexing history failed");
        }
        gc::unregister(fs.store(), fs.mount_id())?;
        fs.store().sync()?;
        fs.store().checkpoint()?;
    }
    tracing::info!("unmounted cleanly");
    served.map_err(MountError::Session)
}

/// What a mount found in the store directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A filesystem of its own, mountable read-write.
    Primary,
    /// A replica: followed read-only (`kvfs serve` may apply to it meanwhile).
    Follower,
    /// A satellite: held by the mount, which pulls from its upstream and fetches blocks into
    /// it; read-only to its users.
    Satellite,
}

/// Bind the satellites' listener on `addr` and say where and with which certificate.
fn listen_on(addr: &str, store_dir: &Path) -> Result<std::net::TcpListener, MountError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| MountError::Path {
        path: PathBuf::from(addr),
        source,
    })?;
    let id = crate::replica::tls::identity(store_dir)
        .map_err(|e| MountError::Settings(format!("listen=: {e}")))?;
    let at = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.into());
    tracing::info!(listening = %at, fingerprint = %id.fingerprint(), "serving satellites");
    Ok(l)
}

fn open_store(dir: &Path) -> Result<(crate::kv::KvStore, FormatRecord, Role), MountError> {
    let is_replica = |kv: &crate::kv::KvStore| {
        crate::replica::apply::is_follower_store(kv)
            .map_err(|e| crate::kv::KvError::Other(e.to_string()))
    };
    // A replica is always followed, never held: `kvfs serve` must be able to open it to apply
    // what arrives while it is mounted. A primary (the usual case) is opened once.
    match store::open(dir) {
        Ok((kv, f)) if !is_replica(&kv)? => return Ok((kv, f, Role::Primary)),
        Ok((kv, f)) if crate::replica::is_satellite(&kv)? => return Ok((kv, f, Role::Satellite)),
        Ok(_) => {}
        Err(store::StoreError::InUse(p)) => {
            let (peek, _) = store::open_read_only(dir)?;
            if !is_replica(&peek)? {
                return Err(store::StoreError::InUse(p).into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    let (kv, f) = store::open_follower(dir)?;
    Ok((kv, f, Role::Follower))
}

/// Catch up with the replica's server twice a second, so that what it applied shows within
/// a second (the kernel's attribute and entry caches expire after one more).
pub(crate) fn follow(fs: &Fs, stop: &AtomicBool) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        match fs.store().catch_up() {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                tracing::error!(error = %e, "catching up with the replica's server failed");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Let the kernel hold up to `bytes` of dirty pages for the FUSE mount on `mountpoint` (a
/// canonical path)
/// (`/sys/class/bdi/MAJ:MIN/max_bytes`, Linux 6.2+). Best effort: without root or on an older
/// kernel the mount keeps the kernel's default and says so in the log.
fn raise_dirty_limit(mountpoint: &Path, bytes: u64) {
    let Some(dev) = crate::mountinfo::mount_device(mountpoint) else {
        tracing::info!(mountpoint = %mountpoint.display(), "mount not found in mountinfo; dirty limit left as is");
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/max_bytes");
    match std::fs::write(&knob, bytes.to_string()) {
        Ok(()) => tracing::debug!(knob, bytes, "dirty page limit raised"),
        Err(e) => tracing::info!(knob, error = %e, "dirty page limit left at the kernel default"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse() {
        let o = MountOpts::parse("ro,noatime,allow_other,threads=8,defaults").unwrap();
        assert!(o.read_only && o.atime.mode == AtimeMode::Never && !o.remount);
        assert_eq!(o.acl.as_deref(), Some("allow_other"));
        assert_eq!(o.threads, Some(8));
        assert!(MountOpts::parse("bogus").is_err());
        assert!(MountOpts::parse("threads=0").is_err());
        assert_eq!(
            MountOpts::parse("max_dirty=512M").unwrap().max_dirty,
            Some(512 << 20)
        );
        assert_eq!(MountOpts::parse("max_dirty=0").unwrap().max_dirty, Some(0));
        let o = MountOpts::parse("dev,suid,strictatime,nodiratime,noexec,remount").unwrap();
        assert!(o.dev && o.suid && o.noexec && o.remount);
        assert_eq!(
            o.atime,
            Atime {
                mode: AtimeMode::Strict,
                nodir: true
            }
        );
        let o = MountOpts::parse("dev,nodev,suid,nosuid,strictatime,relatime,noexec,exec").unwrap();
        assert!(!o.dev && !o.suid && !o.noexec && o.atime.mode == AtimeMode::Relatime);
        assert!(MountOpts::parse("max_dirty=lots").is_err());
    }
}
